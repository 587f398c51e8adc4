//! [`Netlink`]: an rtnetlink handle bound to the namespace its socket was
//! opened in, counting the changes it makes; [`NetlinkError`]: a failed
//! call, naming the operation, the object and the namespace.

use std::{
    fmt,
    fs::File,
    io,
    os::fd::AsRawFd,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use rtnetlink::Handle;

/// A failed netlink operation: what was attempted, on what, in which namespace.
#[derive(Debug, thiserror::Error)]
#[error("{op} {object} (netns {ns}): {source}")]
pub struct NetlinkError {
    pub op: &'static str,
    pub object: String,
    pub ns: String,
    #[source]
    pub source: io::Error,
}

impl NetlinkError {
    /// The errno, when the kernel sent one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    /// The object does not exist (ENODEV, ENOENT, ESRCH).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENODEV | libc::ENOENT | libc::ESRCH)
        )
    }
}

pub type Result<T, E = NetlinkError> = std::result::Result<T, E>;

fn to_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

/// An rtnetlink handle bound to one network namespace, counting the changes
/// it makes.
#[derive(Clone)]
pub struct Netlink {
    pub(super) handle: Handle,
    pub(super) ns: Arc<str>,
    pub(super) changes: Arc<AtomicU64>,
}

impl fmt::Debug for Netlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netlink").field("ns", &self.ns).finish()
    }
}

/// Runs `f` on a short-lived thread inside the network namespace at
/// `path` (setns() changes only the calling thread). Sockets `f` opens stay
/// in that namespace.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let context = |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    let ns = File::open(path).map_err(|e| context("open namespace", e))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: an open namespace file; CLONE_NEWNET only affects this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(context("enter namespace", io::Error::last_os_error()));
            }
            f()
        })
        .join()
        .map_err(|_| io::Error::other("thread panicked"))?
    })
}

impl Netlink {
    /// A handle in the caller's namespace. Needs a tokio runtime, which drives
    /// the connection.
    pub fn current() -> Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| NetlinkError {
            op: "open netlink socket",
            object: String::new(),
            ns: "current".into(),
            source,
        })?;
        tokio::spawn(conn);
        Ok(Netlink {
            handle,
            ns: "current".into(),
            changes: Arc::default(),
        })
    }

    /// A handle whose socket is opened inside the namespace at `path`
    /// (`/run/netns/NAME`, `/proc/PID/ns/net`), usable from anywhere.
    pub fn open(path: &Path) -> Result<Netlink> {
        Self::open_in(path, Arc::default())
    }

    /// Like [`open`](Self::open), counting into this handle's change counter:
    /// for a reconciler that works in several namespaces.
    pub fn enter(&self, path: &Path) -> Result<Netlink> {
        Self::open_in(path, self.changes.clone())
    }

    fn open_in(path: &Path, changes: Arc<AtomicU64>) -> Result<Netlink> {
        let label: Arc<str> = path.display().to_string().into();
        let err = |op, source| NetlinkError {
            op,
            object: String::new(),
            ns: label.to_string(),
            source,
        };
        let rt = tokio::runtime::Handle::current();
        // The socket stays bound to the namespace it was opened in.
        let (conn, handle) = in_netns(path, || {
            let _rt = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection()?;
            Ok((conn, handle))
        })
        .map_err(|e| err("open netlink socket", e))?;
        rt.spawn(conn);
        Ok(Netlink {
            handle,
            ns: label,
            changes,
        })
    }

    /// The namespace this handle works in, for messages.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// How many changes (adds, sets, deletes) went through this handle and
    /// the ones [`enter`](Self::enter)ed from it.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    pub(super) fn fail(
        &self,
        op: &'static str,
        object: impl fmt::Display,
    ) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
        let ns = self.ns.to_string();
        let object = object.to_string();
        move |e| NetlinkError {
            op,
            object,
            ns,
            source: to_io(e),
        }
    }

    /// Runs one mutating request, counting it (and logging it at debug) if
    /// the kernel accepted it.
    pub(super) async fn change(
        &self,
        op: &'static str,
        object: impl fmt::Display,
        request: impl Future<Output = Result<(), rtnetlink::Error>>,
    ) -> Result<()> {
        let object = object.to_string();
        match request.await {
            Ok(()) => {
                self.changes.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(ns = %self.ns, op, %object, "netlink change");
                Ok(())
            }
            Err(e) => Err(NetlinkError {
                op,
                object,
                ns: self.ns.to_string(),
                source: to_io(e),
            }),
        }
    }
}
