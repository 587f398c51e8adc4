//! Loading mesh's eBPF object, attaching its programs through pinned links
//! (so the data path keeps running while meshd restarts), and the kernel
//! implementation of the load balancer's map operations.

use std::{
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, ArrayOfMaps, HashMap, MapData, MapError},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, LinkOrder, PinnedLink},
        tc::{self, SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use dataplane_common::{Backend, Frontend, FrontendKey, LbConfig, limits, maps, programs};

use crate::lb::{BackendKey, LbMaps, LbSync, SyncError};

/// The eBPF object built from `dataplane-ebpf` by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

/// BPF_F_INNER_MAP: lets each Maglev table be sized to its frontend.
const BPF_F_INNER_MAP: u32 = 1 << 12;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the eBPF object (pin directory {pin_dir:?})")]
    Object {
        pin_dir: Option<PathBuf>,
        #[source]
        source: Box<EbpfError>,
    },
    #[error("room for {asked} {what} asked: between 1 and {max}")]
    Capacity {
        what: &'static str,
        asked: u32,
        max: u32,
    },
    #[error("map {map}: a pinned map of another layout: {why}")]
    Stale { map: &'static str, why: String },
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("program {program}: {operation}")]
    Program {
        program: &'static str,
        operation: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("attaching {program} to interface {interface}")]
    Attach {
        program: &'static str,
        interface: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("{operation} link {path}: {message}")]
    Link {
        operation: &'static str,
        path: PathBuf,
        message: String,
    },
}

