//! The stop signal every long-running task of a daemon watches.

use tokio::sync::watch;

/// Resolves once `stop` is set (the daemon is stopping).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
