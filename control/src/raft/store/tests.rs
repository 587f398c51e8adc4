//! The store against openraft's conformance suite, reopening, sealing at
//! rest and the format check.

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
            OpenError::Storage { source, .. } => *source,
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
