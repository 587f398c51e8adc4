//! Where a node's program links are pinned, and which load balancer an
//! update writes to (the eBPF maps, or IPVS beside them).

use std::path::{Path, PathBuf};

use dataplane::{
    ebpf::Datapath,
    ipvs::{IpvsSync, WithIpvs},
    lb::{Ebpf, LbSync, LbTarget},
};

pub(crate) fn link_pin(dir: &Path, kind: &str, iface: &str) -> PathBuf {
    dir.join(format!("link_{kind}_{iface}"))
}

/// The load balancer's target: the eBPF maps, or IPVS (the maps then
/// keep no frontend).
pub(crate) fn lb_target<'a>(
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