/// Unpins every pinned map whose layout (key size, value size, capacity)
/// differs from the object's: an upgrade that changed a map's layout then
/// starts that map afresh, where reusing it would fail verification (a
/// program reading past the old value's end) or misread its bytes. Maps
/// whose layout is unchanged are kept, with their flows and counters.
fn drop_stale_pins(pins: &[(&'static str, PathBuf)], backends: u32) -> Result<(), LoadError> {
    let object = aya_obj::Object::parse(OBJECT).map_err(|e| LoadError::Stale {
        map: "(object)",
        why: format!("parse the eBPF object: {e}"),
    })?;
    for (name, path) in pins {
        let Some(want) = object.maps.get(*name) else {
            continue;
        };
        let Ok(have) = aya::maps::MapInfo::from_pin(path) else {
            continue;
        };
        let entries = if sized_by_backends(name) {
            backends
        } else {
            want.max_entries()
        };
        let (h, w) = (
            (have.key_size(), have.value_size(), have.max_entries()),
            (want.key_size(), want.value_size(), entries),
        );
        if h != w {
            tracing::warn!(
                map = name,
                pinned = ?h,
                object = ?w,
                "pinned map has another layout (key, value, entries): starting it afresh"
            );
            std::fs::remove_file(path).map_err(|e| LoadError::Stale {
                map: name,
                why: format!("unpin {}: {e}", path.display()),
            })?;
        }
    }
    Ok(())
}

/// The maps whose capacity is the backend capacity chosen at load.
fn sized_by_backends(map: &str) -> bool {
    map == maps::BACKENDS || map == maps::BACKEND_STATS
}

/// The loaded object: every program verified and loaded.
pub struct Datapath {
    ebpf: Ebpf,
    /// BACKENDS' capacity (BACKEND_STATS has the same).
    backends: u32,
}

impl Datapath {
    /// Loads the object with the compiled map sizes; see [`Datapath::load_with`].
    pub fn load(pin_dir: Option<&Path>) -> Result<Self, LoadError> {
        Datapath::load_with(pin_dir, limits::BACKENDS_DEFAULT)
    }

    /// Loads the object, with room for `backends` backends (at most
    /// [`limits::BACKENDS_LIMIT`]). With `pin_dir`, every map is pinned there
    /// by name, and maps already pinned there (by an earlier meshd) are
    /// reused, so counters, tables and conntrack survive a daemon restart;
    /// a pinned map of another size starts afresh.
    pub fn load_with(pin_dir: Option<&Path>, backends: u32) -> Result<Self, LoadError> {
        if backends == 0 || backends > limits::BACKENDS_LIMIT {
            return Err(LoadError::Capacity {
                what: "backends",
                asked: backends,
                max: limits::BACKENDS_LIMIT,
            });
        }
        raise_memlock();
        let pins: Vec<(&'static str, PathBuf)> = match pin_dir {
            Some(dir) => maps::ALL.iter().map(|m| (*m, dir.join(m))).collect(),
            None => Vec::new(),
        };
        if !pins.is_empty() {
            drop_stale_pins(&pins, backends)?;
        }
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        for map in [maps::BACKENDS, maps::BACKEND_STATS] {
            loader.map_max_entries(map, backends);
        }
        let mut ebpf = loader.load(OBJECT).map_err(|source| LoadError::Object {
            pin_dir: pin_dir.map(Path::to_owned),
            source: Box::new(source),
        })?;
        let load_err = |program| {
            move |source| LoadError::Program {
                program,
                operation: "verifier/load",
                source: Box::new(source),
            }
        };
        for xdp in [programs::XDP_PARSE, programs::XDP_PASS] {
            xdp_mut(&mut ebpf, xdp)?.load().map_err(load_err(xdp))?;
        }
        tc_mut(&mut ebpf, programs::TC_LB)?
            .load()
            .map_err(load_err(programs::TC_LB))?;
        Ok(Datapath { ebpf, backends })
    }

    /// Attaches the parser to `interface` (in the caller's network namespace).
    /// With `link_pin`, the link is pinned there; if a pinned link already
    /// exists, its program is replaced atomically instead.
    pub fn attach_parser(
        &mut self,
        interface: &str,
        mode: XdpMode,
        link_pin: Option<&Path>,
    ) -> Result<(), LoadError> {
        let program = programs::XDP_PARSE;
        let xdp = self.parser()?;
        let attach_err = |source| LoadError::Attach {
            program,
            interface: interface.to_owned(),
            source: Box::new(source),
        };
        let Some(pin) = link_pin else {
            xdp.attach(interface, mode).map_err(attach_err)?;
            return Ok(());
        };
        if let Some(old) = open_pinned_link(pin)? {
            let link = XdpLink::try_from(old).map_err(|e| link_err("reuse", pin, e))?;
            xdp.attach_to_link(link).map_err(attach_err)?;
            return Ok(());
        }
        let id = xdp.attach(interface, mode).map_err(attach_err)?;
        let link = xdp.take_link(id).map_err(attach_err)?;
        let fd = FdLink::try_from(link).map_err(|e| link_err("pin", pin, e))?;
        fd.pin(pin).map_err(|e| link_err("pin", pin, e))?;
        Ok(())
    }

    /// Attaches the load balancer at TC ingress of `interface` (TCX link),
    /// pinned like [`Datapath::attach_parser`].
    pub fn attach_lb(&mut self, interface: &str, link_pin: Option<&Path>) -> Result<(), LoadError> {
        let program = programs::TC_LB;
        let tc = tc_mut(&mut self.ebpf, program)?;
        let attach_err = |source| LoadError::Attach {
            program,
            interface: interface.to_owned(),
            source: Box::new(source),
        };
        let options = TcAttachOptions::TcxOrder(LinkOrder::default());
        if let Some(pin) = link_pin
            && let Some(old) = open_pinned_link(pin)?
        {
            let link = SchedClassifierLink::try_from(old).map_err(|e| link_err("reuse", pin, e))?;
            tc.attach_to_link(link).map_err(attach_err)?;
            return Ok(());
        }
        // TCX needs no qdisc; the legacy fallback does. "Exists" is fine.
        if let Err(e) = tc::qdisc_add_clsact(interface) {
            tracing::debug!(%interface, error = %e, "clsact qdisc not added");
        }
        let id = tc
            .attach_with_options(interface, TcAttachType::Ingress, options)
            .map_err(attach_err)?;
        if let Some(pin) = link_pin {
            let link = tc.take_link(id).map_err(attach_err)?;
            let fd = FdLink::try_from(link).map_err(|e| link_err("pin", pin, e))?;
            fd.pin(pin).map_err(|e| link_err("pin", pin, e))?;
        }
        Ok(())
    }

    /// The parser program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn parser(&mut self) -> Result<&mut Xdp, LoadError> {
        xdp_mut(&mut self.ebpf, programs::XDP_PARSE)
    }

    /// The no-op XDP program (benchmark baseline).
    pub fn noop(&mut self) -> Result<&mut Xdp, LoadError> {
        xdp_mut(&mut self.ebpf, programs::XDP_PASS)
    }

    /// The load-balancer program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn lb(&mut self) -> Result<&mut SchedClassifier, LoadError> {
        tc_mut(&mut self.ebpf, programs::TC_LB)
    }

    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Map access for [`LbSync`].
    pub fn lb_maps(&mut self) -> KernelLbMaps<'_> {
        KernelLbMaps {
            ebpf: &mut self.ebpf,
        }
    }

    /// Rebuilds [`LbSync`] from the (possibly pinned, pre-existing) maps.
    pub fn recover_lb(&mut self) -> Result<LbSync, SyncError> {
        let e = &self.ebpf;
        let config = {
            let m: Array<&MapData, LbConfig> = typed(e, maps::LB_CONFIG)?;
            let c = m.get(&0, 0).map_err(map_err("read LB_CONFIG"))?;
            (c.nat_addr_be[0] != 0).then_some(c)
        };
        let addrs: HashMap<&MapData, [u32; 4], u32> = typed(e, maps::NODE_ADDRS)?;
        let addrs: Vec<Ipv4Addr> = addrs
            .keys()
            .map(|k| k.map(|k| Ipv4Addr::from(k[0].to_ne_bytes())))
            .collect::<Result<_, _>>()
            .map_err(map_err("read NODE_ADDRS"))?;
        let nat: HashMap<&MapData, u32, [u32; 4]> = typed(e, maps::NAT_IFACES)?;
        let nat: Vec<(u32, Ipv4Addr)> = nat
            .iter()
            .map(|r| r.map(|(i, a)| (i, Ipv4Addr::from(a[0].to_ne_bytes()))))
            .collect::<Result<_, _>>()
            .map_err(map_err("read NAT_IFACES"))?;
        let fronts: HashMap<&MapData, FrontendKey, Frontend> = typed(e, maps::FRONTENDS)?;
        let fronts: Vec<(FrontendKey, Frontend)> = fronts
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err("read FRONTENDS"))?;
        let backs: HashMap<&MapData, u32, Backend> = typed(e, maps::BACKENDS)?;
        let backs: Vec<(u32, Backend)> = backs
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err("read BACKENDS"))?;
        let backends = backs
            .iter()
            .filter_map(|(id, b)| Some((*id, BackendKey::from_map(b)?)));
        Ok(LbSync::recover(
            config,
            addrs,
            nat,
            fronts,
            backends,
            self.backends,
        ))
    }
}

