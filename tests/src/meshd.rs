//! Running real `meshd` processes on test hosts: config files and a spawn
//! helper that waits for meshd's readiness line.

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::mpsc,
    time::Duration,
};

use crate::{
    ChildGuard, Host,
    netns::{BPF_ROOT, UNDERLAY_IFACE},
};

/// The line meshd prints on stdout once its data plane and config are in place.
pub const READY_LINE: &str = "meshd: ready";

/// Where the meshd binary is: `$MESHD`, else next to the running test binary
/// (`target/<profile>/deps/x` -> `target/<profile>/meshd`), else target/debug.
pub fn meshd_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("MESHD") {
        return path.into();
    }
    beside_test("meshd", "cargo build -p meshd")
}

/// Where meshctl is: `$MESHCTL`, else next to meshd or the test binary.
pub fn meshctl_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("MESHCTL") {
        return path.into();
    }
    if let Some(beside) = std::env::var_os("MESHD")
        .map(PathBuf::from)
        .and_then(|m| m.parent().map(|d| d.join("meshctl")))
        .filter(|p| p.exists())
    {
        return beside;
    }
    beside_test("meshctl", "cargo build -p meshctl")
}

/// The small HTTP server tasks run (`mesh-web`), next to meshd.
pub fn mesh_web_bin() -> PathBuf {
    let beside = meshd_bin().with_file_name("mesh-web");
    if beside.exists() {
        return beside;
    }
    beside_test("mesh-web", "cargo build -p dataplane --bins")
}

fn beside_test(name: &str, build: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let candidates = [
        exe.parent().and_then(Path::parent).map(|d| d.join(name)),
        exe.parent().map(|d| d.join(name)),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found next to {}: build it (`{build}`) or set {}",
                exe.display(),
                name.to_uppercase()
            )
        })
}

/// Starts a control-plane-only meshd on `host` (`args` after the binary,
/// e.g. `init --data-dir D ...`), waits for its ready line, and returns it
/// with everything it printed before that line.
pub fn start_control(host: &Host, args: &[&str]) -> (ChildGuard, Vec<String>) {
    let mut cmd = host.command(meshd_bin());
    cmd.args(args)
        // openraft logs every failed RPC to a killed peer; the tests read
        // outcomes through meshctl instead. MESH_TEST_RUST_LOG overrides it
        // when a test needs meshd's own account.
        .env(
            "RUST_LOG",
            std::env::var("MESH_TEST_RUST_LOG").unwrap_or_else(|_| "warn,openraft=off".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut guard = host.spawn(&mut cmd);
    let stdout = guard.take_stdout().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut before = Vec::new();
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line == READY_LINE {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(std::mem::take(&mut before));
                }
            } else if tx.is_some() {
                before.push(line);
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(lines) => (guard, lines),
        Err(_) => {
            guard.assert_running();
            panic!(
                "meshd {args:?} on {} did not become ready in 30 s",
                host.label()
            );
        }
    }
}

/// A published service for a config file: `port` answers on every node and
/// balances to `backends` on `target_port`.
pub struct Published<'a> {
    pub id: u32,
    pub name: &'a str,
    pub port: u16,
    pub protocol: &'a str,
    pub target_port: u16,
    pub backends: &'a [Ipv4Addr],
}

/// A meshd `--config` file for `host`, removed on Drop.
pub struct ConfigFile(pub PathBuf);

