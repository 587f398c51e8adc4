//! The loaded data plane: the eBPF programs attached to the underlay (or
//! IPVS as the load balancer), the overlay, and IPsec, with what keeps
//! them in shape between updates (resync, conntrack sweep, SIGHUP reload)
//! and what takes them down (`meshd down`).
//!
//! The reconcilers that bring each part to the tables are in
//! [`crate::reconcile`]; this module owns the parts and their lifecycle.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::programs::XdpMode;
use dataplane::{
    bpffs,
    ebpf::{Datapath, monotonic_ns},
    ipsec::{Ipsec, IpsecSpec},
    ipvs::IpvsSync,
    lb::{LbSync, Timeouts},
    netlink::Netlink,
    overlay::{Overlay, OverlaySpec},
    tables::LbView,
};

use crate::{
    attach::link_pin,
    config::NodeConfig,
    error::{DownError, StartError},
};

/// What balances published ports and VIPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbBackend {
    /// TC programs with Maglev.
    Ebpf,
    /// The kernel's IPVS (NAT forwarding, `mh` else `rr`; VIPs as fwmark
    /// services).
    Ipvs,
}

/// How to bring a node's data plane up.
#[derive(Clone, Debug)]
pub struct Options {
    /// Its maps and links are pinned under `<bpf_root>/<node>`.
    pub node: String,
    pub bpf_root: PathBuf,
    /// The interface other nodes and clients reach this one on.
    pub underlay: String,
    pub xdp_mode: XdpMode,
    /// The `--config` file, re-read on SIGHUP.
    pub config: Option<PathBuf>,
    pub lb_backend: LbBackend,
    /// Room in the eBPF load balancer's backend maps.
    pub lb_backends: u32,
}

/// Where IPVS mode keeps the set of services it installed (runtime state:
/// IPVS does not outlive a reboot either).
const IPVS_STATE_DIR: &str = "/run/mesh/ipvs";

fn ipvs_state_file(node: &str) -> PathBuf {
    Path::new(IPVS_STATE_DIR).join(format!("{node}.json"))
}

/// The loaded data plane and what keeps it in shape.
pub struct Dataplane {
    pub(crate) node: String,
    pub(crate) datapath: Datapath,
    pub(crate) sync: LbSync,
    /// `LbBackend::Ipvs`: the load balancer is IPVS.
    pub(crate) ipvs: Option<IpvsSync>,
    /// ESP for encrypted networks, opened when the first one arrives.
    pub(crate) ipsec: Option<Ipsec>,
    /// XFRM could not be opened, and only the drop rules are in place.
    pub(crate) plaintext_blocked: bool,
    /// What the last tables asked of it (re-applied by each resync).
    pub(crate) ipsec_spec: IpsecSpec,
    /// Where the ESP states sent with are recorded (the data dir).
    pub(crate) ipsec_record: Option<PathBuf>,
    pub(crate) overlay: Overlay,
    timeouts: Timeouts,
    pub(crate) pin_dir: PathBuf,
    config_path: Option<PathBuf>,
    /// The overlay and load balancer follow the cluster's tables (a node
    /// with a control plane); --config then gives neither.
    pub(crate) lb_from_tables: bool,
    /// Overlay bridges the load balancer is attached to: name -> ifindex.
    pub(crate) bridges: BTreeMap<String, u32>,
    /// Bridges it should be on: name -> this node's address there.
    pub(crate) lb_bridges: BTreeMap<String, Ipv4Addr>,
    /// The load balancer's share of the tables (when it follows them).
    pub(crate) lb: LbView,
    /// The node `lb` was made for.
    pub(crate) lb_node: Option<String>,
}

