//! Ended tasks: replaced as their restart policy says (delay, attempts in
//! a window), kept as history; task status only moves forward.

use super::*;

/// The node's report for the running task of `service` in `slot`.
fn report(w: &mut World, service: &str, slot: u32, observed: TaskState, code: Option<i32>) {
    let id = w
        .running(service)
        .find(|t| t.slot == slot)
        .unwrap_or_else(|| panic!("no running task in slot {slot}"))
        .id
        .clone();
    for step in [TaskState::Running, observed] {
        w.run(Command::SetTaskStatus {
            id: id.clone(),
            observed: step,
            netns: None,
            exit_code: (step == observed).then_some(code).flatten(),
            error: None,
            at_ms: w.now,
        });
    }
}

#[test]
fn a_restart_waits_for_its_delay_and_says_when_to_look_again() {
    let mut w = three();
    // Swarm's default delay: 5 s.
    w.service(serde_json::json!({
        "name": "job", "mode": {"replicated": {"replicas": 1}},
        "task": {"command": ["/bin/job"]}
    }));
    w.settle();
    report(&mut w, "job", 1, TaskState::Failed, Some(2));
    let ended = w.now;
    let plans = w.settle();
    assert_eq!(
        w.slots("job"),
        Vec::<u32>::new(),
        "restarted before its delay"
    );
    assert_eq!(plans.last().unwrap().wake_at_ms, Some(ended + 5000));
    w.now = ended + 4999;
    w.settle();
    assert_eq!(w.slots("job"), Vec::<u32>::new());
    w.now = ended + 5000;
    let plans = w.settle();
    assert_eq!(w.slots("job"), vec![1]);
    assert_eq!(plans[0].wake_at_ms, None);
    // A task stopped on purpose is replaced at once, delay or not.
    let host = {
        let t = w.running("job").next().unwrap();
        w.state.nodes[&t.node].hostname.clone()
    };
    w.set_node(&host, |s| s.availability = Availability::Drain);
    w.settle();
    assert_eq!(w.slots("job"), vec![1]);
}

#[test]
fn an_ended_task_is_replaced_as_its_restart_policy_says_and_kept_as_history() {
    // any: a clean exit is replaced too; history is kept, 5 per slot.
    let mut w = three();
    w.service(with_restart("any", 0));
    w.settle();
    for _ in 0..7 {
        report(&mut w, "job", 1, TaskState::Complete, Some(0));
        let plans = w.settle();
        assert_eq!(plans.len(), 2, "one plan does it all: {plans:?}");
        assert_eq!(w.slots("job"), vec![1]);
    }
    let all: Vec<&Task> = w.state.tasks.values().collect();
    assert_eq!(all.len(), TASK_HISTORY, "history is pruned to the newest");
    assert!(all.iter().all(|t| t.slot == 1));
    let newest = all.iter().max_by_key(|t| t.seq).unwrap();
    assert!(newest.live() && newest.attempt == 7, "{newest:?}");
    // The ended ones gave their addresses back and are no endpoints.
    assert!(
        all.iter()
            .filter(|t| t.ended())
            .all(|t| t.attachments.is_empty())
    );
    drop(all);
    // A manager that loads this state from a snapshot (indexes rebuilt)
    // counts the next restart the same way.
    let mut copy: State = serde_json::from_str(&serde_json::to_string(&w.state).unwrap()).unwrap();
    copy.reindex().unwrap();
    let mut twin = World {
        state: copy,
        ids: w.ids,
        now: w.now,
    };
    for world in [&mut w, &mut twin] {
        report(world, "job", 1, TaskState::Failed, Some(1));
        world.settle();
    }
    assert_eq!(twin.state, w.state);
    let newest = w.running("job").next().unwrap();
    assert_eq!(newest.attempt, 8);

    // on-failure with 2 attempts: a crash is retried twice, then the
    // slot stays empty; an exit 0 is not retried at all.
    let mut w = three();
    w.service(with_restart("on-failure", 2));
    w.settle();
    for round in 0..3 {
        report(&mut w, "job", 1, TaskState::Failed, Some(137));
        w.settle();
        let want: Vec<u32> = if round < 2 { vec![1] } else { vec![] };
        assert_eq!(w.slots("job"), want, "after failure {}", round + 1);
    }
    let mut w = three();
    w.service(with_restart("on-failure", 0));
    w.settle();
    report(&mut w, "job", 1, TaskState::Complete, Some(0));
    w.settle();
    assert_eq!(w.slots("job"), Vec::<u32>::new());

    // none: never replaced; but a task stopped by a drain is.
    let mut w = three();
    w.service(with_restart("none", 0));
    w.settle();
    let host = |w: &World| {
        let t = w.running("job").next().unwrap();
        w.state.nodes[&t.node].hostname.clone()
    };
    let h = host(&w);
    w.set_node(&h, |s| s.availability = Availability::Drain);
    w.settle();
    assert_ne!(host(&w), h, "a drained task is moved whatever the policy");
    report(&mut w, "job", 1, TaskState::Failed, Some(1));
    w.settle();
    assert_eq!(w.slots("job"), Vec::<u32>::new());
}

#[test]
fn task_status_only_moves_forward_and_an_ended_task_frees_its_address() {
    let mut w = three();
    w.service(serde_json::json!({
        "name": "web", "mode": {"replicated": {"replicas": 1}},
        "task": {"command": ["/bin/web"]},
        "endpoint": {"ports": [{"protocol": "tcp", "target": 80, "published": 8080}]}
    }));
    w.settle();
    let id = w.running("web").next().unwrap().id.clone();
    let addr = w.state.tasks[&id].attachments[0].addr;
    let set = |w: &mut World, observed| {
        w.state.apply(&Command::SetTaskStatus {
            id: id.clone(),
            observed,
            netns: Some("/run/netns/x".into()),
            exit_code: None,
            error: None,
            at_ms: 5,
        })
    };
    set(&mut w, TaskState::Running).unwrap();
    let err = set(&mut w, TaskState::Starting).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("task {id} is Running; a status cannot go back to Starting")
    );
    set(&mut w, TaskState::Failed).unwrap();
    let err = set(&mut w, TaskState::Running).unwrap_err();
    assert!(err.to_string().contains("already ended (Failed)"), "{err}");
    assert_eq!(w.state.tasks[&id].netns.as_deref(), Some("/run/netns/x"));
    w.settle();
    // The replacement may take the freed address: it is free.
    let new = w.running("web").next().unwrap();
    assert_eq!(new.attachments[0].addr, addr);
}

#[test]
fn max_attempts_within_a_window_reopen_when_the_window_passes() {
    let mut w = three();
    w.service(serde_json::json!({
        "name": "job", "mode": {"replicated": {"replicas": 1}},
        "task": {"command": ["/bin/job"],
                 "restart": {"condition": "any", "max_attempts": 2,
                             "delay_ms": 0, "window_ms": 10000}}
    }));
    w.settle();
    let first_end = w.now;
    // The first task and two restarts fail, one second apart.
    for _ in 0..3 {
        assert_eq!(w.slots("job"), vec![1]);
        report(&mut w, "job", 1, TaskState::Failed, Some(1));
        w.settle();
        w.now += 1000;
    }
    let plans = w.settle();
    assert_eq!(
        w.slots("job"),
        Vec::<u32>::new(),
        "3 failures in 10 s with max 2"
    );
    // The slot reopens when the first failure leaves the window.
    assert_eq!(plans.last().unwrap().wake_at_ms, Some(first_end + 10_001));
    w.now = first_end + 10_001;
    w.settle();
    assert_eq!(w.slots("job"), vec![1], "the window passed");
}
