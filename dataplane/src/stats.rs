//! Reading the parser's per-CPU counters, from a loaded object or from pins.

use std::{fmt, path::Path};

use aya::{
    Ebpf,
    maps::{Map, MapData, MapError, PerCpuArray},
};
use dataplane_common::{Counter, maps, outcome, proto};

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("opening pinned map {path}")]
    Pin {
        path: String,
        #[source]
        source: MapError,
    },
    #[error("reading map {map}")]
    Read {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

/// Parser counters summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParserStats {
    /// Indexed by `dataplane_common::proto`.
    pub proto: [Counter; proto::COUNT as usize],
    /// Indexed by `dataplane_common::outcome`.
    pub outcome: [Counter; outcome::COUNT as usize],
}

impl ParserStats {
    /// Reads the counters of a loaded object.
    pub fn read(ebpf: &Ebpf) -> Result<Self, StatsError> {
        let proto_map = ebpf
            .map(maps::PROTO_STATS)
            .ok_or(StatsError::MissingMap(maps::PROTO_STATS))?;
        let outcome_map = ebpf
            .map(maps::OUTCOME_STATS)
            .ok_or(StatsError::MissingMap(maps::OUTCOME_STATS))?;
        Ok(ParserStats {
            proto: sum_slots(maps::PROTO_STATS, proto_map)?,
            outcome: sum_slots(maps::OUTCOME_STATS, outcome_map)?,
        })
    }

    /// Reads the counters a running (or stopped) meshd pinned under `pin_dir`.
    pub fn read_pinned(pin_dir: &Path) -> Result<Self, StatsError> {
        Ok(ParserStats {
            proto: sum_slots(maps::PROTO_STATS, &open_pinned(pin_dir, maps::PROTO_STATS)?)?,
            outcome: sum_slots(
                maps::OUTCOME_STATS,
                &open_pinned(pin_dir, maps::OUTCOME_STATS)?,
            )?,
        })
    }

    pub fn proto(&self, class: u32) -> Counter {
        self.proto[class as usize]
    }

    pub fn outcome(&self, outcome: u32) -> Counter {
        self.outcome[outcome as usize]
    }

    /// Counters gained since `before` (counters only grow).
    pub fn since(&self, before: &ParserStats) -> ParserStats {
        let sub = |a: Counter, b: Counter| Counter {
            packets: a.packets - b.packets,
            bytes: a.bytes - b.bytes,
        };
        ParserStats {
            proto: std::array::from_fn(|i| sub(self.proto[i], before.proto[i])),
            outcome: std::array::from_fn(|i| sub(self.outcome[i], before.outcome[i])),
        }
    }
}

/// Opens the map meshd pinned as `<pin_dir>/<name>`.
pub fn open_pinned(pin_dir: &Path, name: &'static str) -> Result<Map, StatsError> {
    let path = pin_dir.join(name);
    MapData::from_pin(&path)
        .and_then(Map::from_map_data)
        .map_err(|source| StatsError::Pin {
            path: path.display().to_string(),
            source,
        })
}

fn sum_slots<const N: usize>(name: &'static str, map: &Map) -> Result<[Counter; N], StatsError> {
    let read = |source| StatsError::Read { map: name, source };
    let array = PerCpuArray::<&MapData, Counter>::try_from(map).map_err(read)?;
    let mut out = [Counter::default(); N];
    for (index, slot) in out.iter_mut().enumerate() {
        let per_cpu = array.get(&(index as u32), 0).map_err(read)?;
        *slot = per_cpu
            .iter()
            .fold(Counter::default(), |acc, c| acc.add(*c));
    }
    Ok(out)
}

impl fmt::Display for ParserStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<10} {:>10} {:>12}", "PROTOCOL", "PACKETS", "BYTES")?;
        for (name, c) in proto::NAMES.iter().zip(&self.proto) {
            writeln!(f, "{name:<10} {:>10} {:>12}", c.packets, c.bytes)?;
        }
        writeln!(f)?;
        writeln!(f, "{:<10} {:>10} {:>12}", "OUTCOME", "PACKETS", "BYTES")?;
        for (name, c) in outcome::NAMES.iter().zip(&self.outcome) {
            writeln!(f, "{name:<10} {:>10} {:>12}", c.packets, c.bytes)?;
        }
        Ok(())
    }
}
