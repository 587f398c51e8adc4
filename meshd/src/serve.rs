//! `meshd init|join|run`: starts the control plane and the node's data
//! plane, wires the agent, the node and the task runner together, and
//! serves until a signal or the cluster's removal of this node.

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, Result, bail};
use control::daemon::{self, Addresses, InitReport};
use dataplane::dns::Dns;
use node::{
    Dataplane, Node,
    config::NodeConfig,
    executor::ProcessExecutor,
    runner::{self, StopTiming},
};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::{DataplaneArgs, Start};

fn print_init(report: &InitReport, at: &Addresses) {
    println!(
        "Swarm initialized: current node ({}) is now a manager.\n",
        report.node_id
    );
    println!("To add a worker to this swarm, run the following command:\n");
    println!(
        "    meshd join --token {} {}\n",
        report.worker_token, at.api_addr
    );
    println!("To add a manager to this swarm, run the following command:\n");
    println!(
        "    meshd join --token {} {}\n",
        report.manager_token, at.api_addr
    );
    if let Some(key) = &report.unlock_key {
        println!(
            "To unlock a swarm manager after it restarts, run `meshd unlock` and provide the following key:\n\n    {key}\n"
        );
        println!(
            "Please remember to store this key in a password manager, since without it you will not be able to restart the manager."
        );
    }
}

async fn start_control(
    start: Start,
    config: &control::raft::manager::ManagerConfig,
) -> Result<Option<daemon::Daemon>> {
    Ok(match start {
        Start::None => None,
        Start::Init { dir, at, opts } => {
            let (d, report) = daemon::init_with(&dir, &at, &opts, config).await?;
            print_init(&report, &at);
            Some(d)
        }
        Start::Join {
            dir,
            at,
            token,
            manager,
        } => {
            let d = daemon::join_with(&dir, &at, &token, &manager, config).await?;
            let role = if d.ctx.manager.read().expect("lock").is_some() {
                "manager"
            } else {
                "worker"
            };
            println!("This node joined a swarm as a {role}.");
            Some(d)
        }
        Start::Run { dir, unlock } => Some(daemon::run_with(&dir, unlock, config).await?),
    })
}

