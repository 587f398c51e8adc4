//! meshctl: the mesh CLI. It talks gRPC over mTLS to a manager: on a
//! manager it uses that node's credentials from the data dir; elsewhere
//! `--host` and a client certificate (`--cert`, `--key`, `--ca`).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, RwLock},
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use model::{
    Availability, EndpointMode, EndpointSpec, Network, NetworkAttachment, NetworkSpec, Node,
    NodeSpec, NodeStatus, PortConfig, Protocol, PublishMode, Role, Service, ServiceMode,
    ServiceSpec, Task, TaskState, TaskTemplate,
    api::{Info, ManagerStatus, NodeProgress, NodeView, Progress, ServiceView, TaskView},
};
use mtls::{
    client::{self as tls, Credentials, Trust},
    datadir::{NodeFile, certs_dir},
    grpc::{MAX_MESSAGE, status_text},
    identity as pki,
};
use proto::{
    CreateTaskRequest, Empty, JoinTokenRequest, Ref, Remove, SetRoleRequest, UpdateNodeRequest,
    UpdateServiceRequest, cluster_client::ClusterClient,
};
use tonic::transport::Channel;

mod client;
mod commands;
mod converge;
mod render;
mod table;

use client::*;
use commands::{network::*, node::*, service::*, swarm::*, task::*};
use converge::*;
use render::*;
use table::Table;

