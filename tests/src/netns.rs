//! Network namespaces, hosts and the underlay topology.
//!
//! ```text
//!   [underlay ns: bridge br0] --veth-- [host ns 1: eth0 198.18.0.1]
//!                             --veth-- [host ns 2: eth0 198.18.0.2] ...
//! ```
//!
//! Every namespace is named `mesh-<pid>-<n>` and deleted on Drop (also while a
//! panic unwinds). Links are created inside our namespaces only; the root
//! namespace's interfaces, routes and firewall are never touched. Child
//! processes run in a namespace by `setns` before `exec`, so they see the real
//! `/sys` (unlike `ip netns exec`, which remounts it and hides bpffs).

use std::{
    fs::File,
    future::Future,
    io,
    net::Ipv4Addr,
    os::{
        fd::{AsRawFd as _, RawFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use futures::TryStreamExt as _;
use netlink_packet_route::link::{LinkAttribute, LinkXdp};

/// Env var overriding the underlay prefix (an IPv4 network, /8 to /24).
pub const PREFIX_ENV: &str = "MESH_TEST_PREFIX";
/// RFC 2544's benchmarking range: never routed anywhere real.
pub const DEFAULT_PREFIX: &str = "198.18.0.0/24";
/// Env var every child process we spawn carries, so leak checks can find them.
pub const CHILD_MARK_ENV: &str = "MESH_TEST_CHILD";
/// Where test nodes pin their maps (one directory per host namespace).
pub const BPF_ROOT: &str = "/run/mesh/bpf";
/// The underlay interface name inside every host namespace.
pub const UNDERLAY_IFACE: &str = "eth0";

static NEXT_NS: AtomicU32 = AtomicU32::new(0);

/// Runs `ip` with `args`; panics with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip {args:?}: {e} (install iproute2)"));
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A named network namespace (`/run/netns/<name>`), deleted on Drop.
pub struct Netns {
    name: String,
    file: File,
}

/// Runs `f` on a fresh thread in the namespace bound at `path` (one a
/// test's own meshd made for a task, say).
pub fn enter_path<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> T {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let fd = file.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(fd).expect("setns into a task's namespace");
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

impl Netns {
    /// Creates `mesh-<pid>-<n>`.
    pub fn new() -> Netns {
        let n = NEXT_NS.fetch_add(1, Ordering::Relaxed);
        let name = format!("mesh-{}-{n}", std::process::id());
        ip(&["netns", "add", &name]);
        let file = File::open(Path::new("/run/netns").join(&name))
            .unwrap_or_else(|e| panic!("open /run/netns/{name}: {e}"));
        let ns = Netns { name, file };
        // No IPv6 autoconf chatter (RS, MLD, DAD): tests count packets exactly.
        for key in ["all", "default"] {
            ns.write_sysctl(&format!("net/ipv6/conf/{key}/disable_ipv6"), "1");
        }
        ns
    }

    /// `/run/netns/<name>`: what a reconciler is given to find this namespace.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Runs `f` on a fresh thread that has entered this namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let fd = self.fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(fd).expect("setns into test namespace");
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Runs async code inside this namespace on its own current-thread runtime.
    pub fn run<T: Send, Fut: Future<Output = T>>(&self, f: impl FnOnce() -> Fut + Send) -> T {
        self.enter(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(f())
        })
    }

    /// Writes a sysctl under `/proc/sys/` as seen from this namespace.
    pub fn write_sysctl(&self, key: &str, value: &str) {
        let path = Path::new("/proc/sys").join(key);
        self.enter(|| std::fs::write(&path, value))
            .unwrap_or_else(|e| panic!("{}: write {} = {value}: {e}", self.name, path.display()));
    }

    /// A command that will run inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let fd = self.fd();
        cmd.env(CHILD_MARK_ENV, &self.name);
        // SAFETY: setns is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || setns(fd));
        }
        cmd
    }

    /// Runs `program args` in this namespace to completion.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{}: cannot run {program}: {e}", self.name))
    }

    /// Like [`Netns::exec`], panicking unless the command succeeds.
    pub fn exec_ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.exec(program, args);
        assert!(
            out.status.success(),
            "{}: {program} {args:?} failed ({}): {}{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `cmd` (built with [`Netns::command`]); the guard kills it on Drop.
    pub fn spawn(&self, cmd: &mut Command) -> ChildGuard {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{}: cannot spawn {cmd:?}: {e}", self.name));
        ChildGuard {
            child: Some(child),
            what: format!("{cmd:?}"),
        }
    }

    /// An rtnetlink handle whose socket was opened inside this namespace.
    /// Must be called from within a tokio runtime, which drives the connection.
    pub fn netlink(&self) -> rtnetlink::Handle {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle) = self.enter(|| {
            let _guard = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection().expect("netlink socket");
            (conn, handle)
        });
        rt.spawn(conn);
        handle
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("warning: ip netns del {}: {e}", self.name),
        }
    }
}

