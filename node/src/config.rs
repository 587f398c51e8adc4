//! The `--config` file: a node's static data-plane settings (conntrack
//! timeouts, endpoint interfaces) and, for a node without a control plane,
//! its load balancer and overlay. Read and checked whole before anything
//! is touched: a bad file changes nothing.

use std::path::{Path, PathBuf};

use dataplane::{
    ebpf::{Datapath, LoadError},
    ipvs::IpvsSync,
    lb::{LbSpec, LbSync, SpecError, SyncError, Timeouts},
    overlay::{OverlayError, OverlaySpec},
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Host-side interfaces of local task endpoints: replies from local
    /// backends enter here and must be reverse-NATed.
    #[serde(default)]
    pub endpoint_interfaces: Vec<String>,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Frontends and backends; without it the load-balancer maps are left
    /// as they are.
    #[serde(default)]
    pub lb: Option<LbSpec>,
    /// Overlay networks and their endpoints (an empty table removes them).
    #[serde(default)]
    pub overlay: OverlaySpec,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid meshd config: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: invalid load-balancer spec: {source}")]
    Lb {
        path: PathBuf,
        #[source]
        source: SpecError,
    },
    #[error("{path}: invalid overlay spec: {source}")]
    Overlay {
        path: PathBuf,
        #[source]
        source: OverlayError,
    },
    #[error(
        "{path}: this node runs the control plane, so its overlay and load balancer come from the cluster's tables; remove the \"lb\" and \"overlay\" sections (keep \"timeouts\" and \"endpoint_interfaces\")"
    )]
    FightsTables { path: PathBuf },
    #[error("attaching the load balancer to endpoint interface {iface}: {source}")]
    Attach {
        iface: String,
        #[source]
        source: LoadError,
    },
    #[error("applying the load-balancer state: {0}")]
    Apply(#[source] SyncError),
}

impl NodeConfig {
    /// Reads and checks `path`.
    pub fn read(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: NodeConfig =
            serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
        if let Some(lb) = &config.lb {
            lb.validate().map_err(|source| ConfigError::Lb {
                path: path.to_owned(),
                source,
            })?;
        }
        config
            .overlay
            .validate()
            .map_err(|source| ConfigError::Overlay {
                path: path.to_owned(),
                source,
            })?;
        Ok(config)
    }

    /// With a control plane (`tables`), the overlay and the load balancer
    /// come from the cluster's tables: a config that also gives them would
    /// fight the tables.
    pub fn check_with_tables(&self, tables: bool, path: &Path) -> Result<(), ConfigError> {
        if tables && (self.lb.is_some() || !self.overlay.networks.is_empty()) {
            return Err(ConfigError::FightsTables {
                path: path.to_owned(),
            });
        }
        Ok(())
    }

    /// Attaches the load balancer to the endpoint interfaces and applies
    /// the static load-balancer spec, if any.
    pub(crate) fn apply(
        &self,
        datapath: &mut Datapath,
        sync: &mut LbSync,
        ipvs: &mut Option<IpvsSync>,
        pin_dir: &Path,
    ) -> Result<(), ConfigError> {
        for iface in &self.endpoint_interfaces {
            datapath
                .attach_lb(iface, Some(&crate::attach::link_pin(pin_dir, "tc", iface)))
                .map_err(|source| ConfigError::Attach {
                    iface: iface.clone(),
                    source,
                })?;
        }
        if let Some(lb) = &self.lb {
            let report = crate::attach::lb_target(datapath, sync, ipvs)
                .apply(lb)
                .map_err(ConfigError::Apply)?;
            tracing::info!(
                ?report,
                writes = report.total(),
                "load-balancer state applied"
            );
        }
        Ok(())
    }
}
