//! meshd: the mesh node daemon.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};
use control::{
    agent::{Sink, Update},
    daemon::{self, Addresses, InitOptions, InitReport, Unlock},
    tables::Tables,
    units::Range,
};
use dataplane::{
    bpffs,
    dns::Dns,
    ebpf::{Datapath, monotonic_ns},
    executor::ProcessExecutor,
    inspect::{LbTable, read_lb},
    ipsec::Ipsec,
    ipvs::{IpvsSync, WithIpvs},
    lb::{Ebpf, LbSpec, LbSync, LbTarget, Timeouts},
    netlink::Netlink,
    overlay,
    overlay::{Overlay, OverlaySpec},
    runner::{self, StopTiming},
    stats::ParserStats,
    tables::{LbView, NodeView, OverlayUpdate},
};
use serde::Deserialize;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "meshd", version, about = "mesh node daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a new cluster with this node as its first manager (root CA,
    /// join tokens, the ingress network), then serve as `run` does.
    Init {
        #[command(flatten)]
        ctl: ControlArgs,
        #[command(flatten)]
        at: AddrArgs,
        /// Wrap the managers' data keys with a key the operator keeps
        /// (`meshctl swarm unlock-key`); a restarted manager waits for
        /// `meshd unlock`.
        #[arg(long)]
        autolock: bool,
        /// Lifetime of node certificates (s, m, h or d suffix); they renew
        /// in the last third.
        #[arg(long, default_value = "90d", value_parser = CERT_LIFETIME.parser())]
        cert_lifetime: Duration,
        /// How often each node's agent sends a heartbeat to the leader.
        #[arg(long, default_value = "1s", value_parser = HEARTBEAT_PERIOD.parser())]
        heartbeat_period: Duration,
        /// Missed heartbeats after which the leader marks a node down and
        /// withdraws its endpoints.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
        heartbeat_misses: u32,
        /// How often the leader adds a key to the encrypted networks' ring
        /// and drops the oldest (Swarm: 12h).
        #[arg(long, default_value = "12h", value_parser = KEY_ROTATION.parser())]
        network_key_rotation: Duration,
        #[command(flatten)]
        dp: DataplaneArgs,
    },
    /// Join a cluster through one of its managers, then serve as `run`
    /// does. A manager token makes this node a manager.
    Join {
        #[command(flatten)]
        ctl: ControlArgs,
        #[command(flatten)]
        at: AddrArgs,
        /// MESH-1-<CA digest>-<secret>, from `meshctl swarm join-token`.
        #[arg(long)]
        token: String,
        /// A manager's address (host:port).
        manager: String,
        #[command(flatten)]
        dp: DataplaneArgs,
    },
    /// Serve until SIGINT/SIGTERM: the control plane from --data-dir (a
    /// node that ran init or join) and/or the data plane (--node and
    /// --underlay). SIGHUP re-reads --config. On exit the data path stays
    /// attached (pinned links), so a restart does not break established
    /// flows; `meshd down` removes it.
    Run {
        /// The node's data dir (from `meshd init` or `meshd join`).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Read the unlock key of an autolocked manager from this file
        /// instead of waiting for `meshd unlock`.
        #[arg(long, requires = "data_dir")]
        unlock_key_file: Option<PathBuf>,
        #[command(flatten)]
        dp: DataplaneArgs,
    },
    /// Unlock an autolocked manager that `meshd run` started: reads the
    /// unlock key from stdin.
    Unlock {
        #[command(flatten)]
        ctl: ControlArgs,
    },
    /// Print this node's packet counters, read from its pinned maps.
    Stats {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Load-balancer state read from the pinned maps.
    Lb {
        #[command(subcommand)]
        command: LbCommand,
    },
    /// Detach the data path, remove this node's pins and its overlay links
    /// (after `run` has exited).
    Down {
        #[command(flatten)]
        node: NodeArgs,
    },
}

#[derive(clap::Args)]
struct ControlArgs {
    /// Where the node keeps its identity, certificates and (managers) the
    /// Raft store.
    #[arg(long, default_value = "/var/lib/mesh")]
    data_dir: PathBuf,
}

#[derive(clap::Args)]
struct AddrArgs {
    /// Where to serve gRPC (Raft, the API, joins).
    #[arg(long, default_value = "0.0.0.0:2377")]
    listen_addr: SocketAddr,
    /// The address other nodes reach this one on (IP or IP:port); default:
    /// the listen address, or --node-addr with the listen port.
    #[arg(long)]
    advertise_addr: Option<String>,
    /// This node's underlay IPv4 address (its VXLAN source); default: the
    /// advertised IP.
    #[arg(long)]
    node_addr: Option<Ipv4Addr>,
    /// Node name shown by `meshctl node ls`; default: the host name.
    #[arg(long)]
    hostname: Option<String>,
}

/// The IPv4 prefixes on the interface that holds `addr`: what the cluster
/// keeps every network out of. None when no local interface holds it (an
/// address advertised through NAT); `addr` itself is still protected.
async fn underlay_prefixes(addr: Ipv4Addr) -> Result<Vec<control::allocator::Subnet>> {
    let nl = Netlink::current()?;
    let Some(index) = nl.link_with_address(addr.into()).await? else {
        return Ok(Vec::new());
    };
    Ok(nl
        .addresses(index)
        .await?
        .into_iter()
        .filter_map(|(ip, prefix)| match ip {
            std::net::IpAddr::V4(v4) => Some(control::allocator::Subnet::containing(v4, prefix)),
            std::net::IpAddr::V6(_) => None,
        })
        .collect())
}

