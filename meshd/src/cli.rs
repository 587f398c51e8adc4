//! meshd's command line: the subcommands, their flags, and how flags
//! become the control plane's addresses and the node's options.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};
use control::{
    daemon::{Addresses, InitOptions, Unlock},
    units::Range,
};
use dataplane::{bpffs, lb::limits};

#[derive(Parser)]
#[command(name = "meshd", version, about = "mesh node daemon")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
        /// The ingress network's subnet: every node takes one address of
        /// it, so the default 10.0.0.0/24 holds 253 nodes.
        #[arg(long, value_name = "CIDR")]
        ingress_subnet: Option<control::allocator::Subnet>,
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
pub(crate) struct ControlArgs {
    /// Where the node keeps its identity, certificates and (managers) the
    /// Raft store.
    #[arg(long, default_value = "/var/lib/mesh")]
    pub(crate) data_dir: PathBuf,
}

#[derive(clap::Args)]
pub(crate) struct AddrArgs {
    /// Where to serve gRPC (Raft, the API, joins).
    #[arg(long, default_value = "0.0.0.0:2377")]
    pub(crate) listen_addr: SocketAddr,
    /// The address other nodes reach this one on (IP or IP:port); default:
    /// the listen address, or --node-addr with the listen port.
    #[arg(long)]
    pub(crate) advertise_addr: Option<String>,
    /// This node's underlay IPv4 address (its VXLAN source); default: the
    /// advertised IP.
    #[arg(long)]
    pub(crate) node_addr: Option<Ipv4Addr>,
    /// Node name shown by `meshctl node ls`; default: the host name.
    #[arg(long)]
    pub(crate) hostname: Option<String>,
}

impl AddrArgs {
    pub(crate) fn resolve(&self) -> Result<Addresses> {
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
            .block_on(node::underlay::prefixes(node_addr))
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
pub(crate) struct DataplaneArgs {
    /// Node name for the data plane; its maps and links are pinned under
    /// <bpf-root>/<node>.
    #[arg(long)]
    pub(crate) node: Option<String>,
    /// Root of the bpffs mesh pins under (mounted if needed).
    #[arg(long, default_value = bpffs::DEFAULT_ROOT)]
    pub(crate) bpf_root: PathBuf,
    /// The underlay interface (the one other nodes and clients reach us
    /// on). Without it, no data plane is loaded.
    #[arg(long, requires = "node")]
    pub(crate) underlay: Option<String>,
    /// XDP attach mode for the packet counters.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub(crate) xdp_mode: Mode,
    /// Node config (JSON): load-balancer frontends/backends, local endpoint
    /// interfaces, conntrack timeouts. Without it the LB answers nothing.
    #[arg(long, requires = "underlay")]
    pub(crate) config: Option<PathBuf>,
    /// Where the embedded DNS forwards names that are not the cluster's
    /// (repeatable); default: the non-loopback nameservers of
    /// /etc/resolv.conf.
    #[arg(long = "dns-upstream")]
    pub(crate) dns_upstream: Vec<SocketAddr>,
    /// Seconds between conntrack sweeps.
    #[arg(long, default_value_t = 10)]
    pub(crate) sweep_interval: u64,
    /// Seconds between full overlay reconciles (re-reading the kernel
    /// and repairing drift, such as an FDB entry deleted by hand).
    #[arg(long, default_value_t = 30)]
    pub(crate) resync_interval: u64,
    /// Names this node's tasks' namespaces (`/run/netns/<scope>-<task>`)
    /// and their cgroup (`<cgroup2>/<scope>`); nodes sharing a host need
    /// different scopes.
    #[arg(long, default_value = "mesh", value_parser = parse_scope)]
    pub(crate) task_scope: String,
    /// Between the withdrawal of a stopping task's endpoints and its
    /// SIGTERM: open flows finish, and every node applies the withdrawal.
    #[arg(long, default_value_t = 2000)]
    pub(crate) drain_ms: u64,
    /// Between a task's SIGTERM and its SIGKILL (Docker's default: 10 s).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) stop_grace_ms: u64,
    /// What balances published ports and VIPs: `ebpf` (TC with Maglev) or
    /// `ipvs` (the kernel's IPVS, NAT forwarding, `mh` else `rr`; VIPs as
    /// fwmark services).
    #[arg(long, value_enum, default_value_t = LbBackend::Ebpf)]
    pub(crate) lb_backend: LbBackend,
    /// Room for backends (a task's address, port and protocol) in the eBPF
    /// load balancer: every node holds every service's. Its counters take
    /// 16 bytes per backend per CPU.
    #[arg(long, default_value_t = limits::BACKENDS_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1024..=i64::from(limits::BACKENDS_LIMIT)))]
    pub(crate) lb_backends: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LbBackend {
    Ebpf,
    Ipvs,
}

pub(crate) fn parse_scope(s: &str) -> Result<String, String> {
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
pub(crate) const HEARTBEAT_PERIOD: Range = Range {
    what: "the heartbeat period",
    min: Duration::from_millis(50),
    max: Duration::from_secs(60),
};

/// A certificate lifetime: at most 10 years (its dates must stay
/// representable).
pub(crate) const CERT_LIFETIME: Range = Range {
    what: "a certificate lifetime",
    min: Duration::from_secs(6),
    max: Duration::from_secs(3650 * 86_400),
};

/// The network key rotation period.
pub(crate) const KEY_ROTATION: Range = Range {
    what: "the network key rotation period",
    min: Duration::from_secs(6),
    max: Duration::from_secs(365 * 86_400),
};

/// How the control plane starts, if at all.
pub(crate) enum Start {
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
pub(crate) enum LbCommand {
    /// Frontends -> backends with their Maglev slots and counters.
    Ls {
        #[command(flatten)]
        node: NodeArgs,
    },
}

#[derive(clap::Args)]
pub(crate) struct NodeArgs {
    /// Node name; its maps and links are pinned under <bpf-root>/<node>.
    #[arg(long)]
    pub(crate) node: String,
    /// Root of the bpffs mesh pins under (mounted if needed).
    #[arg(long, default_value = bpffs::DEFAULT_ROOT)]
    pub(crate) bpf_root: PathBuf,
}

impl NodeArgs {
    pub(crate) fn dir(&self) -> Result<PathBuf> {
        Ok(bpffs::node_dir(&self.bpf_root, &self.node)?)
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Mode {
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

impl DataplaneArgs {
    /// The node's data-plane options, when `--underlay` asks for one.
    pub(crate) fn options(&self) -> Result<Option<node::Options>> {
        let Some(underlay) = &self.underlay else {
            return Ok(None);
        };
        let node = self.node.clone().context("--underlay needs --node")?;
        Ok(Some(node::Options {
            node,
            bpf_root: self.bpf_root.clone(),
            underlay: underlay.clone(),
            xdp_mode: self.xdp_mode.into(),
            config: self.config.clone(),
            lb_backend: match self.lb_backend {
                LbBackend::Ebpf => node::LbBackend::Ebpf,
                LbBackend::Ipvs => node::LbBackend::Ipvs,
            },
            lb_backends: self.lb_backends,
        }))
    }
}