fn typed<'a, T: TryFrom<&'a aya::maps::Map, Error = MapError>>(
    ebpf: &'a Ebpf,
    name: &'static str,
) -> Result<T, SyncError> {
    let map = ebpf.map(name).ok_or(SyncError::Map {
        operation: "find map",
        message: format!("{name} is missing from the eBPF object"),
    })?;
    T::try_from(map).map_err(map_err("open map"))
}

fn typed_mut<'a, T: TryFrom<&'a mut aya::maps::Map, Error = MapError>>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<T, SyncError> {
    let map = ebpf.map_mut(name).ok_or(SyncError::Map {
        operation: "find map",
        message: format!("{name} is missing from the eBPF object"),
    })?;
    T::try_from(map).map_err(map_err("open map"))
}

fn map_err(operation: &'static str) -> impl Fn(MapError) -> SyncError {
    move |e| SyncError::Map {
        operation,
        message: e.to_string(),
    }
}

fn link_err(operation: &'static str, path: &Path, e: impl std::fmt::Display) -> LoadError {
    LoadError::Link {
        operation,
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Opens a pinned link, or `None` if nothing is pinned at `path`.
fn open_pinned_link(path: &Path) -> Result<Option<FdLink>, LoadError> {
    match PinnedLink::from_pin(path) {
        Ok(link) => Ok(Some(FdLink::from(link))),
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(link_err("open pinned", path, e)),
    }
}

/// The kernel maps behind [`LbMaps`].
pub struct KernelLbMaps<'a> {
    ebpf: &'a mut Ebpf,
}

impl LbMaps for KernelLbMaps<'_> {
    fn set_config(&mut self, config: &LbConfig) -> Result<(), SyncError> {
        let mut m: Array<&mut MapData, LbConfig> = typed_mut(self.ebpf, maps::LB_CONFIG)?;
        m.set(0, config, 0).map_err(map_err("write LB_CONFIG"))
    }

    fn add_node_addr(&mut self, addr: Ipv4Addr) -> Result<(), SyncError> {
        let mut m: HashMap<&mut MapData, [u32; 4], u32> = typed_mut(self.ebpf, maps::NODE_ADDRS)?;
        m.insert([u32::from_ne_bytes(addr.octets()), 0, 0, 0], 1, 0)
            .map_err(map_err("write NODE_ADDRS"))
    }

    fn remove_node_addr(&mut self, addr: Ipv4Addr) -> Result<(), SyncError> {
        let mut m: HashMap<&mut MapData, [u32; 4], u32> = typed_mut(self.ebpf, maps::NODE_ADDRS)?;
        ignore_missing(m.remove(&[u32::from_ne_bytes(addr.octets()), 0, 0, 0]))
            .map_err(map_err("delete from NODE_ADDRS"))
    }

    fn set_nat_interface(&mut self, ifindex: u32, addr: Option<Ipv4Addr>) -> Result<(), SyncError> {
        let mut m: HashMap<&mut MapData, u32, [u32; 4]> = typed_mut(self.ebpf, maps::NAT_IFACES)?;
        match addr {
            Some(a) => m
                .insert(ifindex, [u32::from_ne_bytes(a.octets()), 0, 0, 0], 0)
                .map_err(map_err("write NAT_IFACES")),
            None => ignore_missing(m.remove(&ifindex)).map_err(map_err("delete from NAT_IFACES")),
        }
    }

    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), SyncError> {
        let mut m: HashMap<&mut MapData, u32, Backend> = typed_mut(self.ebpf, maps::BACKENDS)?;
        m.insert(id, backend, 0).map_err(map_err("write BACKENDS"))
    }

    fn remove_backend(&mut self, id: u32) -> Result<(), SyncError> {
        let mut m: HashMap<&mut MapData, u32, Backend> = typed_mut(self.ebpf, maps::BACKENDS)?;
        ignore_missing(m.remove(&id)).map_err(map_err("delete from BACKENDS"))
    }

    fn swap_table(&mut self, frontend_id: u32, table: &[u32]) -> Result<(), SyncError> {
        // Fill a fresh inner map completely, then swap it in with one update:
        // a packet sees either the old table or the new one, never a mix.
        let mut inner = Array::<MapData, u32>::create(table.len() as u32, BPF_F_INNER_MAP)
            .map_err(map_err("create Maglev table"))?;
        for (slot, backend) in table.iter().enumerate() {
            inner
                .set(slot as u32, backend, 0)
                .map_err(map_err("fill Maglev table"))?;
        }
        let mut outer: ArrayOfMaps<&mut MapData, Array<MapData, u32>> =
            typed_mut(self.ebpf, maps::MAGLEV)?;
        outer
            .set(frontend_id, &inner, 0)
            .map_err(map_err("swap Maglev table"))
    }

    fn set_frontend(&mut self, key: &FrontendKey, frontend: &Frontend) -> Result<(), SyncError> {
        let mut m: HashMap<&mut MapData, FrontendKey, Frontend> =
            typed_mut(self.ebpf, maps::FRONTENDS)?;
        m.insert(key, frontend, 0)
            .map_err(map_err("write FRONTENDS"))
    }

    fn remove_frontend(&mut self, key: &FrontendKey) -> Result<(), SyncError> {
        let mut m: HashMap<&mut MapData, FrontendKey, Frontend> =
            typed_mut(self.ebpf, maps::FRONTENDS)?;
        ignore_missing(m.remove(key)).map_err(map_err("delete from FRONTENDS"))
    }
}

