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
    Availability, Command, EndpointMode, EndpointSpec, Network, NetworkAttachment, NetworkSpec,
    Node, NodeSpec, NodeStatus, Outcome, PortConfig, Protocol, PublishMode, Role, Service,
    ServiceMode, ServiceSpec, TaskState, TaskTemplate,
    api::{Info, ManagerStatus, NodeProgress, NodeView, Progress, ServiceView, TaskView},
};
use mtls::{
    client::{self as tls, Credentials, Trust},
    datadir::{NodeFile, certs_dir},
    grpc::{MAX_MESSAGE, status_text},
    identity as pki,
};
use proto::{
    Blob, Empty, JoinTokenRequest, Ref, Remove, SetRoleRequest, Update,
    cluster_client::ClusterClient,
};
use tonic::transport::Channel;

mod table;
use table::Table;

#[derive(Parser)]
#[command(name = "meshctl", version, about = "mesh command-line client")]
struct Cli {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args)]
struct Conn {
    /// The local node's data dir: its credentials and manager addresses.
    #[arg(
        long,
        global = true,
        default_value = "/var/lib/mesh",
        env = "MESH_DATA_DIR"
    )]
    data_dir: PathBuf,
    /// A manager's API address (host:port); default: this node if it is a
    /// manager, else the managers it knows.
    #[arg(long, short = 'H', global = true, env = "MESH_HOST")]
    host: Option<String>,
    /// Client certificate (PEM), instead of the data dir's.
    #[arg(long, global = true, requires = "key")]
    cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long, global = true, requires = "cert")]
    key: Option<PathBuf>,
    /// The cluster CA (PEM), instead of the data dir's.
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// Per-call timeout in seconds.
    #[arg(long, global = true, default_value_t = 15)]
    timeout: u64,
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