/// How often a node re-reads its underlay prefixes (a netlink dump).
const UNDERLAY_POLL: Duration = Duration::from_secs(5);

/// Follows the prefixes on the interface holding `addr`, re-read every
/// [`UNDERLAY_POLL`]; the agent reports each change to the cluster. Starts
/// from what the interface holds now, so a session never reports a
/// placeholder. The watcher ends when nobody follows it.
async fn watch_underlay(
    addr: Ipv4Addr,
) -> Result<tokio::sync::watch::Receiver<Vec<control::allocator::Subnet>>> {
    let mut now = underlay_prefixes(addr).await?;
    now.sort();
    let (tx, rx) = tokio::sync::watch::channel(now);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep(UNDERLAY_POLL) => {}
            }
            match underlay_prefixes(addr).await {
                Ok(mut p) => {
                    p.sort();
                    tx.send_if_modified(|old| {
                        let changed = *old != p;
                        if changed {
                            tracing::info!(?p, "the underlay interface's prefixes changed");
                            *old = p;
                        }
                        changed
                    });
                }
                Err(e) => tracing::debug!("reading the underlay prefixes: {e:#}"),
            }
        }
    });
    Ok(rx)
}

impl AddrArgs {
    fn resolve(&self) -> Result<Addresses> {
        let port = self.listen_addr.port();
        let listen_ip = match self.listen_addr.ip() {
            std::net::IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
            _ => None,
        };
        let api_addr = match (&self.advertise_addr, listen_ip, self.node_addr) {
            (Some(a), _, _) if a.parse::<SocketAddr>().is_ok() => a.clone(),
            (Some(a), _, _) => {
                let ip: Ipv4Addr = a.parse().with_context(|| {
                    format!("--advertise-addr {a:?}: give an IPv4 address or IP:port")
                })?;
                format!("{ip}:{port}")
            }
            (None, Some(ip), _) | (None, None, Some(ip)) => format!("{ip}:{port}"),
            (None, None, None) => bail!(
                "cannot tell which address other nodes reach this one on: give --advertise-addr (or listen on a specific IP)"
            ),
        };
        let node_addr = match self.node_addr {
            Some(ip) => ip,
            None => match api_addr.parse::<SocketAddr>().map(|a| a.ip()) {
                Ok(std::net::IpAddr::V4(ip)) => ip,
                _ => bail!("give --node-addr: the advertised address {api_addr} is not IPv4"),
            },
        };
        let hostname = match &self.hostname {
            Some(h) => h.clone(),
            None => fs::read_to_string("/proc/sys/kernel/hostname")
                // Host names are case-insensitive; the cluster keeps one
                // spelling (lowercase), as DNS does.
                .map(|h| h.trim().to_ascii_lowercase())
                .context("reading the host name (or pass --hostname)")?,
        };
        let underlay = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime to read the underlay")?
            .block_on(underlay_prefixes(node_addr))
            .with_context(|| {
                format!("reading the prefixes of the interface holding {node_addr}")
            })?;
        Ok(Addresses {
            hostname,
            addr: node_addr,
            listen_addr: self.listen_addr,
            api_addr,
            underlay,
        })
    }
}

#[derive(clap::Args)]
struct DataplaneArgs {
    /// Node name for the data plane; its maps and links are pinned under
    /// <bpf-root>/<node>.
    #[arg(long)]
    node: Option<String>,
    /// Root of the bpffs mesh pins under (mounted if needed).
    #[arg(long, default_value = bpffs::DEFAULT_ROOT)]
    bpf_root: PathBuf,
    /// The underlay interface (the one other nodes and clients reach us
    /// on). Without it, no data plane is loaded.
    #[arg(long, requires = "node")]
    underlay: Option<String>,
    /// XDP attach mode for the packet counters.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    xdp_mode: Mode,
    /// Node config (JSON): load-balancer frontends/backends, local endpoint
    /// interfaces, conntrack timeouts. Without it the LB answers nothing.
    #[arg(long, requires = "underlay")]
    config: Option<PathBuf>,
    /// Where the embedded DNS forwards names that are not the cluster's
    /// (repeatable); default: the non-loopback nameservers of
    /// /etc/resolv.conf.
    #[arg(long = "dns-upstream")]
    dns_upstream: Vec<SocketAddr>,
    /// Seconds between conntrack sweeps.
    #[arg(long, default_value_t = 10)]
    sweep_interval: u64,
    /// Seconds between full overlay reconciles (re-reading the kernel
    /// and repairing drift, such as an FDB entry deleted by hand).
    #[arg(long, default_value_t = 30)]
    resync_interval: u64,
    /// Names this node's tasks' namespaces (`/run/netns/<scope>-<task>`)
    /// and their cgroup (`<cgroup2>/<scope>`); nodes sharing a host need
    /// different scopes.
    #[arg(long, default_value = "mesh", value_parser = parse_scope)]
    task_scope: String,
    /// Between the withdrawal of a stopping task's endpoints and its
    /// SIGTERM: open flows finish, and every node applies the withdrawal.
    #[arg(long, default_value_t = 2000)]
    drain_ms: u64,
    /// Between a task's SIGTERM and its SIGKILL (Docker's default: 10 s).
    #[arg(long, default_value_t = 10_000)]
    stop_grace_ms: u64,
    /// What balances published ports and VIPs: `ebpf` (TC with Maglev) or
    /// `ipvs` (the kernel's IPVS, NAT forwarding, `mh` else `rr`; VIPs as
    /// fwmark services).
    #[arg(long, value_enum, default_value_t = LbBackend::Ebpf)]
    lb_backend: LbBackend,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LbBackend {
    Ebpf,
    Ipvs,
}

/// Where IPVS mode keeps the set of services it installed (runtime state:
/// IPVS does not outlive a reboot either).
const IPVS_STATE_DIR: &str = "/run/mesh/ipvs";

fn ipvs_state_file(node: &str) -> PathBuf {
    Path::new(IPVS_STATE_DIR).join(format!("{node}.json"))
}

/// The load balancer's target: the eBPF maps, or IPVS (the maps then
/// keep no frontend).
fn lb_target<'a>(
    datapath: &'a mut Datapath,
    sync: &'a mut LbSync,
    ipvs: &'a mut Option<IpvsSync>,
) -> Box<dyn LbTarget + 'a> {
    let ebpf = Ebpf {
        sync,
        maps: datapath.lb_maps(),
    };
    match ipvs {
        Some(ipvs) => Box::new(WithIpvs { ebpf, ipvs }),
        None => Box::new(ebpf),
    }
}