impl Dataplane {
    /// Loads and attaches the data plane, reusing what an earlier meshd
    /// pinned (established flows keep their conntrack entries). `tables`:
    /// a control plane will drive the overlay and the load balancer.
    pub async fn start(
        opts: &Options,
        config: Option<NodeConfig>,
        tables: bool,
        data_dir: Option<&Path>,
    ) -> Result<Dataplane, StartError> {
        let node = opts.node.clone();
        // IPVS first: a kernel without it refuses before anything is loaded.
        let mut ipvs = match opts.lb_backend {
            LbBackend::Ebpf => None,
            LbBackend::Ipvs => {
                fs::create_dir_all(IPVS_STATE_DIR).map_err(|source| StartError::StateDir {
                    path: IPVS_STATE_DIR.into(),
                    source,
                })?;
                let sync = IpvsSync::open(&ipvs_state_file(&node)).map_err(StartError::Ipvs)?;
                tracing::info!(scheduler = sync.scheduler(), "the load balancer is IPVS");
                Some(sync)
            }
        };
        let pin_dir = bpffs::prepare_node_dir(&opts.bpf_root, &node)?;
        // The LB routes NATed packets; bpf_fib_lookup refuses unless forwarding is on.
        fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1").map_err(StartError::Forwarding)?;
        let underlay = &opts.underlay;
        let mut datapath = Datapath::load_with(Some(&pin_dir), opts.lb_backends)?;
        datapath.attach_parser(
            underlay,
            opts.xdp_mode,
            Some(&link_pin(&pin_dir, "xdp", underlay)),
        )?;
        datapath.attach_lb(underlay, Some(&link_pin(&pin_dir, "tc", underlay)))?;
        let mut sync = datapath.recover_lb().map_err(StartError::Recover)?;
        let mut timeouts = Timeouts::default();
        if let Some(c) = &config {
            c.apply(&mut datapath, &mut sync, &mut ipvs, &pin_dir)?;
            timeouts = c.timeouts;
        }
        let mut overlay = Overlay::new(Netlink::current().map_err(StartError::Netlink)?);
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
            config_path: opts.config.clone(),
            lb_from_tables: tables,
            bridges: Default::default(),
            lb_bridges: Default::default(),
            lb: LbView::new(),
            lb_node: None,
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether an earlier meshd left the load balancer configured (a warm
    /// restart: see `Sink::warm`).
    pub fn configured(&self) -> bool {
        self.sync.configured()
    }

    /// SIGHUP: re-reads the config file and applies it; a bad file is
    /// logged and changes nothing.
    pub async fn reload(&mut self) {
        let Some(path) = self.config_path.clone() else {
            tracing::warn!("SIGHUP without --config: nothing to reload");
            return;
        };
        let tables = self.lb_from_tables;
        let read = NodeConfig::read(&path).and_then(|c| {
            c.check_with_tables(tables, &path)?;
            c.apply(
                &mut self.datapath,
                &mut self.sync,
                &mut self.ipvs,
                &self.pin_dir,
            )?;
            Ok(c)
        });
        match read {
            Ok(c) => {
                self.timeouts = c.timeouts;
                if !tables {
                    apply_overlay(&mut self.overlay, c.overlay).await;
                }
            }
            Err(e) => tracing::error!(
                error = %e,
                "config reload failed; keeping the previous state"
            ),
        }
    }

    /// Re-reads the kernel's state of each part and repairs what drifted,
    /// in the order updates apply: IPsec, the overlay, the load balancer.
    pub async fn resync(&mut self) {
        self.resync_ipsec();
        match self.overlay.reconcile().await {
            Ok(r) if r.changes > 0 => tracing::warn!(changes = r.changes, "overlay drift repaired"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "overlay reconcile"),
        }
        if let Err(e) = self.resync_lb().await {
            tracing::error!(error = %e, "load-balancer bridge repair");
        }
    }

    /// Expires idle conntrack entries.
    pub fn sweep(&mut self) {
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

/// Applies an overlay table. A kernel error is logged, not fatal: the rest
/// of the table is in place, and every resync retries what failed.
async fn apply_overlay(overlay: &mut Overlay, spec: OverlaySpec) {
    match overlay.apply(spec).await {
        Ok(r) => tracing::info!(changes = r.changes, full = r.full, "overlay applied"),
        Err(e) => tracing::error!(error = %e, "overlay apply"),
    }
}

/// Takes node `node`'s data plane down after meshd has exited: the overlay
/// links, IPsec, IPVS services, and the pins (which detaches the programs
/// and frees the maps). Returns what it did, as lines for the operator.
pub async fn down(node: &str, bpf_root: &Path) -> Result<Vec<String>, DownError> {
    let mut said = Vec::new();
    // The overlay links live in this namespace, whatever the pins say.
    let mut overlay = Overlay::new(Netlink::current().map_err(DownError::Netlink)?);
    let report = overlay.teardown().await.map_err(DownError::Overlay)?;
    // ESP states and policies of encrypted networks, and their drop rules.
    // The record of SAs sent with stays in the data dir: the peers' replay
    // windows outlive this teardown.
    match Ipsec::open(None) {
        Ok(mut x) => {
            let n = x.teardown().map_err(DownError::Ipsec)?;
            if n > 0 {
                said.push(format!("removed {n} IPsec state(s) and policies"));
            }
        }
        Err(_) => dataplane::ipsec::remove_rules(),
    }
    // IPVS services an `LbBackend::Ipvs` meshd installed, and its table.
    let ipvs_state = ipvs_state_file(node);
    let mut ipvs_removed = 0;
    if ipvs_state.exists() {
        let mut sync = IpvsSync::open(&ipvs_state).map_err(DownError::Ipvs)?;
        ipvs_removed = sync.teardown().map_err(DownError::IpvsSync)?;
        fs::remove_file(&ipvs_state).map_err(|source| DownError::Remove {
            path: ipvs_state.clone(),
            source,
        })?;
        said.push(format!("removed {ipvs_removed} IPVS service(s)"));
    }
    let dir = bpffs::node_dir(bpf_root, node)?;
    if !dir.exists() {
        if report.changes > 0 || ipvs_removed > 0 {
            said.push(format!("removed {} overlay link(s)", report.changes));
            return Ok(said);
        }
        return Err(DownError::NothingThere {
            node: node.to_owned(),
            root: bpf_root.to_owned(),
        });
    }
    // Unpinning the links detaches the programs (no process holds them once
    // meshd has exited); unpinning the maps frees them.
    fs::remove_dir_all(&dir).map_err(|source| DownError::Remove {
        path: dir.clone(),
        source,
    })?;
    said.push(format!(
        "node {node} is down (pins removed from {})",
        dir.display()
    ));
    Ok(said)
}
