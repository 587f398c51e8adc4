//! Tasks as real processes: the built-in executor.
//!
//! A task is a process (its "container") in
//! - a fresh network namespace, bound at `/run/netns/<prefix><task id>` so
//!   the overlay can wire it and the embedded DNS can serve in it, with
//!   `lo` up (127.0.0.11 lives there);
//! - its own mount namespace, where `/etc/resolv.conf` is a file naming
//!   127.0.0.11 (the host's file is untouched);
//! - its own cgroup (cgroup v2, `<mount>/mesh/<task id>`), so that stopping
//!   it ends every process it started;
//! - its own session, with stdout and stderr captured to one log file for
//!   `meshctl service logs`.
//!
//! The exit status is reported as Docker does: the exit code, or 128 plus
//! the signal that ended it ("task: non-zero exit (137)" after SIGKILL).
//!
//! [`Executor`] is the trait other runtimes implement; [`ProcessExecutor`]
//! is this one.

use std::{
    ffi::CString,
    fs::{self, File, OpenOptions},
    future::Future,
    io::{self, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::{ffi::OsStrExt as _, process::ExitStatusExt as _},
    },
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

/// What a node runs for a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRun {
    pub id: String,
    /// `svc.slot` (replicated) or `svc.node` (global): the process's
    /// HOSTNAME variable.
    pub name: String,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// `KEY=value` pairs, added to a minimal environment.
    pub env: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("task {task}: {what}: {source}")]
    Io {
        task: String,
        what: String,
        source: io::Error,
    },
    #[error("task {task}: {message}")]
    Invalid { task: String, message: String },
}

impl ExecError {
    fn io(task: &str, what: &str) -> impl FnOnce(io::Error) -> ExecError + use<> {
        let (task, what) = (task.to_owned(), what.to_owned());
        move |source| ExecError::Io { task, what, source }
    }
}

/// A runtime for tasks. Other runtimes (a container engine) implement the
/// same calls.
pub trait Executor {
    type Task: RunningTask;
    /// A task whose namespace exists and whose process has not started.
    type Prepared: Prepared;
    /// Creates `task`'s namespace (and files), so that its networks can be
    /// attached before anything runs in it, as Swarm attaches a
    /// container's networks before it starts.
    fn prepare(
        &self,
        task: &TaskRun,
    ) -> impl Future<Output = Result<Self::Prepared, ExecError>> + Send;
    /// Starts a prepared task; returns once its process runs. On failure,
    /// nothing of the task is left.
    fn launch(
        &self,
        prepared: Self::Prepared,
    ) -> impl Future<Output = Result<Self::Task, ExecError>> + Send;
    /// Task `id` as an earlier run of this executor left it running (a
    /// restarted meshd takes its tasks over), or None.
    fn adopt(&self, _id: &str) -> Option<Self::Task> {
        None
    }
    /// Ends whatever an earlier run left behind apart from `keep`.
    fn reap_others(&self, _keep: &std::collections::HashSet<String>) -> usize {
        0
    }
}

/// A prepared task.
pub trait Prepared: Send {
    fn netns(&self) -> &Path;
    /// Gives up a task that will not start: what prepare made is removed.
    fn discard(self) -> impl Future<Output = ()> + Send;
}

/// A started task.
pub trait RunningTask: Send {
    /// Its network namespace, for the overlay and the DNS server.
    fn netns(&self) -> &Path;
    /// Waits for it to end; its exit code (128 + signal when a signal
    /// ended it).
    fn wait(&mut self) -> impl Future<Output = io::Result<i32>> + Send;
    /// SIGTERM to its processes, SIGKILL to what is left after `grace`;
    /// its exit code.
    fn stop(&mut self, grace: Duration) -> impl Future<Output = io::Result<i32>> + Send;
    /// Frees what it held (namespace, cgroup) once it has ended; its log
    /// stays until the task record goes.
    fn remove(self) -> impl Future<Output = io::Result<()>> + Send;
    /// Whether it was adopted from an earlier run: its exit status can't
    /// be read then (this process is not its parent), and `wait` gives
    /// [`EXIT_UNKNOWN`] for a task that ended by itself.
    fn adopted(&self) -> bool {
        false
    }
}

