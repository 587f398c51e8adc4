//! `cargo xtask test`: setup, lints, and every test tier, ending in one
//! summary line per tier and a total line.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use mesh_tests::{figures::FIGURES_LOG_ENV, netns::leftovers, skip::SKIP_LOG_ENV};

use crate::{cargo, target_dir};

#[derive(Default)]
struct Tier {
    name: &'static str,
    passed: u64,
    failed: u64,
    skipped: u64,
    reasons: Vec<String>,
    /// A tier whose tests need root: all-skipped is a failure.
    privileged: bool,
    seconds: f64,
}

impl Tier {
    /// Adds a libtest `test result:` line's counts; false for other lines.
    fn count_result(&mut self, line: &str) -> bool {
        let Some((passed, failed, ignored)) = parse_result_line(line) else {
            return false;
        };
        self.passed += passed;
        self.failed += failed;
        if ignored > 0 {
            self.skipped += ignored;
            self.reasons
                .push(format!("{ignored} ignored by the test harness"));
        }
        true
    }

    /// Moves tests that recorded a skip (`mesh-skip: <test>: <reason>`
    /// lines) from passed to skipped, with their reasons.
    fn count_skips<'a>(&mut self, lines: impl Iterator<Item = &'a str>) {
        for line in lines {
            self.skipped += 1;
            self.passed = self.passed.saturating_sub(1);
            self.reasons
                .push(line.trim_start_matches("mesh-skip: ").to_owned());
        }
    }

    fn line(&self) -> String {
        let mut s = format!(
            "{:<8} {} passed, {} failed, {} skipped ({:.1} s)",
            format!("{}:", self.name),
            self.passed,
            self.failed,
            self.skipped,
            self.seconds
        );
        if !self.reasons.is_empty() {
            s.push_str(&format!(" — skipped: {}", self.reasons.join("; ")));
        }
        s
    }
}

