//! The state's service commands: checks, endpoint allocation (VIPs, ports),
//! create, update, rollback, remove.

use super::*;

impl State {
    /// Everything about a service spec that does not need allocation.
    pub(super) fn check_service(
        &self,
        spec: &ServiceSpec,
        own_id: Option<&str>,
    ) -> Result<(), StateError> {
        check_name("service", &spec.name)?;
        if let Some(other) = self.service_by_ref(&spec.name)
            && Some(other.id.as_str()) != own_id
        {
            // A create retried after an unknown outcome finds its own work.
            return Err(if own_id.is_none() && other.spec == *spec {
                StateError::SameSpec {
                    kind: "service",
                    name: spec.name.clone(),
                    id: other.id.clone(),
                }
            } else {
                StateError::NameInUse {
                    kind: "service",
                    name: spec.name.clone(),
                }
            });
        }
        if spec.task.command.is_empty() || spec.task.command[0].is_empty() {
            return Err(invalid(format!(
                "service {}: a command is required",
                spec.name
            )));
        }
        let max_ms = crate::units::SPEC_MAX.as_millis() as u64;
        for (what, ms) in [
            ("restart delay", spec.task.restart.delay_ms),
            ("restart window", spec.task.restart.window_ms),
            ("update delay", spec.update.delay_ms),
            ("update monitor", spec.update.monitor_ms),
            ("rollback delay", spec.rollback.delay_ms),
            ("rollback monitor", spec.rollback.monitor_ms),
        ] {
            if ms > max_ms {
                return Err(invalid(format!(
                    "service {}: the {what} of {ms} ms is longer than the most a spec holds \
                     (365 days)",
                    spec.name
                )));
            }
        }
        model::constraint::parse_constraints(&spec.task.constraints)
            .map_err(|e| invalid(format!("service {}: {e}", spec.name)))?;
        for e in &spec.task.env {
            match e.split_once('=') {
                Some((k, _)) if !k.is_empty() && !k.contains(char::is_whitespace) => {}
                _ => {
                    return Err(invalid(format!(
                        "service {}: environment entry {e:?} must look like KEY=VALUE",
                        spec.name
                    )));
                }
            }
        }
        let mut seen = BTreeSet::new();
        for a in &spec.task.networks {
            let n = self
                .network_by_ref(&a.target)
                .ok_or_else(|| StateError::NotFound {
                    kind: "network",
                    name: a.target.clone(),
                })?;
            if n.ingress {
                return Err(invalid(format!(
                    "service {}: the ingress network is joined by publishing a port, not attached by hand",
                    spec.name
                )));
            }
            if !seen.insert(&n.id) {
                return Err(invalid(format!(
                    "service {}: network {} is attached twice",
                    spec.name, n.spec.name
                )));
            }
            for alias in &a.aliases {
                check_name("alias", alias)?;
            }
        }
        let mut ports = BTreeSet::new();
        for p in &spec.endpoint.ports {
            if p.target == 0 {
                return Err(invalid(format!(
                    "service {}: target port must be 1-65535",
                    spec.name
                )));
            }
            if p.published == Some(0) {
                return Err(invalid(format!(
                    "service {}: published port must be 1-65535 (leave it out to get one from 30000-32767)",
                    spec.name
                )));
            }
            if p.mode == PublishMode::Ingress && spec.endpoint.mode == EndpointMode::Dnsrr {
                return Err(invalid(format!(
                    "service {}: a port published in ingress mode needs endpoint mode vip, not dnsrr; use mode=host",
                    spec.name
                )));
            }
            if p.mode == PublishMode::Host && spec.task.networks.is_empty() {
                return Err(invalid(format!(
                    "service {}: a port published in mode=host reaches the task through one of its networks; attach one (--network NAME)",
                    spec.name
                )));
            }
            if p.mode == PublishMode::Host && p.published.is_none() {
                return Err(invalid(format!(
                    "service {}: a port published in mode=host needs published=PORT",
                    spec.name
                )));
            }
            if let Some(port) = p.published
                && !ports.insert((p.protocol, port))
            {
                return Err(invalid(format!(
                    "service {}: port {port}/{} is published twice",
                    spec.name, p.protocol
                )));
            }
        }
        if let ServiceMode::Replicated { replicas } = spec.mode
            && replicas > 10_000
        {
            return Err(invalid(format!(
                "service {}: {replicas} replicas is more than this cluster supports (10000)",
                spec.name
            )));
        }
        Ok(())
    }

