//! `meshctl service`: create, ls, ps, inspect, update, scale, rollback, logs, rm,
//! and the flags that build a service spec.

use crate::*;

#[derive(Args)]
pub(crate) struct ServiceOpts {
    /// Number of tasks (replicated mode).
    #[arg(long)]
    pub(crate) replicas: Option<u32>,
    /// Publish a port: published:target[/udp], or the long form
    /// mode=host,published=8080,target=80,protocol=udp.
    #[arg(long, short = 'p')]
    pub(crate) publish: Vec<String>,
    /// Attach to a network (name or id).
    #[arg(long)]
    pub(crate) network: Vec<String>,
    /// vip (a virtual IP per network) or dnsrr (DNS round robin).
    #[arg(long, value_enum)]
    pub(crate) endpoint_mode: Option<EndpointModeArg>,
    /// Environment variable (KEY=value).
    #[arg(long, short = 'e')]
    pub(crate) env: Vec<String>,
    /// Placement constraint: node.role==manager, node.hostname!=a,
    /// node.labels.zone==east (repeatable; on update, replaces the set).
    #[arg(long)]
    pub(crate) constraint: Vec<String>,
    /// Restart a task that ended: any, on-failure or none.
    #[arg(long, value_parser = ["any", "on-failure", "none"])]
    pub(crate) restart_condition: Option<String>,
    /// Wait between a task's end and its restart (e.g. 5s, 500ms).
    #[arg(long, value_parser = parse_ms)]
    pub(crate) restart_delay: Option<u64>,
    /// Give up a slot after this many restarts in a row (0: never); with
    /// --restart-window, this many within the window.
    #[arg(long)]
    pub(crate) restart_max_attempts: Option<u32>,
    /// The window --restart-max-attempts counts restarts in (e.g. 1m).
    #[arg(long, value_parser = parse_ms)]
    pub(crate) restart_window: Option<u64>,
    #[command(flatten)]
    pub(crate) update: UpdateOpts,
}

/// How a rolling update (or its rollback) replaces tasks.
#[derive(Args, Default)]
pub(crate) struct UpdateOpts {
    /// Tasks replaced at once (0: all).
    #[arg(long)]
    pub(crate) update_parallelism: Option<u32>,
    /// Wait between batches (e.g. 10s).
    #[arg(long, value_parser = parse_ms)]
    pub(crate) update_delay: Option<u64>,
    /// How long a new task must run before it counts as healthy.
    #[arg(long, value_parser = parse_ms)]
    pub(crate) update_monitor: Option<u64>,
    /// When a new task fails during the update: pause, continue or rollback.
    #[arg(long, value_parser = ["pause", "continue", "rollback"])]
    pub(crate) update_failure_action: Option<String>,
    /// stop-first (old task stops, then the new one starts) or start-first.
    #[arg(long, value_parser = ["stop-first", "start-first"])]
    pub(crate) update_order: Option<String>,
    #[arg(long)]
    pub(crate) rollback_parallelism: Option<u32>,
    #[arg(long, value_parser = parse_ms)]
    pub(crate) rollback_delay: Option<u64>,
    #[arg(long, value_parser = parse_ms)]
    pub(crate) rollback_monitor: Option<u64>,
    #[arg(long, value_parser = ["pause", "continue"])]
    pub(crate) rollback_failure_action: Option<String>,
    #[arg(long, value_parser = ["stop-first", "start-first"])]
    pub(crate) rollback_order: Option<String>,
}

/// "500ms", "5s", "2m", "1h30m" or plain seconds, in ms: at most a year
/// (what a service spec holds), checked, never overflowing.
pub(crate) fn parse_ms(s: &str) -> Result<u64, String> {
    model::units::Range {
        what: "a service duration",
        min: Duration::ZERO,
        max: model::units::SPEC_MAX,
    }
    .parse_ms(s)
    .map_err(|e| e.to_string())
}

