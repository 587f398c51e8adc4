//! Where mesh pins its maps.
//!
//! We mount our own bpffs at [`DEFAULT_ROOT`] instead of using `/sys/fs/bpf`:
//! `ip netns exec` remounts `/sys` for the command it runs, which hides
//! `/sys/fs/bpf`, and on this host `/sys/fs/bpf` is not mounted at all.
//! Each node gets its own directory below the root, so several nodes (test
//! hosts in namespaces) on one machine never share a map.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

/// The bpffs mount mesh uses unless told otherwise.
pub const DEFAULT_ROOT: &str = "/run/mesh/bpf";

/// Magic number of bpffs in `statfs.f_type`.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("cannot create bpffs mount point {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount bpffs at {path} (meshd needs root)")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create node pin directory {path}")]
    NodeDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("node name {0:?} must be 1-64 characters of [A-Za-z0-9_.-]")]
    BadNodeName(String),
}

/// True when `path` is the root of a mounted bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we pass; the path is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Mounts bpffs at `root` unless one is already there. Idempotent.
pub fn ensure_mounted(root: &Path) -> Result<(), BpffsError> {
    if is_bpffs(root) {
        return Ok(());
    }
    fs::create_dir_all(root).map_err(|source| BpffsError::CreateDir {
        path: root.to_owned(),
        source,
    })?;
    let target = CString::new(root.as_os_str().as_bytes()).map_err(|_| BpffsError::Mount {
        path: root.to_owned(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: all arguments are valid NUL-terminated strings; data may be NULL.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(BpffsError::Mount {
            path: root.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Checks a node name is safe to use as a directory name.
pub fn validate_node_name(node: &str) -> Result<(), BpffsError> {
    let ok = !node.is_empty()
        && node.len() <= 64
        && node != "."
        && node != ".."
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(BpffsError::BadNodeName(node.to_owned()))
    }
}

/// The pin directory of one node: `<root>/<node>`.
pub fn node_dir(root: &Path, node: &str) -> Result<PathBuf, BpffsError> {
    validate_node_name(node)?;
    Ok(root.join(node))
}

/// Mounts the root if needed and creates the node's pin directory.
pub fn prepare_node_dir(root: &Path, node: &str) -> Result<PathBuf, BpffsError> {
    let dir = node_dir(root, node)?;
    ensure_mounted(root)?;
    fs::create_dir_all(&dir).map_err(|source| BpffsError::NodeDir {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_that_could_escape_the_root_are_refused() {
        for bad in ["", ".", "..", "a/b", "../etc", "x y", &"n".repeat(65)] {
            assert!(validate_node_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["node-1", "mesh-123-4", "host_a.example"] {
            assert!(validate_node_name(good).is_ok(), "{good:?} refused");
        }
        assert_eq!(
            node_dir(Path::new("/run/mesh/bpf"), "n1").unwrap(),
            PathBuf::from("/run/mesh/bpf/n1")
        );
    }

    #[test]
    fn a_plain_directory_is_not_bpffs() {
        assert!(!is_bpffs(&std::env::temp_dir()));
        assert!(!is_bpffs(Path::new("/nonexistent/mesh")));
    }
}
