//! `cargo xtask vm`: the VM tier. Boots Debian's stock 6.12 kernel under
//! QEMU (TCG) and runs privileged test binaries inside it, for what this
//! host's kernel lacks (IPVS, ESP). See docs/testing.md.
//!
//! The guest has no disk and no NIC. Its root is the host's `/`, shared
//! read-only over 9p, with tmpfs over `/run`, `/tmp` and `/var/tmp` (the
//! workspace and target dir put back on top where they lie below), so the
//! test binaries, meshd and every tool (`ip`, `nft`) run from where they are
//! on the host. A second, writable 9p share (`target/vm/run`) carries the
//! guest script in and the results out. Kernel modules come from the
//! unpacked kernel package through a `kernel.modprobe` wrapper, so the
//! kernel's own autoloading (crypto, nf_tables, ip_vs) works.
//!
//! Cached under `target/vm`: the unpacked kernel (by package name, the
//! newest 6.12 build apt offers) and the initramfs (by a digest of what goes
//! into it). Neither is rebuilt while its inputs are unchanged.

use std::{
    collections::hash_map::DefaultHasher,
    fs,
    hash::{Hash as _, Hasher as _},
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{run_ok, target_dir};

/// Debian's kernel packages of this series, newest first by patch level.
const KERNEL_SERIES: &str = "6.12.";
const KERNEL_FLAVOUR: &str = "+deb12-amd64-unsigned";
/// What the initramfs needs to mount the 9p root (the rest autoloads).
const INITRD_MODULES: &[&str] = &[
    "fs/netfs/netfs",
    "net/9p/9pnet",
    "net/9p/9pnet_virtio",
    "fs/9p/9p",
];
/// Bumped whenever `initrd` puts something else into the image: part of
/// its cache key, with everything that goes in.
const INITRD_LAYOUT: u32 = 2;
/// isa-debug-exit: a byte written to this port ends QEMU with exit status
/// `(byte << 1) | 1`.
const DEBUG_EXIT_PORT: u64 = 0xf4;
/// The byte stage two writes when it ran to its end (status 85: not a
/// status QEMU itself exits with).
const GUEST_DONE: u8 = 0x2a;
/// The byte stage one writes when it cannot set the guest up (status 255).
const GUEST_SETUP_FAILED: u8 = 0x7f;

/// Stage one, in the initramfs: mount the host's root and switch to it.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "mesh-vm: $*"; printf '\177' | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null; poweroff -f; }
for m in netfs 9pnet 9pnet_virtio 9p; do insmod /modules/$m.ko || fail "insmod $m"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /newroot || fail "mount the host root"
# The workspace and target dir stay visible even under /tmp (a CI clone):
# held aside, then put back over the tmpfs.
i=0
for k in $(cat /keep-dirs); do i=$((i+1)); mkdir -p /keep$i; mount --bind /newroot$k /keep$i || fail "bind $k"; done
for d in run tmp var/tmp; do mount -t tmpfs tmpfs /newroot/$d || fail "tmpfs on /$d"; done
i=0
for k in $(cat /keep-dirs); do i=$((i+1)); mkdir -p /newroot$k 2>/dev/null; mount --move /keep$i /newroot$k || fail "keep $k"; done
RUN=$(cat /run-dir)
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /newroot$RUN || fail "mount the results share at $RUN"
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /bin/sh $RUN/stage2
"#;

pub struct Options {
    /// Test binaries of mesh-tests (`tests/tests/<name>.rs`) to run.
    pub binaries: Vec<String>,
    /// Passed to every test binary (a name filter, `--exact`, ...).
    pub args: Vec<String>,
    /// Wall-clock limit for the whole boot.
    pub timeout: Duration,
}

/// What the guest reported.
pub struct Outcome {
    /// libtest's "test result:" lines, as printed.
    pub result_lines: Vec<String>,
    /// Per binary: its exit status inside the guest.
    pub statuses: Vec<(String, i32)>,
    /// Lines of the skip log the guest's tests appended to.
    pub skips: Vec<String>,
    pub seconds: f64,
}

pub fn run(opts: &Options) -> Result<Outcome> {
    if !crate::is_root() {
        bail!("the VM tier boots QEMU and runs privileged tests: run it as root");
    }
    crate::setup::apt_install(crate::setup::VM_PACKAGES)?;
    let dir = target_dir().join("vm");
    fs::create_dir_all(&dir)?;
    let kernel = kernel(&dir)?;
    let initrd = initrd(&dir, &kernel)?;

    crate::build_binaries()?;
    let mut bins = Vec::new();
    for name in &opts.binaries {
        bins.push((name.clone(), test_binary(name)?));
    }

    // The results share: fresh for every boot.
    let run_dir = dir.join("run");
    if run_dir.exists() {
        fs::remove_dir_all(&run_dir)?;
    }
    fs::create_dir_all(&run_dir)?;
    fs::write(
        run_dir.join("stage2"),
        stage2(&kernel, &run_dir, &bins, &opts.args),
    )?;

    let started = Instant::now();
    println!(
        "vm: booting {} (TCG) for {}",
        kernel.version,
        opts.binaries.join(", ")
    );
    let mut attempt = 1;
    let result_lines = loop {
        let boot = boot(&kernel, &initrd, &run_dir, started + opts.timeout)?;
        if boot.timed_out {
            bail!("the VM tier timed out after {:?}", opts.timeout);
        }
        let code = boot.status.code();
        if code == Some((i32::from(GUEST_SETUP_FAILED) << 1) | 1) {
            bail!("the guest could not set itself up (see its last `mesh-vm:` line)");
        }
        // A guest that died before its tests (TCG has oopsed at boot):
        // boot again, at most twice.
        if !boot.reached_stage2 && attempt < 3 {
            eprintln!("vm: the guest died before its tests ran (attempt {attempt}); booting again");
            attempt += 1;
            continue;
        }
        if code != Some((i32::from(GUEST_DONE) << 1) | 1) {
            bail!(
                "QEMU exited without the guest's verdict: {code:?} (a guest panic, or QEMU failed)"
            );
        }
        break boot.result_lines;
    };
    let seconds = started.elapsed().as_secs_f64();
    let mut statuses = Vec::new();
    for (name, _) in &bins {
        let file = run_dir.join(format!("{name}.status"));
        let code = fs::read_to_string(&file)
            .with_context(|| format!("the guest wrote no {}", file.display()))?
            .trim()
            .parse()
            .with_context(|| format!("{} is not an exit code", file.display()))?;
        statuses.push((name.clone(), code));
    }
    let skips = fs::read_to_string(run_dir.join("skips.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    Ok(Outcome {
        result_lines,
        statuses,
        skips,
        seconds,
    })
}

struct Boot {
    status: std::process::ExitStatus,
    timed_out: bool,
    /// The guest's stage two started (the kernel booted).
    reached_stage2: bool,
    result_lines: Vec<String>,
}

/// One QEMU run, its serial console echoed, killed at `deadline`.
fn boot(kernel: &Kernel, initrd: &Path, run_dir: &Path, deadline: Instant) -> Result<Boot> {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        "stdio",
        // /dev/kvm here cannot run a stock kernel (TOOLCHAIN.md): TCG.
        "-accel",
        "tcg",
        "-cpu",
        "max",
        // One vCPU: with two, multi-threaded TCG now and then executes a
        // half-patched instruction while the kernel flips a static key
        // (an int3 oops in the middle of a test, seen here); one cannot.
        "-smp",
        "1",
        "-m",
        "3072",
    ])
    .arg("-kernel")
    .arg(&kernel.vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3"])
    .args([
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    ])
    .arg("-virtfs")
    .arg(format!(
        "local,path={},mount_tag=results,security_model=none",
        run_dir.display()
    ))
    .args([
        "-device",
        &format!("isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=0x04"),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let mut child = qemu.spawn().context("cannot start qemu-system-x86_64")?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut result_lines = Vec::new();
    let mut timed_out = false;
    let mut reached_stage2 = false;
    loop {
        if Instant::now() >= deadline {
            timed_out = true;
            eprintln!("vm: no poweroff in time: killing QEMU (pid {})", child.id());
            let _ = child.kill();
            break;
        }
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_owned();
                println!("vm| {line}");
                if line.starts_with("mesh-vm: kernel ") {
                    reached_stage2 = true;
                }
                if line.starts_with("test result: ") {
                    result_lines.push(line);
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    let status = child.wait()?;
    let _ = reader.join();
    Ok(Boot {
        status,
        timed_out,
        reached_stage2,
        result_lines,
    })
}

struct Kernel {
    version: String,
    /// The unpacked package: `boot/`, `lib/modules/<version>/`.
    root: PathBuf,
    vmlinuz: PathBuf,
}

/// The newest 6.12 stock kernel apt offers, unpacked once into `dir`.
fn kernel(dir: &Path) -> Result<Kernel> {
    let cache = dir.join("kernel");
    fs::create_dir_all(&cache)?;
    let package = match newest_kernel_package()? {
        Some(p) => p,
        // Offline, or the lists are stale: a cached one will do.
        None => cached_kernels(&cache)
            .pop()
            .context("apt offers no linux-image-6.12.*+deb12-amd64-unsigned and none is cached")?,
    };
    let root = cache.join(&package);
    let ready = root.join(".mesh-ready");
    if !ready.exists() {
        let started = Instant::now();
        println!("vm: fetching {package}");
        if root.exists() {
            fs::remove_dir_all(&root)?;
        }
        let download = cache.join("download");
        let _ = fs::remove_dir_all(&download);
        fs::create_dir_all(&download)?;
        run_ok(
            Command::new("apt-get")
                .args(["download", "-qq", &package])
                .current_dir(&download),
        )?;
        let deb = fs::read_dir(&download)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download left no .deb")?;
        run_ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        fs::remove_dir_all(&download)?;
        let version = module_version(&root)?;
        run_ok(Command::new("depmod").arg("-b").arg(&root).arg(&version))?;
        fs::write(&ready, "")?;
        println!(
            "vm: {package} unpacked ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
        // Older builds go: one kernel is ~120 MB unpacked.
        for old in cached_kernels(&cache) {
            if old != package {
                let _ = fs::remove_dir_all(cache.join(old));
            }
        }
    }
    let version = module_version(&root)?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{version}"));
    if !vmlinuz.exists() {
        bail!("{} is missing from the unpacked package", vmlinuz.display());
    }
    Ok(Kernel {
        version,
        root,
        vmlinuz,
    })
}

/// `linux-image-6.12.N+deb12-amd64-unsigned` with the highest N.
fn newest_kernel_package() -> Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["pkgnames", &format!("linux-image-{KERNEL_SERIES}")])
        .output()
        .context("cannot run apt-cache")?;
    let names = String::from_utf8_lossy(&out.stdout);
    Ok(names
        .lines()
        .filter_map(|n| {
            let patch = n
                .strip_prefix(&format!("linux-image-{KERNEL_SERIES}"))?
                .strip_suffix(KERNEL_FLAVOUR)?;
            Some((patch.parse::<u32>().ok()?, n.to_owned()))
        })
        .max()
        .map(|(_, n)| n))
}

fn cached_kernels(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(cache)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.path().join(".mesh-ready").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

fn module_version(root: &Path) -> Result<String> {
    fs::read_dir(root.join("lib/modules"))
        .with_context(|| format!("{} has no lib/modules", root.display()))?
        .filter_map(Result::ok)
        .find_map(|e| e.file_name().into_string().ok())
        .context("no module directory in the kernel package")
}

/// The initramfs: static busybox, the 9p modules, stage one. Rebuilt only
/// when one of them (or the results path it mounts) changed.
fn initrd(dir: &Path, kernel: &Kernel) -> Result<PathBuf> {
    let busybox = fs::read("/bin/busybox").context("read /bin/busybox (busybox-static)")?;
    let modules_dir = kernel
        .root
        .join("lib/modules")
        .join(&kernel.version)
        .join("kernel");
    let run_dir = dir.join("run");
    // Paths must not hold whitespace (the init script splits on it).
    let keep = format!("{}\n{}\n", crate::root().display(), target_dir().display());
    let mut hasher = DefaultHasher::new();
    INITRD_LAYOUT.hash(&mut hasher);
    keep.hash(&mut hasher);
    busybox.hash(&mut hasher);
    INIT.hash(&mut hasher);
    kernel.version.hash(&mut hasher);
    run_dir.hash(&mut hasher);
    let key = format!("{:016x}", hasher.finish());
    let image = dir.join(format!("initrd-{key}.img"));
    if image.exists() {
        return Ok(image);
    }
    let started = Instant::now();
    let staging = dir.join("initrd-staging");
    let _ = fs::remove_dir_all(&staging);
    for sub in ["bin", "proc", "sys", "dev", "newroot", "modules"] {
        fs::create_dir_all(staging.join(sub))?;
    }
    fs::write(staging.join("bin/busybox"), &busybox)?;
    set_mode(&staging.join("bin/busybox"), 0o755)?;
    fs::write(staging.join("init"), INIT)?;
    set_mode(&staging.join("init"), 0o755)?;
    fs::write(
        staging.join("run-dir"),
        run_dir.to_string_lossy().as_bytes(),
    )?;
    fs::write(staging.join("keep-dirs"), &keep)?;
    for m in INITRD_MODULES {
        let xz = modules_dir.join(format!("{m}.ko.xz"));
        let name = Path::new(m).file_name().expect("module name");
        let out = Command::new("xz")
            .arg("-dc")
            .arg(&xz)
            .output()
            .with_context(|| format!("xz -dc {}", xz.display()))?;
        if !out.status.success() {
            bail!("cannot decompress {}", xz.display());
        }
        fs::write(
            staging
                .join("modules")
                .join(format!("{}.ko", name.to_string_lossy())),
            out.stdout,
        )?;
    }
    let tmp = dir.join("initrd.tmp");
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(r#"cd "$1" && find . | cpio -o -H newc --quiet | gzip -1 > "$2""#)
            .arg("sh")
            .arg(&staging)
            .arg(&tmp),
    )?;
    // Old images go; this one replaces them.
    for e in fs::read_dir(dir)?.filter_map(Result::ok) {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("initrd-") && n.ends_with(".img") {
            let _ = fs::remove_file(e.path());
        }
    }
    fs::rename(&tmp, &image)?;
    fs::remove_dir_all(&staging)?;
    println!(
        "vm: initramfs built ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(image)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Builds `tests/tests/<name>.rs` of mesh-tests and returns the executable.
fn test_binary(name: &str) -> Result<PathBuf> {
    let out = crate::cargo()
        .args([
            "test",
            "--no-run",
            "--package",
            "mesh-tests",
            "--message-format=json-render-diagnostics",
            "--test",
            name,
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo test --no-run")?;
    if !out.status.success() {
        bail!("building test binary {name} failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == name)
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo reported no executable for test {name}"))
}

/// Stage two, run from the host's root inside the guest: the environment
/// the tests expect, then each binary, then the verdict.
fn stage2(kernel: &Kernel, run_dir: &Path, bins: &[(String, PathBuf)], args: &[String]) -> String {
    let run = run_dir.display();
    let mut s = format!(
        r#"export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp
export RUST_BACKTRACE=1 MESH_VM=1 MESH_SKIP_LOG={run}/skips.log
mount -t cgroup2 none /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mkdir -p /run/mesh-vm /run/netns
printf '#!/bin/sh\nexec /sbin/modprobe -d {root} "$@"\n' > /run/mesh-vm/modprobe
chmod +x /run/mesh-vm/modprobe
echo /run/mesh-vm/modprobe > /proc/sys/kernel/modprobe
ip link set lo up
echo "mesh-vm: kernel $(uname -r), $(nproc) CPUs"
cd /tmp
"#,
        root = kernel.root.display(),
    );
    for (name, path) in bins {
        let args: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
        s.push_str(&format!(
            "echo \"mesh-vm: running {name}\"\n{} --test-threads=1 --color=never {} 2>&1\necho $? > {run}/{name}.status\n",
            shell_quote(&path.to_string_lossy()),
            args.join(" "),
        ));
    }
    s.push_str(&format!(
        "sync\nprintf '\\{GUEST_DONE:03o}' | dd of=/dev/port bs=1 seek={DEBUG_EXIT_PORT} count=1 2>/dev/null\nsleep 10\n"
    ));
    s
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
