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
        source: Box<StoreError>,
    },
}

/// Records in `table`; 0 when the file has no such table.
fn rows<K: redb::Key + 'static, V: redb::Value + 'static>(
    tx: &redb::ReadTransaction,
    table: TableDefinition<K, V>,
) -> Result<u64, StoreError> {
    let r = |e: &dyn std::fmt::Display| StoreError::from(StorageIOError::read(any(e)));
    match tx.open_table(table) {
        Ok(t) => t.len().map_err(|e| r(&e)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(r(&e)),
    }
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
        None => (rows(&tx, LOG)? + rows(&tx, META)? > 0).then_some(1),
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
        source: Box::new(source),
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
    let logs = LogStore::start(db.clone(), key.clone())?;
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

mod log;
mod machine;
#[cfg(test)]
pub(crate) mod tests;

pub use log::LogStore;
pub use machine::StateMachineStore;