fn setns(fd: RawFd) -> io::Result<()> {
    // SAFETY: fd is an open /run/netns file; CLONE_NEWNET only affects this thread.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A child process killed (SIGTERM, then SIGKILL) and reaped on Drop.
pub struct ChildGuard {
    child: Option<Child>,
    what: String,
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends SIGTERM and waits (up to 10 s) for a clean exit.
    pub fn stop(mut self) -> ExitStatus {
        let child = self.child.take().expect("child present until dropped");
        terminate(child, &self.what)
    }

    /// SIGKILLs the child and reaps it: a crash, as far as it can tell.
    pub fn kill(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("child present until dropped");
        let _ = child.kill();
        child.wait().expect("wait")
    }

    /// Takes the child's stdout, if it was piped.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut().and_then(|c| c.stdout.take())
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the child, by PID.
    pub fn signal(&self, signal: i32) {
        // SAFETY: the pid is our own unreaped child, so it cannot have been reused.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// The child's exit status if it has exited (it is reaped then).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))
    }

    /// Panics if the child has already exited (it was expected to be serving).
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("child");
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("{} exited early: {status}", self.what);
        }
    }
}

fn terminate(mut child: Child, what: &str) -> ExitStatus {
    // SAFETY: the pid is our own unreaped child, so it cannot have been reused.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("warning: {what} ignored SIGTERM for 10 s; killing it");
    let _ = child.kill();
    child.wait().expect("wait")
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            terminate(child, &self.what);
        }
    }
}

/// The underlay prefix: network address and prefix length.
pub fn underlay_prefix() -> (Ipv4Addr, u8) {
    let raw = std::env::var(PREFIX_ENV).unwrap_or_else(|_| DEFAULT_PREFIX.to_owned());
    parse_prefix(&raw).unwrap_or_else(|e| panic!("{PREFIX_ENV}={raw:?}: {e}"))
}

fn parse_prefix(raw: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = raw
        .split_once('/')
        .ok_or("expected an IPv4 prefix like 198.18.0.0/24")?;
    let addr: Ipv4Addr = addr.parse().map_err(|e| format!("bad address: {e}"))?;
    let len: u8 = len.parse().map_err(|e| format!("bad prefix length: {e}"))?;
    if !(8..=24).contains(&len) {
        return Err(format!("prefix length {len} must be between 8 and 24"));
    }
    let mask = u32::MAX << (32 - len);
    Ok((Ipv4Addr::from(u32::from(addr) & mask), len))
}

/// One simulated machine: a namespace with `eth0` on the underlay bridge.
pub struct Host {
    ns: Netns,
    label: String,
    addr: Ipv4Addr,
    prefix_len: u8,
    /// 1-based position in the topology; names this host's task subnet.
    index: u8,
}

/// A task ("container"): its own namespace behind a veth pair from its host.
/// Task k on host h is 198.19.h.(4k+2)/30, its host side 198.19.h.(4k+1).
pub struct Task {
    ns: Netns,
    addr: Ipv4Addr,
    host_iface: String,
}

impl Task {
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The host-side interface (where replies from this task enter the host).
    pub fn host_iface(&self) -> &str {
        &self.host_iface
    }
}

/// The /24 that holds host `index`'s tasks.
pub fn task_subnet(index: u8) -> String {
    format!("198.19.{index}.0/24")
}

impl Host {
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    /// Creates task `k` (0..63) on this host: a namespace with `eth0`
    /// 198.19.<host>.(4k+2)/30 and a default route to the host side `t<k>`.
    pub fn add_task(&self, k: u8) -> Task {
        assert!(k < 63, "task index {k} out of range");
        let ns = Netns::new();
        let (h, t) = (self.ns.name(), ns.name());
        let host_iface = format!("t{k}");
        let host_side = Ipv4Addr::new(198, 19, self.index, 4 * k + 1);
        let addr = Ipv4Addr::new(198, 19, self.index, 4 * k + 2);
        ip(&[
            "-n",
            h,
            "link",
            "add",
            &host_iface,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            t,
        ]);
        ip(&[
            "-n",
            h,
            "addr",
            "add",
            &format!("{host_side}/30"),
            "dev",
            &host_iface,
        ]);
        ip(&["-n", h, "link", "set", &host_iface, "up"]);
        ip(&["-n", t, "addr", "add", &format!("{addr}/30"), "dev", "eth0"]);
        ip(&["-n", t, "link", "set", "eth0", "up"]);
        ip(&["-n", t, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            t,
            "route",
            "add",
            "default",
            "via",
            &host_side.to_string(),
        ]);
        Task {
            ns,
            addr,
            host_iface,
        }
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// This host's pin directory: `<BPF_ROOT>/<namespace name>`.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new(BPF_ROOT).join(self.ns.name())
    }

