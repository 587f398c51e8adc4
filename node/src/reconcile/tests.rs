//! The reconcile order with a fake node: what each part is handed, in
//! which order, and that a failure takes nothing away.

use std::net::Ipv4Addr;

use dataplane::{
    ipsec::IpsecSpec,
    overlay::OverlayError,
    tables::{NodeView, OverlayUpdate},
};
use model::{
    NetworkKey,
    session::Update,
    tables::{Key, NetworkEntry, NetworkKeysEntry, NodeEndpointEntry, Tables, Value},
};

use super::{Parts, apply_in_order};
use crate::error::ApplyError;

const ME: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

#[derive(Debug, PartialEq)]
enum Call {
    /// The peers IPsec was asked to protect.
    Ipsec(Vec<Ipv4Addr>),
    Overlay {
        whole: bool,
    },
    Lb {
        whole: bool,
    },
}

#[derive(Default)]
struct Fake {
    calls: Vec<Call>,
    applied: IpsecSpec,
    fail_overlay: bool,
}

impl Parts for Fake {
    fn validate(&self, ipsec: &IpsecSpec, overlay: &OverlayUpdate) -> Result<(), ApplyError> {
        super::validate_specs(ipsec, overlay)
    }
    fn ipsec_applied(&self) -> &IpsecSpec {
        &self.applied
    }
    fn ipsec(&mut self, spec: IpsecSpec) -> Result<(), ApplyError> {
        self.calls
            .push(Call::Ipsec(spec.peers.iter().copied().collect()));
        self.applied = spec;
        Ok(())
    }
    async fn overlay(&mut self, update: OverlayUpdate) -> Result<u64, ApplyError> {
        self.calls.push(Call::Overlay {
            whole: matches!(update, OverlayUpdate::Whole(_)),
        });
        if self.fail_overlay {
            return Err(ApplyError::Overlay(OverlayError::Kernel {
                changes: 0,
                errors: vec!["add vxlan4097: Operation not permitted".into()],
            }));
        }
        Ok(1)
    }
    fn lb_follows_tables(&self) -> bool {
        true
    }
    async fn lb(
        &mut self,
        _: &Tables,
        update: Update<'_>,
        _: &NodeView,
        _: Ipv4Addr,
    ) -> Result<(), ApplyError> {
        self.calls.push(Call::Lb {
            whole: matches!(update, Update::Whole),
        });
        Ok(())
    }
}

/// An encrypted network with this node and (with `peer`) another on it.
fn tables(revision: u64, peer: bool) -> Tables {
    let mut t = Tables {
        revision,
        ..Tables::default()
    };
    t.entries.insert(
        Key::Network { id: "n1".into() },
        Value::Network(NetworkEntry {
            name: "secret".into(),
            vni: 4097,
            subnet: "10.0.9.0/24".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 0, 9, 1),
            ingress: false,
            internal: false,
            encrypted: true,
        }),
    );
    t.entries.insert(
        Key::NetworkKeys,
        Value::NetworkKeys(NetworkKeysEntry {
            keys: vec![NetworkKey {
                id: 1,
                secret: vec![7; 20],
                created_ms: 0,
            }],
            primary: 1,
        }),
    );
    let mut node = |name: &str, underlay: Ipv4Addr, addr: Ipv4Addr| {
        t.entries.insert(
            Key::NodeEndpoint {
                network: "n1".into(),
                node: name.into(),
            },
            Value::NodeEndpoint(NodeEndpointEntry {
                node_addr: underlay,
                addr,
                mac: model::tables::mac_of(addr),
            }),
        );
    };
    node("me", ME, Ipv4Addr::new(10, 0, 9, 2));
    if peer {
        node("peer", PEER, Ipv4Addr::new(10, 0, 9, 3));
    }
    t
}

async fn apply(
    fake: &mut Fake,
    view: &mut NodeView,
    t: &Tables,
) -> Result<Option<u64>, ApplyError> {
    apply_in_order(fake, view, t, Update::Whole, "me", ME).await
}

#[tokio::test]
async fn ipsec_comes_before_the_overlay_and_goes_only_after_the_load_balancer() {
    let mut fake = Fake::default();
    let mut view = NodeView::new("me", ME);
    apply(&mut fake, &mut view, &tables(1, true)).await.unwrap();
    assert_eq!(
        fake.calls,
        [
            Call::Ipsec(vec![PEER]),
            Call::Overlay { whole: true },
            Call::Lb { whole: true },
            Call::Ipsec(vec![PEER]),
        ]
    );

    // The peer leaves: its protection stays through the overlay and the
    // load balancer (which may still send it a flow), and goes last.
    fake.calls.clear();
    apply(&mut fake, &mut view, &tables(2, false))
        .await
        .unwrap();
    assert_eq!(
        fake.calls.first(),
        Some(&Call::Ipsec(vec![PEER])),
        "{:?}",
        fake.calls
    );
    assert_eq!(
        fake.calls.last(),
        Some(&Call::Ipsec(vec![])),
        "{:?}",
        fake.calls
    );
    assert!(fake.applied.peers.is_empty());
}

#[tokio::test]
async fn a_failed_overlay_stops_the_update_before_anything_is_taken_away() {
    let mut fake = Fake::default();
    let mut view = NodeView::new("me", ME);
    apply(&mut fake, &mut view, &tables(1, true)).await.unwrap();
    fake.calls.clear();
    fake.fail_overlay = true;
    let mut again = NodeView::new("me", ME);
    assert!(
        apply(&mut fake, &mut again, &tables(2, false))
            .await
            .is_err()
    );
    assert_eq!(
        fake.calls,
        [Call::Ipsec(vec![PEER]), Call::Overlay { whole: true }],
        "no load balancer and no narrowed IPsec after the overlay failed"
    );
    assert_eq!(
        fake.applied.peers.iter().copied().collect::<Vec<_>>(),
        [PEER]
    );
}

/// A key ring the kernel would refuse (a 5-byte key) stops the update
/// before any part is touched: not even the widened IPsec goes in.
#[tokio::test]
async fn a_spec_a_part_would_refuse_touches_no_part() {
    let mut fake = Fake::default();
    let mut view = NodeView::new("me", ME);
    apply(&mut fake, &mut view, &tables(1, true)).await.unwrap();
    fake.calls.clear();
    let mut bad = tables(2, true);
    bad.entries.insert(
        Key::NetworkKeys,
        Value::NetworkKeys(NetworkKeysEntry {
            keys: vec![NetworkKey {
                id: 2,
                secret: vec![7; 5],
                created_ms: 0,
            }],
            primary: 2,
        }),
    );
    let err = apply(&mut fake, &mut view, &bad).await.unwrap_err();
    assert!(format!("{err:?}").contains("KeyLength"), "{err:?}");
    assert_eq!(fake.calls, [], "nothing touched");
    assert_eq!(
        fake.applied.peers.iter().copied().collect::<Vec<_>>(),
        [PEER],
        "the applied IPsec stays"
    );
}
