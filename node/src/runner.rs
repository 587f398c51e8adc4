//! Runs the tasks the leader assigns this node, with an [`Executor`], and
//! reports what they do.
//!
//! For each assignment:
//! - desired `running`, not started here: make its namespace and report
//!   `starting` with it; the overlay wires the namespace and the embedded
//!   DNS serves in it; once this node's data plane has applied that (or
//!   after [`WIRE_WAIT`]), start the process and report `running`. As in
//!   Swarm, a task's networks are there before it runs. A start that fails
//!   is reported `rejected` with the reason.
//! - the process exits: `complete` (code 0) or `failed` with
//!   `task: non-zero exit (N)`; the orchestrator applies the restart policy.
//! - desired `shutdown`: the tables already withdrew the task's endpoints,
//!   so no new flow reaches it. After the drain period (every node has
//!   applied the withdrawal, open requests finish) it gets SIGTERM, and
//!   SIGKILL after the stop grace; then `shutdown` with its exit code.
//! - meshd restarted: a task still assigned here whose process is alive is
//!   adopted (watched again, not restarted: its connections survive); one
//!   it reported started that is gone is `failed`, "task lost: meshd
//!   restarted", and the orchestrator replaces it; what an earlier meshd
//!   left that is no longer assigned here is ended. meshd leaving (SIGTERM
//!   too) leaves its tasks running, as Docker's live-restore does.
//!
//! A task that ended stays ended here until the leader's assignments drop
//! it, so a report still in flight never starts it twice.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use model::{
    TaskState,
    session::{Assignment, TaskReport},
};
use tokio::sync::{mpsc, watch};

use crate::executor::{Executor, Prepared as _, RunningTask, TaskRun};

/// The longest a task waits for its networks before it starts anyway.
pub const WIRE_WAIT: Duration = Duration::from_secs(10);

/// This node's task namespaces and how many of their endpoints its data
/// plane has wired (overlay, load balancer and DNS applied).
pub type Wired = watch::Receiver<HashMap<String, usize>>;

/// How a node stops its tasks.
#[derive(Debug, Clone, Copy)]
pub struct StopTiming {
    /// Between the withdrawal of a task's endpoints and SIGTERM.
    pub drain: Duration,
    /// Between SIGTERM and SIGKILL (Docker's default: 10 s).
    pub grace: Duration,
}

impl Default for StopTiming {
    fn default() -> Self {
        StopTiming {
            drain: Duration::from_secs(2),
            grace: Duration::from_secs(10),
        }
    }
}

struct Handle {
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
}

/// How the runner ends when `stop` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStop {
    /// meshd is restarting or leaving: the tasks stay, to be adopted.
    LeaveTasks,
    /// The node was removed from the cluster: every task is stopped.
    EndTasks,
}