    /// Node name for meshd: the namespace name, unique on this machine.
    pub fn node_name(&self) -> &str {
        self.ns.name()
    }

    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        self.ns.exec(program, args)
    }

    pub fn exec_ok(&self, program: &str, args: &[&str]) -> String {
        self.ns.exec_ok(program, args)
    }

    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.ns.command(program)
    }

    pub fn spawn(&self, cmd: &mut Command) -> ChildGuard {
        self.ns.spawn(cmd)
    }

    pub fn netlink(&self) -> rtnetlink::Handle {
        self.ns.netlink()
    }

    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.ns.enter(f)
    }

    pub fn run<T: Send, Fut: Future<Output = T>>(&self, f: impl FnOnce() -> Fut + Send) -> T {
        self.ns.run(f)
    }

    /// The id of the XDP program attached to `iface`, if any (read over netlink).
    pub fn xdp_prog_id(&self, iface: &str) -> Option<u32> {
        let iface = iface.to_owned();
        self.run(|| async move {
            let handle = self.netlink();
            let link = handle
                .link()
                .get()
                .match_name(iface.clone())
                .execute()
                .try_next()
                .await
                .unwrap_or_else(|e| panic!("netlink get link {iface}: {e}"))
                .unwrap_or_else(|| panic!("no link {iface}"));
            link.attributes.iter().find_map(|attr| match attr {
                LinkAttribute::Xdp(xdp) => xdp.iter().find_map(|x| match x {
                    LinkXdp::ProgId(id) if *id != 0 => Some(*id),
                    _ => None,
                }),
                _ => None,
            })
        })
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let dir = self.pin_dir();
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            eprintln!("warning: cannot remove pins {}: {e}", dir.display());
        }
    }
}

/// An underlay bridge in its own namespace plus hosts attached to it.
pub struct Topology {
    // Hosts drop before the underlay, so their veths vanish first.
    hosts: Vec<Host>,
    underlay: Netns,
    network: Ipv4Addr,
    prefix_len: u8,
}

impl Topology {
    /// Builds the underlay and `hosts` hosts labelled `host1..hostN`.
    pub fn new(hosts: usize) -> Topology {
        let (network, prefix_len) = underlay_prefix();
        let underlay = Netns::new();
        let u = underlay.name().to_owned();
        ip(&["-n", &u, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &u, "link", "set", "br0", "up"]);
        ip(&["-n", &u, "link", "set", "lo", "up"]);
        let mut topo = Topology {
            hosts: Vec::new(),
            underlay,
            network,
            prefix_len,
        };
        for i in 1..=hosts {
            topo.add_host(&format!("host{i}"));
        }
        topo
    }

    /// Adds a host (e.g. an external client) with the next free address.
    pub fn add_host(&mut self, label: &str) -> &Host {
        let index = self.hosts.len() as u32 + 1;
        let host_bits = 32 - u32::from(self.prefix_len);
        assert!(
            index < (1 << host_bits) - 1,
            "prefix /{} has no room for host {index}",
            self.prefix_len
        );
        let addr = Ipv4Addr::from(u32::from(self.network) + index);
        let ns = Netns::new();
        let u = self.underlay.name();
        let h = ns.name();
        let port = format!("p{index}");
        ip(&[
            "-n",
            u,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            UNDERLAY_IFACE,
            "netns",
            h,
        ]);
        ip(&["-n", u, "link", "set", &port, "master", "br0", "up"]);
        let cidr = format!("{addr}/{}", self.prefix_len);
        ip(&["-n", h, "addr", "add", &cidr, "dev", UNDERLAY_IFACE]);
        ip(&["-n", h, "link", "set", UNDERLAY_IFACE, "up"]);
        ip(&["-n", h, "link", "set", "lo", "up"]);
        self.hosts.push(Host {
            ns,
            label: label.to_owned(),
            addr,
            prefix_len: self.prefix_len,
            index: index as u8,
        });
        self.hosts.last().expect("just pushed")
    }