/// Applies the `--<prefix>-*` options to `c`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply_update_opts(
    c: &mut model::UpdateConfig,
    parallelism: Option<u32>,
    delay: Option<u64>,
    monitor: Option<u64>,
    failure_action: Option<&str>,
    order: Option<&str>,
) {
    use model::{FailureAction, UpdateOrder};
    if let Some(p) = parallelism {
        c.parallelism = p;
    }
    if let Some(d) = delay {
        c.delay_ms = d;
    }
    if let Some(m) = monitor {
        c.monitor_ms = m;
    }
    match failure_action {
        Some("pause") => c.failure_action = FailureAction::Pause,
        Some("continue") => c.failure_action = FailureAction::Continue,
        Some("rollback") => c.failure_action = FailureAction::Rollback,
        _ => {}
    }
    match order {
        Some("stop-first") => c.order = UpdateOrder::StopFirst,
        Some("start-first") => c.order = UpdateOrder::StartFirst,
        _ => {}
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum EndpointModeArg {
    Vip,
    Dnsrr,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ModeArg {
    Replicated,
    Global,
}

#[derive(Subcommand)]
pub(crate) enum ServiceCmd {
    /// Create a service: meshctl service create --name web -p 8080:80 -- CMD ARGS
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum, default_value_t = ModeArg::Replicated)]
        mode: ModeArg,
        #[command(flatten)]
        opts: ServiceOpts,
        #[command(flatten)]
        wait: Wait,
        /// The task's command and arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List services.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        #[arg(long, short)]
        quiet: bool,
    },
    /// Show services in detail (JSON).
    Inspect {
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Set the replica count of replicated services: scale web=5 api=2.
    Scale {
        #[arg(required = true)]
        targets: Vec<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// List a service's tasks: each slot's current task, then its history
    /// (`\_` rows), newest first.
    Ps {
        service: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Full task ids.
        #[arg(long)]
        no_trunc: bool,
    },
    /// Change a service. Fields not given keep their value.
    Update {
        #[command(flatten)]
        opts: ServiceOpts,
        /// Replace the command and arguments.
        #[arg(long, num_args = 1.., allow_hyphen_values = true)]
        args: Option<Vec<String>>,
        #[command(flatten)]
        wait: Wait,
        service: String,
    },
    /// Show the output of a service's tasks, fetched from their nodes.
    Logs {
        service: String,
        /// Only the last N lines of each task.
        #[arg(long, short = 'n')]
        tail: Option<usize>,
        /// Full task ids.
        #[arg(long)]
        no_trunc: bool,
    },
    /// Go back to the spec before the last update, as a rolling update.
    Rollback {
        #[command(flatten)]
        wait: Wait,
        service: String,
    },
    /// Remove services.
    Rm {
        #[command(flatten)]
        wait: Wait,
        #[arg(required = true)]
        services: Vec<String>,
    },
}

/// Parses --publish: `8080:80`, `8080:80/udp`, `80` (auto-assigned), or
/// `mode=host,published=8080,target=80,protocol=udp`.
pub(crate) fn parse_publish(s: &str) -> Res<PortConfig> {
    let bad = |why: &str| {
        format!(
            "--publish {s:?}: {why}; use published:target[/udp] or mode=host,published=P,target=T"
        )
    };
    let port = |v: &str, what: &str| -> Res<u16> {
        v.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad(&format!("{what} port {v:?} is not 1-65535")))
    };
    if s.contains('=') {
        let mut p = PortConfig {
            protocol: Protocol::Tcp,
            target: 0,
            published: None,
            mode: PublishMode::Ingress,
        };
        for kv in s.split(',') {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(&format!("{kv:?} is not key=value")))?;
            match k {
                "mode" => {
                    p.mode = match v {
                        "host" => PublishMode::Host,
                        "ingress" => PublishMode::Ingress,
                        _ => return Err(bad("mode is host or ingress")),
                    }
                }
                "published" => p.published = Some(port(v, "published")?),
                "target" => p.target = port(v, "target")?,
                "protocol" => {
                    p.protocol = match v {
                        "tcp" => Protocol::Tcp,
                        "udp" => Protocol::Udp,
                        _ => return Err(bad("protocol is tcp or udp")),
                    }
                }
                other => return Err(bad(&format!("unknown key {other:?}"))),
            }
        }
        if p.target == 0 {
            return Err(bad("target is missing"));
        }
        return Ok(p);
    }
    let (ports, proto) = match s.split_once('/') {
        Some((p, "tcp")) => (p, Protocol::Tcp),
        Some((p, "udp")) => (p, Protocol::Udp),
        Some(_) => return Err(bad("protocol is tcp or udp")),
        None => (s, Protocol::Tcp),
    };
    let (published, target) = match ports.split_once(':') {
        Some((p, t)) => (Some(port(p, "published")?), port(t, "target")?),
        None => (None, port(ports, "target")?),
    };
    Ok(PortConfig {
        protocol: proto,
        target,
        published,
        mode: PublishMode::Ingress,
    })
}

