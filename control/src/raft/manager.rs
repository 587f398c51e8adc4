//! A manager: a Raft member (openraft over gRPC/mTLS) with the durable
//! store, and the write path every API call goes through.
//!
//! Writes are [`Command`]s. The leader commits them; a follower forwards
//! them to the leader (`Cluster/Propose`, authenticated with its own
//! manager certificate). A manager that cannot reach a quorum refuses the
//! write with a "no quorum" error instead of queueing it: a leader checks
//! that a quorum acknowledged it recently before it appends anything.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Arc, RwLock, Weak},
    time::{Duration, Instant},
};

use openraft::{BasicNode, Config, ServerState, SnapshotPolicy};
use proto::{Internal, cluster_client::ClusterClient};

use crate::{
    ca::tls::Credentials,
    raft::seal::Key,
    raft::store::{self, NodeId, StateMachineStore, TypeConfig},
    state::{Command, Outcome, State},
};

pub type Raft = openraft::Raft<TypeConfig>;

pub use super::network::{Contacts, PeerClient, Peers};
pub use super::write::{NOT_LEADER, PROPOSAL_QUEUE, WriteError};
use super::write::{Proposal, batcher};

/// What a manager is started with, passed in (no process globals).
#[derive(Debug, Clone, Copy)]
pub struct ManagerConfig {
    /// Raft entries between snapshots (tests lower it to exercise
    /// compaction and snapshot installs); at least 10.
    pub snapshot_every: u64,
    /// Whether this host's kernel can run encrypted networks, as the data
    /// plane probes it (meshd sets it). `None` (a control plane without a
    /// data plane): an encrypted network is taken as asked.
    pub encryption_check: Option<fn() -> Result<(), String>>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            snapshot_every: 10_000,
            encryption_check: None,
        }
    }
}

/// Raft timing: 75 ms heartbeats, elections after 0.3–0.6 s of silence.
/// A follower refuses to vote while its leader's lease lasts (openraft
/// sets it to the maximum election timeout since the last heartbeat), so
/// the first candidate is often turned away and the second round wins: a
/// dead leader is replaced in about 1 s.
pub fn raft_config(config: &ManagerConfig) -> Config {
    let snapshot_every = config.snapshot_every.max(10);
    Config {
        cluster_name: "mesh".into(),
        heartbeat_interval: 75,
        election_timeout_min: 300,
        election_timeout_max: 600,
        // Compaction: snapshot every 10k entries (by default), keep a tenth
        // of that behind it for followers that lag a little.
        snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_every),
        max_in_snapshot_log_to_keep: snapshot_every / 10,
        max_payload_entries: 1_000,
        ..Config::default()
    }
}

/// How long a leader may go without a quorum's acknowledgement before it
/// refuses writes.
const QUORUM_STALE: Duration = Duration::from_millis(1000);
/// A forwarded write's outer bound: longer than the leader's largest
/// budget, so the leader's answer arrives. Each forward also tells the
/// leader its own remaining budget (`grpc-timeout`), which the leader
/// keeps to.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(WRITE_BUDGET.as_secs() + 2);

pub use model::api::never_sent;

/// How long a write may look for a leader and retry, by default and at
/// most: longer than an election (about 1 s here, 4 s at worst).
pub const WRITE_BUDGET: Duration = Duration::from_secs(8);