    /// Routes every host's task subnet via that host's underlay address on
    /// every other host (what the overlay will do later).
    pub fn route_tasks_via_underlay(&self) {
        for h in &self.hosts {
            for other in &self.hosts {
                if other.index != h.index {
                    let via = other.addr.to_string();
                    ip(&[
                        "-n",
                        h.ns.name(),
                        "route",
                        "add",
                        &task_subnet(other.index),
                        "via",
                        &via,
                    ]);
                }
            }
        }
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    pub fn underlay(&self) -> &Netns {
        &self.underlay
    }

    /// Every namespace name this topology owns.
    pub fn namespace_names(&self) -> Vec<String> {
        let mut names = vec![self.underlay.name().to_owned()];
        names.extend(self.hosts.iter().map(|h| h.ns.name().to_owned()));
        names
    }
}

/// A namespace set up for running the load balancer with BPF_PROG_TEST_RUN:
/// `v0` (198.18.0.1/24, the packets' "ingress" device) with a veth peer, a
/// route to the task range 198.19.0.0/16 via 198.18.0.2, and forwarding on
/// (bpf_fib_lookup refuses to route otherwise, as on a real node).
/// Returns the namespace and v0's ifindex.
pub fn lb_test_namespace() -> (Netns, u32) {
    let ns = Netns::new();
    let n = ns.name().to_owned();
    for args in [
        &["link", "add", "v0", "type", "veth", "peer", "name", "v1"][..],
        &["addr", "add", "198.18.0.1/24", "dev", "v0"],
        &["link", "set", "v0", "up"],
        &["link", "set", "v1", "up"],
        &[
            "route",
            "add",
            "198.19.0.0/16",
            "via",
            "198.18.0.2",
            "dev",
            "v0",
        ],
    ] {
        let mut full = vec!["-n", n.as_str()];
        full.extend(args);
        ip(&full);
    }
    ns.write_sysctl("net/ipv4/conf/all/forwarding", "1");
    let name = std::ffi::CString::new("v0").expect("no NUL");
    // SAFETY: valid C string; the lookup runs inside the namespace.
    let ifindex = ns.enter(|| unsafe { libc::if_nametoindex(name.as_ptr()) });
    assert_ne!(ifindex, 0, "no v0 in {n}");
    (ns, ifindex)
}

/// Names of existing namespaces starting with `prefix`.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    match std::fs::read_dir("/run/netns") {
        Ok(dir) => dir
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(prefix))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Waits until `cond` holds, polling every 20 ms; panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Namespaces, pin directories, root-namespace links and marked processes
/// whose name starts with `prefix` (`mesh-` for every test run). Empty means clean.
pub fn leftovers(prefix: &str) -> Vec<String> {
    leftovers_matching(&|name| name.starts_with(prefix))
}

/// The same check for names that `owned` accepts (e.g. one exact namespace).
pub fn leftovers_matching(owned: &dyn Fn(&str) -> bool) -> Vec<String> {
    let names_in = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| owned(n))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut found: Vec<String> = names_in("/run/netns")
        .into_iter()
        .map(|n| format!("namespace {n}"))
        .collect();
    found.extend(
        names_in(BPF_ROOT)
            .into_iter()
            .map(|n| format!("pin directory {BPF_ROOT}/{n}")),
    );
    // We never create links in the root namespace; check that none appeared.
    found.extend(
        names_in("/sys/class/net")
            .into_iter()
            .map(|n| format!("root-namespace link {n}")),
    );
    found.extend(
        marked_processes(owned)
            .into_iter()
            .map(|p| format!("process {p}")),
    );
    found
}

/// PIDs of live processes whose child mark names a namespace `owned` accepts.
pub fn marked_processes(owned: &dyn Fn(&str) -> bool) -> Vec<u32> {
    let key = format!("{CHILD_MARK_ENV}=");
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc_dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|b| *b == 0).any(|kv| {
                    kv.strip_prefix(key.as_bytes())
                        .is_some_and(|v| owned(&String::from_utf8_lossy(v)))
                })
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_parsed_and_masked() {
        assert_eq!(
            parse_prefix("198.18.0.0/24"),
            Ok((Ipv4Addr::new(198, 18, 0, 0), 24))
        );
        assert_eq!(
            parse_prefix("10.9.8.7/16"),
            Ok((Ipv4Addr::new(10, 9, 0, 0), 16))
        );
        assert!(parse_prefix("10.0.0.0").is_err());
        assert!(parse_prefix("10.0.0.0/30").is_err());
        assert!(parse_prefix("nonsense/24").is_err());
    }
}