pub(crate) fn apply_opts(spec: &mut ServiceSpec, o: ServiceOpts, creating: bool) -> Res {
    if let Some(r) = o.replicas {
        match &mut spec.mode {
            ServiceMode::Replicated { replicas } => *replicas = r,
            ServiceMode::Global => {
                return Err("--replicas applies to replicated services only".into());
            }
        }
    }
    if !o.publish.is_empty() {
        let ports = o
            .publish
            .iter()
            .map(|p| parse_publish(p))
            .collect::<Res<Vec<_>>>()?;
        if creating {
            spec.endpoint.ports = ports;
        } else {
            // Update: a port with the same target and protocol is replaced.
            for p in ports {
                spec.endpoint
                    .ports
                    .retain(|q| !(q.target == p.target && q.protocol == p.protocol));
                spec.endpoint.ports.push(p);
            }
        }
    }
    if !o.network.is_empty() {
        spec.task.networks = o
            .network
            .into_iter()
            .map(|target| NetworkAttachment {
                target,
                aliases: Vec::new(),
            })
            .collect();
    }
    if let Some(m) = o.endpoint_mode {
        spec.endpoint.mode = match m {
            EndpointModeArg::Vip => EndpointMode::Vip,
            EndpointModeArg::Dnsrr => EndpointMode::Dnsrr,
        };
    }
    if !o.constraint.is_empty() {
        model::constraint::parse_constraints(&o.constraint)?;
        spec.task.constraints = o.constraint;
    }
    let u = &o.update;
    apply_update_opts(
        &mut spec.update,
        u.update_parallelism,
        u.update_delay,
        u.update_monitor,
        u.update_failure_action.as_deref(),
        u.update_order.as_deref(),
    );
    apply_update_opts(
        &mut spec.rollback,
        u.rollback_parallelism,
        u.rollback_delay,
        u.rollback_monitor,
        u.rollback_failure_action.as_deref(),
        u.rollback_order.as_deref(),
    );
    match o.restart_condition.as_deref() {
        Some("any") => spec.task.restart.condition = model::RestartCondition::Any,
        Some("on-failure") => spec.task.restart.condition = model::RestartCondition::OnFailure,
        Some("none") => spec.task.restart.condition = model::RestartCondition::None,
        _ => {}
    }
    if let Some(d) = o.restart_delay {
        spec.task.restart.delay_ms = d;
    }
    if let Some(n) = o.restart_max_attempts {
        spec.task.restart.max_attempts = n;
    }
    if let Some(w) = o.restart_window {
        spec.task.restart.window_ms = w;
    }
    for e in o.env {
        if !e.contains('=') {
            return Err(format!("--env {e:?}: use KEY=value"));
        }
        let key = e.split('=').next().unwrap_or_default().to_owned();
        spec.task
            .env
            .retain(|x| x.split('=').next() != Some(key.as_str()));
        spec.task.env.push(e);
    }
    Ok(())
}

pub(crate) async fn inspect_service(c: &mut Client, target: &str) -> Res<Service> {
    from_reply(
        c.api
            .inspect_service(Ref {
                target: target.to_owned(),
            })
            .await
            .map_err(err)?,
    )
}

/// Replaces `cur`'s spec, refused if the service changed since it was read.
pub(crate) async fn update_spec(c: &mut Client, cur: &Service, spec: ServiceSpec) -> Res {
    c.api
        .update_service(UpdateServiceRequest {
            target: cur.id.clone(),
            version: cur.version,
            spec: Some(spec.into()),
        })
        .await
        .map_err(err)?;
    Ok(())
}

/// `web=5` -> ("web", 5).
pub(crate) fn parse_scale(arg: &str) -> Res<(String, u32)> {
    let bad = || format!("invalid scale specifier {arg:?}: use SERVICE=REPLICAS, e.g. web=5");
    let (name, n) = arg.split_once('=').ok_or_else(bad)?;
    if name.is_empty() {
        return Err(bad());
    }
    let n = n.parse::<u32>().map_err(|_| bad())?;
    Ok((name.to_owned(), n))
}

