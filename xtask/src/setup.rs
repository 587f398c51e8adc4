//! Installs the toolchain pieces a fresh Debian machine lacks, following
//! shared/TOOLCHAIN.md. Every step checks first, so a re-run takes seconds.

use std::{process::Command, time::Instant};

use anyhow::{Context as _, Result, bail};

use crate::run_ok;

/// Debian packages: LLVM 22 for bpf-linker, and the tools the tests drive.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "iproute2",
    "iputils-ping",
    "nftables",
    "bpftool",
    "socat",
    "curl",
    // dig, an upstream resolver for the DNS tests, and the DNS benchmark.
    "dnsutils",
    "dnsmasq-base",
    "dnsperf",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Must match rustc's LLVM major, or linking fails with "Invalid record".
const BPF_LINKER_FEATURES: &[&str] = &["llvm-22", "llvm-link-static"];

pub fn run() -> Result<()> {
    let started = Instant::now();
    apt()?;
    rust_components()?;
    bpf_linker()?;
    println!(
        "setup: everything present ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Debian packages the VM tier needs on the host (`cargo xtask vm`).
pub const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio", "kmod"];

fn apt() -> Result<()> {
    apt_install(&[APT_PACKAGES, VM_PACKAGES].concat())
}

/// Installs the Debian packages of `packages` that are missing (root only).
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::is_root() {
        bail!(
            "apt packages missing ({}); run `cargo xtask setup` as root",
            missing.join(" ")
        );
    }
    println!("setup: apt-get install {}", missing.join(" "));
    run_ok(Command::new("apt-get").args(["update", "-qq"]))?;
    run_ok(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", pkg])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"installed")
}

fn rustup_lines(args: &[&str]) -> Result<Vec<String>> {
    let out = Command::new("rustup")
        .args(args)
        .output()
        .context("rustup not found: install Rust with rustup first")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

fn rust_components() -> Result<()> {
    let toolchains = rustup_lines(&["toolchain", "list"])?;
    if !toolchains.iter().any(|t| t.starts_with("nightly")) {
        println!("setup: installing the nightly toolchain (eBPF builds need -Z build-std)");
        run_ok(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let nightly = rustup_lines(&["component", "list", "--toolchain", "nightly", "--installed"])?;
    if !nightly.iter().any(|c| c.starts_with("rust-src")) {
        println!("setup: adding rust-src to nightly");
        run_ok(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let stable = rustup_lines(&["component", "list", "--installed"])?;
    for component in ["clippy", "rustfmt"] {
        if !stable.iter().any(|c| c.starts_with(component)) {
            println!("setup: adding {component}");
            run_ok(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if bpf_linker_ok() {
        return Ok(());
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    run_ok(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
            ])
            .args([
                "--no-default-features",
                "--features",
                &BPF_LINKER_FEATURES.join(","),
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )?;
    if !bpf_linker_ok() {
        bail!("bpf-linker installed but not found with the expected version and features");
    }
    Ok(())
}

/// True when cargo's install record shows our bpf-linker version and LLVM features.
fn bpf_linker_ok() -> bool {
    let on_path = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if !on_path {
        return false;
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo")));
    let Some(record) = cargo_home.and_then(|h| std::fs::read(h.join(".crates2.json")).ok()) else {
        return false;
    };
    let Ok(record) = serde_json::from_slice::<serde_json::Value>(&record) else {
        return false;
    };
    let key = format!("bpf-linker {BPF_LINKER_VERSION} ");
    record["installs"].as_object().is_some_and(|installs| {
        installs.iter().any(|(k, v)| {
            k.starts_with(&key)
                && BPF_LINKER_FEATURES.iter().all(|f| {
                    v["features"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x == f))
                })
        })
    })
}
