//! `cargo xtask`: setup, test, demo.

mod demo;
mod setup;
mod test;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "mesh developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh Debian machine lacks (apt packages, nightly rust-src, bpf-linker).
    Setup,
    /// Setup, fmt, clippy, then the unit, packet and namespace tiers, with a summary.
    Test,
    /// Bring up a 3-host cluster in network namespaces and show the data plane at work.
    Demo,
    /// Measure the data plane against its baselines; writes docs/BENCHMARKS.md.
    Bench,
    /// Boot Debian's stock kernel under QEMU and run privileged test binaries in it.
    Vm {
        /// mesh-tests test binaries to run in the guest (`tests/tests/<name>.rs`).
        #[arg(long = "test", default_value = "vm")]
        tests: Vec<String>,
        /// Seconds before the boot is killed.
        #[arg(long, default_value_t = 1200)]
        timeout: u64,
        /// Passed to every test binary (a name filter, --exact, ...).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::run(),
        Task::Test => test::run(),
        Task::Demo => demo::run(),
        Task::Bench => bench(),
        Task::Vm {
            tests,
            timeout,
            args,
        } => test::vm_only(&vm::Options {
            binaries: tests,
            args,
            timeout: std::time::Duration::from_secs(timeout),
        }),
    }
}

fn bench() -> Result<()> {
    if !is_root() {
        bail!("the benchmark creates network namespaces and loads eBPF: run it as root");
    }
    setup::run()?;
    build_binaries()?;
    run_ok(
        cargo()
            .args(["bench", "--package", "mesh-tests", "--bench", "dataplane"])
            .env("MESHD", target_dir().join("debug/meshd")),
    )
}

/// Builds meshd and meshctl (debug), what the namespace tier, the demo and
/// the bench run.
pub fn build_binaries() -> Result<()> {
    run_ok(cargo().args([
        "build",
        "--package",
        "dataplane",
        "--package",
        "meshd",
        "--package",
        "meshctl",
        "--bins",
    ]))
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_owned()
}

/// The cargo target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// A `cargo` command run from the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Runs `cmd`, failing with its rendering if it does not succeed.
pub fn run_ok(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