fn parse_scope(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?}: a task scope is 1 to 32 letters, digits, '-' or '_'"
        ))
    }
}

/// The heartbeat period: "250ms", "1s" or "2s".
const HEARTBEAT_PERIOD: Range = Range {
    what: "the heartbeat period",
    min: Duration::from_millis(50),
    max: Duration::from_secs(60),
};

/// A certificate lifetime: at most 10 years (its dates must stay
/// representable).
const CERT_LIFETIME: Range = Range {
    what: "a certificate lifetime",
    min: Duration::from_secs(6),
    max: Duration::from_secs(3650 * 86_400),
};

/// The network key rotation period.
const KEY_ROTATION: Range = Range {
    what: "the network key rotation period",
    min: Duration::from_secs(6),
    max: Duration::from_secs(365 * 86_400),
};

/// How the control plane starts, if at all.
enum Start {
    None,
    Init {
        dir: PathBuf,
        at: Addresses,
        opts: InitOptions,
    },
    Join {
        dir: PathBuf,
        at: Addresses,
        token: String,
        manager: String,
    },
    Run {
        dir: PathBuf,
        unlock: Unlock,
    },
}

#[derive(Subcommand)]
enum LbCommand {
    /// Frontends -> backends with their Maglev slots and counters.
    Ls {
        #[command(flatten)]
        node: NodeArgs,
    },
}

#[derive(clap::Args)]
struct NodeArgs {
    /// Node name; its maps and links are pinned under <bpf-root>/<node>.
    #[arg(long)]
    node: String,
    /// Root of the bpffs mesh pins under (mounted if needed).
    #[arg(long, default_value = bpffs::DEFAULT_ROOT)]
    bpf_root: PathBuf,
}

impl NodeArgs {
    fn dir(&self) -> Result<PathBuf> {
        Ok(bpffs::node_dir(&self.bpf_root, &self.node)?)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Native where the driver supports it, generic otherwise.
    Auto,
    Native,
    Generic,
}

impl From<Mode> for XdpMode {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Auto => XdpMode::Default,
            Mode::Native => XdpMode::Driver,
            Mode::Generic => XdpMode::Skb,
        }
    }
}

/// The `--config` file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeConfig {
    /// Host-side interfaces of local task endpoints: replies from local
    /// backends enter here and must be reverse-NATed.
    #[serde(default)]
    endpoint_interfaces: Vec<String>,
    #[serde(default)]
    timeouts: Timeouts,
    /// Frontends and backends; without it the load-balancer maps are left
    /// as they are.
    #[serde(default)]
    lb: Option<LbSpec>,
    /// Overlay networks and their endpoints (an empty table removes them).
    #[serde(default)]
    overlay: OverlaySpec,
}

fn read_config(path: &Path) -> Result<NodeConfig> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let config: NodeConfig = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid meshd config", path.display()))?;
    if let Some(lb) = &config.lb {
        lb.validate()
            .with_context(|| format!("{}: invalid load-balancer spec", path.display()))?;
    }
    config
        .overlay
        .validate()
        .with_context(|| format!("{}: invalid overlay spec", path.display()))?;
    Ok(config)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Init {
            ctl,
            at,
            autolock,
            cert_lifetime,
            heartbeat_period,
            heartbeat_misses,
            network_key_rotation,
            dp,
        } => serve(
            Start::Init {
                dir: ctl.data_dir,
                at: at.resolve()?,
                opts: InitOptions {
                    autolock,
                    cert_lifetime,
                    heartbeat: heartbeat_period,
                    heartbeat_misses,
                    network_key_rotation,
                },
            },
            dp,
        ),
        Command::Join {
            ctl,
            at,
            token,
            manager,
            dp,
        } => serve(
            Start::Join {
                dir: ctl.data_dir,
                at: at.resolve()?,
                token,
                manager,
            },
            dp,
        ),
        Command::Run {
            data_dir,
            unlock_key_file,
            dp,
        } => {
            let start = match data_dir {
                Some(dir) => {
                    Start::Run {
                        dir,
                        unlock: match unlock_key_file {
                            Some(f) => {
                                let text = fs::read_to_string(&f)
                                    .with_context(|| format!("reading {}", f.display()))?;
                                Unlock::Key(text.trim().parse().with_context(|| {
                                    format!("{}: not an unlock key", f.display())
                                })?)
                            }
                            None => Unlock::Wait,
                        },
                    }
                }
                None if dp.underlay.is_some() => Start::None,
                None => bail!(
                    "nothing to run: give --data-dir (the control plane of a node that ran init or join) and/or --node and --underlay (the data plane)"
                ),
            };
            serve(start, dp)
        }
        Command::Unlock { ctl } => {
            let mut key = String::new();
            std::io::stdin()
                .read_line(&mut key)
                .context("reading the unlock key from stdin")?;
            runtime()?.block_on(daemon::send_unlock(&ctl.data_dir, &key))?;
            println!("meshd: unlocked");
            Ok(())
        }
        Command::Stats { node } => {
            let stats = ParserStats::read_pinned(&node.dir()?).with_context(|| {
                format!("is meshd running (or has it run) on node {}?", node.node)
            })?;
            print!("{stats}");
            Ok(())
        }
        Command::Lb {
            command: LbCommand::Ls { node },
        } => {
            let views = read_lb(&node.dir()?).with_context(|| {
                format!("is meshd running (or has it run) on node {}?", node.node)
            })?;
            print!("{}", LbTable(&views));
            Ok(())
        }
        Command::Down { node } => down(&node),
    }
}

