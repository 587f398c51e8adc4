//! The durable Raft store: the log, the vote and the committed index in a
//! redb file, the state machine ([`State`]) in memory, rebuilt at start from
//! the last snapshot (also in redb) plus the committed log after it.
//!
//! redb because it is pure Rust (no C++ toolchain, unlike RocksDB), ACID with
//! an fsync per committed write transaction, and one file per manager.
//!
//! The file's format is versioned ([`FORMAT`], in its own table): records
//! are sealed postcard ([`crate::codec`]). A file in another format is
//! refused with what to do ([`OpenError::Format`]), never half-read.
//!
//! Appends go to a writer thread that commits whatever has queued up in one
//! transaction (group commit), then tells openraft those entries are
//! durable. Until then they are held in memory, where readers see them (as
//! openraft requires). Truncation and purging go through the same queue, so
//! disk operations keep their order.

// openraft's StorageError is large, and its traits fix it as the error type.
#![allow(clippy::result_large_err)]

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Debug,
    io::Cursor,
    ops::RangeBounds,
    path::Path,
    sync::{Arc, Mutex, mpsc},
};

use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
    storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot},
};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::{
    raft::seal::Key,
    state::{Command, Outcome, State},
    tables::{Book, Revision, Touched},
};

/// What a committed command answered: the outcome, or the refusal as the
/// user should read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response(pub Result<Outcome, String>);

openraft::declare_raft_types!(
    /// mesh's Raft types: log entries carry [`Command`]s.
    pub TypeConfig: D = Command, R = Response
);

pub type NodeId = u64;
type StoreError = StorageError<NodeId>;

/// The store's format. 1: JSON records (wave 1, before the format was
/// recorded). 2: postcard records, externally tagged enums.
pub const FORMAT: u32 = 2;

const VERSION: TableDefinition<&str, u32> = TableDefinition::new("version");
const FORMAT_KEY: &str = "format";
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "last_purged";
const SNAPSHOT: &str = "snapshot";

fn any(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

/// Serializes and seals a record for `slot`.
fn encode<T: Serialize>(key: &Key, slot: &str, v: &T) -> Result<Vec<u8>, StoreError> {
    let plain = crate::codec::encode(v).map_err(|e| StorageIOError::write(any(e)))?;
    key.seal(slot.as_bytes(), &plain)
        .map_err(|e| StorageIOError::write(any(e)).into())
}

fn log_slot(index: u64) -> String {
    format!("log:{index}")
}

fn meta_slot(name: &str) -> String {
    format!("meta:{name}")
}

/// Opens and deserializes the record sealed for `slot`.
fn decode<T: for<'de> Deserialize<'de>>(
    key: &Key,
    slot: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    let plain = key
        .open(slot.as_bytes(), bytes)
        .map_err(|e| StorageIOError::read(any(e)))?;
    crate::codec::decode(&plain).map_err(|e| StorageIOError::read(any(e)).into())
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "{path} holds a Raft store in format {found}; this meshd reads format {FORMAT} only. \
         Its log cannot be carried over: stop this manager, move its data directory aside, \
         and join it again (meshd join with a manager token); it then receives the cluster's \
         state from the leader. For a single-manager cluster, keep running the meshd that \
         wrote it until the cluster has another manager"
    )]
    Format { path: String, found: u32 },
    #[error("{path}: {source}")]
    Storage {
        path: String,
        #[source]
        source: StoreError,
    },
}