/// A fresh request id for [`Command::Once`].
fn new_request_id() -> String {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut raw = [0u8; 16];
    // The system RNG does not fail on Linux; a zero id would only make
    // this request share dedup with another failed-RNG one.
    let _ = SystemRandom::new().fill(&mut raw);
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// `cmd` made safe to retry: each ordinary command is applied at most once.
fn once(cmd: &Command) -> Command {
    match cmd {
        Command::Init { .. } | Command::Once { .. } => cmd.clone(),
        Command::Batch { commands } => Command::Batch {
            commands: commands.iter().map(once).collect(),
        },
        other => Command::Once {
            request: new_request_id(),
            write: Box::new(other.clone()),
        },
    }
}

/// The Raft id of a node id (16 hex digits).
pub fn raft_id(node_id: &str) -> Option<NodeId> {
    u64::from_str_radix(node_id, 16).ok().filter(|&n| n != 0)
}

pub use model::api::ManagerStatus;

pub struct Manager {
    pub raft_id: NodeId,
    pub raft: Raft,
    pub sm: StateMachineStore,
    pub peers: Peers,
    /// Agent sessions and liveness (used while this manager leads).
    pub dispatcher: crate::sessions::Dispatcher,
    proposals: tokio::sync::mpsc::Sender<Proposal>,
    stop: tokio::sync::watch::Sender<bool>,
    /// The liveness and orchestrator loops, awaited on shutdown (they hold
    /// the manager while they work, and the store must be closed when
    /// shutdown returns).
    liveness: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// While leading: the applied index, sampled by the liveness loop
    /// (see [`Manager::sample_applied`]), to tell a follower that trails
    /// by the entries in flight from one that is behind.
    pub(super) applied_history: std::sync::Mutex<std::collections::VecDeque<(Instant, u64)>>,
}

/// Why a manager did not start, or a new cluster's first manager did not
/// become its only voter.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("opening the Raft store")]
    Store(#[source] Box<store::OpenError>),
    #[error("the Raft configuration")]
    Config(#[source] Box<openraft::ConfigError>),
    #[error("starting Raft")]
    Raft(#[source] Box<openraft::error::Fatal<NodeId>>),
    #[error("initializing Raft")]
    Bootstrap(
        #[source]
        Box<
            openraft::error::RaftError<NodeId, openraft::error::InitializeError<NodeId, BasicNode>>,
        >,
    ),
}

impl Manager {
    /// Opens the store under `dir` and starts the Raft member.
    pub async fn start(
        raft_id: NodeId,
        dir: &Path,
        key: Key,
        creds: Arc<RwLock<Credentials>>,
        config: &ManagerConfig,
    ) -> Result<Arc<Manager>, StartError> {
        let (log, sm) =
            store::open(&dir.join("raft.redb"), key).map_err(|e| StartError::Store(Box::new(e)))?;
        let raft_config = raft_config(config)
            .validate()
            .map_err(|e| StartError::Config(Box::new(e)))?;
        let peers = Peers::new(creds);
        let raft = Raft::new(
            raft_id,
            Arc::new(raft_config),
            peers.clone(),
            log,
            sm.clone(),
        )
        .await
        .map_err(|e| StartError::Raft(Box::new(e)))?;
        let (proposals, rx) = tokio::sync::mpsc::channel(PROPOSAL_QUEUE);
        tokio::spawn(batcher(raft.clone(), rx));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let m = Arc::new(Manager {
            raft_id,
            raft,
            sm,
            peers,
            dispatcher: Default::default(),
            proposals,
            stop,
            liveness: Default::default(),
            applied_history: Default::default(),
        });
        let tasks = vec![tokio::spawn(orchestrate(Arc::downgrade(&m), stopped))];
        *m.liveness.lock().expect("liveness lock") = tasks;
        Ok(m)
    }

    /// Keeps `task` with this manager's own, awaited when it stops (the
    /// dispatcher's liveness check, which the daemon starts beside it).
    pub fn keep_task(&self, task: tokio::task::JoinHandle<()>) {
        self.liveness.lock().expect("liveness lock").push(task);
    }

    /// Makes this manager the only voter of a new cluster.
    pub async fn bootstrap(&self, api_addr: &str) -> Result<(), StartError> {
        let members = BTreeMap::from([(
            self.raft_id,
            BasicNode {
                addr: api_addr.to_owned(),
            },
        )]);
        self.raft
            .initialize(members)
            .await
            .map_err(|e| StartError::Bootstrap(Box::new(e)))
    }

    pub fn with_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        self.sm.with_state(f)
    }

    pub fn metrics(&self) -> openraft::RaftMetrics<NodeId, BasicNode> {
        self.raft.metrics().borrow().clone()
    }

    pub fn is_leader(&self) -> bool {
        self.metrics().state == ServerState::Leader
    }

    /// The leader's Raft id and API address, waiting up to `wait` for an
    /// election to finish.
    pub async fn leader(&self, wait: Duration) -> Result<(NodeId, String), WriteError> {
        let deadline = Instant::now() + wait;
        loop {
            let m = self.metrics();
            if let Some(id) = m.current_leader
                && let Some(node) = m.membership_config.membership().get_node(&id)
            {
                return Ok((id, node.addr.clone()));
            }
            if Instant::now() >= deadline {
                let voters = m.membership_config.membership().voter_ids().count();
                return Err(WriteError::NoQuorum(format!(
                    "no leader is elected: this manager cannot reach a majority of the {voters} managers"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fails unless this manager is the leader and hears from a quorum.
    pub(super) async fn lead(&self) -> Result<(), WriteError> {
        if !self.is_leader() {
            return Err(WriteError::Internal(format!(
                "{NOT_LEADER} {}",
                self.raft_id
            )));
        }
        self.check_quorum().await
    }

    /// Fails unless this leader hears from a quorum: recently, or within a
    /// short wait (a membership change restarts the acknowledgements).
    async fn check_quorum(&self) -> Result<(), WriteError> {
        let deadline = Instant::now() + QUORUM_STALE;
        loop {
            match self.quorum_now() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
    }

    fn quorum_now(&self) -> Result<(), WriteError> {
        let m = self.metrics();
        let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        if voters.len() <= 1 {
            return Ok(());
        }
        match m.millis_since_quorum_ack {
            Some(ms) if ms <= QUORUM_STALE.as_millis() as u64 => Ok(()),
            other => {
                let contacts = self.peers.contacts.lock().expect("contacts lock");
                let reachable = voters
                    .iter()
                    .filter(|&&v| {
                        v == self.raft_id
                            || contacts.get(&v).is_some_and(|t| t.elapsed() < QUORUM_STALE)
                    })
                    .count();
                Err(WriteError::NoQuorum(format!(
                    "this manager reaches {reachable} of {} managers (a majority is {}); last acknowledged by a quorum {}",
                    voters.len(),
                    voters.len() / 2 + 1,
                    match other {
                        Some(ms) => format!("{ms} ms ago"),
                        None => "never in this term".into(),
                    }
                )))
            }
        }
    }

    /// Commits a command: here if this is the leader, else on the leader,
    /// within [`WRITE_BUDGET`] or, if it is shorter, what the caller waits
    /// (its gRPC deadline, less a second to answer in).
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, WriteError> {
        let budget = crate::deadline::remaining().map_or(WRITE_BUDGET, |left| {
            left.saturating_sub(Duration::from_secs(1))
        });
        self.propose_within(cmd, budget).await
    }

    /// Commits a command within `budget`: through an election it waits for
    /// the new leader, and a write whose outcome was unknown is retried
    /// under the same request id (see [`Command::Once`]), so that it
    /// applies once. The error says "not applied" only when no attempt can
    /// have been committed; otherwise the outcome is unknown.
    pub async fn propose_within(
        &self,
        cmd: Command,
        budget: Duration,
    ) -> Result<Outcome, WriteError> {
        let deadline = Instant::now() + budget.min(WRITE_BUDGET);
        let cmd = once(&cmd);
        let mut unknown: Option<WriteError> = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let result = match self.leader(remaining).await {
                Ok((leader, _)) if leader == self.raft_id => {
                    self.write_local_within(cmd.clone(), remaining).await
                }
                Ok((_, addr)) => self.forward(&addr, &cmd, remaining).await,
                Err(e) => Err(e),
            };
            let e = match result {
                Ok(out) => return Ok(out),
                Err(e @ (WriteError::Refused(_) | WriteError::Busy(_))) => {
                    // A refusal after an unknown attempt may be the first
                    // attempt's own effect ("name in use"): say so.
                    return Err(match (&e, unknown) {
                        (WriteError::Busy(_), Some(u)) => u,
                        _ => e,
                    });
                }
                Err(WriteError::Internal(m)) if !m.starts_with(NOT_LEADER) => {
                    return Err(unknown.unwrap_or(WriteError::Internal(m)));
                }
                // This manager leads but no majority answers it (it is cut
                // off): no new leader will reach it here, so say so now.
                Err(e @ WriteError::NoQuorum(_)) if self.is_leader() => {
                    return Err(unknown.unwrap_or(e));
                }
                Err(e) => e,
            };
            if e.maybe_applied() {
                unknown = Some(e.clone());
            }
            if Instant::now() >= deadline {
                return Err(unknown.unwrap_or(match e {
                    WriteError::Internal(_) => {
                        WriteError::NoQuorum("the leader kept changing".into())
                    }
                    e => e,
                }));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Commits on this node, which must be the leader. A request applied
    /// before is answered with what it made, from this leader's state.
    pub async fn write_local(&self, cmd: Command) -> Result<Outcome, WriteError> {
        self.write_local_within(cmd, WRITE_BUDGET).await
    }

    /// [`Manager::write_local`], waiting at most `budget` for the commit: a
    /// leader cut off after it took the write (its quorum check passed an
    /// instant before) answers in time, with an unknown outcome.
    pub async fn write_local_within(
        &self,
        cmd: Command,
        budget: Duration,
    ) -> Result<Outcome, WriteError> {
        let deadline = Instant::now() + budget;
        self.lead().await?;
        let (done, rx) = tokio::sync::oneshot::channel();
        let original = cmd.clone();
        self.proposals
            .try_send(Proposal { cmd, done })
            .map_err(|e| match e {
                tokio::sync::mpsc::error::TrySendError::Full(_) => {
                    WriteError::Busy(format!("{PROPOSAL_QUEUE} writes are queued on the leader"))
                }
                tokio::sync::mpsc::error::TrySendError::Closed(_) => {
                    WriteError::Internal("this manager is shutting down".into())
                }
            })?;
        // Answered when it commits, when the budget ends, or as soon as no
        // quorum has acknowledged this leader for QUORUM_STALE (it was cut
        // off after it took the write): each of the last two leaves the
        // outcome unknown.
        let wait = async {
            let mut rx = rx;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    r = &mut rx => return r.map_err(|_| {
                        WriteError::Unknown("this manager shut down during the write".into())
                    }),
                    _ = tick.tick() => {
                        if let Err(WriteError::NoQuorum(why)) = self.quorum_now() {
                            return Err(WriteError::Unknown(format!(
                                "the write was proposed, then this leader lost its quorum: {why}"
                            )));
                        }
                    }
                }
            }
        };
        let out = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), wait)
            .await
            .map_err(|_| {
                WriteError::Unknown(format!(
                    "the write was proposed but no quorum acknowledged it within {} ms",
                    budget.as_millis()
                ))
            })???;
        Ok(match (out, original) {
            (Outcome::AlreadyApplied, Command::Once { write, .. }) => {
                self.with_state(|s| s.outcome_of(&write))
            }
            (Outcome::Batch(results), Command::Batch { commands }) => Outcome::Batch(
                results
                    .into_iter()
                    .zip(&commands)
                    .map(|(r, c)| match (r, c) {
                        (Ok(Outcome::AlreadyApplied), Command::Once { write, .. }) => {
                            Ok(self.with_state(|s| s.outcome_of(write)))
                        }
                        (r, _) => r,
                    })
                    .collect(),
            ),
            (out, _) => out,
        })
    }

    /// Sends a write to the leader, which works on it for `budget` (plus
    /// the second it keeps to answer in): the answer comes back before
    /// this manager's own caller gives up.
    async fn forward(
        &self,
        addr: &str,
        cmd: &Command,
        budget: Duration,
    ) -> Result<Outcome, WriteError> {
        let channel = self
            .peers
            .channel_with(addr, FORWARD_TIMEOUT)
            .map_err(|s| WriteError::NoQuorum(s.message().to_owned()))?;
        let body = crate::codec::encode(cmd).map_err(|e| WriteError::Internal(e.to_string()))?;
        let mut request = tonic::Request::new(Internal { body });
        request.set_timeout(budget + Duration::from_secs(1));
        match ClusterClient::new(channel).propose(request).await {
            Ok(reply) => {
                let r: Result<Outcome, String> = crate::codec::decode(&reply.into_inner().body)
                    .map_err(|e| WriteError::Unknown(format!("bad reply from the leader: {e}")))?;
                r.map_err(WriteError::Refused)
            }
            Err(s) => Err(WriteError::from_leader(&s, addr)),
        }
    }

    /// Waits until this manager's state holds every write acknowledged
    /// before the call (a read index): on the leader, a quorum confirms it
    /// still leads; on a follower, the leader's applied index is fetched and
    /// waited for. Err says why the state may be stale (and by how much), for
    /// the reply to carry: reads are still served, marked.
    pub async fn read_barrier(&self) -> Result<(), String> {
        const WAIT: Duration = Duration::from_secs(1);
        if self.is_leader() {
            return match tokio::time::timeout(WAIT, self.raft.ensure_linearizable()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("this manager can't confirm it still leads: {e}")),
                Err(_) => Err(
                    "this manager can't confirm it still leads: no quorum answered within 1 s"
                        .into(),
                ),
            };
        }
        let m = self.metrics();
        let Some(addr) = m.current_leader.and_then(|l| {
            m.membership_config
                .membership()
                .get_node(&l)
                .map(|n| n.addr.clone())
        }) else {
            return Err("this manager sees no leader: its state may miss the newest writes".into());
        };
        let channel = self
            .peers
            .channel_with(&addr, WAIT)
            .map_err(|s| s.message().to_owned())?;
        let info = tokio::time::timeout(WAIT, ClusterClient::new(channel).info(proto::Empty {}))
            .await
            .map_err(|_| format!("the leader at {addr} did not answer within 1 s"))?
            .map_err(|s| {
                format!(
                    "cannot ask the leader at {addr}: {}",
                    crate::grpc::status_text(&s)
                )
            })?;
        let leader_applied = info.into_inner().last_applied.unwrap_or(0);
        let mut rx = self.raft.metrics();
        let caught_up = tokio::time::timeout(
            WAIT,
            rx.wait_for(|m| m.last_applied.is_some_and(|l| l.index >= leader_applied)),
        )
        .await;
        match caught_up {
            Ok(Ok(_)) => Ok(()),
            _ => {
                let here = self.metrics().last_applied.map_or(0, |l| l.index);
                Err(format!(
                    "this manager is {} entries behind the leader (applied {here} of {leader_applied})",
                    leader_applied.saturating_sub(here)
                ))
            }
        }
    }

    /// Set once [`Manager::shutdown`] starts: tasks holding the manager
    /// (dispatcher sessions, liveness) end on it.
    pub fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Tells the tasks holding this manager to end (see [`Manager::stopping`]).
    pub fn begin_shutdown(&self) {
        let _ = self.stop.send(true);
    }

    pub async fn shutdown(&self) {
        self.begin_shutdown();
        let loops = std::mem::take(&mut *self.liveness.lock().expect("liveness lock"));
        for task in loops {
            let _ = task.await;
        }
        self.dispatcher
            .wait_sessions_closed(Duration::from_secs(2))
            .await;
        let _ = self.raft.shutdown().await;
        // Raft's workers drop their store handles as they wind down; wait
        // for that, so the file is closed once this manager is dropped (a
        // restart in the same process reopens it at once).
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.sm.other_db_handles() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

pub use crate::ids::now_ms;

/// Waits this long after a change before looking, so that a burst of
/// Waits this long after a change before looking, so that a burst of
/// changes is one look and one batch.
const ORCHESTRATE_SETTLE: Duration = Duration::from_millis(20);

/// The orchestrator, on the leader: after each change of the state, and
/// when a restart delay or an update's monitor period ends, it runs
/// [`crate::orchestrator::reconcile_some`] on the services the change
/// touched and proposes the plan as one batch. A new leader looks at every
/// service first. Commands the state refuses are logged, and the next look
/// waits a second (no busy loop on a plan that cannot apply).
pub async fn orchestrate(m: Weak<Manager>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let Some(mut changes) = m.upgrade().map(|m| m.sm.changes()) else {
        return;
    };
    let mut leading = false;
    let mut wake: Option<u64> = None;
    let mut pending_said: Vec<(String, u32, String)> = Vec::new();
    loop {
        let mut pause = Duration::from_secs(1);
        let mut backoff = false;
        {
            let Some(mgr) = m.upgrade() else { return };
            if !mgr.is_leader() {
                leading = false;
            } else {
                if !leading {
                    leading = true;
                    mgr.sm.touch_all();
                }
                let now = now_ms();
                // The key manager: the encrypted networks' ring filled, then
                // one new key per rotation period.
                if let Some(n) = mgr.with_state(|s| crate::keys::due(s, now)) {
                    match mgr.with_state(|s| crate::keys::generate(s, n, now)) {
                        Ok(keys) => match mgr.propose(Command::RotateNetworkKeys { keys }).await {
                            Ok(_) => tracing::info!(added = n, "network key ring rotated"),
                            Err(e) => {
                                tracing::info!("network key rotation not committed: {e}");
                                backoff = true;
                            }
                        },
                        Err(e) => {
                            tracing::error!("network key rotation: {e}");
                            backoff = true;
                        }
                    }
                }
                let mut touched = mgr.sm.take_touched();
                if wake.is_some_and(|w| w <= now) {
                    touched.all = true;
                }
                let plan = if touched.is_empty() {
                    None
                } else {
                    Some(mgr.with_state(|s| {
                        crate::orchestrator::reconcile_some(s, now, &touched, crate::ids::new_id)
                    }))
                };
                if let Some(plan) = plan {
                    if touched.all {
                        wake = plan.wake_at_ms;
                    } else if let Some(w) = plan.wake_at_ms {
                        wake = Some(wake.map_or(w, |x| x.min(w)));
                    }
                    if plan.pending != pending_said {
                        for (service, slot, why) in &plan.pending {
                            tracing::warn!(%service, slot, "task not placed: {why}");
                        }
                        pending_said = plan.pending;
                    }
                    if !plan.commands.is_empty() {
                        let n = plan.commands.len();
                        match mgr
                            .propose(Command::Batch {
                                commands: plan.commands,
                            })
                            .await
                        {
                            Ok(Outcome::Batch(results)) => {
                                let refused: Vec<&String> =
                                    results.iter().filter_map(|r| r.as_ref().err()).collect();
                                if refused.is_empty() {
                                    pause = Duration::ZERO;
                                } else {
                                    tracing::warn!(
                                        commands = n,
                                        refused = refused.len(),
                                        first = %refused[0],
                                        "orchestrator: the state refused part of a plan"
                                    );
                                    mgr.sm.touch_all();
                                    backoff = true;
                                }
                            }
                            Ok(_) => pause = Duration::ZERO,
                            Err(e) => {
                                tracing::info!("orchestrator: plan not committed: {e}");
                                mgr.sm.touch_all();
                                backoff = true;
                            }
                        }
                    }
                }
            }
        }
        if pause.is_zero() {
            continue;
        }
        if backoff {
            tokio::select! {
                () = crate::shutdown::stopped(&mut stop) => return,
                () = tokio::time::sleep(pause) => continue,
            }
        }
        let until_wake = wake.map_or(pause, |w| {
            Duration::from_millis(w.saturating_sub(now_ms())).min(pause)
        });
        tokio::select! {
            () = crate::shutdown::stopped(&mut stop) => return,
            r = changes.changed() => {
                if r.is_err() { return; }
                tokio::time::sleep(ORCHESTRATE_SETTLE).await;
            }
            () = tokio::time::sleep(until_wake) => {}
        }
    }
}
