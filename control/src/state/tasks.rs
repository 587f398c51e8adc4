//! The state's task commands: create (addresses per network), shutdown,
//! status reports, removal.

use super::*;

impl State {
    pub(super) fn create_task(
        &mut self,
        id: &str,
        service: &str,
        slot: u32,
        node: &str,
        netns: Option<String>,
    ) -> Result<Outcome, StateError> {
        if self.tasks.contains_key(id) {
            return Err(invalid(format!("task id {id} is already in use")));
        }
        // What the task needs of its service and node, not copies of them.
        let (svc_id, networks) = {
            let svc = self
                .service_by_ref(service)
                .ok_or_else(|| StateError::NotFound {
                    kind: "service",
                    name: service.to_owned(),
                })?;
            (svc.id.clone(), self.network_ids_of(svc))
        };
        let Some((node_id, node_nets)) = self.nodes.get(node).map(|n| {
            let on: BTreeSet<String> = networks
                .iter()
                .filter(|net| n.lb_addrs.contains_key(*net))
                .cloned()
                .collect();
            (n.id.clone(), on)
        }) else {
            return Err(StateError::NotFound {
                kind: "node",
                name: node.to_owned(),
            });
        };
        let mut attachments = Vec::new();
        let mut node_lbs: Vec<(String, Ipv4Addr)> = Vec::new();
        let give_back =
            |s: &mut State, attachments: &[TaskAttachment], lbs: &[(String, Ipv4Addr)]| {
                let addrs = attachments.iter().map(|a| (&a.network, a.addr));
                for (net, addr) in addrs.chain(lbs.iter().map(|(n, a)| (n, *a))) {
                    if let Some(pool) = s.alloc.addresses.get_mut(net) {
                        pool.release(addr);
                    }
                }
            };
        for net in networks {
            let pool = self.alloc.addresses.get_mut(&net).expect("indexed");
            if !node_nets.contains(&net) {
                match pool.allocate() {
                    Ok(addr) => node_lbs.push((net.clone(), addr)),
                    Err(e) => {
                        give_back(self, &attachments, &node_lbs);
                        return Err(e.into());
                    }
                }
            }
            let pool = self.alloc.addresses.get_mut(&net).expect("indexed");
            match pool.allocate() {
                Ok(addr) => {
                    attachments.push(TaskAttachment {
                        network: net,
                        addr,
                        mac: model::tables::mac_of(addr),
                    });
                }
                Err(e) => {
                    give_back(self, &attachments, &node_lbs);
                    return Err(e.into());
                }
            }
        }
        if let Some(n) = self.nodes.get_mut(&node_id) {
            n.lb_addrs.extend(node_lbs);
        }
        // The slot's previous task (a global service's slot is its node).
        let key: SlotKey = (
            svc_id.clone(),
            slot,
            if slot == 0 {
                node_id.clone()
            } else {
                String::new()
            },
        );
        let previous = self
            .alloc
            .newest_of_slot(&key)
            .and_then(|id| self.tasks.get(id));
        let attempt = previous.map_or(0, |p| {
            if p.ended_by_itself() {
                p.attempt + 1
            } else {
                0
            }
        });
        self.task_seq += 1;
        let attached = netns.is_some();
        let spec = {
            let current = &self.services[&svc_id].spec.task;
            self.alloc.template(&svc_id, current)
        };
        let task = Task {
            id: id.to_owned(),
            service: svc_id,
            slot,
            node: node_id,
            desired: TaskState::Running,
            observed: TaskState::New,
            attachments,
            error: None,
            netns,
            exit_code: None,
            seq: self.task_seq,
            attempt,
            since_ms: 0,
            attached,
            spec,
        };
        self.alloc.slots.insert((key, task.seq), task.id.clone());
        self.alloc
            .by_node
            .entry(task.node.clone())
            .or_default()
            .insert(task.id.clone());
        self.tasks.insert(id.to_owned(), task.clone());
        self.bump_node(id);
        Ok(Outcome::Task(task))
    }