/// Checks (or, for a new file, records) the format: `Ok` when the file is
/// in [`FORMAT`], the format found otherwise. A file with records and no
/// recorded format is format 1.
fn check_format(db: &Database) -> Result<Result<(), u32>, StoreError> {
    let r = |e: &dyn std::fmt::Display| StorageIOError::read(any(e));
    let tx = db.begin_read().map_err(|e| r(&e))?;
    let recorded = match tx.open_table(VERSION) {
        Ok(t) => t.get(FORMAT_KEY).map_err(|e| r(&e))?.map(|v| v.value()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(r(&e).into()),
    };
    let found = match recorded {
        Some(f) => Some(f),
        None => {
            let log = match tx.open_table(LOG) {
                Ok(t) => t.len().map_err(|e| r(&e))?,
                Err(redb::TableError::TableDoesNotExist(_)) => 0,
                Err(e) => return Err(r(&e).into()),
            };
            let meta = match tx.open_table(META) {
                Ok(t) => t.len().map_err(|e| r(&e))?,
                Err(redb::TableError::TableDoesNotExist(_)) => 0,
                Err(e) => return Err(r(&e).into()),
            };
            (log + meta > 0).then_some(1)
        }
    };
    drop(tx);
    match found {
        Some(f) if f == FORMAT => Ok(Ok(())),
        Some(f) => Ok(Err(f)),
        None => {
            let w = |e: &dyn std::fmt::Display| StorageIOError::write(any(e));
            let tx = db.begin_write().map_err(|e| w(&e))?;
            tx.open_table(VERSION)
                .map_err(|e| w(&e))?
                .insert(FORMAT_KEY, FORMAT)
                .map_err(|e| w(&e))?;
            tx.commit().map_err(|e| w(&e))?;
            Ok(Ok(()))
        }
    }
}

/// Opens (or creates) the store at `path` (one redb file shared by the log
/// and the state machine), every record sealed with `key`.
pub fn open(path: &Path, key: Key) -> Result<(LogStore, StateMachineStore), OpenError> {
    let storage = |source| OpenError::Storage {
        path: path.display().to_string(),
        source,
    };
    let db = Database::create(path).map_err(|e| storage(StorageIOError::read(any(e)).into()))?;
    if let Err(found) = check_format(&db).map_err(storage)? {
        return Err(OpenError::Format {
            path: path.display().to_string(),
            found,
        });
    }
    open_db(db, key).map_err(storage)
}

fn open_db(db: Database, key: Key) -> Result<(LogStore, StateMachineStore), StoreError> {
    let db = Arc::new(db);
    let key = Arc::new(key);
    let tx = db
        .begin_write()
        .map_err(|e| StorageIOError::write(any(e)))?;
    {
        tx.open_table(LOG)
            .map_err(|e| StorageIOError::write(any(e)))?;
        tx.open_table(META)
            .map_err(|e| StorageIOError::write(any(e)))?;
    }
    tx.commit().map_err(|e| StorageIOError::write(any(e)))?;
    let pending = Arc::new(Mutex::new(BTreeMap::new()));
    let (tx, rx) = mpsc::channel();
    let thread = {
        let (db, key, pending) = (db.clone(), key.clone(), pending.clone());
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || log_writer(db, key, pending, rx))
            .map_err(|e| StorageIOError::write_logs(any(e)))?
    };
    let logs = LogStore {
        db: db.clone(),
        key: key.clone(),
        pending,
        writer: Arc::new(Writer {
            tx: Some(tx),
            thread: Some(thread),
        }),
    };
    let sm = StateMachineStore::load(db, key)?;
    Ok((logs, sm))
}

fn meta_get<T: for<'de> Deserialize<'de>>(
    db: &Database,
    seal: &Key,
    key: &str,
) -> Result<Option<T>, StoreError> {
    let tx = db.begin_read().map_err(|e| StorageIOError::read(any(e)))?;
    let table = tx
        .open_table(META)
        .map_err(|e| StorageIOError::read(any(e)))?;
    match table.get(key).map_err(|e| StorageIOError::read(any(e)))? {
        Some(v) => decode(seal, &meta_slot(key), v.value()).map(Some),
        None => Ok(None),
    }
}

fn meta_put<T: Serialize>(db: &Database, seal: &Key, key: &str, v: &T) -> Result<(), StoreError> {
    meta_put_with(db, seal, key, v, true)
}

