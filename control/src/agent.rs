//! The node agent: keeps a session with the leader's dispatcher, holds a
//! replica of the tables, hands every update to the data plane (a
//! [`Sink`]), and acks the revision once the data plane has applied it.
//!
//! - On (re)connect it says hello with the revision it last applied, and
//!   gets only the deltas after it, or a snapshot.
//! - It tries the managers it knows in turn, and follows a manager's
//!   "the dispatcher is at ..." answer to the leader.
//! - The replica is saved to `tables.json` in the data dir, so a restarted
//!   node resumes from its revision; and while no manager answers, the
//!   data plane keeps running on the last state it was given.
//! - The encrypted networks' key ring is never written there: it lives in
//!   memory only, and a started agent asks for it in its hello. Until it
//!   arrives, encrypted networks carry nothing (IPsec fails closed), and
//!   SAs the kernel kept across a meshd restart keep working.

use std::{
    collections::VecDeque,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use proto::{Internal, dispatcher_client::DispatcherClient};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use model::session::{
    AgentMessage, Assignment, DispatcherMessage, NOT_LEADER_DISPATCH, TaskReport,
};

use crate::{
    ca::tls::{self, Trust},
    context::Ctx,
    grpc::{MAX_MESSAGE, status_text},
    tables::{Key, Revision, Tables, Value},
};

pub use model::session::{Applied, Update};

/// The data plane, as the agent drives it.
pub trait Sink: Send + 'static {
    /// Why an update was not applied: logged with its whole chain, and the
    /// revision stays unacknowledged until the whole table applies.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Makes the data plane match `tables`, which `update` just produced.
    fn apply(
        &mut self,
        tables: &Tables,
        update: Update<'_>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Whether the data plane already holds state from an earlier run (a
    /// meshd restart, not a reboot): it is then newer than the saved
    /// replica, which may miss the last second of changes, and is kept as
    /// it is until the managers' current tables arrive.
    fn warm(&self) -> bool {
        false
    }
}

const TABLES_FILE: &str = "tables.json";
/// How often, at most, the replica is written.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// Reads the replica a previous run saved (an unreadable file is ignored:
/// the dispatcher then sends a snapshot).
pub fn load_replica(dir: &std::path::Path) -> Tables {
    std::fs::read(dir.join(TABLES_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The replica as it is saved: without the key ring.
fn at_rest(replica: &Tables) -> std::borrow::Cow<'_, Tables> {
    if replica.entries.contains_key(&Key::NetworkKeys) {
        let mut t = replica.clone();
        t.entries.remove(&Key::NetworkKeys);
        std::borrow::Cow::Owned(t)
    } else {
        std::borrow::Cow::Borrowed(replica)
    }
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    // The mode applies to a new file only: never reuse a leftover one.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

pub struct Agent<S: Sink> {
    ctx: Arc<Ctx>,
    sink: S,
    replica: Tables,
    /// Where the replica is saved, if anywhere.
    file: Option<PathBuf>,
    dirty: bool,
    saved_at: Option<Instant>,
    /// A warm restart: the data plane is left as the kernel kept it until
    /// the session has caught up (see [`Sink::warm`]).
    hold: bool,
    /// The data plane failed to apply the replica: nothing is acked until
    /// a whole apply succeeds.
    failed: bool,
    /// When the next whole apply is due after a failure.
    retry: Retry,
    /// What this node's tasks did, from the executor; sent in order, kept
    /// while no session is open.
    reports: Option<mpsc::UnboundedReceiver<TaskReport>>,
    unsent: VecDeque<TaskReport>,
    /// The tasks the leader assigned this node (None: not heard yet). Kept
    /// while no session is open: the tasks keep running.
    assigned: watch::Sender<Option<Vec<Assignment>>>,
    /// The prefixes on this node's underlay interface, from the node's
    /// watcher; sent after each hello and whenever they change.
    underlay: Option<watch::Receiver<Vec<crate::allocator::Subnet>>>,
}

enum Ended {
    Stop,
    /// Try this address next.
    Redirect(String),
    Failed(String),
    /// The cluster removed this node (`node rm`): nothing more will come.
    Removed(String),
}

impl<S: Sink> Agent<S> {
    pub fn new(ctx: Arc<Ctx>, sink: S, dir: Option<PathBuf>) -> Agent<S> {
        let replica = dir.as_deref().map(load_replica).unwrap_or_default();
        let mut agent = Agent {
            ctx,
            sink,
            replica,
            file: dir.map(|d| d.join(TABLES_FILE)),
            dirty: false,
            saved_at: None,
            hold: false,
            failed: false,
            retry: Retry::default(),
            reports: None,
            unsent: VecDeque::new(),
            assigned: watch::Sender::new(None),
            underlay: None,
        };
        if agent.replica.entries.contains_key(&Key::NetworkKeys) {
            // Saved by an older meshd, key ring included: rewritten without
            // it now, not at the next change (a quiet cluster has none).
            agent.dirty = true;
            agent.save();
        }
        agent
    }

    /// Reports what `prefixes` holds to the dispatcher, now and whenever it
    /// changes (the cluster keeps every network off those prefixes).
    pub fn follow_underlay(&mut self, prefixes: watch::Receiver<Vec<crate::allocator::Subnet>>) {
        self.underlay = Some(prefixes);
    }

    /// Where the executor sends what this node's tasks did; the agent
    /// passes it to the dispatcher, which commits it.
    pub fn task_reports(&mut self) -> mpsc::UnboundedSender<TaskReport> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.reports = Some(rx);
        tx
    }

    /// Follows the tasks the leader assigns this node.
    pub fn assignments(&self) -> watch::Receiver<Option<Vec<Assignment>>> {
        self.assigned.subscribe()
    }

    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        if self.replica.revision > 0 && self.sink.warm() {
            // The kernel kept the data plane across the restart, and it is
            // at least as new as the replica (saved at most every second):
            // applying the replica could take back the newest changes (a
            // task's veth, say). Nothing is touched until the session has
            // caught up; with no manager, the kernel's state stays.
            self.hold = true;
            tracing::info!(
                revision = self.replica.revision,
                "data plane kept from the previous run; waiting for the current tables"
            );
        } else if self.replica.revision > 0 {
            // After a reboot: the last state, before any manager answers.
            self.apply_whole().await;
            tracing::info!(
                revision = self.replica.revision,
                "data plane restored from the saved tables"
            );
        }
        let mut next = 0usize;
        let mut hint: Option<String> = None;
        let mut failures = 0u32;
        loop {
            let managers = self.ctx.managers.read().expect("managers lock").clone();
            let addr = match hint.take() {
                Some(a) => a,
                None if managers.is_empty() => {
                    tokio::select! {
                        () = stopped(&mut stop) => return,
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
                None => managers[next % managers.len()].clone(),
            };
            match self.session(&addr, &mut stop).await {
                Ended::Stop => {
                    self.save();
                    return;
                }
                Ended::Removed(why) => {
                    tracing::error!("this node was removed from the cluster: {why}");
                    self.ctx.removed.send_replace(Some(why));
                    return;
                }
                Ended::Redirect(to) => {
                    tracing::debug!(from = %addr, %to, "following the dispatcher");
                    hint = Some(to);
                    continue;
                }
                Ended::Failed(e) => {
                    failures += 1;
                    next += 1;
                    if failures % 10 == 3 {
                        tracing::warn!(manager = %addr, "agent session: {e}; keeping the data plane on revision {}", self.replica.revision);
                    } else {
                        tracing::debug!(manager = %addr, "agent session: {e}");
                    }
                }
            }
            let backoff = Duration::from_millis(100 * u64::from(failures.min(10)));
            tokio::select! {
                () = stopped(&mut stop) => { self.save(); return }
                () = tokio::time::sleep(backoff) => {}
            }
        }
    }

    fn save(&mut self) {
        if !self.dirty {
            return;
        }
        if let Some(path) = &self.file {
            let tmp = path.with_extension("json.tmp");
            // Owner-only, and without the key ring (see the module doc).
            let r = serde_json::to_vec(&at_rest(&self.replica))
                .map_err(|e| e.to_string())
                .and_then(|b| write_private(&tmp, &b).map_err(|e| e.to_string()))
                .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
            if let Err(e) = r {
                tracing::warn!("saving the tables to {}: {e}", path.display());
            }
        }
        self.dirty = false;
        self.saved_at = Some(Instant::now());
    }

    async fn session(&mut self, addr: &str, stop: &mut watch::Receiver<bool>) -> Ended {
        let channel = match tls::channel(
            addr,
            Trust::Node(self.ctx.creds.clone()),
            Duration::from_secs(2),
        ) {
            Ok(c) => c,
            Err(e) => return Ended::Failed(e.to_string()),
        };
        let (tx, rx) = mpsc::channel::<Internal>(16);
        let up = |m: &AgentMessage| Internal {
            body: crate::codec::encode(m).expect("agent message encodes"),
        };
        let _ = tx
            .send(up(&AgentMessage::Hello {
                revision: self.replica.revision,
                want_keys: self.replica.network_keys().is_none(),
            }))
            .await;
        let mut client = DispatcherClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let opened = tokio::time::timeout(
            Duration::from_secs(3),
            client.session(ReceiverStream::new(rx)),
        )
        .await;
        let mut inbound = match opened {
            Err(_) => return Ended::Failed("no answer within 3 s".into()),
            Ok(Err(s)) => return ended(&s),
            Ok(Ok(r)) => r.into_inner(),
        };
        let mut period = Duration::from_secs(1);
        let mut misses = 3u32;
        let mut beat = tokio::time::interval(period);
        // Heartbeats go out from their own task: a long apply (a whole
        // table, a slow kernel) holds up this loop, and must not make the
        // leader think the node died.
        let (beat_period, beat_rx) = watch::channel(period);
        let _heartbeats = Heartbeats(tokio::spawn(heartbeats(tx.clone(), beat_rx)));
        let mut save = tokio::time::interval(SAVE_EVERY);
        let mut heard = Instant::now();
        // The agent never blocks on sending: the dispatcher may be busy
        // sending a long catch-up and not reading. A full queue skips a
        // heartbeat; an ack not sent is retried on the next beat (only the
        // latest matters).
        let mut acked: Option<Revision> = None;
        // Sent once per session, then on every change.
        let mut underlay_due = self.underlay.is_some();
        let send = |m: &AgentMessage| match tx.try_send(up(m)) {
            Ok(()) => Ok(true),
            Err(mpsc::error::TrySendError::Full(_)) => Ok(false),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(Ended::Failed("session closed".into()))
            }
        };
        loop {
            // Reports first in, first out; a full queue keeps the rest for
            // the next turn.
            while let Some(r) = self.unsent.front() {
                match send(&AgentMessage::TaskStatus(r.clone())) {
                    Ok(true) => {
                        self.unsent.pop_front();
                    }
                    Ok(false) => break,
                    Err(e) => return e,
                }
            }
            if underlay_due && let Some(rx) = &self.underlay {
                let prefixes = rx.borrow().clone();
                match send(&AgentMessage::Underlay { prefixes }) {
                    Ok(sent) => underlay_due = !sent,
                    Err(e) => return e,
                }
            }
            let report = async {
                match &mut self.reports {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let underlay_changed = async {
                let ok = match &mut self.underlay {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => false,
                };
                if !ok {
                    // No watcher, or it ended: nothing more will change.
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = stopped(stop) => return Ended::Stop,
                Some(r) = report => {
                    self.unsent.push_back(r);
                    continue;
                }
                () = underlay_changed => {
                    underlay_due = true;
                    continue;
                }
                _ = save.tick() => self.save(),
                _ = beat.tick() => {
                    if heard.elapsed() > period * misses {
                        return Ended::Failed(format!(
                            "nothing from the dispatcher for {} ms", heard.elapsed().as_millis()
                        ));
                    }
                    if self.failed && self.retry.due(Instant::now()) {
                        // Retry the whole state until the data plane takes it.
                        self.apply_whole().await;
                    }
                }
                msg = inbound.message() => {
                    let msg = match msg {
                        Err(s) => return ended(&s),
                        Ok(None) => return Ended::Failed("the dispatcher closed the session".into()),
                        Ok(Some(b)) => match crate::codec::decode::<DispatcherMessage>(&b.body) {
                            Ok(m) => m,
                            Err(e) => return Ended::Failed(format!("invalid dispatcher message: {e}")),
                        },
                    };
                    match msg {
                        DispatcherMessage::Welcome { heartbeat_ms, misses: m } => {
                            period = Duration::from_millis(heartbeat_ms.max(10));
                            misses = m.max(1);
                            beat = tokio::time::interval(period);
                            beat_period.send_replace(period);
                            tracing::info!(manager = %addr, revision = self.replica.revision, "agent session open");
                        }
                        DispatcherMessage::Heartbeat => {}
                        DispatcherMessage::Assignments { tasks } => {
                            self.assigned.send_if_modified(|a| {
                                let changed = a.as_ref() != Some(&tasks);
                                *a = Some(tasks);
                                changed
                            });
                        }
                        DispatcherMessage::Snapshot { tables } => {
                            self.replica = tables;
                            self.dirty = true;
                            // A whole new base: on disk at once.
                            self.save();
                            if !self.hold {
                                self.apply_whole().await;
                            }
                        }
                        DispatcherMessage::Delta { delta } => {
                            // An old delta (already held) changes nothing.
                            if delta.revision > self.replica.revision {
                                if self.hold {
                                    // Catching up: the replica only.
                                    if let Err(e) = self.replica.apply(&delta) {
                                        tracing::warn!("catching up the tables: {e}");
                                    }
                                    self.dirty = true;
                                } else {
                                    self.apply_delta(&delta).await;
                                }
                            }
                        }
                        DispatcherMessage::Keys { entry } => {
                            self.set_keys(entry.map(|b| *b)).await;
                        }
                        DispatcherMessage::CaughtUp { revision } => {
                            if self.hold && self.replica.revision >= revision {
                                // Current now: one whole apply reconciles
                                // the kept data plane with it.
                                self.hold = false;
                                self.save();
                                self.apply_whole().await;
                                tracing::info!(revision, "data plane reconciled with the current tables");
                            }
                        }
                    }
                    // Heard now: a long apply is this side's delay, not the
                    // dispatcher's silence.
                    heard = Instant::now();
                }
            }
            // Ack what the data plane holds, once per revision.
            if !self.failed && !self.hold && acked != Some(self.replica.revision) {
                match send(&AgentMessage::Ack {
                    revision: self.replica.revision,
                }) {
                    Ok(true) => acked = Some(self.replica.revision),
                    Ok(false) => {}
                    Err(e) => return e,
                }
            }
        }
    }

    /// Puts the key ring the dispatcher sent into the replica (same
    /// revision) and hands the change to the data plane, unless holding.
    async fn set_keys(&mut self, entry: Option<Value>) {
        let key = Key::NetworkKeys;
        let old = self.replica.entries.get(&key).cloned();
        if old == entry {
            return;
        }
        match &entry {
            Some(v) => self.replica.entries.insert(key.clone(), v.clone()),
            None => self.replica.entries.remove(&key),
        };
        if self.hold {
            return;
        }
        let applied = [Applied {
            key,
            old,
            new: entry,
        }];
        self.hand(&applied).await;
    }

    /// Hands these changes to the sink; after a failure the data plane's
    /// state is unknown, and only the whole table brings it back.
    async fn hand(&mut self, applied: &[Applied]) {
        let r = if self.failed {
            // The replica has the change; the retry, when due, takes it
            // with the rest. A delta is no reason to retry sooner: at scale
            // every one would cost a whole apply.
            if !self.retry.due(Instant::now()) {
                return;
            }
            self.sink.apply(&self.replica, Update::Whole).await
        } else {
            self.sink.apply(&self.replica, Update::Delta(applied)).await
        };
        self.settle(r.map_err(|e| mtls::client::chain(&e)));
    }

    /// Hands the whole replica to the sink; on failure, retried later.
    async fn apply_whole(&mut self) {
        let r = self.sink.apply(&self.replica, Update::Whole).await;
        self.settle(r.map_err(|e| mtls::client::chain(&e)));
    }

    async fn apply_delta(&mut self, delta: &crate::tables::Delta) {
        let applied: Vec<Applied> = delta
            .changes
            .iter()
            .map(|c| Applied {
                key: c.key.clone(),
                old: self.replica.entries.get(&c.key).cloned(),
                new: c.value.clone(),
            })
            .collect();
        match self.replica.apply(delta) {
            Ok(false) => return,
            Ok(true) => {}
            Err(e) => {
                self.settle(Err(e.to_string()));
                return;
            }
        }
        self.dirty = true;
        // On disk at once unless saved in the last second (the tick flushes
        // the rest): a node that crashes right after its first update still
        // resumes from a revision.
        if self.saved_at.is_none_or(|t| t.elapsed() >= SAVE_EVERY) {
            self.save();
        }
        self.hand(&applied).await;
    }

    fn settle(&mut self, r: Result<(), String>) {
        match r {
            Ok(()) => {
                if self.failed {
                    tracing::info!(revision = self.replica.revision, "tables applied again");
                }
                self.failed = false;
                self.retry = Retry::default();
            }
            Err(e) => {
                let wait = self.retry.failed(Instant::now());
                tracing::debug!(?wait, "the next whole apply");
                if !self.failed {
                    tracing::error!(
                        revision = self.replica.revision,
                        "applying the tables: {e}; not acked, retrying the whole table"
                    );
                }
                self.failed = true;
            }
        }
    }
}

/// When a data plane that failed is next given the whole table: 250 ms
/// after the first failure, doubling to 5 s while it keeps failing. A
/// failing apply can cost as much as a whole one (a node short of map room
/// fails only at the end), and deltas keep coming.
#[derive(Debug, Default)]
struct Retry {
    failures: u32,
    at: Option<Instant>,
}

impl Retry {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(5);

    /// After a failure at `now`: how long until the next try.
    fn failed(&mut self, now: Instant) -> Duration {
        let wait = Self::FIRST
            .saturating_mul(1 << self.failures.min(16))
            .min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        self.at = Some(now + wait);
        wait
    }

    fn due(&self, now: Instant) -> bool {
        self.at.is_none_or(|t| now >= t)
    }
}

fn ended(s: &tonic::Status) -> Ended {
    let text = status_text(s);
    // The state a manager answers from is committed: one is enough.
    if crate::grpc::is_removal(s) {
        return Ended::Removed(text);
    }
    match s.message().strip_prefix(NOT_LEADER_DISPATCH) {
        Some(rest) => {
            let addr = rest.trim();
            if addr.contains(':') && !addr.contains(' ') {
                Ended::Redirect(addr.to_owned())
            } else {
                Ended::Failed(text)
            }
        }
        None => Ended::Failed(text),
    }
}

pub use crate::shutdown::stopped;

/// Sends a heartbeat every period (the current one from `period`) until
/// the session's queue closes. A full queue skips a beat: the dispatcher
/// is then behind in reading, and any message counts as one.
async fn heartbeats(tx: mpsc::Sender<Internal>, mut period: watch::Receiver<Duration>) {
    let beat = Internal {
        body: crate::codec::encode(&AgentMessage::Heartbeat).expect("a heartbeat encodes"),
    };
    loop {
        let every = *period.borrow_and_update();
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            r = period.changed() => {
                if r.is_err() {
                    return;
                }
                continue;
            }
        }
        if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(beat.clone()) {
            return;
        }
    }
}

/// Ends the heartbeat task with its session.
struct Heartbeats(tokio::task::JoinHandle<()>);

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_data_plane_is_retried_later_and_later_up_to_a_bound() {
        let t0 = Instant::now();
        let mut r = Retry::default();
        assert!(r.due(t0), "nothing failed: due at once");
        let waits: Vec<Duration> = (0..8).map(|_| r.failed(t0)).collect();
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
        assert!(!r.due(t0 + Duration::from_millis(4999)));
        assert!(r.due(t0 + Duration::from_secs(5)));
        // Thousands of failures neither overflow nor pass the bound.
        for _ in 0..10_000 {
            r.failed(t0);
        }
        assert!(r.due(t0 + Retry::MAX));
    }
}
