//! Unlocking an autolocked manager: the key given, or waited for on the
//! unlock socket (`meshd unlock` sends it).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::error::{DaemonError, msg};
use crate::raft::seal::{DataKeys, SealError, UnlockKey};

/// How a locked data dir gets its unlock key.
pub enum Unlock {
    /// Given on the command line / stdin.
    Key(UnlockKey),
    /// Wait for `meshd unlock` on `<data-dir>/unlock.sock`.
    Wait,
}

/// The unlock socket: in its own 0700 directory, so that no other user
/// can reach it at any moment (a socket's own mode is set only after
/// `bind`, and the process-wide umask can't be changed safely while other
/// threads create files).
pub fn unlock_socket(dir: &Path) -> PathBuf {
    dir.join("unlock").join("unlock.sock")
}

pub(super) async fn open_keys(dir: &Path, unlock: Unlock) -> Result<DataKeys, DaemonError> {
    match unlock {
        Unlock::Key(k) => Ok(DataKeys::load(dir, Some(&k))?),
        Unlock::Wait => match DataKeys::load(dir, None) {
            Err(SealError::Locked) => wait_for_unlock(dir).await,
            other => Ok(other?),
        },
    }
}

/// How long an unlock client may take to send its key line, and its most.
const UNLOCK_READ_TIMEOUT: Duration = Duration::from_secs(10);
const UNLOCK_LINE_MAX: u64 = 1024;

/// Serves the unlock socket until a client sends the right key. Clients
/// are served concurrently, each with a read timeout and a bounded line:
/// one that connects and says nothing holds up no one.
async fn wait_for_unlock(dir: &Path) -> Result<DataKeys, DaemonError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let path = unlock_socket(dir);
    let parent = path
        .parent()
        .expect("the socket has a directory")
        .to_owned();
    let _ = std::fs::remove_dir_all(&parent);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&parent)
        .map_err(|e| msg(format!("{}: {e}", parent.display())))?;
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(|e| msg(format!("{}: {e}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| msg(format!("{}: {e}", path.display())))?;
    tracing::warn!(
        "this manager is locked (autolock): run `meshd unlock --data-dir {}` with the unlock key",
        dir.display()
    );
    let (found, mut unlocked) = tokio::sync::mpsc::channel::<DataKeys>(1);
    loop {
        tokio::select! {
            Some(keys) = unlocked.recv() => {
                let _ = std::fs::remove_dir_all(&parent);
                return Ok(keys);
            }
            accepted = listener.accept() => {
                let (stream, _) = accepted.map_err(|e| msg(format!("{}: {e}", path.display())))?;
                tokio::spawn(serve_unlock(stream, dir.to_owned(), found.clone()));
            }
        }
    }
}

/// One unlock client: a key line in, "ok" or "error: ..." out.
async fn serve_unlock(
    stream: tokio::net::UnixStream,
    dir: PathBuf,
    found: tokio::sync::mpsc::Sender<DataKeys>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r.take(UNLOCK_LINE_MAX));
    let read = reader.read_line(&mut line);
    let answer = match tokio::time::timeout(UNLOCK_READ_TIMEOUT, read).await {
        Err(_) => Err(format!(
            "no key line within {} s",
            UNLOCK_READ_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(_)) => line
            .trim()
            .parse::<UnlockKey>()
            .and_then(|k| DataKeys::load(&dir, Some(&k)))
            .map_err(|e| e.to_string()),
    };
    match answer {
        Ok(keys) => {
            let _ = w.write_all(b"ok\n").await;
            let _ = found.send(keys).await;
        }
        Err(e) => {
            let _ = w.write_all(format!("error: {e}\n").as_bytes()).await;
        }
    }
}

/// Sends an unlock key to a waiting `meshd run` (`meshd unlock`).
pub async fn send_unlock(dir: &Path, key: &str) -> Result<(), DaemonError> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let path = unlock_socket(dir);
    let stream = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
        msg(format!(
            "{}: {e} (is meshd running and waiting to be unlocked?)",
            path.display()
        ))
    })?;
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{}\n", key.trim()).as_bytes())
        .await
        .map_err(|e| msg(e.to_string()))?;
    let mut line = String::new();
    BufReader::new(r)
        .read_line(&mut line)
        .await
        .map_err(|e| msg(e.to_string()))?;
    match line.trim() {
        "ok" => Ok(()),
        other => Err(msg(other.trim_start_matches("error: ").to_owned())),
    }
}
