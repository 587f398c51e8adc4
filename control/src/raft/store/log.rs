//! The Raft log, the vote and the committed index: appends go to a writer
//! thread that commits what has queued up in one transaction (group commit).

use super::*;

/// The Raft log, vote and committed index.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    key: Arc<Key>,
    /// Appended entries not yet on disk, by index.
    pending: Arc<Mutex<BTreeMap<u64, Entry<TypeConfig>>>>,
    writer: Arc<Writer>,
}

impl LogStore {
    /// The log of `db`, with its writer thread started.
    pub(super) fn start(db: Arc<Database>, key: Arc<Key>) -> Result<LogStore, StoreError> {
        let pending = Arc::new(Mutex::new(BTreeMap::new()));
        let (tx, rx) = mpsc::channel();
        let thread = {
            let (db, key, pending) = (db.clone(), key.clone(), pending.clone());
            std::thread::Builder::new()
                .name("raft-log-writer".into())
                .spawn(move || log_writer(db, key, pending, rx))
                .map_err(|e| StorageIOError::write_logs(any(e)))?
        };
        Ok(LogStore {
            db,
            key,
            pending,
            writer: Arc::new(Writer {
                tx: Some(tx),
                thread: Some(thread),
            }),
        })
    }
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
        let table = self.log_table()?;
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

impl LogStore {
    /// The log as last committed to disk, for reading.
    fn log_table(&self) -> Result<redb::ReadOnlyTable<u64, &'static [u8]>, StoreError> {
        let tx = self
            .db
            .begin_read()
            .map_err(|e| StorageIOError::read_logs(any(e)))?;
        Ok(tx
            .open_table(LOG)
            .map_err(|e| StorageIOError::read_logs(any(e)))?)
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
        let table = self.log_table()?;
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