/// Follows `assigned` until `stop` is set; then leaves or ends its tasks,
/// as `on_stop` says at that moment.
pub async fn run<E>(
    exec: Arc<E>,
    wired: Wired,
    mut assigned: watch::Receiver<Option<Vec<Assignment>>>,
    reports: mpsc::UnboundedSender<TaskReport>,
    timing: StopTiming,
    mut stop: watch::Receiver<bool>,
    on_stop: watch::Receiver<OnStop>,
) where
    E: Executor + Send + Sync + 'static,
    E::Task: 'static,
{
    let mut running: HashMap<String, Handle> = HashMap::new();
    // Ended here, and still assigned (the report is on its way).
    let mut ended: HashSet<String> = HashSet::new();
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<String>();
    // Until the first assignments: what an earlier meshd left running is
    // neither adopted nor ended yet.
    let mut first = true;
    loop {
        let tasks = assigned.borrow_and_update().clone();
        if let Some(tasks) = tasks {
            if std::mem::take(&mut first) {
                adopt(&exec, &tasks, &mut running, &reports, timing, &ended_tx);
                let keep: HashSet<String> = running.keys().cloned().collect();
                let reaped = exec.reap_others(&keep);
                if reaped > 0 {
                    tracing::warn!(
                        tasks = reaped,
                        "ended tasks an earlier meshd left that this node no longer runs"
                    );
                }
            }
            let ids: HashSet<&str> = tasks.iter().map(|a| a.id.as_str()).collect();
            ended.retain(|id| ids.contains(id.as_str()));
            // No longer assigned (removed, or ended and recorded): stop it
            // if it still runs.
            for (id, h) in &running {
                if !ids.contains(id.as_str()) {
                    h.stop.send_replace(true);
                }
            }
            for a in &tasks {
                if let Some(h) = running.get(&a.id) {
                    if a.desired > TaskState::Running {
                        h.stop.send_replace(true);
                    }
                    continue;
                }
                if ended.contains(&a.id) {
                    continue;
                }
                if a.desired > TaskState::Running {
                    // Told to stop before it started here.
                    ended.insert(a.id.clone());
                    let _ = reports.send(report(&a.id, TaskState::Shutdown, None, None, None));
                    continue;
                }
                if a.observed >= TaskState::Starting {
                    ended.insert(a.id.clone());
                    let _ = reports.send(report(
                        &a.id,
                        TaskState::Failed,
                        None,
                        None,
                        Some("task lost: meshd restarted on its node".into()),
                    ));
                    continue;
                }
                let (stop_tx, stop_rx) = watch::channel(false);
                let done = tokio::spawn(lifecycle(
                    exec.clone(),
                    wired.clone(),
                    a.clone(),
                    reports.clone(),
                    timing,
                    stop_rx,
                    ended_tx.clone(),
                ));
                running.insert(
                    a.id.clone(),
                    Handle {
                        stop: stop_tx,
                        done,
                    },
                );
            }
        }
        tokio::select! {
            r = assigned.changed() => if r.is_err() {
                // The agent ended (meshd is stopping, or the node was
                // removed): wait for meshd's word on what to do with the
                // tasks, so that `on_stop` is read once it is set.
                stopped(&mut stop).await;
                break;
            },
            Some(id) = ended_rx.recv() => {
                running.remove(&id);
                ended.insert(id);
            }
            () = stopped(&mut stop) => break,
        }
    }
    // meshd is going away: its tasks stay (Docker's live-restore). The
    // next meshd adopts them; if it comes back too late, the leader has
    // marked this node down and placed them elsewhere, and the next meshd
    // ends them (they are no longer assigned here).
    if *on_stop.borrow() == OnStop::EndTasks {
        let mut waits = Vec::new();
        for (_, h) in running.drain() {
            h.stop.send_replace(true);
            waits.push(h.done);
        }
        for w in waits {
            let _ = w.await;
        }
        // And what an earlier run left that this one never adopted.
        exec.reap_others(&HashSet::new());
        return;
    }
    for (_, h) in running.drain() {
        h.done.abort();
    }
}

/// Takes over the tasks an earlier meshd started that are still assigned
/// to run here and still alive: they are watched again, not restarted, so
/// their connections and addresses survive the restart.
fn adopt<E>(
    exec: &Arc<E>,
    tasks: &[Assignment],
    running: &mut HashMap<String, Handle>,
    reports: &mpsc::UnboundedSender<TaskReport>,
    timing: StopTiming,
    ended: &mpsc::UnboundedSender<String>,
) where
    E: Executor + Send + Sync + 'static,
    E::Task: 'static,
{
    for a in tasks {
        if a.desired > TaskState::Running
            || a.observed < TaskState::Starting
            || a.observed > TaskState::Running
        {
            continue;
        }
        let Some(task) = exec.adopt(&a.id) else {
            continue;
        };
        tracing::info!(task = %a.id, name = %a.name, "adopted the task an earlier meshd started");
        let _ = reports.send(report(&a.id, TaskState::Running, None, None, None));
        let (stop_tx, stop_rx) = watch::channel(false);
        let done = tokio::spawn(supervise(
            task,
            a.clone(),
            reports.clone(),
            timing,
            stop_rx,
            ended.clone(),
        ));
        running.insert(
            a.id.clone(),
            Handle {
                stop: stop_tx,
                done,
            },
        );
    }
}