/// The exit code reported for an adopted task that ended by itself, as
/// Docker reports a container whose status was lost.
pub const EXIT_UNKNOWN: i32 = 255;

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|l| {
        // ... mount-point ... - fstype source options
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The built-in executor: processes in namespaces.
#[derive(Debug, Clone)]
pub struct ProcessExecutor {
    /// Per-task directories: the resolv.conf and the log.
    dir: PathBuf,
    /// Namespace names are this plus the task id.
    netns_prefix: String,
    /// `<cgroup2>/<group>`: one child cgroup per task.
    cgroups: PathBuf,
}

impl ProcessExecutor {
    /// `dir` keeps each task's files; `netns_prefix` names its namespaces
    /// and `group` its cgroups (`mesh` for meshd; tests pass their own).
    pub fn new(dir: &Path, netns_prefix: &str, group: &str) -> io::Result<ProcessExecutor> {
        let root = cgroup2_mount().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no cgroup v2 mount in /proc/self/mountinfo: tasks need cgroup2 \
                 (mount -t cgroup2 none /sys/fs/cgroup)",
            )
        })?;
        let cgroups = root.join(group);
        fs::create_dir_all(&cgroups)?;
        fs::create_dir_all(dir)?;
        fs::create_dir_all("/run/netns")?;
        Ok(ProcessExecutor {
            dir: dir.to_owned(),
            netns_prefix: netns_prefix.to_owned(),
            cgroups,
        })
    }

    /// Ends what an earlier run of this executor left behind (a meshd that
    /// was killed leaves its tasks running): every process in its cgroups
    /// is killed, and those cgroups and its namespaces are removed. Logs
    /// stay. Returns how many tasks it found.
    pub fn reap(&self) -> usize {
        self.reap_except(&std::collections::HashSet::new())
    }

    /// [`ProcessExecutor::reap`], sparing the tasks in `keep` (adopted).
    pub fn reap_except(&self, keep: &std::collections::HashSet<String>) -> usize {
        let mut found = 0;
        if let Ok(dir) = fs::read_dir(&self.cgroups) {
            for e in dir.flatten().filter(|e| e.path().is_dir()) {
                if keep.contains(e.file_name().to_string_lossy().as_ref()) {
                    continue;
                }
                found += 1;
                let _ = fs::write(e.path().join("cgroup.kill"), "1");
                for _ in 0..100 {
                    if fs::remove_dir(e.path()).is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        if let Ok(dir) = fs::read_dir("/run/netns") {
            for e in dir.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                // Only names this executor makes: prefix + a task id
                // (cluster task ids are letters and digits).
                let ours = name.strip_prefix(&self.netns_prefix).is_some_and(|id| {
                    !id.is_empty()
                        && id.bytes().all(|b| b.is_ascii_alphanumeric())
                        && !keep.contains(id)
                });
                if ours {
                    let _ = remove_netns(&e.path());
                }
            }
        }
        found
    }

    /// Where a running task's main process is recorded: "<pid> <start
    /// time>" (the start time, in clock ticks since boot, tells a reused
    /// pid apart).
    fn pid_record(&self, task: &str) -> PathBuf {
        self.dir.join(task).join("pid")
    }

    /// The task as an earlier run left it: its main process still alive
    /// (same pid and start time), in its cgroup, with its namespace.
    fn find_adoptable(&self, id: &str) -> Option<ProcessTask> {
        check_id(id).ok()?;
        let record = fs::read_to_string(self.pid_record(id)).ok()?;
        let (pid, start) = record.trim().split_once(' ')?;
        let pid: i32 = pid.parse().ok()?;
        // The pidfd first, then the checks: the fd pins the process the pid
        // named, so a pid reused after the checks can't pass for the task.
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh fd we own.
        let fd =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        if start_time(pid)? != start.parse::<u64>().ok()? {
            return None;
        }
        let cgroup = self.cgroup_path(id);
        let in_cgroup = fs::read_to_string(cgroup.join("cgroup.procs"))
            .ok()?
            .lines()
            .any(|l| l.trim() == pid.to_string());
        let netns = self.netns_path(id);
        if !in_cgroup || !netns.exists() {
            return None;
        }
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open (and the
        // same fd) until the AsyncFd is dropped. Called on a runtime (the
        // runner's), whose reactor it registers with.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .ok()?;
        Some(ProcessTask {
            id: id.to_owned(),
            netns,
            cgroup,
            child: None,
            adopted: Some(Adopted { pid, fd }),
            exit: None,
        })
    }

    /// The task's log: stdout and stderr, in the order written.
    pub fn log_path(&self, task: &str) -> PathBuf {
        self.dir.join(task).join("output.log")
    }

    pub fn netns_path(&self, task: &str) -> PathBuf {
        Path::new("/run/netns").join(format!("{}{task}", self.netns_prefix))
    }

    pub fn cgroup_path(&self, task: &str) -> PathBuf {
        self.cgroups.join(task)
    }
}

/// A task id becomes a file, namespace and cgroup name: no separators.
fn check_id(id: &str) -> Result<(), ExecError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ExecError::Invalid {
            task: id.to_owned(),
            message: "a task id is 1 to 64 letters, digits, '-' or '_'".into(),
        })
    }
}