fn link_pin(dir: &Path, kind: &str, iface: &str) -> PathBuf {
    dir.join(format!("link_{kind}_{iface}"))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// The loaded data plane and what keeps it in shape.
struct Dataplane {
    node: String,
    datapath: Datapath,
    sync: LbSync,
    /// `--lb-backend ipvs`: the load balancer is IPVS.
    ipvs: Option<IpvsSync>,
    /// ESP for encrypted networks, opened when the first one arrives.
    ipsec: Option<Ipsec>,
    /// XFRM could not be opened, and only the drop rules are in place.
    plaintext_blocked: bool,
    /// What the last tables asked of it (re-applied by each resync).
    ipsec_spec: dataplane::ipsec::IpsecSpec,
    /// Where the ESP states sent with are recorded (the data dir).
    ipsec_record: Option<PathBuf>,
    overlay: Overlay,
    timeouts: Timeouts,
    pin_dir: PathBuf,
    config_path: Option<PathBuf>,
    /// The overlay and load balancer follow the cluster's tables (a node
    /// with a control plane); --config then gives neither.
    lb_from_tables: bool,
    /// Overlay bridges the load balancer is attached to: name -> ifindex.
    bridges: std::collections::BTreeMap<String, u32>,
    /// Bridges it should be on: name -> this node's address there.
    lb_bridges: std::collections::BTreeMap<String, Ipv4Addr>,
    /// The load balancer's share of the tables (when it follows them).
    lb: LbView,
    /// The node `lb` was made for.
    lb_node: Option<String>,
}

impl Dataplane {
    async fn start(
        dp: &DataplaneArgs,
        underlay: &str,
        config: Option<NodeConfig>,
        tables: bool,
        data_dir: Option<&Path>,
    ) -> Result<Dataplane> {
        let node = dp.node.clone().context("--underlay needs --node")?;
        // IPVS first: a kernel without it refuses before anything is loaded.
        let mut ipvs = match dp.lb_backend {
            LbBackend::Ebpf => None,
            LbBackend::Ipvs => {
                fs::create_dir_all(IPVS_STATE_DIR)
                    .with_context(|| format!("creating {IPVS_STATE_DIR}"))?;
                let sync = IpvsSync::open(&ipvs_state_file(&node)).context("--lb-backend ipvs")?;
                tracing::info!(scheduler = sync.scheduler(), "the load balancer is IPVS");
                Some(sync)
            }
        };
        let pin_dir = bpffs::prepare_node_dir(&dp.bpf_root, &node)?;
        // The LB routes NATed packets; bpf_fib_lookup refuses unless forwarding is on.
        fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1")
            .context("enabling IPv4 forwarding")?;
        let mut datapath = Datapath::load(Some(&pin_dir))?;
        datapath.attach_parser(
            underlay,
            dp.xdp_mode.into(),
            Some(&link_pin(&pin_dir, "xdp", underlay)),
        )?;
        datapath.attach_lb(underlay, Some(&link_pin(&pin_dir, "tc", underlay)))?;
        let mut sync = datapath
            .recover_lb()
            .context("reading the pinned load-balancer state")?;
        let mut timeouts = Timeouts::default();
        if let Some(c) = &config {
            apply_config(&mut datapath, &mut sync, &mut ipvs, c, &pin_dir)?;
            timeouts = c.timeouts;
        }
        let mut overlay = Overlay::new(Netlink::current()?);
        if let Some(c) = &config
            && !tables
        {
            apply_overlay(&mut overlay, c.overlay.clone()).await;
        }
        tracing::info!(node = %node, %underlay, pins = %pin_dir.display(), "data plane attached");
        Ok(Dataplane {
            node,
            datapath,
            sync,
            ipvs,
            ipsec: None,
            plaintext_blocked: false,
            ipsec_spec: Default::default(),
            ipsec_record: data_dir.map(|d| d.join("ipsec-sent.json")),
            overlay,
            timeouts,
            pin_dir,
            config_path: dp.config.clone(),
            lb_from_tables: tables,
            bridges: Default::default(),
            lb_bridges: Default::default(),
            lb: LbView::new(),
            lb_node: None,
        })
    }

    async fn reload(&mut self) {
        let Some(path) = self.config_path.clone() else {
            tracing::warn!("SIGHUP without --config: nothing to reload");
            return;
        };
        let tables = self.lb_from_tables;
        match read_config(&path).and_then(|c| {
            check_config_with_tables(&c, tables, &path)?;
            apply_config(
                &mut self.datapath,
                &mut self.sync,
                &mut self.ipvs,
                &c,
                &self.pin_dir,
            )?;
            Ok(c)
        }) {
            Ok(c) => {
                self.timeouts = c.timeouts;
                if !tables {
                    apply_overlay(&mut self.overlay, c.overlay).await;
                }
            }
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "config reload failed; keeping the previous state"
            ),
        }
    }

    async fn resync(&mut self) {
        // IPsec first, as on every update: re-read the kernel's states
        // (keys included) and policies, and repair what drifted.
        if let Some(ipsec) = self.ipsec.as_mut() {
            match ipsec.reconcile(&self.ipsec_spec) {
                Ok(r) if r.total() > r.nft_writes => {
                    tracing::warn!(?r, "ipsec drift repaired");
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "ipsec reconcile"),
            }
        }
        match self.overlay.reconcile().await {
            Ok(r) if r.changes > 0 => tracing::warn!(changes = r.changes, "overlay drift repaired"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "overlay reconcile"),
        }
        // A bridge the reconcile re-created has a new index: attach the
        // load balancer there and move its NAT address.
        if self.lb_from_tables {
            let before = self.bridges.clone();
            let r = self.refresh_bridges().await.and_then(|()| {
                if self.bridges == before {
                    return Ok(());
                }
                let nat = self.nat_interfaces();
                self.lb
                    .set_nat_interfaces(
                        nat,
                        &mut *lb_target(&mut self.datapath, &mut self.sync, &mut self.ipvs),
                    )
                    .map(drop)
                    .map_err(|e| e.to_string())
            });
            if let Err(e) = r {
                tracing::error!(error = %e, "load-balancer bridge repair");
            }
        }
    }

    /// Makes this node's IPsec match the tables, before the overlay wires
    /// anything: an encrypted network's VXLAN never flows in plaintext. A
    /// failure with the drop rules in place is logged (the network carries
    /// nothing until it is fixed); without them, the update fails.
    fn sync_ipsec(&mut self, spec: dataplane::ipsec::IpsecSpec) -> Result<(), String> {
        if spec.is_empty() && self.ipsec.is_none() {
            if std::mem::take(&mut self.plaintext_blocked) {
                dataplane::ipsec::remove_rules();
            }
            return Ok(());
        }
        self.ipsec_spec = spec.clone();
        if self.ipsec.is_none() {
            match Ipsec::open(self.ipsec_record.as_deref()) {
                Ok(x) => self.ipsec = Some(x),
                Err(e) => {
                    dataplane::ipsec::block_plaintext(&spec.vnis)
                        .map_err(|b| format!("encrypted networks: {e}; and {b}"))?;
                    self.plaintext_blocked = true;
                    tracing::error!(
                        error = %e,
                        "encrypted networks carry nothing on this node: it cannot program ESP"
                    );
                    return Ok(());
                }
            }
        }
        let ipsec = self.ipsec.as_mut().expect("opened above");
        match ipsec.apply(&spec) {
            Ok(r) if r.total() > 0 => {
                tracing::info!(?r, peers = spec.peers.len(), primary = ?spec.primary, "ipsec applied");
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) if ipsec.blocks(&spec.vnis) => {
                tracing::error!(error = %e, "ipsec: encrypted networks are blocked until this is fixed");
                Ok(())
            }
            Err(e) => Err(format!("ipsec: {e}")),
        }
    }

    /// Makes the load balancer match the tables. On a whole update: attaches
    /// it to the bridge of every network this node is on (where replies,
    /// and local tasks' flows to VIPs, arrive), gives each bridge its NAT
    /// address, and syncs every frontend; on a delta, only the services the
    /// delta touched. Either way only the difference is written.
    async fn sync_lb(
        &mut self,
        tables: &Tables,
        update: Update<'_>,
        view: &NodeView,
        underlay: Ipv4Addr,
    ) -> Result<(), String> {
        if matches!(update, Update::Whole) {
            self.lb_bridges = view
                .networks()
                .iter()
                .filter_map(|(net, addr)| {
                    let (_, n) = tables.networks().find(|(id, _)| id == net)?;
                    Some((overlay::bridge_name(n.vni), *addr))
                })
                .collect();
            self.refresh_bridges().await?;
        }
        if self.lb_node.as_deref() != Some(view.node()) {
            self.lb = LbView::for_node(view.node());
            self.lb_node = Some(view.node().to_owned());
        }
        let nat = self.nat_interfaces();
        let report = self
            .lb
            .sync(
                tables,
                update,
                view.networks(),
                vec![underlay],
                nat,
                &mut *lb_target(&mut self.datapath, &mut self.sync, &mut self.ipvs),
            )
            .map_err(|e| format!("load balancer: {e}"))?;
        if report.total() > 0 {
            tracing::debug!(?report, revision = tables.revision, "load balancer synced");
        }
        Ok(())
    }

    /// NAT address per attached bridge index.
    fn nat_interfaces(&self) -> std::collections::BTreeMap<u32, Ipv4Addr> {
        self.bridges
            .iter()
            .filter_map(|(name, index)| Some((*index, *self.lb_bridges.get(name)?)))
            .collect()
    }

    /// Attaches the load balancer to every bridge it should be on that has
    /// no link yet (new, or re-created with a new index).
    async fn refresh_bridges(&mut self) -> Result<(), String> {
        let mut bridges = std::collections::BTreeMap::new();
        for name in self.lb_bridges.keys() {
            let link = self
                .overlay
                .netlink()
                .link(name)
                .await
                .map_err(|e| e.to_string())?;
            // Not built (yet): the overlay reports why, and a retry follows.
            let Some(link) = link else { continue };
            bridges.insert(name.clone(), link.index);
        }
        for (name, index) in &bridges {
            if self.bridges.get(name) != Some(index) {
                self.attach_bridge(name, *index)?;
            }
        }
        self.bridges = bridges;
        Ok(())
    }

    /// Attaches the load balancer to a bridge, pinned by name and index: a
    /// restart reuses the link; a bridge that was re-created gets a new one.
    fn attach_bridge(&mut self, name: &str, index: u32) -> Result<(), String> {
        let prefix = format!("link_tc_{name}@");
        if let Ok(dir) = fs::read_dir(&self.pin_dir) {
            for e in dir.flatten() {
                let file = e.file_name().to_string_lossy().into_owned();
                if file.starts_with(&prefix) && file != format!("{prefix}{index}") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let pin = self.pin_dir.join(format!("{prefix}{index}"));
        self.datapath
            .attach_lb(name, Some(&pin))
            .map_err(|e| format!("attaching the load balancer to {name}: {e}"))
    }

    fn sweep(&mut self) {
        match self
            .datapath
            .sweep_conntrack(monotonic_ns(), &self.timeouts)
        {
            Ok(r) if r.flows_expired + r.revnat_expired > 0 => {
                tracing::info!(?r, "conntrack sweep")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "conntrack sweep failed"),
        }
    }
}

fn print_init(report: &InitReport, at: &Addresses) {
    println!(
        "Swarm initialized: current node ({}) is now a manager.\n",
        report.node_id
    );
    println!("To add a worker to this swarm, run the following command:\n");
    println!(
        "    meshd join --token {} {}\n",
        report.worker_token, at.api_addr
    );
    println!("To add a manager to this swarm, run the following command:\n");
    println!(
        "    meshd join --token {} {}\n",
        report.manager_token, at.api_addr
    );
    if let Some(key) = &report.unlock_key {
        println!(
            "To unlock a swarm manager after it restarts, run `meshd unlock` and provide the following key:\n\n    {key}\n"
        );
        println!(
            "Please remember to store this key in a password manager, since without it you will not be able to restart the manager."
        );
    }
}

/// Starts the control plane (per `start`) and the data plane (with
/// --underlay), then serves until SIGINT/SIGTERM.
fn serve(start: Start, dp: DataplaneArgs) -> Result<()> {
    // Read the config before touching anything: a bad file changes nothing.
    let config = dp.config.as_deref().map(read_config).transpose()?;
    if let (Some(c), Some(path)) = (&config, &dp.config) {
        check_config_with_tables(c, !matches!(start, Start::None), path)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    // A manager refuses encrypted networks this kernel cannot protect.
    let manager_config = control::manager::ManagerConfig {
        encryption_check: Some(dataplane::ipsec::probe),
        ..Default::default()
    };
    let removal = rt.block_on(async {
        let daemon = match start {
            Start::None => None,
            Start::Init { dir, at, opts } => {
                let (d, report) = daemon::init_with(&dir, &at, &opts, &manager_config).await?;
                print_init(&report, &at);
                Some(d)
            }
            Start::Join {
                dir,
                at,
                token,
                manager,
            } => {
                let d = daemon::join_with(&dir, &at, &token, &manager, &manager_config).await?;
                let role = if d.ctx.manager.read().expect("lock").is_some() {
                    "manager"
                } else {
                    "worker"
                };
                println!("This node joined a swarm as a {role}.");
                Some(d)
            }
            Start::Run { dir, unlock } => Some(daemon::run_with(&dir, unlock, &manager_config).await?),
        };
        if let Some(d) = &daemon {
            tracing::info!(node = %d.ctx.node_id, api = %d.ctx.api_addr, data_dir = %d.dir.display(), "control plane serving");
        }
        let dataplane = match &dp.underlay {
            Some(underlay) => Some(Arc::new(tokio::sync::Mutex::new(
                Dataplane::start(
                    &dp,
                    underlay,
                    config,
                    daemon.is_some(),
                    daemon.as_ref().map(|d| d.dir.as_path()),
                )
                .await?,
            ))),
            None => None,
        };
        let mut daemon = daemon;
        let tasks_stop = tokio::sync::watch::Sender::new(false);
        let on_stop = tokio::sync::watch::Sender::new(runner::OnStop::LeaveTasks);
        let mut tasks = None;
        let mut removed = None;
        if let Some(d) = daemon.as_mut() {
            let file = control::daemon::NodeFile::load(&d.dir)?;
            let upstream = if dp.dns_upstream.is_empty() {
                Dns::host_resolvers()
            } else {
                dp.dns_upstream.clone()
            };
            let wired = tokio::sync::watch::Sender::new(Default::default());
            let wired_rx = wired.subscribe();
            let warm = match &dataplane {
                Some(dp) => dp.lock().await.sync.configured(),
                None => false,
            };
            let underlay = match watch_underlay(file.addr).await {
                Ok(rx) => Some(rx),
                Err(e) => {
                    tracing::warn!("not following the underlay's prefixes: {e:#}");
                    None
                }
            };
            let link = d.start_agent(TableSink {
                warm,
                node: d.ctx.node_id.clone(),
                underlay: file.addr,
                view: NodeView::new(&d.ctx.node_id, file.addr),
                dataplane: dataplane.clone(),
                dns: Dns::new(upstream),
                wired,
            }, underlay);
            removed = Some(link.removed);
            let scope = &dp.task_scope;
            match ProcessExecutor::new(&d.dir.join("tasks"), &format!("{scope}-"), scope) {
                Ok(exec) => {
                    // Tasks an earlier meshd left running are adopted by
                    // the runner if still assigned here, else ended.
                    tasks = Some(tokio::spawn(runner::run(
                        Arc::new(exec),
                        wired_rx,
                        link.assignments,
                        link.reports,
                        StopTiming {
                            drain: Duration::from_millis(dp.drain_ms),
                            grace: Duration::from_millis(dp.stop_grace_ms),
                        },
                        tasks_stop.subscribe(),
                        on_stop.subscribe(),
                    )));
                }
                Err(e) => tracing::error!(
                    "this node cannot run tasks (they stay assigned to it, not started): {e}"
                ),
            }
        }
        println!("meshd: ready");

        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        let mut sweep = tokio::time::interval(Duration::from_secs(dp.sweep_interval.max(1)));
        let mut resync = tokio::time::interval(Duration::from_secs(dp.resync_interval.max(1)));
        resync.reset(); // the first full pass just happened
        let mut removal = None;
        loop {
            let was_removed = async {
                match removed.as_mut() {
                    Some(r) => r.wait_for(Option::is_some).await.ok().and_then(|v| v.clone()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                why = was_removed => {
                    // Its tasks end with it: they belong to the cluster.
                    removal = Some(why.unwrap_or_else(|| "removed".into()));
                    on_stop.send_replace(runner::OnStop::EndTasks);
                    break;
                }
                r = tokio::signal::ctrl_c() => { r.context("waiting for SIGINT")?; break; }
                _ = term.recv() => break,
                _ = hup.recv() => {
                    if let Some(d) = &dataplane { d.lock().await.reload().await }
                }
                _ = resync.tick(), if dataplane.is_some() => {
                    if let Some(d) = &dataplane { d.lock().await.resync().await }
                }
                _ = sweep.tick(), if dataplane.is_some() => {
                    if let Some(d) = &dataplane { d.lock().await.sweep() }
                }
            }
        }
        // Tasks first: their last reports may still reach the leader.
        tasks_stop.send_replace(true);
        if let Some(t) = tasks {
            let _ = t.await;
        }
        if let Some(d) = daemon {
            d.stop().await;
        }
        if let Some(d) = dataplane
            && removal.is_none()
        {
            tracing::info!(node = %d.lock().await.node, "exiting; the data path stays attached for the next start");
        }
        anyhow::Ok(removal)
    })?;
    let Some(why) = removal else {
        return Ok(());
    };
    // A removed node leaves nothing of the cluster behind: its data plane
    // (overlay, pins, IPsec) goes as `meshd down` takes it.
    if let Some(node) = dp.node.clone() {
        let args = NodeArgs {
            node,
            bpf_root: dp.bpf_root.clone(),
        };
        if let Err(e) = down(&args) {
            tracing::warn!("tearing down the data plane: {e:#}");
        }
    }
    bail!(
        "this node was removed from the cluster ({why}); its tasks were stopped and its data \
         plane removed. To bring it back, join again with a current token and a fresh --data-dir"
    )
}

/// The agent's view of the data plane: each update of the tables becomes
/// this node's overlay, then its DNS records (swapped in one step).
struct TableSink {
    /// The data plane was kept from an earlier meshd (see `Sink::warm`).
    warm: bool,
    node: String,
    /// This node's underlay address: where published ports answer.
    underlay: Ipv4Addr,
    view: NodeView,
    dataplane: Option<Arc<tokio::sync::Mutex<Dataplane>>>,
    dns: Dns,
    /// Task namespace -> endpoints of it applied (see [`runner::Wired`]).
    wired: tokio::sync::watch::Sender<std::collections::HashMap<String, usize>>,
}

impl TableSink {
    /// Counts this node's task namespaces in the endpoints just applied:
    /// a task starts once all its networks are wired.
    fn note_wired(&self, tables: &Tables, update: Update<'_>) {
        use control::tables::{Key, Value};
        let node = &self.node;
        let mine = |v: &Option<Value>| match v {
            Some(Value::Endpoint(e)) if e.node == *node => e.netns.clone(),
            _ => None,
        };
        self.wired.send_modify(|w| match update {
            Update::Whole => {
                w.clear();
                for (_, _, e) in tables.endpoints() {
                    if e.node == *node
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
        });
    }
}

impl Sink for TableSink {
    fn warm(&self) -> bool {
        self.warm
    }

    async fn apply(&mut self, tables: &Tables, update: Update<'_>) -> Result<(), String> {
        let r = self.apply_dataplane(tables, update).await;
        if r.is_ok() {
            self.note_wired(tables, update);
        }
        r
    }
}

impl TableSink {
    async fn apply_dataplane(&mut self, tables: &Tables, update: Update<'_>) -> Result<(), String> {
        let Some(dp) = &self.dataplane else {
            return Ok(());
        };
        let mut dp = dp.lock().await;
        // IPsec before the overlay wires anything new, and what the update
        // takes away only after the overlay removed it: a VXLAN device of
        // an encrypted network never exists without its protection.
        let ipsec = dataplane::tables::ipsec_spec(tables, &self.node, self.underlay);
        let widened = ipsec.widened(&dp.ipsec_spec);
        dp.sync_ipsec(widened)?;
        let overlay = self.view.overlay(tables, update);
        let whole = matches!(overlay, OverlayUpdate::Whole(_));
        let report = match overlay {
            OverlayUpdate::Unchanged => None,
            OverlayUpdate::Changes(c) => Some(dp.overlay.apply_changes(&c).await),
            OverlayUpdate::Whole(spec) => Some(dp.overlay.apply(spec).await),
        }
        .transpose()
        .map_err(|e| e.to_string())?;
        if dp.lb_from_tables {
            // A whole overlay (the node's networks changed) needs a whole LB.
            let update = if whole { Update::Whole } else { update };
            dp.sync_lb(tables, update, &self.view, self.underlay)
                .await?;
        }
        dp.sync_ipsec(ipsec)?;
        // After the overlay: a new task's namespace has its `lo` up.
        self.dns.update(tables, update, &self.node).await?;
        tracing::debug!(
            revision = tables.revision,
            overlay_changes = report.map(|r| r.changes),
            dns_tasks = self.dns.served(),
            "tables applied"
        );
        Ok(())
    }
}

/// With a control plane, the overlay and the load balancer come from the
/// cluster's tables: a config that also gives them would fight the tables.
fn check_config_with_tables(config: &NodeConfig, tables: bool, path: &Path) -> Result<()> {
    if tables && (config.lb.is_some() || !config.overlay.networks.is_empty()) {
        bail!(
            "{}: this node runs the control plane, so its overlay and load balancer come from the cluster's tables; remove the \"lb\" and \"overlay\" sections (keep \"timeouts\" and \"endpoint_interfaces\")",
            path.display()
        );
    }
    Ok(())
}

fn apply_config(
    datapath: &mut Datapath,
    sync: &mut LbSync,
    ipvs: &mut Option<IpvsSync>,
    config: &NodeConfig,
    pin_dir: &Path,
) -> Result<()> {
    for iface in &config.endpoint_interfaces {
        datapath
            .attach_lb(iface, Some(&link_pin(pin_dir, "tc", iface)))
            .with_context(|| {
                format!("attaching the load balancer to endpoint interface {iface}")
            })?;
    }
    if let Some(lb) = &config.lb {
        let report = lb_target(datapath, sync, ipvs).apply(lb)?;
        tracing::info!(
            ?report,
            writes = report.total(),
            "load-balancer state applied"
        );
    }
    Ok(())
}

/// Applies an overlay table. A kernel error is logged, not fatal: the rest
/// of the table is in place, and every resync retries what failed.
async fn apply_overlay(overlay: &mut Overlay, spec: OverlaySpec) {
    match overlay.apply(spec).await {
        Ok(r) => tracing::info!(changes = r.changes, full = r.full, "overlay applied"),
        Err(e) => tracing::error!(error = %e, "overlay apply"),
    }
}

fn down(node: &NodeArgs) -> Result<()> {
    // The overlay links live in this namespace, whatever the pins say.
    let report = runtime()?.block_on(async {
        let mut overlay = Overlay::new(Netlink::current()?);
        overlay
            .teardown()
            .await
            .context("removing the overlay links")
    })?;
    // ESP states and policies of encrypted networks, and their drop rules.
    // The record of SAs sent with stays in the data dir: the peers' replay
    // windows outlive this teardown.
    match Ipsec::open(None) {
        Ok(mut x) => {
            let n = x.teardown().map_err(anyhow::Error::msg)?;
            if n > 0 {
                println!("meshd: removed {n} IPsec state(s) and policies");
            }
        }
        Err(_) => dataplane::ipsec::remove_rules(),
    }
    // IPVS services an `--lb-backend ipvs` meshd installed, and its table.
    let ipvs_state = ipvs_state_file(&node.node);
    let mut ipvs_removed = 0;
    if ipvs_state.exists() {
        let mut sync = IpvsSync::open(&ipvs_state).context("removing the IPVS services")?;
        ipvs_removed = sync.teardown()?;
        fs::remove_file(&ipvs_state)
            .with_context(|| format!("removing {}", ipvs_state.display()))?;
        println!("meshd: removed {ipvs_removed} IPVS service(s)");
    }
    let dir = node.dir()?;
    if !dir.exists() {
        if report.changes > 0 || ipvs_removed > 0 {
            println!("meshd: removed {} overlay link(s)", report.changes);
            return Ok(());
        }
        bail!(
            "node {} has no pins under {} and no overlay links",
            node.node,
            node.bpf_root.display()
        );
    }
    // Unpinning the links detaches the programs (no process holds them once
    // meshd has exited); unpinning the maps frees them.
    fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    println!(
        "meshd: node {} is down (pins removed from {})",
        node.node,
        dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::Cli;

    /// `meshd init --cert-lifetime 999999999999999999d` once panicked on
    /// overflow; every duration flag now gives its range instead.
    #[test]
    fn duration_flags_refuse_overflow_with_the_range() {
        for (flag, value) in [
            ("--cert-lifetime", "999999999999999999d"),
            ("--cert-lifetime", "9999999d"),
            ("--cert-lifetime", "99999999999999999999999"),
            ("--network-key-rotation", "99999999999999999h"),
            ("--heartbeat-period", "99999999999999999999ms"),
        ] {
            let err = Cli::try_parse_from(["meshd", "init", flag, value])
                .err()
                .unwrap_or_else(|| panic!("{flag} {value} was accepted"));
            let text = err.to_string();
            assert!(
                text.contains("out of range") || text.contains("is not a duration"),
                "{flag} {value}: {text}"
            );
        }
        assert!(Cli::try_parse_from(["meshd", "init", "--cert-lifetime", "3650d"]).is_ok());
    }
}
