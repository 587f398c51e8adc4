//! meshd: the mesh node daemon.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};
use dataplane::{
    bpffs,
    ebpf::{Datapath, monotonic_ns},
    inspect::{LbTable, read_lb},
    lb::{LbSpec, LbSync, Timeouts},
    netlink::Netlink,
    overlay::{Overlay, OverlaySpec},
    stats::ParserStats,
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
    /// Load the data plane on this node and serve until SIGINT/SIGTERM.
    /// SIGHUP re-reads --config. On exit the data path stays attached (pinned
    /// links), so a restart does not break established flows; `meshd down`
    /// removes it.
    Run {
        #[command(flatten)]
        node: NodeArgs,
        /// The underlay interface (the one other nodes and clients reach us on).
        #[arg(long)]
        underlay: String,
        /// XDP attach mode for the packet counters.
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        xdp_mode: Mode,
        /// Node config (JSON): load-balancer frontends/backends, local endpoint
        /// interfaces, conntrack timeouts. Without it the LB answers nothing.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Seconds between conntrack sweeps.
        #[arg(long, default_value_t = 10)]
        sweep_interval: u64,
        /// Seconds between full overlay reconciles (re-reading the kernel
        /// and repairing drift, such as an FDB entry deleted by hand).
        #[arg(long, default_value_t = 30)]
        resync_interval: u64,
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
        Command::Run {
            node,
            underlay,
            xdp_mode,
            config,
            sweep_interval,
            resync_interval,
        } => run(
            node,
            &underlay,
            xdp_mode,
            config.as_deref(),
            Intervals {
                sweep: sweep_interval,
                resync: resync_interval,
            },
        ),
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

struct Intervals {
    sweep: u64,
    resync: u64,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn run(
    node: NodeArgs,
    underlay: &str,
    mode: Mode,
    config_path: Option<&Path>,
    every: Intervals,
) -> Result<()> {
    // Read the config before touching the kernel: a bad file changes nothing.
    let config = config_path.map(read_config).transpose()?;
    let pin_dir = bpffs::prepare_node_dir(&node.bpf_root, &node.node)?;
    // The LB routes NATed packets; bpf_fib_lookup refuses unless forwarding is on.
    fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1").context("enabling IPv4 forwarding")?;

    let mut datapath = Datapath::load(Some(&pin_dir))?;
    datapath.attach_parser(
        underlay,
        mode.into(),
        Some(&link_pin(&pin_dir, "xdp", underlay)),
    )?;
    datapath.attach_lb(underlay, Some(&link_pin(&pin_dir, "tc", underlay)))?;
    let mut sync = datapath
        .recover_lb()
        .context("reading the pinned load-balancer state")?;
    let mut timeouts = Timeouts::default();
    if let Some(c) = &config {
        apply_config(&mut datapath, &mut sync, c, &pin_dir)?;
        timeouts = c.timeouts;
    }

    let rt = runtime()?;
    rt.block_on(async {
        let mut overlay = Overlay::new(Netlink::current()?);
        if let Some(c) = &config {
            apply_overlay(&mut overlay, c.overlay.clone()).await;
        }
        tracing::info!(node = %node.node, %underlay, pins = %pin_dir.display(), "data plane attached");
        println!("meshd: ready");

        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        let mut sweep = tokio::time::interval(Duration::from_secs(every.sweep.max(1)));
        let mut resync = tokio::time::interval(Duration::from_secs(every.resync.max(1)));
        resync.reset(); // the first full pass just happened
        loop {
            tokio::select! {
                r = tokio::signal::ctrl_c() => { r.context("waiting for SIGINT")?; break; }
                _ = term.recv() => break,
                _ = hup.recv() => {
                    let Some(path) = config_path else {
                        tracing::warn!("SIGHUP without --config: nothing to reload");
                        continue;
                    };
                    match read_config(path).and_then(|c| {
                        apply_config(&mut datapath, &mut sync, &c, &pin_dir)?;
                        Ok(c)
                    }) {
                        Ok(c) => {
                            timeouts = c.timeouts;
                            apply_overlay(&mut overlay, c.overlay).await;
                        }
                        Err(e) => tracing::error!(error = format!("{e:#}"), "config reload failed; keeping the previous state"),
                    }
                }
                _ = resync.tick() => {
                    match overlay.reconcile().await {
                        Ok(r) if r.changes > 0 => tracing::warn!(changes = r.changes, "overlay drift repaired"),
                        Ok(_) => {}
                        Err(e) => tracing::error!(error = %e, "overlay reconcile"),
                    }
                }
                _ = sweep.tick() => {
                    match datapath.sweep_conntrack(monotonic_ns(), &timeouts) {
                        Ok(r) if r.flows_expired + r.revnat_expired > 0 => tracing::info!(?r, "conntrack sweep"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "conntrack sweep failed"),
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;
    tracing::info!(node = %node.node, "exiting; the data path stays attached for the next start");
    Ok(())
}

fn apply_config(
    datapath: &mut Datapath,
    sync: &mut LbSync,
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
        let report = sync.apply(lb, &mut datapath.lb_maps())?;
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
    let dir = node.dir()?;
    if !dir.exists() {
        if report.changes > 0 {
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