/// Creates a network namespace bound at `path` with `lo` up, as
/// `ip netns add` does, from a short-lived thread.
fn create_netns(path: &Path) -> io::Result<()> {
    File::create(path)?;
    let target = CString::new(path.as_os_str().as_bytes())?;
    let made = std::thread::scope(|s| {
        s.spawn(|| -> io::Result<()> {
            // SAFETY: unshare affects this thread only (CLONE_NEWNET).
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let src = c"/proc/thread-self/ns/net";
            // SAFETY: valid C strings; a bind mount of this thread's namespace.
            let r = unsafe {
                libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            set_lo_up()
        })
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?
    });
    if made.is_err() {
        let _ = remove_netns(path);
    }
    made
}

/// `ip link set lo up` in the calling thread's namespace.
fn set_lo_up() -> io::Result<()> {
    // SAFETY: a plain socket for the interface ioctls, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: fd is open; req names an interface and has room for flags.
    let r = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) != 0 {
            -1
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req)
        }
    };
    let err = io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    if r != 0 { Err(err) } else { Ok(()) }
}

fn remove_netns(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a valid C string; a lazy unmount of the bind mount.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Docker's reading of an exit status.
/// A process's start time in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`), or None if it is gone or a zombie.
fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count after its ')'.
    let (_, rest) = stat.rsplit_once(") ")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

impl Executor for ProcessExecutor {
    type Task = ProcessTask;
    type Prepared = PreparedTask;

    fn adopt(&self, id: &str) -> Option<ProcessTask> {
        self.find_adoptable(id)
    }

    fn reap_others(&self, keep: &std::collections::HashSet<String>) -> usize {
        self.reap_except(keep)
    }

    async fn prepare(&self, task: &TaskRun) -> Result<PreparedTask, ExecError> {
        check_id(&task.id)?;
        if task.command.first().is_none_or(String::is_empty) {
            return Err(ExecError::Invalid {
                task: task.id.clone(),
                message: "no command to run".into(),
            });
        }
        let io_err = |what: &str| ExecError::io(&task.id, what);
        let dir = self.dir.join(&task.id);
        fs::create_dir_all(&dir).map_err(io_err("create the task directory"))?;
        let resolv = dir.join("resolv.conf");
        fs::write(&resolv, "nameserver 127.0.0.11\noptions ndots:0\n")
            .map_err(io_err("write resolv.conf"))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(&task.id))
            .map_err(io_err("open the log"))?;
        let netns = self.netns_path(&task.id);
        if netns.exists() {
            return Err(ExecError::Invalid {
                task: task.id.clone(),
                message: format!("{} exists: is the task running already?", netns.display()),
            });
        }
        create_netns(&netns).map_err(io_err("create the network namespace"))?;
        Ok(PreparedTask {
            run: task.clone(),
            made: ProcessTask {
                id: task.id.clone(),
                netns,
                cgroup: self.cgroup_path(&task.id),
                child: None,
                adopted: None,
                exit: None,
            },
            resolv,
            log,
        })
    }

    async fn launch(&self, p: PreparedTask) -> Result<ProcessTask, ExecError> {
        let PreparedTask {
            run,
            mut made,
            resolv,
            log,
        } = p;
        match self.spawn(&run, &made, &resolv, log).await {
            Ok(child) => {
                // So that a restarted meshd can take the task over.
                if let Some(pid) = child.id()
                    && let Some(start) = start_time(pid as i32)
                    && let Err(e) = fs::write(self.pid_record(&run.id), format!("{pid} {start}\n"))
                {
                    tracing::warn!(task = %run.id, "recording its pid (it can't be adopted): {e}");
                }
                made.child = Some(child);
                Ok(made)
            }
            Err(e) => {
                let _ = made.remove().await;
                Err(e)
            }
        }
    }
}

impl ProcessExecutor {
    /// Prepares and launches `task` at once.
    pub async fn start(&self, task: &TaskRun) -> Result<ProcessTask, ExecError> {
        let p = self.prepare(task).await?;
        self.launch(p).await
    }
}

/// A task of the [`ProcessExecutor`] with its namespace made and its
/// process not started.
#[derive(Debug)]
pub struct PreparedTask {
    run: TaskRun,
    made: ProcessTask,
    resolv: PathBuf,
    log: File,
}

impl Prepared for PreparedTask {
    fn netns(&self) -> &Path {
        &self.made.netns
    }

    async fn discard(self) {
        let _ = self.made.remove().await;
    }
}

