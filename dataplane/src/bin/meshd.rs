//! meshd: the mesh node daemon.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};
use dataplane::{bpffs, ebpf::Datapath, stats::ParserStats};
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
    Run {
        #[command(flatten)]
        node: NodeArgs,
        /// The underlay interface (the one other nodes and clients reach us on).
        #[arg(long)]
        underlay: String,
        /// XDP attach mode.
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        xdp_mode: Mode,
    },
    /// Print this node's data-plane counters, read from its pinned maps.
    Stats {
        #[command(flatten)]
        node: NodeArgs,
    },
}

#[derive(clap::Args)]
struct NodeArgs {
    /// Node name; its maps are pinned under <bpf-root>/<node>.
    #[arg(long)]
    node: String,
    /// Root of the bpffs mesh pins under (mounted if needed).
    #[arg(long, default_value = bpffs::DEFAULT_ROOT)]
    bpf_root: PathBuf,
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

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            node,
            underlay,
            xdp_mode,
        } => run(node, &underlay, xdp_mode),
        Command::Stats { node } => {
            let dir = bpffs::node_dir(&node.bpf_root, &node.node)?;
            let stats = ParserStats::read_pinned(&dir).with_context(|| {
                format!("is meshd running (or has it run) on node {}?", node.node)
            })?;
            print!("{stats}");
            Ok(())
        }
    }
}

fn run(node: NodeArgs, underlay: &str, mode: Mode) -> Result<()> {
    let pin_dir = bpffs::prepare_node_dir(&node.bpf_root, &node.node)?;
    let mut datapath = Datapath::load(Some(&pin_dir))?;
    datapath.attach_parser(underlay, mode.into(), None)?;
    tracing::info!(node = %node.node, %underlay, pins = %pin_dir.display(), "data plane attached");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })?;
    tracing::info!(node = %node.node, "shutting down; maps stay pinned for the next start");
    drop(datapath);
    Ok(())
}
