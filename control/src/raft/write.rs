//! The write path's pieces: [`WriteError`] (and whether a write may
//! still have happened), and the leader's batcher, which commits queued
//! writes as one log entry.

use std::{sync::Arc, time::Duration};

use openraft::error::{ClientWriteError, RaftError};
use tonic::Code;

use crate::{
    raft::store::TypeConfig,
    state::{Command, Outcome},
};

type Raft = openraft::Raft<TypeConfig>;

/// Prefix of the error a non-leader gives to a forwarded write.
pub const NOT_LEADER: &str = "not the leader:";
/// How long a leader waits for a write to commit.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a write did not succeed, and whether it may still have happened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// The state machine refused the command; the text is for the user.
    #[error("{0}")]
    Refused(String),
    /// Not applied: no leader, or the leader has no quorum. Safe to retry.
    #[error("no quorum: {0} (not applied)")]
    NoQuorum(String),
    /// Not applied: the leader's queue of writes is full. Retry shortly.
    #[error("manager busy, retry: {0} (not applied)")]
    Busy(String),
    /// The write may or may not have been committed: it reached a leader
    /// that then stopped answering, or did not commit in time.
    #[error(
        "outcome unknown: {0}. The write may have been applied: look (meshctl service ls, \
         network ls or node ls) before retrying"
    )]
    Unknown(String),
    #[error("{0}")]
    Internal(String),
}

/// Prefixes that carry a [`WriteError`]'s kind across a forwarded write.
const NO_QUORUM: &str = "no quorum: ";
const BUSY: &str = "manager busy, retry: ";
const UNKNOWN: &str = "outcome unknown: ";

impl From<WriteError> for tonic::Status {
    fn from(e: WriteError) -> tonic::Status {
        match e {
            WriteError::Refused(m) => tonic::Status::failed_precondition(m),
            e @ (WriteError::NoQuorum(_) | WriteError::Busy(_)) => {
                tonic::Status::unavailable(e.to_string())
            }
            e @ WriteError::Unknown(_) => tonic::Status::unknown(e.to_string()),
            WriteError::Internal(m) => tonic::Status::internal(m),
        }
    }
}

impl WriteError {
    /// The error a forwarded write's status stands for.
    pub(super) fn from_leader(s: &tonic::Status, addr: &str) -> WriteError {
        let m = s.message();
        // Our own kinds first (their text ends in a note we don't repeat).
        let inner = |prefix: &str| {
            m.strip_prefix(prefix).map(|rest| {
                rest.trim_end_matches(" (not applied)")
                    .split(". The write may have been applied")
                    .next()
                    .unwrap_or(rest)
                    .to_owned()
            })
        };
        if let Some(r) = inner(NO_QUORUM) {
            return WriteError::NoQuorum(r);
        }
        if let Some(r) = inner(BUSY) {
            return WriteError::Busy(r);
        }
        if let Some(r) = inner(UNKNOWN) {
            return WriteError::Unknown(r);
        }
        if m.starts_with(NOT_LEADER) {
            return WriteError::Internal(m.to_owned());
        }
        let text = crate::grpc::status_text(s);
        match s.code() {
            Code::DeadlineExceeded | Code::Cancelled => {
                WriteError::Unknown(format!("the leader at {addr} did not answer in time"))
            }
            // A connection that never opened carried nothing.
            Code::Unavailable | Code::Unknown if model::api::never_sent(&text) => {
                WriteError::NoQuorum(format!("cannot reach the leader at {addr}: {text}"))
            }
            Code::Unavailable | Code::Unknown => WriteError::Unknown(format!(
                "the connection to the leader at {addr} failed during the write: {text}"
            )),
            _ => WriteError::Internal(format!("the leader at {addr} answered: {text}")),
        }
    }

    /// Whether a retry may still have to find out about an earlier attempt.
    pub(super) fn maybe_applied(&self) -> bool {
        matches!(self, WriteError::Unknown(_))
    }
}

/// A write waiting to be committed by the batcher.
pub(super) struct Proposal {
    pub(super) cmd: Command,
    pub(super) done: tokio::sync::oneshot::Sender<Result<Outcome, WriteError>>,
}

/// Batches in flight at once; while they are, new writes queue up and go
/// out together as one log entry. Measured with 64 clients on 2 cores:
/// 1 in flight gave 6.6k writes/s, 2 gave 5.8k, 4 gave 5.2k (bigger
/// batches beat more of them; see docs/BENCHMARKS.md).
const BATCHES_IN_FLIGHT: usize = 1;
const MAX_BATCH: usize = 512;
/// Writes queued on the leader at most; past it a write is refused as
/// "manager busy" (not applied) instead of queueing without bound.
pub const PROPOSAL_QUEUE: usize = 8192;

/// Commits queued writes: whatever has queued up goes out as one
/// [`Command::Batch`] entry, with a few batches in flight.
pub(super) async fn batcher(raft: Raft, mut rx: tokio::sync::mpsc::Receiver<Proposal>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let _permit = permit;
            commit_batch(&raft, batch).await;
        });
    }
}

async fn commit_batch(raft: &Raft, mut batch: Vec<Proposal>) {
    if batch.len() == 1 {
        let p = batch.pop().expect("one");
        let _ = p.done.send(commit(raft, p.cmd).await);
        return;
    }
    let commands = batch.iter().map(|p| p.cmd.clone()).collect();
    match commit(raft, Command::Batch { commands }).await {
        Ok(Outcome::Batch(results)) if results.len() == batch.len() => {
            for (p, r) in batch.into_iter().zip(results) {
                let _ = p.done.send(r.map_err(WriteError::Refused));
            }
        }
        Ok(other) => {
            for p in batch {
                let _ = p.done.send(Err(WriteError::Internal(format!(
                    "a batch of writes answered {other:?}"
                ))));
            }
        }
        Err(e) => {
            for p in batch {
                let _ = p.done.send(Err(e.clone()));
            }
        }
    }
}

/// One log entry through Raft, with a deadline.
pub(super) async fn commit(raft: &Raft, cmd: Command) -> Result<Outcome, WriteError> {
    match tokio::time::timeout(COMMIT_TIMEOUT, raft.client_write(cmd)).await {
        Ok(Ok(resp)) => resp.data.0.map_err(WriteError::Refused),
        // Refused before it was appended.
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Err(
            WriteError::Internal(format!("{NOT_LEADER} {:?}", f.leader_id)),
        ),
        Ok(Err(e)) => Err(WriteError::Unknown(format!("the leader stopped: {e}"))),
        Err(_) => Err(WriteError::Unknown(format!(
            "the write was not committed within {} s: a majority of managers is not answering \
             (it is in the leader's log, and takes effect if a majority later accepts it)",
            COMMIT_TIMEOUT.as_secs()
        ))),
    }
}