fn report(
    id: &str,
    observed: TaskState,
    netns: Option<String>,
    exit_code: Option<i32>,
    error: Option<String>,
) -> TaskReport {
    TaskReport {
        id: id.to_owned(),
        observed,
        netns,
        exit_code,
        error,
    }
}

/// One task, from start to removal.
async fn lifecycle<E: Executor>(
    exec: Arc<E>,
    mut wired: Wired,
    a: Assignment,
    reports: mpsc::UnboundedSender<TaskReport>,
    timing: StopTiming,
    mut stop: watch::Receiver<bool>,
    ended: mpsc::UnboundedSender<String>,
) {
    let run = TaskRun {
        id: a.id.clone(),
        name: a.name.clone(),
        command: a.command.clone(),
        env: a.env.clone(),
    };
    let rejected = |e: String| {
        tracing::warn!(task = %a.id, name = %a.name, "task not started: {e}");
        let _ = reports.send(report(&a.id, TaskState::Rejected, None, None, Some(e)));
        let _ = ended.send(a.id.clone());
    };
    let prepared = match exec.prepare(&run).await {
        Ok(p) => p,
        Err(e) => return rejected(e.to_string()),
    };
    let netns = prepared.netns().display().to_string();
    let _ = reports.send(report(
        &a.id,
        TaskState::Starting,
        Some(netns.clone()),
        None,
        None,
    ));
    if a.networks > 0 {
        let ready = |w: &HashMap<String, usize>| w.get(&netns).copied().unwrap_or(0) >= a.networks;
        tokio::select! {
            r = async { tokio::time::timeout(WIRE_WAIT, wired.wait_for(ready)).await.map(|r| r.is_ok()) } => {
                if r != Ok(true) {
                    tracing::warn!(task = %a.id, %netns, "networks not wired after {WIRE_WAIT:?}; starting anyway");
                }
            }
            () = stopped(&mut stop) => {
                prepared.discard().await;
                let _ = reports.send(report(&a.id, TaskState::Shutdown, None, None, None));
                let _ = ended.send(a.id);
                return;
            }
        }
    }
    let task = match exec.launch(prepared).await {
        Ok(t) => t,
        Err(e) => return rejected(e.to_string()),
    };
    tracing::info!(task = %a.id, name = %a.name, %netns, "task running");
    let _ = reports.send(report(&a.id, TaskState::Running, None, None, None));
    supervise(task, a, reports, timing, stop, ended).await;
}

/// A running task until it ends or is stopped; then its report and
/// removal.
async fn supervise<T: RunningTask>(
    mut task: T,
    a: Assignment,
    reports: mpsc::UnboundedSender<TaskReport>,
    timing: StopTiming,
    mut stop: watch::Receiver<bool>,
    ended: mpsc::UnboundedSender<String>,
) {
    let (observed, code) = tokio::select! {
        code = task.wait() => {
            let code = code.unwrap_or(255);
            let observed = if code == 0 { TaskState::Complete } else { TaskState::Failed };
            (observed, code)
        }
        () = stopped(&mut stop) => {
            // The endpoints are already withdrawn; let open flows finish,
            // unless the process ends first.
            let drained = tokio::time::timeout(timing.drain, task.wait()).await;
            let code = match drained {
                Ok(code) => code.unwrap_or(255),
                Err(_) => task.stop(timing.grace).await.unwrap_or(255),
            };
            (TaskState::Shutdown, code)
        }
    };
    let error = (observed == TaskState::Failed).then(|| {
        if task.adopted() && code == crate::executor::EXIT_UNKNOWN {
            "task: ended after meshd restarted; its exit status is unknown (this meshd \
             adopted it and is not its parent)"
                .to_owned()
        } else {
            format!("task: non-zero exit ({code})")
        }
    });
    tracing::info!(task = %a.id, name = %a.name, ?observed, code, "task ended");
    let _ = reports.send(report(&a.id, observed, None, Some(code), error));
    if let Err(e) = task.remove().await {
        tracing::warn!(task = %a.id, "removing the task's namespace and cgroup: {e}");
    }
    let _ = ended.send(a.id);
}

/// Resolves once `stop` says true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