    /// Publishes ports and takes VIPs for `spec`, keeping what `old` already
    /// had where it still applies. On error, everything taken is given back.
    pub(super) fn allocate_endpoint(
        &mut self,
        spec: &ServiceSpec,
        old: Option<&Service>,
    ) -> Result<(Vec<PortConfig>, Vec<Vip>), StateError> {
        let name = &spec.name;
        let mut taken_ports: Vec<(String, u16)> = Vec::new();
        let mut taken_vips: Vec<Vip> = Vec::new();
        let result = (|| {
            let mut ports = Vec::new();
            for p in &spec.endpoint.ports {
                let proto = p.protocol.to_string();
                let published = match (p.mode, p.published) {
                    (PublishMode::Host, Some(port)) => port,
                    (PublishMode::Host, None) => p.target,
                    (PublishMode::Ingress, Some(port)) => {
                        let held = old.is_some_and(|o| {
                            o.ports.iter().any(|q| {
                                q.mode == PublishMode::Ingress
                                    && q.protocol == p.protocol
                                    && q.published == Some(port)
                            })
                        });
                        if !held {
                            self.alloc.ports.reserve(&proto, port, name)?;
                            taken_ports.push((proto, port));
                        }
                        port
                    }
                    (PublishMode::Ingress, None) => {
                        // Keep the port an unchanged auto-published target had.
                        let kept = old.and_then(|o| {
                            let i = o.spec.endpoint.ports.iter().position(|q| {
                                q.published.is_none()
                                    && q.target == p.target
                                    && q.protocol == p.protocol
                                    && q.mode == PublishMode::Ingress
                            })?;
                            o.ports[i].published
                        });
                        match kept {
                            Some(port) => port,
                            None => {
                                let port = self.alloc.ports.allocate(&proto, name)?;
                                taken_ports.push((proto, port));
                                port
                            }
                        }
                    }
                };
                ports.push(PortConfig {
                    published: Some(published),
                    ..p.clone()
                });
            }
            let mut vips = Vec::new();
            if spec.endpoint.mode == EndpointMode::Vip {
                let mut nets: Vec<String> = spec
                    .task
                    .networks
                    .iter()
                    .filter_map(|a| self.network_by_ref(&a.target).map(|n| n.id.clone()))
                    .collect();
                if ports.iter().any(|p| p.mode == PublishMode::Ingress)
                    && let Some(i) = self.ingress()
                {
                    nets.push(i.id.clone());
                }
                for net in nets {
                    if let Some(v) = old.and_then(|o| o.vips.iter().find(|v| v.network == net)) {
                        vips.push(v.clone());
                        continue;
                    }
                    let pool = self.alloc.addresses.get_mut(&net).expect("indexed");
                    let addr = pool.allocate()?;
                    let vip = Vip { network: net, addr };
                    taken_vips.push(vip.clone());
                    vips.push(vip);
                }
            }
            Ok((ports, vips))
        })();
        if result.is_err() {
            for (proto, port) in taken_ports {
                self.alloc.ports.release(&proto, port);
            }
            for v in taken_vips {
                if let Some(pool) = self.alloc.addresses.get_mut(&v.network) {
                    pool.release(v.addr);
                }
            }
        }
        result
    }

