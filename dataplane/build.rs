use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../dataplane-ebpf");
    let ebpf = Package {
        name: "dataplane-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
}
