//! [`Node`]: the agent's sink. Each update of the cluster's tables
//! becomes this node's data plane in the order of [`crate::reconcile`],
//! and the task namespaces it wired are counted for the runner.

use std::{collections::HashMap, net::Ipv4Addr, sync::Arc};

use control::agent::Sink;
use dataplane::{dns::Dns, tables::NodeView};
use model::{
    session::Update,
    tables::{Key, Tables, Value},
};
use tokio::sync::{Mutex, watch};

use crate::{Dataplane, error::ApplyError};

/// Task namespace -> endpoints of it applied (see `runner::Wired`).
pub type WiredCounts = HashMap<String, usize>;

/// This node as the agent drives it.
pub struct Node {
    /// The data plane was kept from an earlier meshd (see `Sink::warm`).
    warm: bool,
    node: String,
    /// This node's underlay address: where published ports answer.
    underlay: Ipv4Addr,
    view: NodeView,
    /// None: a control-plane-only node (no `--underlay`).
    dataplane: Option<Arc<Mutex<Dataplane>>>,
    dns: Dns,
    wired: watch::Sender<WiredCounts>,
}

impl Node {
    /// `wired` is what the runner waits on before it starts a task.
    pub async fn new(
        node: &str,
        underlay: Ipv4Addr,
        dataplane: Option<Arc<Mutex<Dataplane>>>,
        dns: Dns,
        wired: watch::Sender<WiredCounts>,
    ) -> Node {
        let warm = match &dataplane {
            Some(dp) => dp.lock().await.configured(),
            None => false,
        };
        Node {
            warm,
            node: node.to_owned(),
            underlay,
            view: NodeView::new(node, underlay),
            dataplane,
            dns,
            wired,
        }
    }

    async fn apply_dataplane(
        &mut self,
        tables: &Tables,
        update: Update<'_>,
    ) -> Result<(), ApplyError> {
        let Some(dp) = &self.dataplane else {
            return Ok(());
        };
        let mut dp = dp.lock().await;
        // 1-4: IPsec widened, the overlay, the load balancer, IPsec exact.
        let changes = crate::reconcile::apply_in_order(
            &mut *dp,
            &mut self.view,
            tables,
            update,
            &self.node,
            self.underlay,
        )
        .await?;
        // 5. DNS, after the overlay: a new task's namespace has its `lo` up.
        self.dns.update(tables, update, &self.node).await?;
        tracing::debug!(
            revision = tables.revision,
            overlay_changes = changes,
            dns_tasks = self.dns.served(),
            "tables applied"
        );
        Ok(())
    }

    /// Counts this node's task namespaces in the endpoints just applied:
    /// a task starts once all its networks are wired.
    fn note_wired(&self, tables: &Tables, update: Update<'_>) {
        let node = &self.node;
        self.wired
            .send_modify(|w| count_wired(w, node, tables, update));
    }
}

fn count_wired(w: &mut WiredCounts, node: &str, tables: &Tables, update: Update<'_>) {
    let mine = |v: &Option<Value>| match v {
        Some(Value::Endpoint(e)) if e.node == node => e.netns.clone(),
        _ => None,
    };
    match update {
        Update::Whole => {
            w.clear();
            for (_, _, e) in tables.endpoints() {
                if e.node == node
                    && let Some(n) = &e.netns
                {
                    *w.entry(n.clone()).or_default() += 1;
                }
            }
        }
        Update::Delta(changes) => {
            for c in changes
                .iter()
                .filter(|c| matches!(c.key, Key::Endpoint { .. }))
            {
                if let Some(n) = mine(&c.old)
                    && let Some(count) = w.get_mut(&n)
                {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        w.remove(&n);
                    }
                }
                if let Some(n) = mine(&c.new) {
                    *w.entry(n).or_default() += 1;
                }
            }
        }
    }
}

impl Sink for Node {
    type Error = ApplyError;

    fn warm(&self) -> bool {
        self.warm
    }

    async fn apply(&mut self, tables: &Tables, update: Update<'_>) -> Result<(), ApplyError> {
        let r = self.apply_dataplane(tables, update).await;
        if r.is_ok() {
            self.note_wired(tables, update);
        }
        r
    }
}
