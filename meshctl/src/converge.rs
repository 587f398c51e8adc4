//! Waiting for a change to converge on every node (`--detach` skips it),
//! with docker's "overall progress" lines.

use crate::*;

#[derive(Args)]
pub(crate) struct Wait {
    /// Return once the change is committed, without waiting for every node
    /// to apply it.
    #[arg(long, short)]
    pub(crate) detach: bool,
}

/// Waits until every node that is up has applied the tables as they are
/// now (so including the change just made), printing progress as
/// `docker service create` does.
pub(crate) async fn converge(c: &mut Client, wait: &Wait) -> Res {
    if wait.detach {
        return Ok(());
    }
    let progress = async |c: &mut Client| -> Res<Progress> {
        from_reply(c.api.progress(Empty {}).await.map_err(err)?)
    };
    let target = progress(c).await?.revision;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut shown = None;
    loop {
        let p = progress(c).await?;
        let up: Vec<&NodeProgress> = p
            .nodes
            .iter()
            .filter(|n| n.status == NodeStatus::Ready)
            .collect();
        let pending = p.pending(target);
        let done = up.len() - pending.len();
        if shown != Some(done) {
            println!("overall progress: {done} out of {} nodes ", up.len());
            shown = Some(done);
        }
        if pending.is_empty() {
            for (i, n) in up.iter().enumerate() {
                println!(
                    "{}/{}: applied   [==================================================>] {}",
                    i + 1,
                    up.len(),
                    n.hostname
                );
            }
            println!("verify: Service converged ");
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            let names: Vec<&str> = pending.iter().map(|n| n.hostname.as_str()).collect();
            return Err(format!(
                "not converged after 60 s: {} not yet applied revision {target} (the change is \
                 committed; those nodes apply it when their agent reaches the leader; \
                 use --detach not to wait)",
                names.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the service's tasks run as its spec says, printing progress
/// as `docker service create|update` does: every wanted slot has a running
/// task of the current spec, and a rolling update has ended. An update that
/// paused or rolled back is an error, with the orchestrator's reason.
pub(crate) async fn converge_tasks(
    c: &mut Client,
    wait: &Wait,
    service: &str,
    updating: bool,
) -> Res {
    use model::UpdateState;
    if wait.detach {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let mut shown: Option<String> = None;
    loop {
        let s = inspect_service(c, service).await?;
        let tasks: Vec<TaskView> = from_reply(
            c.api
                .list_tasks(Ref {
                    target: s.id.clone(),
                })
                .await
                .map_err(err)?,
        )?;
        let live: Vec<&TaskView> = tasks
            .iter()
            .filter(|t| t.task.live() && t.task.managed())
            .collect();
        let running = live
            .iter()
            .filter(|t| t.task.observed == TaskState::Running && *t.task.spec == s.spec.task)
            .count();
        let desired = match s.spec.mode {
            ServiceMode::Replicated { replicas } => replicas as usize,
            // One per node that can take one now, as the orchestrator
            // decides it.
            ServiceMode::Global => {
                let constraints = model::constraint::parse_constraints(&s.spec.task.constraints)?;
                let nodes: Vec<NodeView> =
                    from_reply(c.api.list_nodes(Empty {}).await.map_err(err)?)?;
                nodes
                    .iter()
                    .filter(|n| model::constraint::takes(&n.node, &constraints))
                    .count()
                    .max(live.len())
            }
        };
        let update = s.update_status.as_ref().map(|u| u.state);
        let rolling = update.is_some_and(UpdateState::active);
        let line = format!(
            "overall progress: {}{running} out of {desired} tasks",
            match update {
                Some(UpdateState::RollbackStarted) => "rolling back update: ",
                _ => "",
            }
        );
        if shown.as_deref() != Some(line.as_str()) {
            println!("{line} ");
            shown = Some(line);
        }
        if let Some(u) = &s.update_status
            && matches!(u.state, UpdateState::Paused | UpdateState::RollbackPaused)
        {
            return Err(format!("service {}: {}", s.spec.name, u.message));
        }
        if !rolling && running >= desired {
            for (i, t) in live.iter().enumerate() {
                println!(
                    "{}/{}: running   [==================================================>] {}",
                    i + 1,
                    live.len(),
                    t.name
                );
            }
            println!("verify: Service {} converged ", s.spec.name);
            if let Some(u) = &s.update_status
                && u.state == UpdateState::RollbackCompleted
            {
                println!("rollback: {}", u.message);
                if updating {
                    return Err(format!("service {}: {}", s.spec.name, u.message));
                }
            }
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "service {}: {running} of {desired} tasks running after 180 s; see `meshctl service ps {}` (the change is committed; use --detach not to wait)",
                s.spec.name, s.spec.name
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
