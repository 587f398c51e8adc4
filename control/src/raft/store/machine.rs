//! The state machine: the cluster [`State`] in memory, the tables derived
//! from it, and its snapshots in the store.

use super::*;

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
        self.book = Book::new(self.last_applied.map_or(0, |l| l.index));
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
    pub(super) fn load(db: Arc<Database>, key: Arc<Key>) -> Result<StateMachineStore, StoreError> {
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