/// Starts the control plane (per `start`) and the data plane (with
/// --underlay), then serves until SIGINT/SIGTERM.
pub(crate) fn serve(start: Start, dp: DataplaneArgs) -> Result<()> {
    // Read the config before touching anything: a bad file changes nothing.
    let config = dp.config.as_deref().map(NodeConfig::read).transpose()?;
    if let (Some(c), Some(path)) = (&config, &dp.config) {
        c.check_with_tables(!matches!(start, Start::None), path)?;
    }
    let options = dp.options()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    // A manager refuses encrypted networks this kernel cannot protect.
    let manager_config = control::raft::manager::ManagerConfig {
        encryption_check: Some(|| dataplane::ipsec::probe().map_err(|e| e.to_string())),
        ..Default::default()
    };
    let removal = rt.block_on(async {
        let mut daemon = start_control(start, &manager_config).await?;
        if let Some(d) = &daemon {
            tracing::info!(node = %d.ctx.node_id, api = %d.ctx.api_addr, data_dir = %d.dir.display(), "control plane serving");
        }
        let dataplane = match &options {
            Some(o) => {
                let dir = daemon.as_ref().map(|d| d.dir.as_path());
                let d = Dataplane::start(o, config, daemon.is_some(), dir).await?;
                Some(Arc::new(tokio::sync::Mutex::new(d)))
            }
            None => None,
        };
        let tasks_stop = tokio::sync::watch::Sender::new(false);
        let on_stop = tokio::sync::watch::Sender::new(runner::OnStop::LeaveTasks);
        let mut tasks = None;
        let mut removed = None;
        if let Some(d) = daemon.as_mut() {
            let file = control::daemon::NodeFile::load(&d.dir)?;
            let upstream = if dp.dns_upstream.is_empty() {
                Dns::host_resolvers()
            } else {
                dp.dns_upstream.clone()
            };
            let wired = tokio::sync::watch::Sender::new(Default::default());
            let wired_rx = wired.subscribe();
            let underlay = match node::underlay::watch(file.addr).await {
                Ok(rx) => Some(rx),
                Err(e) => {
                    tracing::warn!("not following the underlay's prefixes: {e}");
                    None
                }
            };
            let node = Node::new(&d.ctx.node_id, file.addr, dataplane.clone(), Dns::new(upstream), wired).await;
            let link = d.start_agent(node, underlay);
            removed = Some(link.removed);
            let scope = &dp.task_scope;
            match ProcessExecutor::new(&d.dir.join("tasks"), &format!("{scope}-"), scope) {
                Ok(exec) => {
                    // Tasks an earlier meshd left running are adopted by
                    // the runner if still assigned here, else ended.
                    tasks = Some(tokio::spawn(runner::run(
                        Arc::new(exec),
                        wired_rx,
                        link.assignments,
                        link.reports,
                        StopTiming {
                            drain: Duration::from_millis(dp.drain_ms),
                            grace: Duration::from_millis(dp.stop_grace_ms),
                        },
                        tasks_stop.subscribe(),
                        on_stop.subscribe(),
                    )));
                }
                Err(e) => tracing::error!(
                    "this node cannot run tasks (they stay assigned to it, not started): {e}"
                ),
            }
        }
        println!("meshd: ready");

        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        let mut sweep = tokio::time::interval(Duration::from_secs(dp.sweep_interval.max(1)));
        let mut resync = tokio::time::interval(Duration::from_secs(dp.resync_interval.max(1)));
        resync.reset(); // the first full pass just happened
        let mut removal = None;
        loop {
            let was_removed = async {
                match removed.as_mut() {
                    Some(r) => r.wait_for(Option::is_some).await.ok().and_then(|v| v.clone()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                why = was_removed => {
                    // Its tasks end with it: they belong to the cluster.
                    removal = Some(why.unwrap_or_else(|| "removed".into()));
                    on_stop.send_replace(runner::OnStop::EndTasks);
                    break;
                }
                r = tokio::signal::ctrl_c() => { r.context("waiting for SIGINT")?; break; }
                _ = term.recv() => break,
                _ = hup.recv() => {
                    if let Some(d) = &dataplane { d.lock().await.reload().await }
                }
                _ = resync.tick(), if dataplane.is_some() => {
                    if let Some(d) = &dataplane { d.lock().await.resync().await }
                }
                _ = sweep.tick(), if dataplane.is_some() => {
                    if let Some(d) = &dataplane { d.lock().await.sweep() }
                }
            }
        }
        // Tasks first: their last reports may still reach the leader.
        tasks_stop.send_replace(true);
        if let Some(t) = tasks {
            let _ = t.await;
        }
        if let Some(d) = daemon {
            d.stop().await;
        }
        if let Some(d) = &dataplane
            && removal.is_none()
        {
            tracing::info!(node = %d.lock().await.node(), "exiting; the data path stays attached for the next start");
        }
        // A removed node leaves nothing of the cluster behind: its data
        // plane (overlay, pins, IPsec) goes as `meshd down` takes it.
        if removal.is_some()
            && let Some(name) = &dp.node
        {
            drop(dataplane);
            match node::down(name, &dp.bpf_root).await {
                Ok(said) => said.iter().for_each(|l| tracing::info!("{l}")),
                Err(e) => tracing::warn!("tearing down the data plane: {e}"),
            }
        }
        anyhow::Ok(removal)
    })?;
    let Some(why) = removal else {
        return Ok(());
    };
    bail!(
        "this node was removed from the cluster ({why}); its tasks were stopped and its data \
         plane removed. To bring it back, join again with a current token and a fresh --data-dir"
    )
}
