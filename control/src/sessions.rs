//! The leader's registry of agent sessions: which node has one, its last
//! heartbeat and acked revision. The dispatcher service fills it; the
//! liveness check and `meshctl` progress read it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{state::State, tables::Revision};

#[derive(Debug, Clone)]
pub(crate) struct Session {
    /// Distinguishes a replaced session from the current one.
    pub(crate) token: u64,
    pub(crate) last_heartbeat: Instant,
    pub(crate) acked: Revision,
    pub(crate) connected: bool,
}

pub use model::api::{NodeProgress, Progress};

/// The leader's view of its agents.
#[derive(Debug, Default)]
pub struct Dispatcher {
    sessions: Mutex<HashMap<String, Session>>,
    next_token: Mutex<u64>,
    /// One clone per running session task (each holds the manager).
    pub(crate) running: Arc<()>,
}

impl Dispatcher {
    /// Waits (up to `limit`) until every session task has ended; they end
    /// when their manager stops.
    pub async fn wait_sessions_closed(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Arc::strong_count(&self.running) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub(crate) fn open(&self, node: &str) -> u64 {
        let token = {
            let mut t = self.next_token.lock().expect("token lock");
            *t += 1;
            *t
        };
        // Acked starts over: the agent acks what it holds right after the
        // welcome (it may have lost its saved tables).
        self.sessions.lock().expect("sessions lock").insert(
            node.to_owned(),
            Session {
                token,
                last_heartbeat: Instant::now(),
                acked: 0,
                connected: true,
            },
        );
        token
    }

    pub(crate) fn with_session(&self, node: &str, token: u64, f: impl FnOnce(&mut Session)) {
        if let Some(s) = self.sessions.lock().expect("sessions lock").get_mut(node)
            && s.token == token
        {
            f(s)
        }
    }

    /// Node -> when its agent was last heard, and whether its session is
    /// still open.
    pub fn heard(&self) -> HashMap<String, (Instant, bool)> {
        self.sessions
            .lock()
            .expect("sessions lock")
            .iter()
            .map(|(k, s)| (k.clone(), (s.last_heartbeat, s.connected)))
            .collect()
    }

    /// Forgets every session (this manager stopped leading).
    pub(crate) fn clear(&self) {
        self.sessions.lock().expect("sessions lock").clear();
    }

    /// What the leader knows about each node of `state`, whose tables
    /// are at `revision`.
    pub fn progress(&self, state: &State, revision: Revision) -> Progress {
        let sessions = self.sessions.lock().expect("sessions lock");
        Progress {
            revision,
            nodes: state
                .nodes
                .values()
                .map(|n| NodeProgress {
                    id: n.id.clone(),
                    hostname: n.hostname.clone(),
                    status: n.status,
                    acked: sessions.get(&n.id).map(|s| s.acked),
                })
                .collect(),
        }
    }
}
