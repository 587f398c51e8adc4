//! Rolling updates: one task per monitor period, rollback or pause on
//! failure, start-first keeping the old task until the new one runs.

use super::*;

/// The node side, simulated: every task told to run that has not
/// started reports running now; every task told to stop that still
/// runs reports shut down (the executor stopped it).
fn nodes_act(w: &mut World) {
    let todo: Vec<(String, TaskState)> = w
        .state
        .tasks
        .values()
        .filter(|t| !t.ended())
        .filter_map(|t| match (t.desired, t.observed) {
            (TaskState::Running, o) if o < TaskState::Running => {
                Some((t.id.clone(), TaskState::Running))
            }
            (TaskState::Shutdown, _) => Some((t.id.clone(), TaskState::Shutdown)),
            _ => None,
        })
        .collect();
    for (id, observed) in todo {
        w.run(Command::SetTaskStatus {
            id,
            observed,
            netns: None,
            exit_code: None,
            error: None,
            at_ms: w.now,
        });
    }
}

fn update_state(w: &World, service: &str) -> Option<UpdateState> {
    w.state
        .service_by_ref(service)
        .unwrap()
        .update_status
        .as_ref()
        .map(|u| u.state)
}

fn rolling(order: &str, failure_action: &str) -> serde_json::Value {
    serde_json::json!({
        "name": "web", "mode": {"replicated": {"replicas": 3}},
        "task": {"command": ["/bin/web", "v1"], "restart": {"delay_ms": 0}},
        "update": {"parallelism": 1, "delay_ms": 0, "monitor_ms": 1000,
                   "failure_action": failure_action, "order": order},
        "rollback": {"parallelism": 0, "delay_ms": 0, "monitor_ms": 1000,
                     "failure_action": "pause", "order": "stop-first"}
    })
}

#[test]
fn a_rolling_update_replaces_one_task_per_monitor_period() {
    let mut w = three();
    w.service(rolling("stop-first", "pause"));
    w.settle();
    nodes_act(&mut w);
    // Replicas alone: no update.
    update_to(&mut w, "web", |s| {
        s.mode = ServiceMode::Replicated { replicas: 3 }
    });
    assert_eq!(update_state(&w, "web"), None);
    update_to(&mut w, "web", |s| s.task.command[1] = "v2".into());
    assert_eq!(update_state(&w, "web"), Some(UpdateState::Updating));
    let mut batches = Vec::new();
    for _ in 0..10 {
        w.settle();
        nodes_act(&mut w);
        let v2 = commands(&w, "web")
            .iter()
            .filter(|(_, c)| c.ends_with("v2"))
            .count();
        batches.push(v2);
        // Never more than one task down at a time (stop-first,
        // parallelism 1): three slots always have a task.
        assert_eq!(w.slots("web"), vec![1, 2, 3]);
        w.now += 600;
    }
    // One more every two looks (monitor 1 s, looks every 0.6 s).
    assert_eq!(batches[..6], [1, 1, 2, 2, 3, 3], "{batches:?}");
    assert_eq!(update_state(&w, "web"), Some(UpdateState::Completed));
    // The old tasks are history of their slots.
    assert_eq!(w.state.tasks.len(), 6);
}

/// Three running web tasks, then an update to a "broken" command
/// (failure_action `action`) whose first new task is placed; its id.
fn start_broken_update(w: &mut World, action: &str) -> String {
    w.service(rolling("stop-first", action));
    w.settle();
    nodes_act(w);
    update_to(w, "web", |s| s.task.command[1] = "broken".into());
    w.settle();
    w.running("web")
        .find(|t| t.spec.command[1] == "broken")
        .unwrap()
        .id
        .clone()
}

#[test]
fn a_failing_update_rolls_back_to_the_previous_spec() {
    let mut w = three();
    // The first new task fails as it starts.
    let new = start_broken_update(&mut w, "rollback");
    for observed in [TaskState::Running, TaskState::Failed] {
        w.run(Command::SetTaskStatus {
            id: new.clone(),
            observed,
            netns: None,
            exit_code: Some(1),
            error: None,
            at_ms: w.now,
        });
    }
    for _ in 0..6 {
        w.settle();
        nodes_act(&mut w);
        w.now += 1100;
    }
    assert_eq!(
        update_state(&w, "web"),
        Some(UpdateState::RollbackCompleted)
    );
    let svc = w.state.service_by_ref("web").unwrap();
    assert_eq!(svc.spec.task.command, ["/bin/web", "v1"]);
    assert_eq!(
        svc.previous.as_ref().unwrap().task.command,
        ["/bin/web", "broken"]
    );
    assert_eq!(
        commands(&w, "web"),
        [1, 2, 3].map(|s| (s, "/bin/web v1".to_owned()))
    );
    // Only the one slot was touched before the failure.
    let broken = w
        .state
        .tasks
        .values()
        .filter(|t| t.spec.command[1] == "broken")
        .count();
    assert_eq!(broken, 1);
}

#[test]
fn a_failing_update_with_pause_stops_replacing() {
    let mut w = three();
    let new = start_broken_update(&mut w, "pause");
    w.run(Command::SetTaskStatus {
        id: new.clone(),
        observed: TaskState::Failed,
        netns: None,
        exit_code: Some(1),
        error: None,
        at_ms: w.now,
    });
    for _ in 0..4 {
        w.settle();
        nodes_act(&mut w);
        w.now += 1100;
    }
    assert_eq!(update_state(&w, "web"), Some(UpdateState::Paused));
    let u = w
        .state
        .service_by_ref("web")
        .unwrap()
        .update_status
        .clone()
        .unwrap();
    assert!(u.message.contains(&new), "{u:?}");
    // Two slots still run v1.
    let v1 = commands(&w, "web")
        .iter()
        .filter(|(_, c)| c.ends_with("v1"))
        .count();
    assert_eq!(v1, 2);
}

#[test]
fn start_first_keeps_the_old_task_until_the_new_one_runs() {
    let mut w = three();
    w.service(rolling("start-first", "pause"));
    w.settle();
    nodes_act(&mut w);
    update_to(&mut w, "web", |s| s.task.command[1] = "v2".into());
    w.settle();
    // Slot with two live tasks: the old one still serves.
    let live = w.running("web").count();
    assert_eq!(live, 4, "the new task is added, not swapped");
    let plans = w.settle();
    assert!(plans[0].commands.is_empty(), "{plans:?}");
    nodes_act(&mut w); // the new one runs
    w.settle();
    assert_eq!(
        w.running("web").count(),
        3,
        "the old one goes once the new runs"
    );
    for _ in 0..8 {
        nodes_act(&mut w);
        w.now += 1100;
        w.settle();
    }
    assert_eq!(update_state(&w, "web"), Some(UpdateState::Completed));
    assert_eq!(
        commands(&w, "web"),
        [1, 2, 3].map(|s| (s, "/bin/web v2".to_owned()))
    );
}