fn meta_put_with<T: Serialize>(
    db: &Database,
    seal: &Key,
    key: &str,
    v: &T,
    durable: bool,
) -> Result<(), StoreError> {
    let bytes = encode(seal, &meta_slot(key), v)?;
    let mut tx = db
        .begin_write()
        .map_err(|e| StorageIOError::write(any(e)))?;
    if !durable {
        tx.set_durability(redb::Durability::None);
    }
    {
        let mut table = tx
            .open_table(META)
            .map_err(|e| StorageIOError::write(any(e)))?;
        table
            .insert(key, bytes.as_slice())
            .map_err(|e| StorageIOError::write(any(e)))?;
    }
    tx.commit()
        .map_err(|e| StorageIOError::write(any(e)).into())
}

/// The Raft log, vote and committed index.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    key: Arc<Key>,
    /// Appended entries not yet on disk, by index.
    pending: Arc<Mutex<BTreeMap<u64, Entry<TypeConfig>>>>,
    writer: Arc<Writer>,
}

/// The writer thread's queue. When the last handle drops, the queue closes
/// and the thread is joined, so the database is closed when the store is.
struct Writer {
    tx: Option<mpsc::Sender<LogOp>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn send(&self, op: LogOp) -> Result<(), StoreError> {
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(op).ok())
            .ok_or_else(|| StorageIOError::write_logs(any("the log writer has stopped")).into())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Work for the log writer thread, in order.
enum LogOp {
    Append(Vec<Entry<TypeConfig>>, LogFlushed<TypeConfig>),
    /// The committed index: written with the next batch, never waited for.
    Committed(Option<LogId<NodeId>>),
    /// Delete this range of indexes, then answer.
    Delete(
        (std::ops::Bound<u64>, std::ops::Bound<u64>),
        tokio::sync::oneshot::Sender<Result<(), StoreError>>,
    ),
}

/// The log writer: takes every queued op, commits consecutive appends in
/// one transaction, and acknowledges them after the commit.
fn log_writer(
    db: Arc<Database>,
    key: Arc<Key>,
    pending: Arc<Mutex<BTreeMap<u64, Entry<TypeConfig>>>>,
    rx: mpsc::Receiver<LogOp>,
) {
    while let Ok(first) = rx.recv() {
        let mut ops = vec![first];
        while ops.len() < 4096
            && let Ok(op) = rx.try_recv()
        {
            ops.push(op);
        }
        let mut batch: Vec<(Vec<Entry<TypeConfig>>, LogFlushed<TypeConfig>)> = Vec::new();
        let mut committed = None;
        for op in ops {
            match op {
                LogOp::Append(entries, cb) => batch.push((entries, cb)),
                LogOp::Committed(c) => committed = Some(c),
                LogOp::Delete(range, done) => {
                    flush(&db, &key, &pending, std::mem::take(&mut batch));
                    let _ = done.send(delete_range(&db, range));
                }
            }
        }
        flush(&db, &key, &pending, batch);
        if let Some(c) = committed
            && let Err(e) = meta_put_with(&db, &key, COMMITTED, &c, false)
        {
            tracing::warn!("saving the committed index: {e}");
        }
    }
}

fn flush(
    db: &Database,
    key: &Key,
    pending: &Mutex<BTreeMap<u64, Entry<TypeConfig>>>,
    batch: Vec<(Vec<Entry<TypeConfig>>, LogFlushed<TypeConfig>)>,
) {
    if batch.is_empty() {
        return;
    }
    let r = write_log(db, |table| {
        for entry in batch.iter().flat_map(|(e, _)| e) {
            let bytes = encode(key, &log_slot(entry.log_id.index), entry)?;
            table
                .insert(entry.log_id.index, bytes.as_slice())
                .map_err(|e| StorageIOError::write_logs(any(e)))?;
        }
        Ok(())
    });
    if r.is_ok() {
        // On disk now: readers find them there. Only drop what was not
        // replaced since (a truncation followed by new appends).
        let mut p = pending.lock().expect("pending lock");
        for entry in batch.iter().flat_map(|(e, _)| e) {
            if p.get(&entry.log_id.index)
                .is_some_and(|e| e.log_id == entry.log_id)
            {
                p.remove(&entry.log_id.index);
            }
        }
    }
    // Durable (committed and fsynced) before openraft hears so.
    for (_, cb) in batch {
        let done = r
            .as_ref()
            .map(|_| ())
            .map_err(|e| std::io::Error::other(e.to_string()));
        cb.log_io_completed(done);
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StoreError> {
        // Pending first, disk second: an entry flushed in between is then
        // found on disk, never in neither place.
        let pending: Vec<(u64, Entry<TypeConfig>)> = self
            .pending
            .lock()
            .expect("pending lock")
            .range(range.clone())
            .map(|(i, e)| (*i, e.clone()))
            .collect();
        let tx = self
            .db
            .begin_read()
            .map_err(|e| StorageIOError::read_logs(any(e)))?;
        let table = tx
            .open_table(LOG)
            .map_err(|e| StorageIOError::read_logs(any(e)))?;
        let mut out = BTreeMap::new();
        for item in table
            .range(range.clone())
            .map_err(|e| StorageIOError::read_logs(any(e)))?
        {
            let (k, v) = item.map_err(|e| StorageIOError::read_logs(any(e)))?;
            out.insert(
                k.value(),
                decode::<Entry<TypeConfig>>(&self.key, &log_slot(k.value()), v.value())?,
            );
        }
        // Appended but not yet flushed: newer than what is on disk.
        out.extend(pending);
        Ok(out.into_values().collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StoreError> {
        // Pending first (see try_get_log_entries).
        let newest_pending = self
            .pending
            .lock()
            .expect("pending lock")
            .last_key_value()
            .map(|(_, e)| e.log_id);
        let last_purged: Option<LogId<NodeId>> = meta_get(&self.db, &self.key, PURGED)?;
        let tx = self
            .db
            .begin_read()
            .map_err(|e| StorageIOError::read_logs(any(e)))?;
        let table = tx
            .open_table(LOG)
            .map_err(|e| StorageIOError::read_logs(any(e)))?;
        let last = match table
            .last()
            .map_err(|e| StorageIOError::read_logs(any(e)))?
        {
            Some((k, v)) => Some(
                decode::<Entry<TypeConfig>>(&self.key, &log_slot(k.value()), v.value())?.log_id,
            ),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: newest_pending.or(last).or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StoreError> {
        meta_put(&self.db, &self.key, VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StoreError> {
        meta_get(&self.db, &self.key, VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StoreError> {
        // Queued, not waited for, and not fsynced: it only saves re-applying
        // entries after a restart, and the next log commit makes it durable.
        // Writing it here would block Raft behind the writer's fsync.
        self.writer.send(LogOp::Committed(committed))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StoreError> {
        Ok(meta_get::<Option<LogId<NodeId>>>(&self.db, &self.key, COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StoreError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        {
            let mut p = self.pending.lock().expect("pending lock");
            for e in &entries {
                p.insert(e.log_id.index, e.clone());
            }
        }
        self.writer.send(LogOp::Append(entries, callback))
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StoreError> {
        self.pending
            .lock()
            .expect("pending lock")
            .retain(|i, _| *i < log_id.index);
        self.delete(log_id.index..).await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StoreError> {
        meta_put(&self.db, &self.key, PURGED, &log_id)?;
        self.pending
            .lock()
            .expect("pending lock")
            .retain(|i, _| *i > log_id.index);
        self.delete(..=log_id.index).await
    }
}

impl LogStore {
    /// Deletes `range` from disk, after every append queued before it.
    async fn delete(&self, range: impl RangeBounds<u64>) -> Result<(), StoreError> {
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.writer.send(LogOp::Delete(bounds, tx))?;
        rx.await
            .map_err(|_| StorageIOError::write_logs(any("the log writer has stopped")))?
    }
}

fn delete_range(
    db: &Database,
    range: (std::ops::Bound<u64>, std::ops::Bound<u64>),
) -> Result<(), StoreError> {
    write_log(db, |table| {
        let keys: Vec<u64> = table
            .range(range)
            .map_err(|e| StorageIOError::write_logs(any(e)))?
            .map(|item| item.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()
            .map_err(|e| StorageIOError::write_logs(any(e)))?;
        for k in keys {
            table
                .remove(k)
                .map_err(|e| StorageIOError::write_logs(any(e)))?;
        }
        Ok(())
    })
}

/// Runs `f` on the log table in one write transaction and commits it
/// (redb's default durability: fsync on commit).
fn write_log(
    db: &Database,
    f: impl FnOnce(&mut redb::Table<u64, &[u8]>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let tx = db
        .begin_write()
        .map_err(|e| StorageIOError::write_logs(any(e)))?;
    {
        let mut table = tx
            .open_table(LOG)
            .map_err(|e| StorageIOError::write_logs(any(e)))?;
        f(&mut table)?;
    }
    tx.commit()
        .map_err(|e| StorageIOError::write_logs(any(e)).into())
}

/// A snapshot as stored: its metadata and the serialized state.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    data: Vec<u8>,
}

/// What the state machine has applied.
#[derive(Default, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, openraft::BasicNode>,
    state: State,
    /// The data-plane tables derived from `state` (not stored: rebuilt).
    #[serde(skip)]
    book: Book,
}

impl Applied {
    /// Rebuilds the derived parts after loading a snapshot.
    fn rebuild(&mut self) -> Result<(), crate::state::StateError> {
        self.state.reindex()?;
        self.book = Book::new(&self.state, self.last_applied.map_or(0, |l| l.index));
        Ok(())
    }
}

/// The cluster state as a Raft state machine.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    key: Arc<Key>,
    applied: Arc<Mutex<Applied>>,
    snapshot_seq: Arc<Mutex<u64>>,
    /// The tables' revision, for whoever waits on a change.
    revision: Arc<tokio::sync::watch::Sender<Revision>>,
    /// Bumped on every applied entry, table change or not (task states,
    /// update progress): what the orchestrator and the assignments follow.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// Node id -> what wakes its dispatcher session when its assignments
    /// change (only that session: the others sleep on).
    assigned: Arc<Mutex<HashMap<String, Arc<tokio::sync::Notify>>>>,
}

impl StateMachineStore {
    fn load(db: Arc<Database>, key: Arc<Key>) -> Result<StateMachineStore, StoreError> {
        let mut applied = Applied::default();
        if let Some(snap) = meta_get::<StoredSnapshot>(&db, &key, SNAPSHOT)? {
            applied = crate::codec::decode(&snap.data)
                .map_err(|e| StorageIOError::read_state_machine(any(e)))?;
        }
        applied
            .rebuild()
            .map_err(|e| StorageIOError::read_state_machine(any(e)))?;
        let revision = Arc::new(tokio::sync::watch::Sender::new(applied.book.revision()));
        Ok(StateMachineStore {
            db,
            key,
            applied: Arc::new(Mutex::new(applied)),
            snapshot_seq: Arc::default(),
            revision,
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
            assigned: Arc::default(),
        })
    }

    /// Handles on the database file besides this one (the log store and
    /// Raft's workers hold them until they have stopped).
    pub fn other_db_handles(&self) -> usize {
        Arc::strong_count(&self.db) - 1
    }

    /// Reads the state and its tables together (one consistent point).
    pub fn with_book<T>(&self, f: impl FnOnce(&State, &Book) -> T) -> T {
        let a = self.applied.lock().expect("state lock");
        f(&a.state, &a.book)
    }

    /// Follows the tables' revision.
    pub fn revisions(&self) -> tokio::sync::watch::Receiver<Revision> {
        self.revision.subscribe()
    }

    /// What changed since the last call, for the orchestrator.
    pub fn take_touched(&self) -> crate::state::Touched {
        self.applied
            .lock()
            .expect("state lock")
            .state
            .take_touched()
    }

    /// Makes the orchestrator look at every service next time.
    pub fn touch_all(&self) {
        self.applied.lock().expect("state lock").state.touch_all();
    }

    /// Notified whenever `node`'s assigned tasks may have changed.
    pub fn assignments_changed(&self, node: &str) -> Arc<tokio::sync::Notify> {
        self.assigned
            .lock()
            .expect("assigned lock")
            .entry(node.to_owned())
            .or_default()
            .clone()
    }

    fn wake_assigned(&self, nodes: BTreeSet<String>, all: bool) {
        let map = self.assigned.lock().expect("assigned lock");
        if all {
            map.values().for_each(|n| n.notify_one());
        } else {
            for n in nodes.iter().filter_map(|id| map.get(id)) {
                n.notify_one();
            }
        }
    }

    /// Follows every change of the state (a counter).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Reads the current cluster state in place.
    pub fn with_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.applied.lock().expect("state lock").state)
    }

    /// A copy of the current cluster state.
    pub fn state(&self) -> State {
        self.applied.lock().expect("state lock").state.clone()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StoreError> {
        let (data, last_applied, membership) = {
            let a = self.applied.lock().expect("state lock");
            (
                crate::codec::encode(&*a)
                    .map_err(|e| StorageIOError::write_state_machine(any(e)))?,
                a.last_applied,
                a.membership.clone(),
            )
        };
        let seq = {
            let mut s = self.snapshot_seq.lock().expect("seq lock");
            *s += 1;
            *s
        };
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
            None => format!("--{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        meta_put(
            &self.db,
            &self.key,
            SNAPSHOT,
            &StoredSnapshot {
                meta: meta.clone(),
                data: data.clone(),
            },
        )?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<NodeId>>,
            StoredMembership<NodeId, openraft::BasicNode>,
        ),
        StoreError,
    > {
        let a = self.applied.lock().expect("state lock");
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StoreError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut a = self.applied.lock().expect("state lock");
        let mut out = Vec::new();
        for entry in entries {
            a.last_applied = Some(entry.log_id);
            let r = match entry.payload {
                EntryPayload::Blank => Response(Ok(Outcome::Done)),
                EntryPayload::Normal(cmd) => {
                    let touched = Touched::before(&a.state, &cmd);
                    let r = a.state.apply(&cmd).map_err(|e| e.to_string());
                    if r.is_ok() {
                        let Applied { state, book, .. } = &mut *a;
                        book.update(state, touched, entry.log_id.index);
                    }
                    Response(r)
                }
                EntryPayload::Membership(m) => {
                    a.membership = StoredMembership::new(Some(entry.log_id), m);
                    Response(Ok(Outcome::Done))
                }
            };
            out.push(r);
        }
        let revision = a.book.revision();
        let bumped = a.state.take_bumped();
        drop(a);
        self.revision
            .send_if_modified(|r| std::mem::replace(r, revision) != revision);
        self.changes.send_modify(|c| *c += 1);
        self.wake_assigned(bumped, false);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StoreError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StoreError> {
        let data = snapshot.into_inner();
        let mut new: Applied =
            crate::codec::decode(&data).map_err(|e| StorageIOError::read_state_machine(any(e)))?;
        new.last_applied = meta.last_log_id;
        new.membership = meta.last_membership.clone();
        new.rebuild()
            .map_err(|e| StorageIOError::write_state_machine(any(e)))?;
        let revision = new.book.revision();
        meta_put(
            &self.db,
            &self.key,
            SNAPSHOT,
            &StoredSnapshot {
                meta: meta.clone(),
                data,
            },
        )?;
        *self.applied.lock().expect("state lock") = new;
        self.revision.send_replace(revision);
        self.changes.send_modify(|c| *c += 1);
        // A new state: every node's assignments may differ.
        self.wake_assigned(BTreeSet::new(), true);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StoreError> {
        Ok(
            meta_get::<StoredSnapshot>(&self.db, &self.key, SNAPSHOT)?.map(|s| Snapshot {
                meta: s.meta,
                snapshot: Box::new(Cursor::new(s.data)),
            }),
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        path::{Path, PathBuf},
        sync::atomic::{AtomicU32, Ordering},
    };

    use openraft::{
        storage::RaftLogStorageExt,
        testing::{StoreBuilder, Suite},
    };

    use super::*;

    /// A directory under the system temp dir, removed on Drop.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new() -> TempDir {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "mesh-store-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).expect("temp dir");
            TempDir(dir)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn test_key() -> Key {
        Key::from_bytes(&[9; 32])
    }

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
        async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StoreError> {
            let dir = TempDir::new();
            let (log, sm) = open(&dir.0.join("raft.redb"), test_key()).map_err(|e| match e {
                OpenError::Storage { source, .. } => source,
                other => StorageIOError::read(any(other)).into(),
            })?;
            Ok((dir, log, sm))
        }
    }

    fn entry(index: u64, cmd: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: openraft::testing::log_id(1, 1, index),
            payload: EntryPayload::Normal(cmd),
        }
    }

    #[test]
    fn a_reopened_store_has_its_vote_log_and_state() {
        let dir = TempDir::new();
        let path = dir.0.join("raft.redb");
        let init = Command::Init {
            cluster_id: "c".into(),
            ingress_id: "ing".into(),
            settings: Default::default(),
            secrets: None,
        };
        let net = Command::CreateNetwork {
            id: "n1".into(),
            spec: crate::state::NetworkSpec {
                name: "front".into(),
                ..Default::default()
            },
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let expected = rt.block_on(async {
            let (mut log, mut sm) = open(&path, test_key()).unwrap();
            let vote = Vote::new(3, 1);
            log.save_vote(&vote).await.unwrap();
            let entries = vec![entry(1, init), entry(2, net)];
            log.blocking_append(entries.clone()).await.unwrap();
            let answers = sm.apply(entries.clone()).await.unwrap();
            assert!(answers.iter().all(|r| r.0.is_ok()), "{answers:?}");
            sm.get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
            // One more entry after the snapshot: it must come back from the log.
            let more = entry(
                3,
                Command::RemoveNetwork {
                    target: "nope".into(),
                },
            );
            log.blocking_append([more.clone()]).await.unwrap();
            let answer = sm.apply([more]).await.unwrap();
            assert_eq!(answer[0].0, Err("network nope not found".to_string()));
            sm.state()
        });
        let (mut log, mut sm) = open(&path, test_key()).unwrap();
        rt.block_on(async {
            assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
            let state = log.get_log_state().await.unwrap();
            assert_eq!(state.last_log_id.map(|l| l.index), Some(3));
            let (applied, _) = sm.applied_state().await.unwrap();
            assert_eq!(applied.map(|l| l.index), Some(2), "the snapshot's point");
            assert_eq!(sm.state(), expected, "the snapshot's state");
            assert!(sm.state().network_by_ref("front").is_some());
        });
    }

    /// Every file under `dir`, as raw bytes.
    fn all_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(all_bytes(&path));
            } else {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
        out
    }

    #[test]
    fn no_service_name_or_secret_is_stored_in_plaintext() {
        let dir = TempDir::new();
        let keys = crate::raft::seal::DataKeys::create(dir.path(), false).unwrap();
        let (name, secret) = ("zebra-unique-svc", "hunter2-xyzzy-secret");
        let mut spec = crate::state::ServiceSpec {
            name: name.into(),
            mode: crate::state::ServiceMode::Replicated { replicas: 1 },
            task: Default::default(),
            endpoint: Default::default(),
            update: Default::default(),
            rollback: Default::default(),
        };
        spec.task.command = vec!["/bin/app".into()];
        spec.task.env = vec![format!("PASSWORD={secret}")];
        let entries = vec![
            entry(
                1,
                Command::Init {
                    cluster_id: "c".into(),
                    ingress_id: "ing".into(),
                    settings: Default::default(),
                    secrets: None,
                },
            ),
            entry(
                2,
                Command::CreateService {
                    id: "s1".into(),
                    spec,
                },
            ),
        ];
        let plain = crate::codec::encode(&entries).unwrap();
        assert!(
            plain.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the check itself works"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut log, mut sm) = open(&dir.path().join("raft.redb"), keys.data).unwrap();
            log.save_vote(&Vote::new(1, 1)).await.unwrap();
            log.blocking_append(entries.clone()).await.unwrap();
            let r = sm.apply(entries).await.unwrap();
            assert!(r.iter().all(|r| r.0.is_ok()), "{r:?}");
            sm.get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
            assert!(sm.state().service_by_ref(name).is_some());
        });
        let files = all_bytes(dir.path());
        assert!(
            files
                .iter()
                .any(|(p, b)| p.ends_with("raft.redb") && b.len() > 4096)
        );
        for (path, bytes) in &files {
            for needle in [name, secret] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                    "{needle:?} in plaintext in {}",
                    path.display()
                );
            }
        }
        // And it reads back with the keys from the data dir.
        let keys = crate::raft::seal::DataKeys::load(dir.path(), None).unwrap();
        let (_, sm) = open(&dir.path().join("raft.redb"), keys.data).unwrap();
        assert!(sm.state().service_by_ref(name).is_some());
    }

    #[test]
    fn openraft_storage_conformance_suite_passes() {
        Suite::test_all(Builder).unwrap();
    }

    /// A file as wave 1 wrote it: JSON records, no recorded format.
    fn wave_one_file(path: &Path) {
        let db = Database::create(path).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut log = tx.open_table(LOG).unwrap();
            let plain =
                serde_json::to_vec(&serde_json::json!({"log_id": {}, "payload": "Blank"})).unwrap();
            let sealed = test_key().seal(log_slot(1).as_bytes(), &plain).unwrap();
            log.insert(1, sealed.as_slice()).unwrap();
        }
        tx.commit().unwrap();
    }

    #[test]
    fn a_file_in_another_format_is_refused_untouched_and_says_what_to_do() {
        let dir = TempDir::new();
        let path = dir.path().join("raft.redb");
        wave_one_file(&path);
        let before = std::fs::read(&path).unwrap();
        let err = open(&path, test_key())
            .err()
            .expect("a format-1 file is refused");
        assert!(matches!(err, OpenError::Format { found: 1, .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("format 1") && text.contains("format 2"),
            "{text}"
        );
        assert!(text.contains("join it again"), "{text}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "a refused file is not written"
        );

        // A newer format than this meshd knows.
        let path = dir.path().join("newer.redb");
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(VERSION)
                .unwrap()
                .insert(FORMAT_KEY, FORMAT + 1)
                .unwrap();
            tx.commit().unwrap();
        }
        let err = open(&path, test_key())
            .err()
            .expect("a newer file is refused");
        assert!(
            matches!(err, OpenError::Format { found, .. } if found == FORMAT + 1),
            "{err:?}"
        );

        // A new file records the format and opens again.
        let path = dir.path().join("new.redb");
        drop(open(&path, test_key()).unwrap());
        drop(open(&path, test_key()).unwrap());
        let db = Database::open(&path).unwrap();
        let tx = db.begin_read().unwrap();
        let v = tx
            .open_table(VERSION)
            .unwrap()
            .get(FORMAT_KEY)
            .unwrap()
            .map(|v| v.value());
        assert_eq!(v, Some(FORMAT));
    }
}