impl ProcessExecutor {
    async fn spawn(
        &self,
        task: &TaskRun,
        made: &ProcessTask,
        resolv: &Path,
        log: File,
    ) -> Result<tokio::process::Child, ExecError> {
        let io_err = |what: &str| ExecError::io(&task.id, what);
        fs::create_dir_all(&made.cgroup).map_err(io_err("create the cgroup"))?;
        let procs = OpenOptions::new()
            .write(true)
            .open(made.cgroup.join("cgroup.procs"))
            .map_err(io_err("open cgroup.procs"))?;
        let ns = File::open(&made.netns).map_err(io_err("open the network namespace"))?;
        let resolv = CString::new(resolv.as_os_str().as_bytes())
            .map_err(|e| io_err("resolv.conf path")(io::Error::other(e)))?;
        let mut cmd = tokio::process::Command::new(&task.command[0]);
        cmd.args(&task.command[1..])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOSTNAME", &task.name)
            .envs(task.env.iter().filter_map(|e| e.split_once('=')))
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("duplicate the log"))?)
            .stderr(log)
            .kill_on_drop(false);
        let (procs_fd, ns_fd) = (procs.as_raw_fd(), ns.as_raw_fd());
        // SAFETY: only async-signal-safe calls on data prepared above.
        unsafe {
            cmd.pre_exec(move || {
                let fail = || Err(io::Error::last_os_error());
                // Into the task's cgroup first: everything it starts follows.
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return fail();
                }
                if libc::setsid() < 0 || libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return fail();
                }
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return fail();
                }
                // Nothing mounted here propagates back to the host.
                let none = std::ptr::null();
                if libc::mount(
                    none,
                    c"/".as_ptr(),
                    none,
                    libc::MS_REC | libc::MS_PRIVATE,
                    none.cast(),
                ) != 0
                {
                    return fail();
                }
                if libc::mount(
                    resolv.as_ptr(),
                    c"/etc/resolv.conf".as_ptr(),
                    none,
                    libc::MS_BIND,
                    none.cast(),
                ) != 0
                {
                    return fail();
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(io_err(&format!("start {:?}", task.command[0])))?;
        drop((procs, ns));
        Ok(child)
    }
}

/// A task the [`ProcessExecutor`] started.
#[derive(Debug)]
pub struct ProcessTask {
    id: String,
    netns: PathBuf,
    cgroup: PathBuf,
    child: Option<tokio::process::Child>,
    /// Set for a task an earlier run started: its main process, watched
    /// through a pidfd.
    adopted: Option<Adopted>,
    exit: Option<i32>,
}

#[derive(Debug)]
struct Adopted {
    pid: i32,
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl ProcessTask {
    pub fn pid(&self) -> Option<u32> {
        match &self.adopted {
            Some(a) => u32::try_from(a.pid).ok(),
            None => self.child.as_ref().and_then(tokio::process::Child::id),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Every process in the task's cgroup.
    pub fn pids(&self) -> io::Result<Vec<i32>> {
        Ok(fs::read_to_string(self.cgroup.join("cgroup.procs"))?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    /// Signals every process of the task (its cgroup, not only its
    /// session: a process may leave the session, not the cgroup).
    fn signal_all(&self, sig: libc::c_int) -> io::Result<()> {
        if sig == libc::SIGKILL
            && let Ok(mut f) = OpenOptions::new()
                .write(true)
                .open(self.cgroup.join("cgroup.kill"))
            && f.write_all(b"1").is_ok()
        {
            return Ok(());
        }
        for pid in self.pids()? {
            // SAFETY: signalling a pid read from the task's own cgroup.
            unsafe { libc::kill(pid, sig) };
        }
        Ok(())
    }
}

impl RunningTask for ProcessTask {
    fn netns(&self) -> &Path {
        &self.netns
    }

    fn adopted(&self) -> bool {
        self.adopted.is_some()
    }

    async fn wait(&mut self) -> io::Result<i32> {
        if let Some(code) = self.exit {
            return Ok(code);
        }
        if let Some(a) = &self.adopted {
            // A pidfd reads ready once the process has ended.
            let _ = a.fd.readable().await?;
            self.exit = Some(EXIT_UNKNOWN);
            return Ok(EXIT_UNKNOWN);
        }
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| io::Error::other("not started"))?;
        let code = exit_code(child.wait().await?);
        self.exit = Some(code);
        Ok(code)
    }

    async fn stop(&mut self, grace: Duration) -> io::Result<i32> {
        if let Some(code) = self.exit {
            return Ok(code);
        }
        self.signal_all(libc::SIGTERM)?;
        match tokio::time::timeout(grace, self.wait()).await {
            Ok(r) => r,
            Err(_) => {
                self.signal_all(libc::SIGKILL)?;
                self.wait().await
            }
        }
    }

    async fn remove(self) -> io::Result<()> {
        // Children the main process left behind end with it.
        let _ = self.signal_all(libc::SIGKILL);
        // The cgroup can go once the kernel has reaped its last process.
        let mut last = Ok(());
        for _ in 0..100 {
            match fs::remove_dir(&self.cgroup) {
                Ok(()) => {
                    last = Ok(());
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    last = Ok(());
                    break;
                }
                Err(e) => last = Err(e),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        remove_netns(&self.netns)?;
        last
    }
}
