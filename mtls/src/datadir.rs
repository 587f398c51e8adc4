//! A node's data dir as the node and its clients read it: `node.json` (who
//! the node is, where it listens, the managers it last knew) and `certs/`.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// The name of the node file in the data dir.
pub const NODE_FILE: &str = "node.json";

/// Why `node.json` could not be read or written; says which file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NodeFileError(String);

/// Who this node is; `node.json` in the data dir.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeFile {
    pub node_id: String,
    pub cluster_id: String,
    pub hostname: String,
    pub addr: Ipv4Addr,
    pub listen_addr: SocketAddr,
    /// Where other nodes reach this node's gRPC server.
    pub api_addr: String,
    /// Last known managers' API addresses.
    pub managers: Vec<String>,
}

impl NodeFile {
    pub fn load(dir: &Path) -> Result<NodeFile, NodeFileError> {
        let path = dir.join(NODE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            NodeFileError(format!(
                "{}: {e} (is this node part of a cluster? start one with `meshd init` or join with `meshd join`)",
                path.display()
            ))
        })?;
        serde_json::from_str(&text).map_err(|e| NodeFileError(format!("{}: {e}", path.display())))
    }

    /// Writes it atomically (written last by init and join: its presence
    /// means "part of a cluster").
    pub fn save(&self, dir: &Path) -> Result<(), NodeFileError> {
        let path = dir.join(NODE_FILE);
        let tmp = dir.join(".node.json.tmp");
        let text = serde_json::to_string_pretty(self).expect("serializable");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| NodeFileError(format!("{}: {e}", path.display())))
    }
}

/// Where a node's credentials are (`ca.crt`, `node.crt`, `node.key`).
pub fn certs_dir(dir: &Path) -> PathBuf {
    dir.join("certs")
}