    /// Gives back what `old` held and `new` (if any) no longer does.
    pub(super) fn release_endpoint(&mut self, old: &Service, new: Option<(&[PortConfig], &[Vip])>) {
        for p in old.ports.iter().filter(|p| p.mode == PublishMode::Ingress) {
            let still = new.is_some_and(|(ports, _)| {
                ports.iter().any(|q| {
                    q.mode == PublishMode::Ingress
                        && q.protocol == p.protocol
                        && q.published == p.published
                })
            });
            if !still {
                self.alloc
                    .ports
                    .release(&p.protocol.to_string(), p.published.expect("resolved"));
            }
        }
        for v in &old.vips {
            if !new.is_some_and(|(_, vips)| vips.contains(v))
                && let Some(pool) = self.alloc.addresses.get_mut(&v.network)
            {
                pool.release(v.addr);
            }
        }
    }

    pub(super) fn create_service(
        &mut self,
        id: &str,
        spec: &ServiceSpec,
    ) -> Result<Outcome, StateError> {
        self.check_service(spec, None)?;
        if self.services.contains_key(id) {
            return Err(invalid(format!("service id {id} is already in use")));
        }
        let (ports, vips) = self.allocate_endpoint(spec, None)?;
        let service = Service {
            id: id.to_owned(),
            version: 1,
            spec: spec.clone(),
            previous: None,
            vips,
            ports,
            update_status: None,
        };
        self.services.insert(id.to_owned(), service.clone());
        self.alloc
            .service_names
            .insert(spec.name.clone(), id.to_owned());
        Ok(Outcome::Service(Box::new(service)))
    }

    pub(super) fn update_service(
        &mut self,
        target: &str,
        version: u64,
        spec: &ServiceSpec,
    ) -> Result<Outcome, StateError> {
        let old = self.service_owned(target)?;
        if old.version != version {
            return Err(StateError::Conflict {
                kind: "service",
                name: old.spec.name.clone(),
                current: old.version,
                given: version,
            });
        }
        self.check_service(spec, Some(&old.id))?;
        // Ports the service gives up must not block ports it takes, and the
        // old ones come back if the new ones cannot be had.
        let (ports, vips) = self.allocate_endpoint(spec, Some(&old))?;
        self.release_endpoint(&old, Some((&ports, &vips)));
        // A new task template starts a rolling update; a change of
        // replicas or ports alone does not.
        let update_status = if spec.task != old.spec.task {
            Some(UpdateStatus {
                state: UpdateState::Updating,
                from_seq: self.task_seq,
                message: "update in progress".into(),
            })
        } else {
            old.update_status.clone()
        };
        let service = Service {
            id: old.id.clone(),
            version: old.version + 1,
            spec: spec.clone(),
            previous: Some(old.spec.clone()),
            vips,
            ports,
            update_status,
        };
        self.services.insert(old.id.clone(), service.clone());
        self.alloc.service_names.remove(&old.spec.name);
        self.alloc
            .service_names
            .insert(spec.name.clone(), old.id.clone());
        Ok(Outcome::Service(Box::new(service)))
    }

    /// The previous spec comes back (its ports and VIPs allocated again as
    /// an update would); the spec rolled back from becomes the previous.
    pub(super) fn rollback_service(
        &mut self,
        target: &str,
        message: &str,
    ) -> Result<Outcome, StateError> {
        let old = self.service_owned(target)?;
        let Some(previous) = old.previous.clone() else {
            return Err(invalid(format!(
                "service {}: there is no previous spec to roll back to",
                old.spec.name
            )));
        };
        self.update_service(&old.id, old.version, &previous)?;
        let svc = self.services.get_mut(&old.id).expect("just updated");
        svc.update_status = Some(UpdateStatus {
            state: UpdateState::RollbackStarted,
            from_seq: self.task_seq,
            message: if message.is_empty() {
                "manually requested rollback".into()
            } else {
                message.to_owned()
            },
        });
        Ok(Outcome::Service(Box::new(svc.clone())))
    }

    pub(super) fn remove_service(&mut self, target: &str) -> Result<Outcome, StateError> {
        let old = self.service_owned(target)?;
        self.remove_tasks_where(|t| t.service == old.id);
        self.release_endpoint(&old, None);
        self.services.remove(&old.id);
        self.alloc.service_names.remove(&old.spec.name);
        self.alloc.templates.remove(&old.id);
        Ok(Outcome::Done)
    }
}
