//! The dispatcher: on the leader, one session per node.
//!
//! A node's agent opens `Dispatcher/Session` (mTLS; the node is the one its
//! certificate names), says hello with the last revision it applied, and
//! from then on sends a heartbeat every period and an ack after applying
//! each update. The dispatcher answers with the missing deltas (or a
//! snapshot when the agent is too far behind), then streams every new
//! delta as Raft applies it.
//!
//! Liveness has exactly one authority: the leader's [`liveness`] loop.
//! A node not heard from for `misses` heartbeat periods is committed
//! `down` through Raft, and that same log entry withdraws its endpoints
//! from every table (see [`crate::tables`]). A node that is down and opens
//! a session again is committed `ready`. Heartbeats themselves stay in the
//! leader's memory; a new leader gives every node a full grace period.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use proto::{Internal, dispatcher_server};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    context::Ctx,
    raft::manager::Manager,
    state::{Command, NodeStatus},
    tables::{Catchup, Revision},
};

pub use model::session::{AgentMessage, Assignment, DispatcherMessage, TaskReport};

/// The tasks assigned to `node`: its tasks that mesh runs and that have
/// not ended, in id order. O(tasks on the node), through the state's
/// per-node index.
pub fn assignments(state: &crate::state::State, node: &str) -> Vec<Assignment> {
    state
        .tasks_on(node)
        .filter(|t| t.managed() && !t.ended())
        .map(|t| {
            let service = state
                .services
                .get(&t.service)
                .map_or(t.service.as_str(), |s| s.spec.name.as_str());
            Assignment {
                id: t.id.clone(),
                name: t.name(service),
                service: service.to_owned(),
                desired: t.desired,
                observed: t.observed,
                command: t.spec.command.clone(),
                env: t.spec.env.clone(),
                networks: t.attachments.len(),
            }
        })
        .collect()
}

pub use model::session::NOT_LEADER_DISPATCH;

pub use crate::sessions::{Dispatcher, NodeProgress, Progress};

/// The heartbeat period and misses from the cluster settings.
fn timing(m: &Manager) -> (Duration, u32) {
    m.with_state(|s| {
        s.settings
            .as_ref()
            .map_or((Duration::from_secs(1), 3), |c| {
                (
                    Duration::from_millis(c.heartbeat_period_ms.max(1)),
                    c.heartbeat_misses.max(1),
                )
            })
    })
}

/// The leader's liveness loop: commits nodes down after missed heartbeats
/// and back up when their agent returns. Ends when the manager is dropped
/// or `stop` is set.
pub async fn liveness(m: Weak<Manager>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut leading_since: Option<Instant> = None;
    // When this leader first saw each node: a node that just joined gets
    // a full grace period before its first heartbeat is due.
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    loop {
        let Some(mgr) = m.upgrade() else { return };
        let (period, misses) = timing(&mgr);
        let tick = (period / 4).clamp(Duration::from_millis(20), Duration::from_millis(250));
        mgr.sample_applied();
        if !mgr.is_leader() {
            if leading_since.take().is_some() {
                mgr.dispatcher.clear();
                first_seen.clear();
            }
        } else {
            let since = *leading_since.get_or_insert_with(Instant::now);
            tokio::select! {
                () = crate::shutdown::stopped(&mut stop) => return,
                () = check_nodes(&mgr, since, &mut first_seen, period * misses, period) => {}
            }
            tokio::select! {
                () = crate::shutdown::stopped(&mut stop) => return,
                () = mgr.reconcile_voters() => {}
            }
        }
        drop(mgr);
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(tick) => {}
        }
    }
}

