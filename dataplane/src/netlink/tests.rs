//! MAC addresses and interface names, checked without a kernel.

use std::net::Ipv4Addr;

use super::*;

#[test]
fn macs_parse_print_and_classify() {
    let m: Mac = "02:42:0a:00:01:02".parse().unwrap();
    assert_eq!(m, Mac::from_ipv4(Ipv4Addr::new(10, 0, 1, 2)));
    assert_eq!(m.to_string(), "02:42:0a:00:01:02");
    assert!(m.is_unicast());
    assert!(!"01:00:5e:00:00:01".parse::<Mac>().unwrap().is_unicast());
    assert!(!"00:00:00:00:00:00".parse::<Mac>().unwrap().is_unicast());
    for bad in [
        "02:42:0a:00:01",
        "02:42:0a:00:01:02:03",
        "2:42:0a:00:01:02",
        "zz:42:0a:00:01:02",
        "",
    ] {
        let err = bad.parse::<Mac>().unwrap_err();
        assert!(err.contains("is not a MAC address"), "{err}");
    }
    let json = serde_json::to_string(&m).unwrap();
    assert_eq!(json, "\"02:42:0a:00:01:02\"");
    assert_eq!(serde_json::from_str::<Mac>(&json).unwrap(), m);
}

#[test]
fn interface_names_follow_the_kernel_rules() {
    assert!(check_ifname("eth0").is_ok());
    assert!(check_ifname("mve-0123456789").is_ok());
    for bad in ["", "a-very-long-name0", "a/b", "a:b", "a b", ".", ".."] {
        assert!(check_ifname(bad).is_err(), "{bad:?} accepted");
    }
}