pub(crate) async fn service(c: &mut Client, cmd: ServiceCmd) -> Res {
    match cmd {
        ServiceCmd::Create {
            name,
            mode,
            opts,
            wait,
            command,
        } => {
            let mut spec = ServiceSpec {
                name,
                mode: match mode {
                    ModeArg::Replicated => ServiceMode::Replicated { replicas: 1 },
                    ModeArg::Global => ServiceMode::Global,
                },
                task: TaskTemplate {
                    command,
                    ..TaskTemplate::default()
                },
                endpoint: EndpointSpec::default(),
                update: Default::default(),
                rollback: Default::default(),
            };
            if matches!(mode, ModeArg::Global) && opts.replicas.is_some() {
                return Err("--replicas cannot be used with --mode global".into());
            }
            apply_opts(&mut spec, opts, true)?;
            let s: Service = from_reply(
                c.api
                    .create_service(proto::ServiceSpec::from(spec))
                    .await
                    .map_err(err)?,
            )?;
            println!("{}", s.id);
            converge(c, &wait).await?;
            converge_tasks(c, &wait, &s.id, false).await
        }
        ServiceCmd::Ls { format, quiet } => {
            let mut svcs: Vec<ServiceView> =
                from_reply(c.api.list_services(Empty {}).await.map_err(err)?)?;
            svcs.sort_by(|a, b| a.service.spec.name.cmp(&b.service.spec.name));
            if quiet {
                svcs.iter()
                    .for_each(|s| println!("{}", short(&s.service.id)));
            } else if format == Format::Json {
                print_json(&svcs);
            } else {
                let mut t = Table::new(&["ID", "NAME", "MODE", "REPLICAS", "COMMAND", "PORTS"]);
                for v in &svcs {
                    let s = &v.service;
                    let (mode, desired) = match s.spec.mode {
                        ServiceMode::Replicated { replicas } => {
                            ("replicated", replicas.to_string())
                        }
                        ServiceMode::Global => ("global", "-".into()),
                    };
                    t.row(vec![
                        short(&s.id).into(),
                        s.spec.name.clone(),
                        mode.into(),
                        format!("{}/{desired}", v.running),
                        s.spec.task.command.join(" "),
                        ports_column(s),
                    ]);
                }
                print!("{t}");
            }
            Ok(())
        }
        ServiceCmd::Ps {
            service,
            format,
            no_trunc,
        } => {
            let tasks: Vec<TaskView> = from_reply(
                c.api
                    .list_tasks(Ref {
                        target: service.clone(),
                    })
                    .await
                    .map_err(err)?,
            )?;
            if format == Format::Json {
                print_json(&tasks);
                return Ok(());
            }
            let s = inspect_service(c, &service).await?;
            print!("{}", ps_table(&tasks, &s, no_trunc, now_ms()));
            Ok(())
        }
        ServiceCmd::Inspect { services } => {
            let mut out = Vec::new();
            for target in services {
                out.push(inspect_service(c, &target).await?);
            }
            print_json(&out);
            Ok(())
        }
        ServiceCmd::Update {
            opts,
            args,
            wait,
            service,
        } => {
            let cur = inspect_service(c, &service).await?;
            let mut spec = cur.spec.clone();
            apply_opts(&mut spec, opts, false)?;
            if let Some(args) = args {
                spec.task.command = args;
            }
            update_spec(c, &cur, spec).await?;
            println!("{service}");
            converge(c, &wait).await?;
            converge_tasks(c, &wait, &cur.id, true).await
        }
        ServiceCmd::Scale { targets, wait } => {
            // Every argument and service is checked before any is changed.
            let wanted = targets
                .iter()
                .map(|t| parse_scale(t))
                .collect::<Res<Vec<_>>>()?;
            let mut current = Vec::new();
            for (name, replicas) in wanted {
                let s = inspect_service(c, &name).await?;
                if s.spec.mode == ServiceMode::Global {
                    return Err(format!(
                        "{name}: scale can only be used with replicated services (it is global)"
                    ));
                }
                current.push((name, replicas, s));
            }
            let mut ids = Vec::new();
            for (name, replicas, s) in current {
                let mut spec = s.spec.clone();
                spec.mode = ServiceMode::Replicated { replicas };
                update_spec(c, &s, spec).await?;
                println!("{name} scaled to {replicas}");
                ids.push(s.id);
            }
            converge(c, &wait).await?;
            for id in ids {
                converge_tasks(c, &wait, &id, false).await?;
            }
            Ok(())
        }
        ServiceCmd::Logs {
            service,
            tail,
            no_trunc,
        } => {
            let logs: Vec<model::api::TaskLog> = from_reply(
                c.api
                    .service_logs(Ref { target: service })
                    .await
                    .map_err(err)?,
            )?;
            print!("{}", logs_text(&logs, tail, no_trunc));
            for l in logs.iter().filter_map(|l| l.error.as_ref()) {
                eprintln!("warning: {l}");
            }
            Ok(())
        }
        ServiceCmd::Rollback { wait, service } => {
            let cur = inspect_service(c, &service).await?;
            c.api
                .rollback_service(Ref {
                    target: cur.id.clone(),
                })
                .await
                .map_err(err)?;
            println!("{service}");
            converge(c, &wait).await?;
            converge_tasks(c, &wait, &service, false).await
        }
        ServiceCmd::Rm { wait, services } => {
            for target in services {
                c.api
                    .remove_service(Remove {
                        target: target.clone(),
                        force: false,
                    })
                    .await
                    .map_err(err)?;
                println!("{target}");
            }
            converge(c, &wait).await
        }
    }
}