async fn check_nodes(
    m: &Manager,
    leading_since: Instant,
    first_seen: &mut HashMap<String, Instant>,
    dead_after: Duration,
    period: Duration,
) {
    let nodes: Vec<(String, NodeStatus)> =
        m.with_state(|s| s.nodes.values().map(|n| (n.id.clone(), n.status)).collect());
    let now = Instant::now();
    first_seen.retain(|id, _| nodes.iter().any(|(n, _)| n == id));
    let seen = m.dispatcher.heard();
    for (id, status) in nodes {
        let since = (*first_seen.entry(id.clone()).or_insert(now)).max(leading_since);
        let (last, connected) = match seen.get(&id) {
            Some((t, c)) => ((*t).max(since), *c),
            None => (since, false),
        };
        let silent = now.saturating_duration_since(last);
        let new_status = match status {
            NodeStatus::Ready if silent > dead_after => NodeStatus::Down,
            NodeStatus::Down if connected && silent <= period * 2 => NodeStatus::Ready,
            _ => continue,
        };
        match m
            .propose(Command::SetNodeStatus {
                id: id.clone(),
                status: new_status,
            })
            .await
        {
            Ok(_) if new_status == NodeStatus::Down => tracing::warn!(
                node = %id,
                silent_ms = silent.as_millis() as u64,
                "node down: no heartbeat; its endpoints are withdrawn"
            ),
            Ok(_) => tracing::info!(node = %id, "node ready: its agent is back"),
            Err(e) => tracing::warn!(node = %id, "recording the node's status: {e}"),
        }
    }
}

pub struct DispatcherService(pub Arc<Ctx>);

type SessionStream = Pin<Box<dyn Stream<Item = Result<Internal, Status>> + Send>>;