    /// Removes the tasks matching `which`, giving back their addresses.
    pub(super) fn remove_tasks_where(&mut self, which: impl Fn(&Task) -> bool) {
        let ids: Vec<String> = self
            .tasks
            .values()
            .filter(|t| which(t))
            .map(|t| t.id.clone())
            .collect();
        for id in ids {
            let _ = self.remove_task(&id); // listed just now, so present
        }
    }

    pub(super) fn task_mut(&mut self, id: &str) -> Result<&mut Task, StateError> {
        self.tasks.get_mut(id).ok_or_else(|| StateError::NotFound {
            kind: "task",
            name: id.to_owned(),
        })
    }

    /// Gives back an ended task's addresses; its endpoints go with them.
    pub(super) fn release_task_addresses(&mut self, id: &str) {
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        for a in std::mem::take(&mut t.attachments) {
            if let Some(pool) = self.alloc.addresses.get_mut(&a.network) {
                pool.release(a.addr);
            }
        }
    }

    pub(super) fn shutdown_task(&mut self, id: &str) -> Result<Outcome, StateError> {
        self.task_mut(id)?;
        self.bump_node(id);
        let t = self.task_mut(id)?;
        if t.desired < TaskState::Shutdown {
            t.desired = TaskState::Shutdown;
        }
        // Nothing runs it yet: nothing will report its end.
        if t.observed < TaskState::Starting {
            t.observed = TaskState::Shutdown;
            self.release_task_addresses(id);
        }
        Ok(Outcome::Task(self.tasks[id].clone()))
    }

    pub(super) fn set_task_status(
        &mut self,
        id: &str,
        observed: TaskState,
        netns: &Option<String>,
        exit_code: Option<i32>,
        error: &Option<String>,
        at_ms: u64,
    ) -> Result<Outcome, StateError> {
        if error.as_ref().is_some_and(|e| e.len() > REPORT_MAX)
            || netns.as_ref().is_some_and(|n| n.len() > REPORT_MAX)
        {
            return Err(invalid(format!(
                "task {id}: a report's error and namespace path are at most {REPORT_MAX} bytes"
            )));
        }
        let t = self.task_mut(id)?;
        if t.ended() && observed != t.observed {
            return Err(invalid(format!(
                "task {id} already ended ({:?}); its status cannot change to {observed:?}",
                t.observed
            )));
        }
        if observed < t.observed {
            return Err(invalid(format!(
                "task {id} is {:?}; a status cannot go back to {observed:?}",
                t.observed
            )));
        }
        if observed != t.observed {
            t.since_ms = at_ms;
        }
        t.observed = observed;
        if netns.is_some() {
            t.netns.clone_from(netns);
        }
        if exit_code.is_some() {
            t.exit_code = exit_code;
        }
        if error.is_some() {
            t.error.clone_from(error);
        }
        if observed >= TaskState::Complete {
            self.release_task_addresses(id);
        }
        self.bump_node(id);
        Ok(Outcome::Task(self.tasks[id].clone()))
    }

    pub(super) fn remove_task(&mut self, id: &str) -> Result<Outcome, StateError> {
        self.bump_node(id);
        let task = self.tasks.remove(id).ok_or_else(|| StateError::NotFound {
            kind: "task",
            name: id.to_owned(),
        })?;
        for a in &task.attachments {
            if let Some(pool) = self.alloc.addresses.get_mut(&a.network) {
                pool.release(a.addr);
            }
        }
        if let Some(ids) = self.alloc.by_node.get_mut(&task.node) {
            ids.remove(&task.id);
            if ids.is_empty() {
                self.alloc.by_node.remove(&task.node);
            }
        }
        let key = slot_key(&task);
        self.alloc.slots.remove(&(key, task.seq));
        Ok(Outcome::Done)
    }
}
