//! The VM tier: what this host's kernel cannot run (IPVS, ESP), run by
//! `cargo xtask vm` inside Debian's stock kernel under QEMU, with the same
//! binaries and the same namespace topologies as the namespace tier. Outside
//! the VM every test here records a skip (counted, with the reason).

use mesh_tests::skip::{Skip, record_skip, require_root};

#[path = "shared/published.rs"]
mod published;

/// `Some` inside the VM tier (as root); otherwise a recorded skip.
fn require_vm(test: &str) -> Option<Skip> {
    if std::env::var_os("MESH_VM").is_none() {
        record_skip(
            test,
            "runs in the VM tier (`cargo xtask vm`): needs IPVS and ESP from Debian's stock kernel",
        );
        return None;
    }
    require_root(test)
}

#[test]
fn ipvs_backend_passes_the_published_port_test() {
    let Some(_vm) = require_vm("vm::ipvs_backend_passes_the_published_port_test") else {
        return;
    };
    published::published_ports_scenario(published::Backend::Ipvs);
}
