//! Reading the load balancer's state back from the pinned maps: what
//! `meshd lb ls` prints (Swarm's `docker service inspect` VIPs, Cilium's
//! `bpf lb list`).

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, path::Path};

use aya::maps::{Array, ArrayOfMaps, HashMap, MapData, PerCpuArray};
use dataplane_common::{Backend, Frontend, FrontendKey, LbCounter, maps};

use crate::{
    lb::Protocol,
    stats::{StatsError, open_pinned as open},
};

#[derive(Clone, Debug)]
pub struct BackendView {
    pub id: u32,
    pub address: Ipv4Addr,
    pub port: u16,
    /// Maglev slots this backend owns in the frontend's table.
    pub slots: u32,
    pub stats: LbCounter,
}

#[derive(Clone, Debug)]
pub struct FrontendView {
    pub key: FrontendKey,
    pub frontend: Frontend,
    pub stats: LbCounter,
    pub backends: Vec<BackendView>,
}

fn read_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> StatsError {
    move |source| StatsError::Read { map, source }
}

fn sum(values: &aya::maps::PerCpuValues<LbCounter>) -> LbCounter {
    values.iter().fold(LbCounter::default(), |a, c| LbCounter {
        packets: a.packets + c.packets,
        bytes: a.bytes + c.bytes,
        new_flows: a.new_flows + c.new_flows,
        rejected: a.rejected + c.rejected,
    })
}

/// Every frontend with its backends and counters, sorted by frontend.
pub fn read_lb(pin_dir: &Path) -> Result<Vec<FrontendView>, StatsError> {
    let fronts_map = open(pin_dir, maps::FRONTENDS)?;
    let fronts: HashMap<&MapData, FrontendKey, Frontend> =
        HashMap::try_from(&fronts_map).map_err(read_err(maps::FRONTENDS))?;
    let backs_map = open(pin_dir, maps::BACKENDS)?;
    let backs: HashMap<&MapData, u32, Backend> =
        HashMap::try_from(&backs_map).map_err(read_err(maps::BACKENDS))?;
    let maglev_map = open(pin_dir, maps::MAGLEV)?;
    let tables: ArrayOfMaps<&MapData, Array<MapData, u32>> =
        ArrayOfMaps::try_from(&maglev_map).map_err(read_err(maps::MAGLEV))?;
    let fstats_map = open(pin_dir, maps::FRONTEND_STATS)?;
    let fstats: PerCpuArray<&MapData, LbCounter> =
        PerCpuArray::try_from(&fstats_map).map_err(read_err(maps::FRONTEND_STATS))?;
    let bstats_map = open(pin_dir, maps::BACKEND_STATS)?;
    let bstats: PerCpuArray<&MapData, LbCounter> =
        PerCpuArray::try_from(&bstats_map).map_err(read_err(maps::BACKEND_STATS))?;

    let mut views = Vec::new();
    for entry in fronts.iter() {
        let (key, frontend) = entry.map_err(read_err(maps::FRONTENDS))?;
        let mut slots: BTreeMap<u32, u32> = BTreeMap::new();
        if let Ok(table) = tables.get(&frontend.id, 0) {
            for id in table.iter().flatten() {
                if id != crate::maglev::NO_BACKEND {
                    *slots.entry(id).or_default() += 1;
                }
            }
        }
        let mut backends = Vec::new();
        for (id, n) in slots {
            let Ok(b) = backs.get(&id, 0) else { continue };
            backends.push(BackendView {
                id,
                address: Ipv4Addr::from(b.addr_be[0].to_ne_bytes()),
                port: u16::from_be(b.port_be),
                slots: n,
                stats: sum(&bstats.get(&id, 0).map_err(read_err(maps::BACKEND_STATS))?),
            });
        }
        backends.sort_by_key(|b| (b.address, b.port));
        views.push(FrontendView {
            key,
            frontend,
            stats: sum(&fstats
                .get(&frontend.id, 0)
                .map_err(read_err(maps::FRONTEND_STATS))?),
            backends,
        });
    }
    views.sort_by_key(|v| (v.key.port_be.swap_bytes(), v.key.proto, v.key.addr_be));
    Ok(views)
}

/// Renders frontends like `docker service ls`: one aligned table.
pub struct LbTable<'a>(pub &'a [FrontendView]);

impl fmt::Display for LbTable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<24} {:<8} {:<22} {:>6} {:>10} {:>12} {:>8} {:>8}",
            "FRONTEND", "SERVICE", "BACKEND", "SLOTS", "PACKETS", "BYTES", "FLOWS", "REJECTED"
        )?;
        for v in self.0 {
            let addr = if v.key.addr_be[0] == 0 {
                "*".to_owned()
            } else {
                Ipv4Addr::from(v.key.addr_be[0].to_ne_bytes()).to_string()
            };
            let proto = match Protocol::from_number(v.key.proto) {
                Some(Protocol::Tcp) => "tcp",
                Some(Protocol::Udp) => "udp",
                None if v.key.proto == 0 => "any",
                None => "?",
            };
            // Port 0: a VIP's any-port frontend.
            let front = match u16::from_be(v.key.port_be) {
                0 => format!("{addr}:*/{proto}"),
                port => format!("{addr}:{port}/{proto}"),
            };
            writeln!(
                f,
                "{front:<24} {:<8} {:<22} {:>6} {:>10} {:>12} {:>8} {:>8}",
                v.frontend.service_id,
                format!("({} backends)", v.frontend.backend_count),
                v.frontend.table_size,
                v.stats.packets,
                v.stats.bytes,
                v.stats.new_flows,
                v.stats.rejected
            )?;
            for b in &v.backends {
                writeln!(
                    f,
                    "{:<24} {:<8} {:<22} {:>6} {:>10} {:>12} {:>8}",
                    "",
                    "",
                    format!("-> {}:{}", b.address, b.port),
                    b.slots,
                    b.stats.packets,
                    b.stats.bytes,
                    b.stats.new_flows
                )?;
            }
        }
        Ok(())
    }
}