/// A key that is already gone is not an error when deleting: the LRU maps
/// evict entries between our walk and the delete. aya reports that as
/// `KeyNotFound` from some calls and as ENOENT from `bpf_map_delete_elem`.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn xdp_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, LoadError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?;
    program.try_into().map_err(|source| LoadError::Program {
        program: name,
        operation: "expected an XDP program",
        source: Box::new(source),
    })
}

fn tc_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoadError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?;
    program.try_into().map_err(|source| LoadError::Program {
        program: name,
        operation: "expected a TC classifier",
        source: Box::new(source),
    })
}

/// Older kernels charge BPF memory to RLIMIT_MEMLOCK; 5.11+ charge the cgroup.
/// Raising the limit can fail (it does on this host), and that is fine there.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "cannot raise RLIMIT_MEMLOCK; relying on cgroup accounting"
        );
    }
}

/// What one conntrack sweep removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub flows_seen: usize,
    pub flows_expired: usize,
    pub revnat_expired: usize,
}

/// Current CLOCK_MONOTONIC in ns: the clock bpf_ktime_get_ns() reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Datapath {
    /// Garbage-collects idle flows. A flow's age is that of its most recent
    /// packet in either direction (conntrack for client->backend, reverse NAT
    /// for replies); when it is past its timeout both entries go.
    pub fn sweep_conntrack(
        &mut self,
        now_ns: u64,
        timeouts: &crate::lb::Timeouts,
    ) -> Result<SweepReport, SyncError> {
        use dataplane_common::{CT_F_CLOSING, CtEntry, FAMILY_V4, FlowKey, RevNat};
        let mut report = SweepReport::default();
        let (ct_entries, rev_entries) = {
            let ct: HashMap<&MapData, FlowKey, CtEntry> = typed(&self.ebpf, maps::CONNTRACK)?;
            let rev: HashMap<&MapData, FlowKey, RevNat> = typed(&self.ebpf, maps::REVNAT)?;
            // Entries can vanish mid-walk (LRU eviction); skip what fails to read.
            let cts: std::collections::HashMap<FlowKey, CtEntry> =
                ct.iter().filter_map(Result::ok).collect();
            let revs: Vec<(FlowKey, RevNat)> = rev.iter().filter_map(Result::ok).collect();
            (cts, revs)
        };
        report.flows_seen = ct_entries.len();
        let mut expired_ct = Vec::new();
        let mut expired_rev = Vec::new();
        let mut live_ct = std::collections::HashSet::new();
        for (rev_key, rev) in &rev_entries {
            let ct_key = FlowKey {
                saddr_be: rev.client_addr_be,
                daddr_be: rev.frontend_addr_be,
                sport_be: rev.client_port_be,
                dport_be: rev.frontend_port_be,
                proto: rev_key.proto,
                family: FAMILY_V4,
                _pad: [0; 2],
            };
            let ct = ct_entries.get(&ct_key);
            let last = rev.last_seen_ns.max(ct.map_or(0, |c| c.last_seen_ns));
            let closing = (rev.flags | ct.map_or(0, |c| c.flags)) & CT_F_CLOSING != 0;
            if timeouts.expired(rev_key.proto, closing, last, now_ns) {
                expired_rev.push(*rev_key);
                if ct.is_some() {
                    expired_ct.push(ct_key);
                }
            } else {
                live_ct.insert(ct_key);
            }
        }
        // Conntrack entries without a reverse entry age on their own.
        for (key, ct) in &ct_entries {
            if !live_ct.contains(key)
                && !expired_ct.contains(key)
                && timeouts.expired(
                    key.proto,
                    ct.flags & CT_F_CLOSING != 0,
                    ct.last_seen_ns,
                    now_ns,
                )
            {
                expired_ct.push(*key);
            }
        }
        let mut ct: HashMap<&mut MapData, FlowKey, CtEntry> =
            typed_mut(&mut self.ebpf, maps::CONNTRACK)?;
        for key in &expired_ct {
            ignore_missing(ct.remove(key)).map_err(map_err("delete from CONNTRACK"))?;
        }
        report.flows_expired = expired_ct.len();
        let mut rev: HashMap<&mut MapData, FlowKey, RevNat> =
            typed_mut(&mut self.ebpf, maps::REVNAT)?;
        for key in &expired_rev {
            ignore_missing(rev.remove(key)).map_err(map_err("delete from REVNAT"))?;
        }
        report.revnat_expired = expired_rev.len();
        Ok(report)
    }
}