#[derive(Subcommand)]
enum NodeCmd {
    /// List nodes.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Only ids.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Show nodes in detail (JSON).
    Inspect {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Make nodes managers.
    Promote {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Make managers workers.
    Demote {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Remove nodes from the cluster.
    Rm {
        /// Remove a node that is still up.
        #[arg(long, short)]
        force: bool,
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Change a node's availability or labels.
    Update {
        #[arg(long, value_enum)]
        availability: Option<AvailabilityArg>,
        /// Add or change a label (key=value).
        #[arg(long = "label-add")]
        label_add: Vec<String>,
        /// Remove a label.
        #[arg(long = "label-rm")]
        label_rm: Vec<String>,
        node: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum AvailabilityArg {
    Active,
    Pause,
    Drain,
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Create an overlay network.
    Create {
        /// Only "overlay" exists.
        #[arg(long, short, default_value = "overlay")]
        driver: String,
        /// Subnet in CIDR form; default: the next free one from the pool.
        #[arg(long)]
        subnet: Option<String>,
        /// Driver options; "encrypted" asks for IPsec between nodes.
        #[arg(long = "opt", short = 'o')]
        opts: Vec<String>,
        /// No route out of the network.
        #[arg(long)]
        internal: bool,
        #[arg(long)]
        attachable: bool,
        name: String,
    },
    /// List networks.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        #[arg(long, short)]
        quiet: bool,
    },
    /// Show networks in detail (JSON).
    Inspect {
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Remove networks (refused while a service uses them).
    Rm {
        #[arg(required = true)]
        networks: Vec<String>,
    },
}

#[derive(Args)]
struct ServiceOpts {
    /// Number of tasks (replicated mode).
    #[arg(long)]
    replicas: Option<u32>,
    /// Publish a port: published:target[/udp], or the long form
    /// mode=host,published=8080,target=80,protocol=udp.
    #[arg(long, short = 'p')]
    publish: Vec<String>,
    /// Attach to a network (name or id).
    #[arg(long)]
    network: Vec<String>,
    /// vip (a virtual IP per network) or dnsrr (DNS round robin).
    #[arg(long, value_enum)]
    endpoint_mode: Option<EndpointModeArg>,
    /// Environment variable (KEY=value).
    #[arg(long, short = 'e')]
    env: Vec<String>,
    /// Placement constraint: node.role==manager, node.hostname!=a,
    /// node.labels.zone==east (repeatable; on update, replaces the set).
    #[arg(long)]
    constraint: Vec<String>,
    /// Restart a task that ended: any, on-failure or none.
    #[arg(long, value_parser = ["any", "on-failure", "none"])]
    restart_condition: Option<String>,
    /// Wait between a task's end and its restart (e.g. 5s, 500ms).
    #[arg(long, value_parser = parse_ms)]
    restart_delay: Option<u64>,
    /// Give up a slot after this many restarts in a row (0: never); with
    /// --restart-window, this many within the window.
    #[arg(long)]
    restart_max_attempts: Option<u32>,
    /// The window --restart-max-attempts counts restarts in (e.g. 1m).
    #[arg(long, value_parser = parse_ms)]
    restart_window: Option<u64>,
    #[command(flatten)]
    update: UpdateOpts,
}

/// How a rolling update (or its rollback) replaces tasks.
#[derive(Args, Default)]
struct UpdateOpts {
    /// Tasks replaced at once (0: all).
    #[arg(long)]
    update_parallelism: Option<u32>,
    /// Wait between batches (e.g. 10s).
    #[arg(long, value_parser = parse_ms)]
    update_delay: Option<u64>,
    /// How long a new task must run before it counts as healthy.
    #[arg(long, value_parser = parse_ms)]
    update_monitor: Option<u64>,
    /// When a new task fails during the update: pause, continue or rollback.
    #[arg(long, value_parser = ["pause", "continue", "rollback"])]
    update_failure_action: Option<String>,
    /// stop-first (old task stops, then the new one starts) or start-first.
    #[arg(long, value_parser = ["stop-first", "start-first"])]
    update_order: Option<String>,
    #[arg(long)]
    rollback_parallelism: Option<u32>,
    #[arg(long, value_parser = parse_ms)]
    rollback_delay: Option<u64>,
    #[arg(long, value_parser = parse_ms)]
    rollback_monitor: Option<u64>,
    #[arg(long, value_parser = ["pause", "continue"])]
    rollback_failure_action: Option<String>,
    #[arg(long, value_parser = ["stop-first", "start-first"])]
    rollback_order: Option<String>,
}

/// "500ms", "5s", "2m", "1h30m" or plain seconds, in ms: at most a year
/// (what a service spec holds), checked, never overflowing.
fn parse_ms(s: &str) -> Result<u64, String> {
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
fn apply_update_opts(
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
enum EndpointModeArg {
    Vip,
    Dnsrr,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Replicated,
    Global,
}

#[derive(Subcommand)]
enum TaskCmd {
    /// Record a task of SERVICE on NODE whose network namespace is NETNS.
    Create {
        #[arg(long)]
        service: String,
        #[arg(long)]
        node: String,
        #[arg(long, default_value_t = 1)]
        slot: u32,
        /// The task's namespace: /run/netns/NAME or /proc/PID/ns/net.
        #[arg(long)]
        netns: Option<String>,
    },
    Rm {
        #[arg(required = true)]
        tasks: Vec<String>,
    },
}

#[derive(Args)]
struct Wait {
    /// Return once the change is committed, without waiting for every node
    /// to apply it.
    #[arg(long, short)]
    detach: bool,
}

#[derive(Subcommand)]
enum ServiceCmd {
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

#[derive(Subcommand)]
enum SwarmCmd {
    /// Show (or rotate) the join token for a role.
    JoinToken {
        #[arg(value_enum)]
        role: RoleArg,
        /// Replace the token; the old one is refused from now on.
        #[arg(long)]
        rotate: bool,
        /// Only the token.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Show the key that unlocks an autolocked manager.
    UnlockKey {
        #[arg(long, short)]
        quiet: bool,
    },
    /// Add a new key to the encrypted networks' ring now (the leader does
    /// it every rotation period, 12 h by default); nodes move to it with no
    /// packet lost.
    RotateNetworkKey,
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Worker,
    Manager,
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

type Res<T = ()> = Result<T, String>;

/// A status as the user should see it: the server's words. A call whose
/// connection could not be made was not applied, and says so; a call cut
/// off otherwise (deadline, connection lost or reset) may have been
/// applied, and says that: never "not applied" for what may have been.
fn err(s: tonic::Status) -> String {
    let text = status_text(&s);
    if text.contains("(not applied") || text.starts_with("outcome unknown") {
        return text;
    }
    if model::api::never_sent(&text) {
        return format!("{text} (not applied: the manager could not be reached)");
    }
    match s.code() {
        tonic::Code::DeadlineExceeded
        | tonic::Code::Cancelled
        | tonic::Code::Unavailable
        | tonic::Code::Unknown
        | tonic::Code::Internal => format!(
            "{text}. If this was a change, its outcome is unknown: it may have been applied; \
             look (meshctl service ls, network ls or node ls) before retrying"
        ),
        _ => text,
    }
}

struct Client {
    api: ClusterClient<Channel>,
    addr: String,
}

fn read(path: &Path, what: &str) -> Res<String> {
    std::fs::read_to_string(path).map_err(|e| format!("reading the {what} {}: {e}", path.display()))
}

impl Conn {
    fn connect(&self) -> Res<Client> {
        let from_dir = Credentials::load(&certs_dir(&self.data_dir));
        let ca = match (&self.ca, &from_dir) {
            (Some(p), _) => read(p, "CA certificate")?,
            (None, Ok(c)) => c.ca.clone(),
            (None, Err(e)) => {
                return Err(format!(
                    "no cluster credentials: {e}. On a node, pass --data-dir; elsewhere --host, --ca, --cert and --key"
                ));
            }
        };
        let trust = match (&self.cert, &self.key, from_dir) {
            (Some(c), Some(k), _) => Trust::Node(Arc::new(RwLock::new(Credentials {
                ca,
                cert: read(c, "certificate")?,
                key: read(k, "key")?,
            }))),
            (_, _, Ok(mut creds)) => {
                creds.ca = ca;
                Trust::Node(Arc::new(RwLock::new(creds)))
            }
            _ => Trust::Anonymous(ca),
        };
        // A certificate the managers would refuse at the handshake is
        // named here, with why, instead of "connection closed" there.
        if let Trust::Node(creds) = &trust {
            let creds = creds.read().expect("creds lock");
            pki::identity(&creds.cert, &creds.ca, pki::now())
                .map_err(|e| format!("this client's {e}"))?;
        }
        let addr = match &self.host {
            Some(h) => h.clone(),
            None => self.local_manager()?,
        };
        let channel = tls::channel(&addr, trust, Duration::from_secs(self.timeout))
            .map_err(|e| e.to_string())?;
        Ok(Client {
            api: ClusterClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            addr,
        })
    }

    /// This node's API if it is a manager, else the first known manager.
    fn local_manager(&self) -> Res<String> {
        let file = NodeFile::load(&self.data_dir).map_err(|e| e.to_string())?;
        let creds = Credentials::load(&certs_dir(&self.data_dir)).map_err(|e| e.to_string())?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let role = pki::identity(&creds.cert, &creds.ca, now)
            .map(|i| i.role)
            .unwrap_or(Role::Worker);
        if role == Role::Manager {
            return Ok(file.api_addr);
        }
        file.managers
            .first()
            .cloned()
            .ok_or_else(|| "this node knows no manager; pass --host".to_owned())
    }
}

fn blob<T: serde::Serialize>(v: &T) -> Blob {
    Blob {
        json: serde_json::to_vec(v).expect("serializable"),
    }
}

/// A reply's body; a reply the manager marked stale (it could not confirm
/// its state is current) is said so on stderr, with the manager's reason.
fn from_blob<T: for<'de> serde::Deserialize<'de>>(b: tonic::Response<Blob>) -> Res<T> {
    if let Some(why) = b
        .metadata()
        .get(model::api::STALE_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        eprintln!("warning: this answer may be stale: {why}");
    }
    serde_json::from_slice(&b.into_inner().json).map_err(|e| format!("bad reply: {e}"))
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
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
            let info: Info = from_blob(c.api.info(Empty {}).await.map_err(err)?)?;
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

fn title<T: std::fmt::Debug>(v: T) -> String {
    let s = format!("{v:?}");
    let mut chars = s.chars();
    match chars.next() {
        Some(f) => f
            .to_uppercase()
            .chain(chars.map(|c| c.to_ascii_lowercase()))
            .collect(),
        None => s,
    }
}

async fn node(c: &mut Client, cmd: NodeCmd) -> Res {
    match cmd {
        NodeCmd::Ls { format, quiet } => {
            let mut nodes: Vec<NodeView> =
                from_blob(c.api.list_nodes(Empty {}).await.map_err(err)?)?;
            nodes.sort_by(|a, b| {
                a.node
                    .hostname
                    .cmp(&b.node.hostname)
                    .then(a.node.id.cmp(&b.node.id))
            });
            if quiet {
                nodes.iter().for_each(|n| println!("{}", n.node.id));
            } else if format == Format::Json {
                print_json(&nodes);
            } else {
                let mut t =
                    Table::new(&["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER STATUS"]);
                for n in &nodes {
                    t.row(vec![
                        if n.is_self {
                            format!("{} *", n.node.id)
                        } else {
                            n.node.id.clone()
                        },
                        n.node.hostname.clone(),
                        title(n.node.status),
                        title(n.node.spec.availability),
                        match n.manager_status {
                            Some(ManagerStatus::Leader) => "Leader".into(),
                            Some(ManagerStatus::Reachable) => "Reachable".into(),
                            Some(ManagerStatus::Unreachable) => "Unreachable".into(),
                            Some(ManagerStatus::Behind { entries }) => {
                                format!("Behind ({entries} entries)")
                            }
                            None => String::new(),
                        },
                    ]);
                }
                print!("{t}");
            }
            Ok(())
        }
        NodeCmd::Inspect { nodes } => {
            let mut out = Vec::new();
            for target in nodes {
                let v: NodeView =
                    from_blob(c.api.inspect_node(Ref { target }).await.map_err(err)?)?;
                out.push(v);
            }
            print_json(&out);
            Ok(())
        }
        NodeCmd::Promote { nodes } => set_role(c, nodes, Role::Manager).await,
        NodeCmd::Demote { nodes } => set_role(c, nodes, Role::Worker).await,
        NodeCmd::Rm { force, nodes } => {
            for target in nodes {
                c.api
                    .remove_node(Remove {
                        target: target.clone(),
                        force,
                    })
                    .await
                    .map_err(err)?;
                println!("{target}");
            }
            Ok(())
        }
        NodeCmd::Update {
            availability,
            label_add,
            label_rm,
            node,
        } => {
            let view: NodeView = from_blob(
                c.api
                    .inspect_node(Ref {
                        target: node.clone(),
                    })
                    .await
                    .map_err(err)?,
            )?;
            let mut spec: NodeSpec = view.node.spec.clone();
            if let Some(a) = availability {
                spec.availability = match a {
                    AvailabilityArg::Active => Availability::Active,
                    AvailabilityArg::Pause => Availability::Pause,
                    AvailabilityArg::Drain => Availability::Drain,
                };
            }
            for l in label_add {
                let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
                spec.labels.insert(k.to_owned(), v.to_owned());
            }
            for k in label_rm {
                if spec.labels.remove(&k).is_none() {
                    return Err(format!("node {node} has no label {k:?}"));
                }
            }
            c.api
                .update_node(Update {
                    target: view.node.id.clone(),
                    version: view.node.version,
                    spec: serde_json::to_vec(&spec).expect("serializable"),
                })
                .await
                .map_err(err)?;
            println!("{node}");
            Ok(())
        }
    }
}

async fn set_role(c: &mut Client, nodes: Vec<String>, role: Role) -> Res {
    for target in nodes {
        let before: NodeView = from_blob(
            c.api
                .inspect_node(Ref {
                    target: target.clone(),
                })
                .await
                .map_err(err)?,
        )?;
        let word = if role == Role::Manager {
            "manager"
        } else {
            "worker"
        };
        if before.node.spec.role == role {
            println!("Node {target} is already a {word} in the swarm.");
            continue;
        }
        let _: Node = from_blob(
            c.api
                .set_role(SetRoleRequest {
                    target: target.clone(),
                    role: word.into(),
                })
                .await
                .map_err(err)?,
        )?;
        match role {
            Role::Manager => println!("Node {target} promoted to a manager in the swarm."),
            Role::Worker => println!("Manager {target} demoted in the swarm."),
        }
    }
    Ok(())
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

async fn network(c: &mut Client, cmd: NetworkCmd) -> Res {
    match cmd {
        NetworkCmd::Create {
            driver,
            subnet,
            opts,
            internal,
            attachable,
            name,
        } => {
            if driver != "overlay" {
                return Err(format!(
                    "driver {driver:?} is not supported: mesh networks are overlay networks"
                ));
            }
            let mut spec = NetworkSpec {
                name,
                subnet: subnet
                    .map(|s| s.parse().map_err(|e| format!("--subnet {s}: {e}")))
                    .transpose()?,
                internal,
                attachable,
                ..NetworkSpec::default()
            };
            for o in opts {
                match o.as_str() {
                    "encrypted" | "encrypted=true" | "encrypted=" => spec.encrypted = true,
                    other => {
                        return Err(format!(
                            "unknown network option {other:?} (known: encrypted)"
                        ));
                    }
                }
            }
            let n: Network = from_blob(c.api.create_network(blob(&spec)).await.map_err(err)?)?;
            println!("{}", n.id);
            Ok(())
        }
        NetworkCmd::Ls { format, quiet } => {
            let mut nets: Vec<Network> =
                from_blob(c.api.list_networks(Empty {}).await.map_err(err)?)?;
            nets.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
            if quiet {
                nets.iter().for_each(|n| println!("{}", short(&n.id)));
            } else if format == Format::Json {
                print_json(&nets);
            } else {
                let mut t = Table::new(&["NETWORK ID", "NAME", "DRIVER", "SCOPE", "SUBNET", "VNI"]);
                for n in &nets {
                    t.row(vec![
                        short(&n.id).into(),
                        n.spec.name.clone(),
                        "overlay".into(),
                        "swarm".into(),
                        n.subnet.to_string(),
                        n.vni.to_string(),
                    ]);
                }
                print!("{t}");
            }
            Ok(())
        }
        NetworkCmd::Inspect { networks } => {
            let mut out = Vec::new();
            for target in networks {
                let n: Network =
                    from_blob(c.api.inspect_network(Ref { target }).await.map_err(err)?)?;
                out.push(n);
            }
            print_json(&out);
            Ok(())
        }
        NetworkCmd::Rm { networks } => {
            for target in networks {
                c.api
                    .remove_network(Remove {
                        target: target.clone(),
                        force: false,
                    })
                    .await
                    .map_err(err)?;
                println!("{target}");
            }
            Ok(())
        }
    }
}

/// Parses --publish: `8080:80`, `8080:80/udp`, `80` (auto-assigned), or
/// `mode=host,published=8080,target=80,protocol=udp`.
fn parse_publish(s: &str) -> Res<PortConfig> {
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

fn apply_opts(spec: &mut ServiceSpec, o: ServiceOpts, creating: bool) -> Res {
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

async fn inspect_service(c: &mut Client, target: &str) -> Res<Service> {
    from_blob(
        c.api
            .inspect_service(Ref {
                target: target.to_owned(),
            })
            .await
            .map_err(err)?,
    )
}

/// Replaces `cur`'s spec, refused if the service changed since it was read.
async fn update_spec(c: &mut Client, cur: &Service, spec: ServiceSpec) -> Res {
    c.api
        .update_service(Update {
            target: cur.id.clone(),
            version: cur.version,
            spec: serde_json::to_vec(&spec).expect("serializable"),
        })
        .await
        .map_err(err)?;
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Docker's wording for how long ago ("About a minute", "8 minutes").
fn human_duration(secs: u64) -> String {
    let (minutes, hours) = (secs / 60, (secs as f64 / 3600.0).round() as u64);
    match () {
        _ if secs < 1 => "Less than a second".into(),
        _ if secs == 1 => "1 second".into(),
        _ if secs < 60 => format!("{secs} seconds"),
        _ if minutes == 1 => "About a minute".into(),
        _ if minutes < 60 => format!("{minutes} minutes"),
        _ if hours == 1 => "About an hour".into(),
        _ if hours < 48 => format!("{hours} hours"),
        _ if hours < 24 * 7 * 2 => format!("{} days", hours / 24),
        _ if hours < 24 * 30 * 2 => format!("{} weeks", hours / 24 / 7),
        _ if hours < 24 * 365 * 2 => format!("{} months", hours / 24 / 30),
        _ => format!("{} years", hours / 24 / 365),
    }
}

/// `web=5` -> ("web", 5).
fn parse_scale(arg: &str) -> Res<(String, u32)> {
    let bad = || format!("invalid scale specifier {arg:?}: use SERVICE=REPLICAS, e.g. web=5");
    let (name, n) = arg.split_once('=').ok_or_else(bad)?;
    if name.is_empty() {
        return Err(bad());
    }
    let n = n.parse::<u32>().map_err(|_| bad())?;
    Ok((name.to_owned(), n))
}

/// `service ps`: per slot (or node, for a global service) the newest task,
/// then the older ones as `\_` rows; slots in order.
fn ps_table(tasks: &[TaskView], s: &Service, no_trunc: bool, now_ms: u64) -> Table {
    let mut groups: BTreeMap<(u32, &str), Vec<&TaskView>> = BTreeMap::new();
    for t in tasks {
        groups.entry(t.task.slot()).or_default().push(t);
    }
    // Host-mode ports are the task's own (ingress ones belong to the mesh).
    let host_ports = s
        .ports
        .iter()
        .filter(|p| p.mode == PublishMode::Host)
        .map(|p| {
            format!(
                "*:{}->{}/{}",
                p.published.unwrap_or(p.target),
                p.target,
                p.protocol
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let mut table = Table::new(&[
        "ID",
        "NAME",
        "NODE",
        "DESIRED STATE",
        "CURRENT STATE",
        "ERROR",
        "PORTS",
    ]);
    for group in groups.values_mut() {
        group.sort_by_key(|t| std::cmp::Reverse(t.task.seq));
        for (i, v) in group.iter().enumerate() {
            let t = &v.task;
            let error = match (&t.error, t.exit_code) {
                (Some(e), _) => format!("{e:?}"),
                (None, Some(code)) if code != 0 => format!("\"task: non-zero exit ({code})\""),
                _ => String::new(),
            };
            let running = t.observed == TaskState::Running;
            table.row(vec![
                if no_trunc {
                    t.id.clone()
                } else {
                    short(&t.id).into()
                },
                if i == 0 {
                    v.name.clone()
                } else {
                    format!(" \\_ {}", v.name)
                },
                v.node_hostname.clone(),
                title(t.desired),
                match t.since_ms {
                    // Nothing reported yet: no time to show.
                    0 => title(t.observed),
                    since => format!(
                        "{} {} ago",
                        title(t.observed),
                        human_duration(now_ms.saturating_sub(since) / 1000)
                    ),
                },
                error,
                if running {
                    host_ports.clone()
                } else {
                    String::new()
                },
            ]);
        }
    }
    table
}

fn ports_column(s: &Service) -> String {
    s.ports
        .iter()
        .map(|p| match p.mode {
            PublishMode::Ingress => format!(
                "*:{}->{}/{}",
                p.published.unwrap_or_default(),
                p.target,
                p.protocol
            ),
            PublishMode::Host => format!(
                "host:{}->{}/{}",
                p.published.unwrap_or(p.target),
                p.target,
                p.protocol
            ),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

async fn service(c: &mut Client, cmd: ServiceCmd) -> Res {
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
            let s: Service = from_blob(c.api.create_service(blob(&spec)).await.map_err(err)?)?;
            println!("{}", s.id);
            converge(c, &wait).await?;
            converge_tasks(c, &wait, &s.id, false).await
        }
        ServiceCmd::Ls { format, quiet } => {
            let mut svcs: Vec<ServiceView> =
                from_blob(c.api.list_services(Empty {}).await.map_err(err)?)?;
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
            let tasks: Vec<TaskView> = from_blob(
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
            let logs: Vec<model::api::TaskLog> = from_blob(
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
            let r: Result<Outcome, String> = from_blob(
                c.api
                    .propose(blob(&Command::RollbackService {
                        target: cur.id.clone(),
                        message: String::new(),
                    }))
                    .await
                    .map_err(err)?,
            )?;
            r?;
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

/// Waits until every node that is up has applied the tables as they are
/// now (so including the change just made), printing progress as
/// `docker service create` does.
async fn converge(c: &mut Client, wait: &Wait) -> Res {
    if wait.detach {
        return Ok(());
    }
    let progress = async |c: &mut Client| -> Res<Progress> {
        from_blob(c.api.progress(Empty {}).await.map_err(err)?)
    };
    let target = progress(c).await?.revision;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut shown = None;
    loop {
        let p = progress(c).await?;
        let up: Vec<&NodeProgress> = p
            .nodes
            .iter()
            .filter(|n| n.status == NodeStatus::Ready)
            .collect();
        let pending = p.pending(target);
        let done = up.len() - pending.len();
        if shown != Some(done) {
            println!("overall progress: {done} out of {} nodes ", up.len());
            shown = Some(done);
        }
        if pending.is_empty() {
            for (i, n) in up.iter().enumerate() {
                println!(
                    "{}/{}: applied   [==================================================>] {}",
                    i + 1,
                    up.len(),
                    n.hostname
                );
            }
            println!("verify: Service converged ");
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            let names: Vec<&str> = pending.iter().map(|n| n.hostname.as_str()).collect();
            return Err(format!(
                "not converged after 60 s: {} not yet applied revision {target} (the change is \
                 committed; those nodes apply it when their agent reaches the leader; \
                 use --detach not to wait)",
                names.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `docker service logs`' shape: `name.id@node    | line`, the prefix
/// padded to one width.
fn logs_text(logs: &[model::api::TaskLog], tail: Option<usize>, no_trunc: bool) -> String {
    let prefix = |l: &model::api::TaskLog| {
        let id = if no_trunc {
            l.id.as_str()
        } else {
            short(&l.id)
        };
        format!("{}.{id}@{}", l.name, l.node_hostname)
    };
    let width = logs.iter().map(|l| prefix(l).len()).max().unwrap_or(0);
    let mut out = String::new();
    for l in logs {
        let lines: Vec<&str> = l.text.lines().collect();
        let from = tail.map_or(0, |n| lines.len().saturating_sub(n));
        for line in &lines[from..] {
            out.push_str(&format!("{:<width$}    | {line}\n", prefix(l)));
        }
    }
    out
}

/// Waits until the service's tasks run as its spec says, printing progress
/// as `docker service create|update` does: every wanted slot has a running
/// task of the current spec, and a rolling update has ended. An update that
/// paused or rolled back is an error, with the orchestrator's reason.
async fn converge_tasks(c: &mut Client, wait: &Wait, service: &str, updating: bool) -> Res {
    use model::UpdateState;
    if wait.detach {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let mut shown: Option<String> = None;
    loop {
        let s = inspect_service(c, service).await?;
        let tasks: Vec<TaskView> = from_blob(
            c.api
                .list_tasks(Ref {
                    target: s.id.clone(),
                })
                .await
                .map_err(err)?,
        )?;
        let live: Vec<&TaskView> = tasks
            .iter()
            .filter(|t| t.task.live() && t.task.managed())
            .collect();
        let running = live
            .iter()
            .filter(|t| t.task.observed == TaskState::Running && t.task.spec == s.spec.task)
            .count();
        let desired = match s.spec.mode {
            ServiceMode::Replicated { replicas } => replicas as usize,
            // One per node that can take one now, as the orchestrator
            // decides it.
            ServiceMode::Global => {
                let constraints = model::constraint::parse_constraints(&s.spec.task.constraints)?;
                let nodes: Vec<NodeView> =
                    from_blob(c.api.list_nodes(Empty {}).await.map_err(err)?)?;
                nodes
                    .iter()
                    .filter(|n| model::constraint::takes(&n.node, &constraints))
                    .count()
                    .max(live.len())
            }
        };
        let update = s.update_status.as_ref().map(|u| u.state);
        let rolling = update.is_some_and(UpdateState::active);
        let line = format!(
            "overall progress: {}{running} out of {desired} tasks",
            match update {
                Some(UpdateState::RollbackStarted) => "rolling back update: ",
                _ => "",
            }
        );
        if shown.as_deref() != Some(line.as_str()) {
            println!("{line} ");
            shown = Some(line);
        }
        if let Some(u) = &s.update_status
            && matches!(u.state, UpdateState::Paused | UpdateState::RollbackPaused)
        {
            return Err(format!("service {}: {}", s.spec.name, u.message));
        }
        if !rolling && running >= desired {
            for (i, t) in live.iter().enumerate() {
                println!(
                    "{}/{}: running   [==================================================>] {}",
                    i + 1,
                    live.len(),
                    t.name
                );
            }
            println!("verify: Service {} converged ", s.spec.name);
            if let Some(u) = &s.update_status
                && u.state == UpdateState::RollbackCompleted
            {
                println!("rollback: {}", u.message);
                if updating {
                    return Err(format!("service {}: {}", s.spec.name, u.message));
                }
            }
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "service {}: {running} of {desired} tasks running after 180 s; see `meshctl service ps {}` (the change is committed; use --detach not to wait)",
                s.spec.name, s.spec.name
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn task(c: &mut Client, cmd: TaskCmd) -> Res {
    let propose = async |c: &mut Client, cmd: Command| -> Res<Outcome> {
        let r: Result<Outcome, String> = from_blob(c.api.propose(blob(&cmd)).await.map_err(err)?)?;
        r
    };
    match cmd {
        TaskCmd::Create {
            service,
            node,
            slot,
            netns,
        } => {
            let out = propose(
                c,
                Command::CreateTask {
                    id: mtls::ids::new_id(),
                    service,
                    slot,
                    node,
                    netns,
                },
            )
            .await?;
            match out {
                Outcome::Task(t) => {
                    println!("{}", t.id);
                    for a in &t.attachments {
                        println!("{} {}", a.network, a.addr);
                    }
                    Ok(())
                }
                other => Err(format!("unexpected answer {other:?}")),
            }
        }
        TaskCmd::Rm { tasks } => {
            for id in tasks {
                propose(c, Command::RemoveTask { id: id.clone() }).await?;
                println!("{id}");
            }
            Ok(())
        }
    }
}

async fn swarm(c: &mut Client, cmd: SwarmCmd) -> Res {
    match cmd {
        SwarmCmd::JoinToken {
            role,
            rotate,
            quiet,
        } => {
            let word = match role {
                RoleArg::Worker => "worker",
                RoleArg::Manager => "manager",
            };
            let token = c
                .api
                .join_token(JoinTokenRequest {
                    role: word.into(),
                    rotate,
                })
                .await
                .map_err(err)?
                .into_inner()
                .token;
            if quiet {
                println!("{token}");
            } else {
                if rotate {
                    println!("Successfully rotated {word} join token.\n");
                }
                println!("To add a {word} to this swarm, run the following command:\n");
                println!("    meshd join --token {token} {}\n", c.addr);
            }
            Ok(())
        }
        SwarmCmd::UnlockKey { quiet } => {
            let key = c
                .api
                .unlock_key(Empty {})
                .await
                .map_err(err)?
                .into_inner()
                .key;
            if quiet {
                println!("{key}");
            } else {
                println!(
                    "To unlock a swarm manager after it restarts, run `meshd unlock` and provide the following key:\n"
                );
                println!("    {key}\n");
                println!(
                    "Please remember to store this key in a password manager, since without it you will not be able to restart the manager."
                );
            }
            Ok(())
        }
        SwarmCmd::RotateNetworkKey => {
            let ring: model::api::KeyRing =
                from_blob(c.api.rotate_network_key(Empty {}).await.map_err(err)?)?;
            let ids: Vec<String> = ring.keys.iter().map(|(id, _)| id.to_string()).collect();
            println!(
                "Network key ring rotated: keys {} (nodes send with key {})",
                ids.join(", "),
                ring.primary.map_or("-".to_owned(), |p| p.to_string())
            );
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
            "spec": {"name": "web", "mode": {"mode": "replicated", "replicas": 3},
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