pub fn run() -> Result<()> {
    let started = Instant::now();
    let setup_started = Instant::now();
    crate::setup::run()?;
    let setup_secs = setup_started.elapsed().as_secs_f64();

    // Figures the tests measured (faults, attacks), printed after the summary.
    std::fs::create_dir_all(target_dir())?;
    std::fs::write(figures_log(), "").context("reset the figures log")?;
    let mut tiers = vec![lint()];
    // meshd and meshctl are what the namespace tier runs; build them before
    // any test binary.
    crate::build_binaries()?;
    tiers.push(cargo_tier(
        "unit",
        false,
        &[
            "test",
            "--workspace",
            "--exclude",
            "dataplane-ebpf",
            "--lib",
            "--bins",
            // control's in-process cluster (loopback, no root).
            "--test",
            "cluster",
        ],
    )?);
    tiers.push(cargo_tier(
        "packet",
        true,
        &[
            "test",
            "--no-fail-fast",
            "--package",
            "mesh-tests",
            "--test",
            "packet",
        ],
    )?);
    let mut netns = cargo_tier(
        "netns",
        true,
        &[
            "test",
            "--no-fail-fast",
            "--package",
            "mesh-tests",
            "--test",
            "netns",
        ],
    )?;
    // The suite checks it cleaned up after itself: namespaces, pins, processes.
    let left = leftovers("mesh-");
    if left.is_empty() {
        netns.passed += 1;
    } else {
        netns.failed += 1;
        eprintln!(
            "leak check: left behind after the namespace tier: {}",
            left.join(", ")
        );
    }
    tiers.push(netns);
    tiers.push(vm_tier(&crate::vm::Options {
        binaries: vec!["vm".to_owned()],
        args: Vec::new(),
        timeout: VM_TIMEOUT,
    }));

    println!(
        "\n==== summary (setup {setup_secs:.1} s, total {:.0} s) ====",
        started.elapsed().as_secs_f64()
    );
    let mut problems = Vec::new();
    for tier in &tiers {
        println!("{}", tier.line());
        if tier.failed > 0 {
            problems.push(format!("{} tier had failures", tier.name));
        }
        if tier.privileged && tier.passed == 0 {
            problems.push(format!("{} tier ran no test (all skipped)", tier.name));
        }
    }
    let sum = |f: fn(&Tier) -> u64| tiers.iter().map(f).sum::<u64>();
    println!(
        "total: {} passed, {} failed, {} skipped",
        sum(|t| t.passed),
        sum(|t| t.failed),
        sum(|t| t.skipped)
    );
    let figures = std::fs::read_to_string(figures_log()).unwrap_or_default();
    if !figures.trim().is_empty() {
        println!("==== figures (docs/RELIABILITY.md)\n{}", figures.trim_end());
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

/// The whole VM tier's boot, tests included.
const VM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// `cargo xtask vm`: setup, then only the VM tier.
pub fn vm_only(opts: &crate::vm::Options) -> Result<()> {
    crate::setup::run()?;
    let tier = vm_tier(opts);
    println!("\n==== summary\n{}", tier.line());
    if tier.failed > 0 || tier.passed == 0 {
        bail!("the VM tier failed or ran no test");
    }
    Ok(())
}

/// Boots the VM and counts what its test binaries reported. A boot that
/// fails or times out is a failure of the tier, never a skip.
fn vm_tier(opts: &crate::vm::Options) -> Tier {
    println!(
        "==== vm tier: {} in Debian's stock kernel",
        opts.binaries.join(", ")
    );
    let mut tier = Tier {
        name: "vm",
        privileged: true,
        ..Tier::default()
    };
    match crate::vm::run(opts) {
        Ok(outcome) => {
            for line in &outcome.result_lines {
                tier.count_result(line);
            }
            for (name, code) in &outcome.statuses {
                if *code != 0 && tier.failed == 0 {
                    tier.failed += 1;
                    eprintln!("vm tier: {name} exited with {code} in the guest");
                }
            }
            tier.count_skips(outcome.skips.iter().map(String::as_str));
            tier.seconds = outcome.seconds;
        }
        Err(e) => {
            tier.failed += 1;
            eprintln!("vm tier: {e:#}");
        }
    }
    tier
}

/// fmt and clippy, each counted as one check.
fn lint() -> Tier {
    let started = Instant::now();
    let mut tier = Tier {
        name: "lint",
        ..Tier::default()
    };
    let checks: [(&str, Vec<&str>); 3] = [
        ("rustfmt", vec!["fmt", "--all", "--", "--check"]),
        (
            "clippy (host)",
            vec![
                "clippy",
                "--workspace",
                "--exclude",
                "dataplane-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
        (
            "clippy (eBPF)",
            vec![
                "+nightly",
                "clippy",
                "--package",
                "dataplane-ebpf",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ],
        ),
    ];
    for (name, args) in checks {
        println!("==== {name}");
        let mut cmd = cargo();
        if args[0] == "+nightly" {
            // Run the nightly cargo by name: a `cargo` already resolved by
            // rustup to stable ignores `+toolchain`.
            cmd = Command::new("cargo");
            cmd.current_dir(crate::root())
                .env_remove("RUSTC")
                .env_remove("CARGO");
        }
        match cmd.args(&args).status() {
            Ok(s) if s.success() => tier.passed += 1,
            _ => {
                tier.failed += 1;
                eprintln!("lint: {name} failed");
            }
        }
    }
    tier.seconds = started.elapsed().as_secs_f64();
    tier
}

/// Runs one `cargo test` invocation and counts its results, moving tests that
/// recorded a skip from "passed" to "skipped".
fn cargo_tier(name: &'static str, privileged: bool, args: &[&str]) -> Result<Tier> {
    println!("==== {name} tier: cargo {}", args.join(" "));
    let started = Instant::now();
    let skip_log: PathBuf = target_dir().join(format!("mesh-skips-{name}.log"));
    std::fs::create_dir_all(target_dir())?;
    std::fs::write(&skip_log, "").with_context(|| format!("reset {}", skip_log.display()))?;

    let mut child = cargo()
        .args(args)
        .env(SKIP_LOG_ENV, &skip_log)
        .env(FIGURES_LOG_ENV, figures_log())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start cargo test")?;
    let mut tier = Tier {
        name,
        privileged,
        ..Tier::default()
    };
    let mut saw_result = false;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        saw_result |= tier.count_result(&line);
    }
    let status = child.wait()?;
    if !status.success() && tier.failed == 0 {
        // A build error or a crashed test binary: count it, never pass silently.
        tier.failed += 1;
        eprintln!("{name} tier: cargo exited with {status}");
    }
    if !saw_result && status.success() {
        eprintln!("{name} tier: no test result line seen");
    }
    let skips = std::fs::read_to_string(&skip_log).unwrap_or_default();
    tier.count_skips(skips.lines().filter(|l| !l.is_empty()));
    tier.seconds = started.elapsed().as_secs_f64();
    Ok(tier)
}

/// Where the test binaries append their figures during one run.
fn figures_log() -> PathBuf {
    target_dir().join("mesh-figures.log")
}

/// `test result: ok. 3 passed; 0 failed; 1 ignored; ...` -> (3, 0, 1).
fn parse_result_line(line: &str) -> Option<(u64, u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    // Each `;`-separated part ends in "<count> <word>".
    let count = |word: &str| -> Option<u64> {
        rest.split(';').find_map(|part| {
            let mut tokens = part.split_whitespace().rev();
            let (w, n) = (tokens.next()?, tokens.next()?);
            (w == word).then(|| n.parse().ok()).flatten()
        })
    };
    Some((count("passed")?, count("failed")?, count("ignored")?))
}

#[cfg(test)]
mod tests {
    use super::parse_result_line;

    #[test]
    fn libtest_result_lines_are_counted() {
        assert_eq!(
            parse_result_line(
                "test result: ok. 12 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.1s"
            ),
            Some((12, 0, 0))
        );
        assert_eq!(
            parse_result_line(
                "test result: FAILED. 1 passed; 2 failed; 3 ignored; 0 measured; 0 filtered out"
            ),
            Some((1, 2, 3))
        );
        assert_eq!(parse_result_line("running 3 tests"), None);
    }
}