fn blob(msg: &DispatcherMessage) -> Result<Internal, Status> {
    crate::codec::encode(msg)
        .map(|body| Internal { body })
        .map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl dispatcher_server::Dispatcher for DispatcherService {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<Internal>>,
    ) -> Result<Response<SessionStream>, Status> {
        let id = self.0.identify(&req)?;
        let m = self.0.manager()?;
        if !m.is_leader() {
            let leader = m
                .leader(Duration::from_secs(1))
                .await
                .map(|(_, a)| a)
                .unwrap_or_else(|_| "unknown (no leader elected)".into());
            return Err(Status::failed_precondition(format!(
                "{NOT_LEADER_DISPATCH} {leader}"
            )));
        }
        if !m.with_state(|s| s.nodes.contains_key(&id.node_id)) {
            return Err(Status::permission_denied(format!(
                "node {} is not in the cluster state",
                id.node_id
            )));
        }
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(256);
        let running = m.dispatcher.running.clone();
        tokio::spawn(async move {
            let node = id.node_id;
            if let Err(e) = run_session(&m, &node, inbound, &tx).await {
                tracing::debug!(%node, "dispatcher session ended: {}", e.message());
                let _ = tx.send(Err(e)).await;
            }
            // The manager first, then the count shutdown waits on.
            drop(m);
            drop(running);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type Out = mpsc::Sender<Result<Internal, Status>>;

/// Task reports and underlay changes read but not yet committed; a full
/// queue holds the reader back (the agent keeps the rest).
const REPORT_QUEUE: usize = 64;
/// How long a closed session's read reports may take to commit.
const REPORT_DRAIN: Duration = Duration::from_secs(5);

async fn send(tx: &Out, msg: &DispatcherMessage) -> Result<(), Status> {
    tx.send(Ok(blob(msg)?))
        .await
        .map_err(|_| Status::cancelled("the agent went away"))
}

/// Sends what an agent at `*sent` is missing; advances `*sent`.
async fn catch_up(m: &Manager, tx: &Out, sent: &mut Revision) -> Result<(), Status> {
    match m.sm.with_book(|s, b| b.since(s, *sent)) {
        Catchup::UpToDate => {}
        Catchup::Deltas(deltas) => {
            for delta in deltas {
                *sent = delta.revision;
                send(tx, &DispatcherMessage::Delta { delta }).await?;
            }
        }
        Catchup::Snapshot(tables) => {
            *sent = tables.revision;
            send(tx, &DispatcherMessage::Snapshot { tables }).await?;
        }
    }
    Ok(())
}

async fn next(inbound: &mut Streaming<Internal>) -> Result<Option<AgentMessage>, Status> {
    match inbound.message().await? {
        None => Ok(None),
        Some(b) => crate::codec::decode(&b.body)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("invalid agent message: {e}"))),
    }
}

/// Commits a node's report on its task. A node reports only its own tasks;
/// a report the state refuses (a task that ended cannot start again) is
/// logged and dropped: the state already says more.
async fn task_status(m: &Arc<Manager>, node: &str, r: TaskReport) {
    let owner = m.with_state(|s| s.tasks.get(&r.id).map(|t| t.node.clone()));
    match owner {
        None => tracing::debug!(%node, task = %r.id, "report on a task that is gone"),
        Some(owner) if owner != node => {
            tracing::warn!(%node, task = %r.id, %owner, "a node reported on another node's task; ignored");
        }
        Some(_) => {
            let cmd = crate::state::Command::SetTaskStatus {
                id: r.id.clone(),
                observed: r.observed,
                netns: r.netns,
                exit_code: r.exit_code,
                error: r.error.map(crate::state::bound_report),
                at_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            };
            if let Err(e) = m.propose(cmd).await {
                tracing::info!(%node, task = %r.id, "task status not recorded: {e}");
            }
        }
    }
}

/// Records a node's underlay prefixes when they changed. A network that
/// overlaps the new prefixes is not refused (it exists already) but named
/// in a warning: its tasks' addresses shadow the node's there.
async fn underlay(m: &Arc<Manager>, node: &str, mut prefixes: Vec<crate::allocator::Subnet>) {
    prefixes.sort();
    prefixes.dedup();
    let known = m.with_state(|s| s.nodes.get(node).map(|n| n.underlay.clone()));
    if known.is_none_or(|k| k == prefixes) {
        return;
    }
    let cmd = crate::state::Command::SetNodeUnderlay {
        id: node.to_owned(),
        underlay: prefixes.clone(),
    };
    match m.propose(cmd).await {
        Ok(_) => {
            let clash = m.with_state(|s| s.underlay_clash(node, &prefixes));
            match clash {
                Some(why) => tracing::warn!(%node, "node underlay changed: {why}"),
                None => tracing::info!(%node, ?prefixes, "node underlay changed"),
            }
        }
        Err(e) => tracing::info!(%node, "node underlay not recorded: {e}"),
    }
}

async fn run_session(
    m: &Arc<Manager>,
    node: &str,
    mut inbound: Streaming<Internal>,
    tx: &Out,
) -> Result<(), Status> {
    let hello = tokio::time::timeout(Duration::from_secs(5), next(&mut inbound))
        .await
        .map_err(|_| Status::deadline_exceeded("no hello from the agent within 5 s"))??;
    let Some(AgentMessage::Hello {
        revision,
        want_keys,
    }) = hello
    else {
        return Err(Status::invalid_argument(
            "an agent session starts with a hello",
        ));
    };
    let (period, misses) = timing(m);
    let token = m.dispatcher.open(node);
    tracing::info!(%node, revision, "agent session opened");
    let result = async {
        send(
            tx,
            &DispatcherMessage::Welcome {
                heartbeat_ms: period.as_millis() as u64,
                misses,
            },
        )
        .await?;
        let mut revisions = m.sm.revisions();
        let mut stopping = m.stopping();
        let mut sent = revision;
        // An agent ahead of this manager (a new leader still applying the
        // log): wait for the log rather than roll the agent back with an
        // older snapshot.
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            revisions.wait_for(|r| *r >= revision),
        )
        .await;
        catch_up(m, tx, &mut sent).await?;
        if want_keys {
            // At least as new as the catch-up; a later change comes as a
            // delta like any other.
            let entry = m
                .sm
                .with_book(|s, b| b.entry(s, &crate::tables::Key::NetworkKeys).map(Box::new));
            send(tx, &DispatcherMessage::Keys { entry }).await?;
        }
        send(tx, &DispatcherMessage::CaughtUp { revision: sent }).await?;
        let assignments_changed = m.sm.assignments_changed(node);
        let mut assigned = m.with_state(|s| assignments(s, node));
        send(
            tx,
            &DispatcherMessage::Assignments {
                tasks: assigned.clone(),
            },
        )
        .await?;
        // Three parts run side by side, so that neither a slow agent (a
        // long apply leaves the queue to it full) nor a slow commit (a task
        // report during an election) delays reading its heartbeats:
        // - the reader takes every message as it arrives, and any message
        //   counts as the agent heard;
        // - the reporter commits task reports and underlay changes, in
        //   order;
        // - the writer sends deltas and assignments.
        let (reports, mut to_commit) = mpsc::channel::<AgentMessage>(REPORT_QUEUE);
        let reader = async {
            loop {
                let Some(msg) = next(&mut inbound).await? else {
                    return Ok(());
                };
                m.dispatcher
                    .with_session(node, token, |s| s.last_heartbeat = Instant::now());
                match msg {
                    AgentMessage::Heartbeat => {
                        // Only so the agent hears something: a full queue
                        // already carries plenty for it.
                        let _ = tx.try_send(Ok(blob(&DispatcherMessage::Heartbeat)?));
                    }
                    AgentMessage::Ack { revision } => {
                        m.dispatcher
                            .with_session(node, token, |s| s.acked = s.acked.max(revision));
                    }
                    AgentMessage::Hello { .. } => {
                        return Err(Status::invalid_argument("hello sent twice"));
                    }
                    report @ (AgentMessage::TaskStatus(_) | AgentMessage::Underlay { .. }) => {
                        if reports.send(report).await.is_err() {
                            return Ok(());
                        }
                    }
                }
            }
        };
        let reporter = async {
            while let Some(report) = to_commit.recv().await {
                match report {
                    AgentMessage::TaskStatus(r) => task_status(m, node, r).await,
                    AgentMessage::Underlay { prefixes } => underlay(m, node, prefixes).await,
                    _ => {}
                }
            }
        };
        let writer = async {
            let mut leadership = tokio::time::interval(period);
            loop {
                tokio::select! {
                    () = crate::shutdown::stopped(&mut stopping) => {
                        return Err(Status::unavailable("this manager is shutting down"));
                    }
                    r = revisions.changed() => {
                        if r.is_err() {
                            return Err(Status::unavailable("this manager is shutting down"));
                        }
                        catch_up(m, tx, &mut sent).await?;
                    }
                    // Woken only when this node's tasks changed (the state
                    // marks the nodes; the others' sessions sleep on).
                    () = assignments_changed.notified() => {
                        let now = m.with_state(|s| assignments(s, node));
                        if now != assigned {
                            assigned = now;
                            send(tx, &DispatcherMessage::Assignments { tasks: assigned.clone() }).await?;
                        }
                    }
                    _ = leadership.tick() => {
                        if !m.is_leader() {
                            return Err(Status::unavailable(format!(
                                "{NOT_LEADER_DISPATCH} another manager (leadership moved)"
                            )));
                        }
                    }
                }
            }
        };
        tokio::pin!(reporter);
        let ended = tokio::select! {
            r = reader => r,
            r = writer => r,
            // Never first: its sender lives until the session ends.
            () = &mut reporter => Ok(()),
        };
        // What was read is committed before the session is let go: the
        // agent counts a report sent once it left.
        drop(reports);
        if tokio::time::timeout(REPORT_DRAIN, reporter).await.is_err() {
            tracing::warn!(%node, "task reports of a closed session not all committed within {REPORT_DRAIN:?}");
        }
        ended
    }
    .await;
    m.dispatcher
        .with_session(node, token, |s| s.connected = false);
    result
}