#[derive(Parser)]
#[command(name = "meshctl", version, about = "mesh command-line client")]
struct Cli {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once
enum Cmd {
    /// Manage nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Manage networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Manage services.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Manage the cluster: join tokens, the unlock key.
    #[command(subcommand)]
    Swarm(SwarmCmd),
    /// Internal: task records until the orchestrator exists (manager
    /// certificate only; tests use it to place tasks on nodes).
    #[command(subcommand, hide = true)]
    Task(TaskCmd),
    /// Cluster-wide information from the manager answering.
    Info {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Res {
    let mut c = cli.conn.connect()?;
    match cli.command {
        Cmd::Node(cmd) => node(&mut c, cmd).await,
        Cmd::Network(cmd) => network(&mut c, cmd).await,
        Cmd::Service(cmd) => service(&mut c, cmd).await,
        Cmd::Swarm(cmd) => swarm(&mut c, cmd).await,
        Cmd::Task(cmd) => task(&mut c, cmd).await,
        Cmd::Info { format } => {
            let info: Info = from_reply(c.api.info(Empty {}).await.map_err(err)?)?;
            if format == Format::Json {
                print_json(&info);
            } else {
                println!("Cluster ID: {}", info.cluster_id);
                println!("Node ID: {}", info.node_id);
                println!("Leader: {}", info.leader.as_deref().unwrap_or("(none)"));
                println!("Raft term: {}", info.term);
                println!("Managers: {}", info.managers);
                println!("Nodes: {}", info.nodes);
                println!("Networks: {}", info.networks);
                println!("Services: {}", info.services);
            }
            Ok(())
        }
    }
}

/// Property tests of the flag parsers: no input panics them; what they
/// accept is in range; every well-formed value parses to what it says.
#[cfg(test)]
mod parser_props {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn publish_never_panics_and_accepts_only_real_ports(s in ".{0,60}") {
            if let Ok(p) = parse_publish(&s) {
                prop_assert!(p.target != 0);
                prop_assert!(p.published != Some(0));
            } else {
                prop_assert!(parse_publish(&s).unwrap_err().contains("--publish"));
            }
        }

        #[test]
        fn publish_short_and_long_forms_parse_to_what_they_say(
            published in prop::option::of(1u16..),
            target in 1u16..,
            udp in any::<bool>(),
            host in any::<bool>(),
        ) {
            let proto = if udp { Protocol::Udp } else { Protocol::Tcp };
            let suffix = if udp { "/udp" } else { "" };
            let short = match published {
                Some(p) => format!("{p}:{target}{suffix}"),
                None => format!("{target}{suffix}"),
            };
            let p = parse_publish(&short).unwrap();
            prop_assert_eq!((p.published, p.target, p.protocol, p.mode), (published, target, proto, PublishMode::Ingress));
            let mut long = vec![format!("target={target}"), format!("protocol={}", if udp { "udp" } else { "tcp" })];
            if let Some(p) = published {
                long.push(format!("published={p}"));
            }
            long.push(format!("mode={}", if host { "host" } else { "ingress" }));
            let p = parse_publish(&long.join(",")).unwrap();
            let mode = if host { PublishMode::Host } else { PublishMode::Ingress };
            prop_assert_eq!((p.published, p.target, p.protocol, p.mode), (published, target, proto, mode));
        }

        #[test]
        fn publish_refuses_ports_out_of_range(bad in prop_oneof![Just(0u64), 65536u64..u64::MAX]) {
            for s in [format!("{bad}:80"), format!("8080:{bad}"), format!("target={bad}")] {
                let e = parse_publish(&s).unwrap_err();
                prop_assert!(e.contains("is not 1-65535"), "{}", e);
            }
        }

        #[test]
        fn scale_never_panics_and_round_trips(s in ".{0,40}", name in "[a-z][a-z0-9_-]{0,20}", n in any::<u32>()) {
            if let Ok((name, _)) = parse_scale(&s) {
                prop_assert!(!name.is_empty());
            }
            prop_assert_eq!(parse_scale(&format!("{name}={n}")).unwrap(), (name, n));
        }

        #[test]
        fn durations_never_panic(s in ".{0,40}") {
            let _ = parse_ms(&s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::NodeStatus;

    /// A command's help lists its own options first, then the connection
    /// flags as a group of their own.
    #[test]
    fn help_shows_the_commands_own_options_before_the_connection_group() {
        use clap::CommandFactory;
        let mut cli = Cli::command();
        // Global flags reach the subcommands when the command is built.
        cli.build();
        let help = cli
            .find_subcommand_mut("service")
            .and_then(|s| s.find_subcommand_mut("ls"))
            .expect("service ls")
            .render_help()
            .to_string();
        let own = help.find("--format").expect("its own option");
        let heading = help
            .find("Connection options:")
            .expect("a connection group");
        let host = help.find("--host").expect("the connection flags");
        assert!(own < heading && heading < host, "{help}");
    }

    #[test]
    fn service_ps_shows_each_slot_then_its_history_like_docker() {
        let now = 10_000_000_u64;
        let task =
            |id: &str, slot: u32, seq: u64, desired: &str, observed: &str, code: Option<i32>| {
                // Reported `seq` minutes ago; the starting one never reported.
                let since = if observed == "starting" {
                    0
                } else {
                    now - seq * 60_000 - 500
                };
                let task = serde_json::from_value(serde_json::json!({
                    "id": id, "service": "s1", "slot": slot, "node": "n1", "seq": seq,
                    "desired": desired, "observed": observed, "attachments": [],
                    "exit_code": code, "since_ms": since,
                }))
                .unwrap();
                TaskView {
                    task,
                    name: format!("web.{slot}"),
                    node_hostname: "ubuntu".into(),
                }
            };
        let service: Service = serde_json::from_value(serde_json::json!({
            "id": "s1", "version": 1, "previous": null, "vips": [],
            "ports": [{"protocol": "tcp", "target": 80, "published": 8080, "mode": "host"}],
            "spec": {"name": "web", "mode": {"replicated": {"replicas": 3}},
                     "task": {"command": ["/bin/web"]}},
        }))
        .unwrap();
        let tasks = vec![
            task(
                "l9ms8ey4no39xxxxxxxxxxxxx",
                3,
                3,
                "running",
                "running",
                None,
            ),
            task(
                "nznw0lnrdjqrxxxxxxxxxxxxx",
                1,
                1,
                "shutdown",
                "failed",
                Some(137),
            ),
            task(
                "zbyw70mn2j5xxxxxxxxxxxxxx",
                1,
                4,
                "running",
                "running",
                None,
            ),
            task(
                "oedpfws28tb2xxxxxxxxxxxxx",
                2,
                2,
                "running",
                "starting",
                None,
            ),
        ];
        let out = ps_table(&tasks, &service, false, now).to_string();
        let rows: Vec<Vec<&str>> = out
            .lines()
            .map(|l| {
                l.split("  ")
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .collect()
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                vec![
                    "ID",
                    "NAME",
                    "NODE",
                    "DESIRED STATE",
                    "CURRENT STATE",
                    "ERROR",
                    "PORTS"
                ],
                vec![
                    "zbyw70mn2j5x",
                    "web.1",
                    "ubuntu",
                    "Running",
                    "Running 4 minutes ago",
                    "*:8080->80/tcp"
                ],
                vec![
                    "nznw0lnrdjqr",
                    "\\_ web.1",
                    "ubuntu",
                    "Shutdown",
                    "Failed About a minute ago",
                    "\"task: non-zero exit (137)\""
                ],
                vec!["oedpfws28tb2", "web.2", "ubuntu", "Running", "Starting"],
                vec![
                    "l9ms8ey4no39",
                    "web.3",
                    "ubuntu",
                    "Running",
                    "Running 3 minutes ago",
                    "*:8080->80/tcp"
                ],
            ],
            "{out}"
        );
    }

    #[test]
    fn durations_read_like_docker() {
        for (secs, want) in [
            (0, "Less than a second"),
            (1, "1 second"),
            (59, "59 seconds"),
            (60, "About a minute"),
            (8 * 60 + 5, "8 minutes"),
            (3600, "About an hour"),
            (5 * 3600, "5 hours"),
            (3 * 86400, "3 days"),
            (20 * 86400, "2 weeks"),
            (90 * 86400, "3 months"),
            (800 * 86400, "2 years"),
        ] {
            assert_eq!(human_duration(secs), want, "{secs} s");
        }
    }

    #[test]
    fn scale_arguments_read_like_docker() {
        assert_eq!(parse_scale("web=5").unwrap(), ("web".into(), 5));
        assert_eq!(parse_scale("web=0").unwrap(), ("web".into(), 0));
        for bad in ["web", "=3", "web=-1", "web=x", "web=3=4"] {
            let err = parse_scale(bad).unwrap_err();
            assert!(err.contains("use SERVICE=REPLICAS"), "{bad}: {err}");
        }
    }

    /// Every duration flag is checked: overflow and out-of-range values
    /// are clap errors naming the range, never a panic.
    #[test]
    fn duration_flags_refuse_overflow_with_the_range() {
        for flag in [
            "--restart-delay",
            "--restart-window",
            "--update-delay",
            "--update-monitor",
            "--rollback-delay",
            "--rollback-monitor",
        ] {
            for value in ["99999999999999999h", "9999999d", "99999999999999999999999"] {
                let err = Cli::try_parse_from([
                    "meshctl", "service", "create", "--name", "web", flag, value, "--", "/bin/web",
                ])
                .err()
                .unwrap_or_else(|| panic!("{flag} {value} was accepted"));
                let text = err.to_string();
                assert!(
                    text.contains("out of range") || text.contains("is not a duration"),
                    "{flag} {value}: {text}"
                );
            }
        }
        assert!(
            Cli::try_parse_from([
                "meshctl",
                "service",
                "create",
                "--name",
                "web",
                "--restart-delay",
                "1h30m",
                "--",
                "/bin/web",
            ])
            .is_ok()
        );
    }

    #[test]
    fn constraints_are_checked_before_anything_is_sent() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from(
                ["meshctl", "service", "create", "--name", "web"]
                    .iter()
                    .chain(args)
                    .chain(&["--", "/bin/web"]),
            )
            .unwrap();
            let Cmd::Service(ServiceCmd::Create { opts, .. }) = cli.command else {
                panic!("not a service create");
            };
            let mut spec = ServiceSpec {
                name: "web".into(),
                mode: ServiceMode::Replicated { replicas: 1 },
                task: TaskTemplate::default(),
                endpoint: EndpointSpec::default(),
                update: Default::default(),
                rollback: Default::default(),
            };
            apply_opts(&mut spec, opts, true).map(|()| spec.task.constraints)
        };
        assert_eq!(
            parse(&[
                "--constraint",
                "node.role==worker",
                "--constraint",
                "node.labels.zone!=a"
            ])
            .unwrap(),
            vec!["node.role==worker", "node.labels.zone!=a"]
        );
        let err = parse(&["--constraint", "node.role=worker"]).unwrap_err();
        assert!(err.contains("expected FIELD==VALUE"), "{err}");
    }

    #[test]
    fn publish_forms() {
        let p = parse_publish("8080:80").unwrap();
        assert_eq!(
            (p.published, p.target, p.protocol),
            (Some(8080), 80, Protocol::Tcp)
        );
        let p = parse_publish("53:53/udp").unwrap();
        assert_eq!(p.protocol, Protocol::Udp);
        assert_eq!(parse_publish("80").unwrap().published, None);
        let p = parse_publish("mode=host,published=8080,target=80").unwrap();
        assert_eq!(
            (p.mode, p.published, p.target),
            (PublishMode::Host, Some(8080), 80)
        );
        for bad in [
            "0:80",
            "80:x",
            "8080:80/sctp",
            "mode=host,published=1",
            "x=1,target=2",
            "70000:80",
        ] {
            let e = parse_publish(bad).unwrap_err();
            assert!(e.contains("--publish"), "{bad}: {e}");
        }
    }

    #[test]
    fn status_and_availability_read_like_docker() {
        assert_eq!(title(NodeStatus::Ready), "Ready");
        assert_eq!(title(Availability::Drain), "Drain");
    }

    #[test]
    fn logs_are_prefixed_like_docker_and_tail_per_task() {
        let log = |name: &str, id: &str, host: &str, text: &str| model::api::TaskLog {
            id: id.into(),
            name: name.into(),
            node_hostname: host.into(),
            text: text.into(),
            error: None,
        };
        let logs = [
            log("web.1", "abcdefghijklmnop", "n1", "a\nb\nc\n"),
            log("web.10", "qrstuvwxyz012345", "node-2", "x\n"),
        ];
        assert_eq!(
            logs_text(&logs, Some(2), false),
            "web.1.abcdefghijkl@n1         | b\n\
             web.1.abcdefghijkl@n1         | c\n\
             web.10.qrstuvwxyz01@node-2    | x\n"
        );
    }
}
