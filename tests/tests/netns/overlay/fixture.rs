//! The overlay scenarios' world: three hosts, two VXLAN networks, a task
//! namespace per network on every host, and a reconciler per host.

use std::{net::Ipv4Addr, process::Output};

use control::allocator::Subnet;
use dataplane::{
    netlink::{Mac, Netlink},
    overlay::{
        Change, LocalEndpoint, NetworkSpec, Overlay, OverlayError, OverlaySpec, RemoteEndpoint,
    },
};
use mesh_tests::{Netns, Topology};
use tokio::runtime::Runtime;

/// (id, VNI, subnet)
pub(super) const NETS: [(&str, u32, &str); 2] = [
    ("red", 4096, "10.10.1.0/24"),
    ("blue", 4097, "10.10.2.0/24"),
];
pub(super) const HOSTS: usize = 3;

pub(super) struct TaskNs {
    pub(super) ns: Netns,
    pub(super) net: usize,
    pub(super) host: usize,
    pub(super) ip: Ipv4Addr,
}

impl TaskNs {
    pub(super) fn id(&self) -> String {
        format!("{}.{}", NETS[self.net].0, self.host)
    }

    pub(super) fn mac(&self) -> Mac {
        Mac::from_ipv4(self.ip)
    }

    pub(super) fn ping(&self, to: Ipv4Addr, extra: &[&str]) -> Output {
        let to = to.to_string();
        let mut args = vec!["-c", "1", "-W", "2"];
        args.extend_from_slice(extra);
        args.push(&to);
        self.ns.exec("ping", &args)
    }

    /// Whether `to` answers a ping within 6 s (three tries: on a loaded
    /// machine one echo, or the ARP exchange before it, can be late).
    pub(super) fn reaches(&self, to: Ipv4Addr) -> bool {
        (0..3).any(|_| self.ping(to, &[]).status.success())
    }

    /// Whether one ping to `to` goes unanswered for 2 s.
    pub(super) fn unreachable(&self, to: Ipv4Addr) -> bool {
        !self.ping(to, &[]).status.success()
    }
}

pub(super) struct Cluster {
    pub(super) topo: Topology,
    pub(super) tasks: Vec<TaskNs>,
    pub(super) rt: Runtime,
    pub(super) overlays: Vec<Overlay>,
}

impl Cluster {
    /// Hosts, task namespaces and one reconciler per host; nothing applied yet.
    pub(super) fn new() -> Cluster {
        let topo = Topology::new(HOSTS);
        let mut tasks = Vec::new();
        for host in 0..HOSTS {
            for net in 0..NETS.len() {
                tasks.push(TaskNs {
                    ns: Netns::new(),
                    net,
                    host,
                    ip: Ipv4Addr::new(10, 10, net as u8 + 1, 10 + host as u8),
                });
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let overlays = topo
            .hosts()
            .iter()
            .map(|h| {
                let nl = rt
                    .block_on(async { Netlink::open(&h.ns().path()) })
                    .expect("netlink in host namespace");
                Overlay::new(nl)
            })
            .collect();
        Cluster {
            topo,
            tasks,
            rt,
            overlays,
        }
    }

    pub(super) fn task(&self, net: usize, host: usize) -> &TaskNs {
        self.tasks
            .iter()
            .find(|t| t.net == net && t.host == host)
            .expect("task exists")
    }

    /// What `host` should have: its own tasks local, everyone else's remote.
    pub(super) fn spec(&self, host: usize) -> OverlaySpec {
        let networks = NETS
            .iter()
            .enumerate()
            .map(|(n, (id, vni, subnet))| {
                let subnet: Subnet = subnet.parse().expect("subnet");
                let mine = self.tasks.iter().filter(|t| t.net == n);
                NetworkSpec {
                    id: (*id).into(),
                    vni: *vni,
                    gateway: subnet.gateway(),
                    subnet,
                    mtu: None,
                    encrypted: false,
                    host: None,
                    vips: vec![],
                    local: mine
                        .clone()
                        .filter(|t| t.host == host)
                        .map(|t| LocalEndpoint {
                            id: t.id(),
                            netns: t.ns.path(),
                            ip: t.ip,
                            mac: t.mac(),
                            interface: "eth0".into(),
                        })
                        .collect(),
                    remote: mine
                        .filter(|t| t.host != host)
                        .map(|t| RemoteEndpoint {
                            ip: t.ip,
                            mac: t.mac(),
                            node: self.topo.host(t.host).addr(),
                        })
                        .collect(),
                }
            })
            .collect();
        OverlaySpec {
            underlay: Some(self.topo.host(host).addr()),
            networks,
        }
    }

    pub(super) fn apply(&mut self, host: usize, spec: OverlaySpec) -> Result<u64, OverlayError> {
        let o = &mut self.overlays[host];
        self.rt.block_on(o.apply(spec)).map(|r| r.changes)
    }

    pub(super) fn changes(&mut self, host: usize, changes: &[Change]) -> Result<u64, OverlayError> {
        let o = &mut self.overlays[host];
        self.rt
            .block_on(o.apply_changes(changes))
            .map(|r| r.changes)
    }

    pub(super) fn reconcile(&mut self, host: usize) -> u64 {
        let o = &mut self.overlays[host];
        self.rt
            .block_on(o.reconcile())
            .unwrap_or_else(|e| panic!("reconcile host {host}: {e}"))
            .changes
    }

    pub(super) fn apply_all(&mut self) {
        for h in 0..HOSTS {
            let spec = self.spec(h);
            let changes = self
                .apply(h, spec)
                .unwrap_or_else(|e| panic!("apply on host {h}: {e}"));
            assert!(changes > 0, "host {h}: the first apply made no change");
        }
    }

    /// No mesh link in any host namespace, nothing but `lo` in any task.
    pub(super) fn assert_nothing_left(&self, after: &str) {
        for (h, host) in self.topo.hosts().iter().enumerate() {
            let left: Vec<String> = Cluster::links(host.ns())
                .into_iter()
                .filter(|n| n.starts_with("mbr-") || n.starts_with("mvx-") || n.starts_with("mve-"))
                .collect();
            assert!(left.is_empty(), "host {h} kept {left:?} after {after}");
        }
        for t in &self.tasks {
            assert_eq!(
                Cluster::links(&t.ns),
                vec!["lo"],
                "task {} after {after}",
                t.id()
            );
        }
    }

    /// Names of links in a namespace (`ip -o link`).
    pub(super) fn links(ns: &Netns) -> Vec<String> {
        ns.exec_ok("ip", &["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .collect()
    }
}

/// The MTU of `iface` in `ns` (sysfs shows the root namespace's devices).
pub(super) fn link_mtu(ns: &Netns, iface: &str) -> u32 {
    let text = ns.exec_ok("ip", &["-o", "link", "show", iface]);
    let mtu = text.split_whitespace().skip_while(|w| *w != "mtu").nth(1);
    mtu.and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no mtu in {text:?}"))
}

pub(super) fn output(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
