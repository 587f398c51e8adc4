//! Property tests for the node's JSON specs (`meshd --config`, and what
//! the agent derives from the tables): the load-balancer spec and the
//! overlay spec, mutated at the JSON value level (a field replaced by an
//! extreme number, a wrong type, a duplicated array, a removed key) and at
//! the byte level. No input panics the decoders or the validators; a load
//! balancer spec that validates applies whole to the maps (every Maglev
//! slot names a backend that is there), and again writes nothing; one
//! that does not leaves the maps as they were.

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::lb::{LbSpec, LbSync, MemoryMaps};
use crate::overlay::OverlaySpec;

fn lb_base() -> Value {
    json!({
        "nat_address": "198.18.0.2",
        "node_addresses": ["198.18.0.2", "10.0.0.2"],
        "nat_port_min": 40000,
        "nat_port_count": 2000,
        "nat_interfaces": {"7": "10.0.1.1"},
        "services": [
            {"id": 1, "name": "web", "table_size": 251,
             "frontends": [{"port": 80, "protocol": "tcp"}, {"address": "10.0.1.5", "port": 80, "protocol": "tcp"}],
             "backends": [{"address": "10.0.1.2", "port": 80}, {"address": "10.0.1.3", "port": 80, "weight": 3}]},
            {"id": 2, "name": "dns", "table_size": 97,
             "frontends": [{"address": "10.0.1.6", "port": 53, "protocol": "udp"}],
             "backends": [{"address": "10.0.1.4", "port": 53}]}
        ]
    })
}

fn overlay_base() -> Value {
    json!({
        "underlay": "198.18.0.2",
        "networks": [{
            "id": "net-a", "vni": 4096, "subnet": "10.0.1.0/24", "gateway": "10.0.1.1",
            "mtu": 1450, "encrypted": false,
            "local": [{"id": "t1", "netns": "/run/netns/t1", "ip": "10.0.1.2", "mac": "02:42:0a:00:01:02"}],
            "remote": [{"ip": "10.0.1.3", "mac": "02:42:0a:00:01:03", "node": "198.18.0.3"}],
            "host": {"ip": "10.0.1.254", "mac": "02:42:0a:00:01:fe"},
            "vips": ["10.0.1.5"]
        }]
    })
}

/// Values that have broken parsers elsewhere.
fn odd(pick: u8) -> Value {
    match pick % 16 {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(65535),
        3 => json!(65536),
        4 => json!(4_294_967_295u64),
        5 => json!(u64::MAX),
        6 => json!(1e300),
        7 => json!(""),
        8 => json!("0.0.0.0"),
        9 => json!("255.255.255.255/33"),
        10 => json!(null),
        11 => json!([]),
        12 => json!({}),
        13 => json!("x".repeat(300)),
        14 => json!(true),
        _ => json!("udp"),
    }
}

/// Every path to a value in `v`, depth first.
fn paths(v: &Value, here: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                here.push(json!(k));
                paths(c, here, out);
                here.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                here.push(json!(i));
                paths(c, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn at<'a>(v: &'a mut Value, path: &[Value]) -> &'a mut Value {
    path.iter().fold(v, |v, k| match k {
        Value::String(k) => &mut v[k.as_str()],
        Value::Number(i) => &mut v[i.as_u64().unwrap() as usize],
        _ => unreachable!(),
    })
}

/// One value-level mutation of `v` at one of its paths.
fn mutate(v: &mut Value, which: usize, how: u8, pick: u8) {
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    let path = &all[which % all.len()];
    match how % 4 {
        0 => *at(v, path) = odd(pick),
        1 => {
            // A removed key.
            if let Some((last, parent)) = path.split_last()
                && let (Value::String(k), Value::Object(m)) = (last, at(v, parent))
            {
                m.remove(k);
            }
        }
        2 => {
            // A duplicated array element (the same backend twice, ...).
            if let Value::Array(a) = at(v, path)
                && let Some(first) = a.first().cloned()
            {
                a.push(first);
            }
        }
        _ => {
            // An unknown key.
            if let Value::Object(m) = at(v, path) {
                m.insert("extra".into(), odd(pick));
            }
        }
    }
}

fn flip(bytes: &mut [u8], flips: &[(usize, u8)]) {
    for &(i, b) in flips {
        if !bytes.is_empty() {
            let n = bytes.len();
            bytes[i % n] = b;
        }
    }
}

fn snapshot(m: &MemoryMaps) -> String {
    format!(
        "{:?}",
        (
            &m.config,
            &m.addrs,
            &m.nat_interfaces,
            &m.backends,
            &m.tables,
            &m.frontends
        )
    )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn mutated_lb_specs_apply_whole_or_change_nothing(
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..3),
    ) {
        let base: LbSpec = serde_json::from_value(lb_base()).unwrap();
        let mut sync = LbSync::new();
        let mut maps = MemoryMaps::default();
        sync.apply(&base, &mut maps).unwrap();
        let mut v = lb_base();
        for &(which, how, pick) in &edits {
            mutate(&mut v, which, how, pick);
        }
        let mut bytes = serde_json::to_vec(&v).unwrap();
        flip(&mut bytes, &flips);
        let Ok(spec) = serde_json::from_slice::<LbSpec>(&bytes) else { return Ok(()) };
        let before = snapshot(&maps);
        match sync.apply(&spec, &mut maps) {
            Err(_) => {
                prop_assert!(spec.validate().is_err(), "a valid spec was refused");
                prop_assert_eq!(snapshot(&maps), before, "a refused spec changed the maps");
            }
            Ok(_) => {
                for (id, table) in &maps.tables {
                    for slot in table {
                        prop_assert!(
                            *slot == crate::maglev::NO_BACKEND || maps.backends.contains_key(slot),
                            "table {} names backend {} that is gone", id, slot
                        );
                    }
                }
                prop_assert_eq!(sync.apply(&spec, &mut maps).unwrap().total(), 0);
            }
        }
    }

    #[test]
    fn mutated_overlay_specs_validate_or_say_why(
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..3),
    ) {
        let mut v = overlay_base();
        for &(which, how, pick) in &edits {
            mutate(&mut v, which, how, pick);
        }
        let mut bytes = serde_json::to_vec(&v).unwrap();
        flip(&mut bytes, &flips);
        if let Ok(spec) = serde_json::from_slice::<OverlaySpec>(&bytes)
            && let Err(e) = spec.validate()
        {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}

#[test]
fn the_bases_are_valid() {
    let lb: LbSpec = serde_json::from_value(lb_base()).unwrap();
    lb.validate().unwrap();
    let overlay: OverlaySpec = serde_json::from_value(overlay_base()).unwrap();
    overlay.validate().unwrap();
}