impl ConfigFile {
    /// Writes the config of `host` (see [`ConfigFile::overwrite`]); the file
    /// is removed when the returned value drops.
    pub fn write(
        host: &Host,
        endpoint_interfaces: &[&str],
        timeouts: serde_json::Value,
        services: &[Published<'_>],
    ) -> ConfigFile {
        let file = ConfigFile(std::env::temp_dir().join(format!("{}.json", host.node_name())));
        file.overwrite(host, endpoint_interfaces, timeouts, services);
        file
    }

    /// A config file with exactly `config` in it.
    pub fn json(host: &Host, config: &serde_json::Value) -> ConfigFile {
        let file = ConfigFile(std::env::temp_dir().join(format!("{}.json", host.node_name())));
        file.replace(config);
        file
    }

    /// Replaces the contents with `config`. Send meshd SIGHUP to apply.
    pub fn replace(&self, config: &serde_json::Value) {
        std::fs::write(&self.0, serde_json::to_vec_pretty(config).expect("json"))
            .expect("write config");
    }

    /// Replaces the contents: `host`'s endpoint interfaces, timeouts (`{}`
    /// for defaults) and published services. Send meshd SIGHUP to apply.
    pub fn overwrite(
        &self,
        host: &Host,
        endpoint_interfaces: &[&str],
        timeouts: serde_json::Value,
        services: &[Published<'_>],
    ) {
        let services: Vec<serde_json::Value> = services
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.id, "name": s.name,
                    "frontends": [{"port": s.port, "protocol": s.protocol}],
                    "backends": s.backends.iter()
                        .map(|a| serde_json::json!({"address": a.to_string(), "port": s.target_port}))
                        .collect::<Vec<_>>(),
                })
            })
            .collect();
        let config = serde_json::json!({
            "endpoint_interfaces": endpoint_interfaces,
            "timeouts": timeouts,
            "lb": {
                "nat_address": host.addr().to_string(),
                "node_addresses": [host.addr().to_string()],
                "services": services,
            }
        });
        self.replace(&config);
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Starts `meshd run` on `host` (with `config`, if any) and waits for its
/// ready line. `extra` is appended to the command line.
pub fn start(host: &Host, config: Option<&ConfigFile>, extra: &[&str]) -> ChildGuard {
    let mut cmd = host.command(meshd_bin());
    cmd.args([
        "run",
        "--node",
        host.node_name(),
        "--underlay",
        UNDERLAY_IFACE,
        "--bpf-root",
        BPF_ROOT,
    ])
    .args(extra)
    .env("RUST_LOG", "warn")
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    if let Some(c) = config {
        cmd.arg("--config").arg(&c.0);
    }
    let mut guard = host.spawn(&mut cmd);
    let stdout = guard.take_stdout().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    // Reads meshd's stdout to the end, so meshd never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line == READY_LINE {
                let _ = tx.send(());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(()) => guard,
        Err(_) => {
            guard.assert_running();
            panic!("meshd on {} did not become ready in 30 s", host.label());
        }
    }
}

/// `meshd down`: detaches the data path and removes the host's pins.
pub fn down(host: &Host) {
    host.exec_ok(
        meshd_bin().to_str().expect("utf-8 path"),
        &["down", "--node", host.node_name(), "--bpf-root", BPF_ROOT],
    );
}

/// Removes what a task scope left (meshd `--task-scope SCOPE`, or an
/// executor made with prefix `SCOPE-` and group `SCOPE`): every process in
/// its cgroups is killed, the cgroups and the `/run/netns/SCOPE-*`
/// namespaces are removed. For Drop, after a panic too.
pub fn remove_task_scope(scope: &str) {
    if let Some(root) = cgroup2_mount() {
        let group = root.join(scope);
        if let Ok(d) = std::fs::read_dir(&group) {
            for e in d.flatten().filter(|e| e.path().is_dir()) {
                let _ = std::fs::write(e.path().join("cgroup.kill"), "1");
                for _ in 0..50 {
                    if std::fs::remove_dir(e.path()).is_ok() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
        let _ = std::fs::remove_dir(&group);
    }
    let prefix = format!("{scope}-");
    for n in crate::netns::leftovers_matching(&|n| n.starts_with(&prefix)) {
        if let Some(name) = n.strip_prefix("namespace ") {
            let path = std::path::PathBuf::from("/run/netns").join(name);
            if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
                // SAFETY: a valid C string; a lazy unmount of a bind mount.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Where cgroup v2 is mounted. The same lookup as the executor's
/// (`node::executor::cgroup2_mount`): this crate cannot depend on
/// `dataplane`, because xtask uses it before bpf-linker exists.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}
