//! Section (g): resident memory per endpoint, one manager and one agent
//! at 100,000 endpoints (the simulated node of section (e): the real
//! agent and views, the kernel's map writes left out).

use std::{
    fmt::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use control::{
    daemon::{self, InitOptions},
    state::{Command, NetworkSpec, ServiceMode},
};

use super::tables_bench::{SinkStats, add_nodes, bulk, service, start_agents};

/// Endpoints for (g): services of `TASKS_PER_SERVICE` tasks each.
/// `MESH_BENCH_ENDPOINTS` sets another count for a profile run (the
/// section then prints, as any partial run, and writes nothing).
fn endpoints_wanted() -> usize {
    std::env::var("MESH_BENCH_ENDPOINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}
const TASKS_PER_SERVICE: usize = 100;
/// How long the agent may take to catch up with the loaded table.
const CATCH_UP_S: u64 = 180;

/// This process's resident memory, after giving freed heap back to the
/// kernel (so what is counted is what is live, not the allocator's spare).
fn rss_bytes() -> u64 {
    // SAFETY: malloc_trim only releases free memory.
    unsafe { libc::malloc_trim(0) };
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// What section (g) measured (bytes, and where the agent got to).
struct Measured {
    empty: u64,
    loaded_manager: u64,
    loaded_both: u64,
    state_bytes: usize,
    table_bytes: usize,
    catch_up: Option<Duration>,
    reached: u64,
    revision: u64,
    /// The sink's last apply error, if the agent did not catch up.
    failed: Option<String>,
}

/// (g) Resident memory per endpoint: one manager and one agent (the real
/// agent, its replica, overlay view, DNS zone and load-balancer view, the
/// map writes left out as the kernel keeps them) at 100,000 endpoints,
/// above the same pair empty.
pub fn memory_per_endpoint(md: &mut String) {
    let total = endpoints_wanted();
    // As an operator sizes a node for this many: `--lb-backends` past the
    // endpoints (each is one backend here, behind its VIP).
    let backends = (total as u32 + total as u32 / 4)
        .next_power_of_two()
        .max(dataplane::lb::limits::BACKENDS_DEFAULT);
    let base = super::control_bench::scratch("memory");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let Measured {
        empty,
        loaded_manager,
        loaded_both,
        state_bytes,
        table_bytes,
        catch_up,
        reached,
        revision,
        failed,
    } = rt.block_on(async {
        let at = super::control_bench::addresses(3);
        // The manager's own node runs no agent: it must not go down
        // (and take its tasks' endpoints along) while the table loads.
        let opts = InitOptions {
            heartbeat_misses: 100_000,
            ..InitOptions::default()
        };
        let (manager, _) = daemon::init(&base, &at, &opts).await.unwrap();
        let m = manager.ctx.manager().unwrap();
        let (ctxs, _) = add_nodes(&m, &at.api_addr, 1).await;
        m.propose(Command::CreateNetwork {
            id: "net-bench".into(),
            spec: NetworkSpec {
                name: "bench".into(),
                subnet: Some("10.128.0.0/14".parse().unwrap()),
                ..NetworkSpec::default()
            },
        })
        .await
        .unwrap();
        let stats = Arc::<SinkStats>::default();
        // The agent's own fixed cost (a task, a channel) falls in the
        // per-endpoint figure: it errs high.
        let empty = rss_bytes();
        // The orchestrator places the tasks, as it would for a user.
        let cmds = (0..total / TASKS_PER_SERVICE)
            .map(|s| {
                let mut spec = service(&format!("svc-{s}"));
                spec.mode = ServiceMode::Replicated {
                    replicas: TASKS_PER_SERVICE as u32,
                };
                Command::CreateService {
                    id: format!("s{s:05}"),
                    spec,
                }
            })
            .collect();
        eprintln!("(g) loading {total} endpoints");
        bulk(&m, cmds).await;
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut last = (0, Instant::now());
        loop {
            let now =
                m.sm.with_book(|s, b| (b.tables(s).endpoints().count(), b.revision()));
            if now.0 >= total && now.1 == last.0 && last.1.elapsed() > Duration::from_secs(2) {
                break;
            }
            if now.1 != last.0 {
                last = (now.1, Instant::now());
            }
            assert!(
                Instant::now() < deadline,
                "the orchestrator placed {} of {total}",
                now.0
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let loaded_manager = rss_bytes();
        let agents = start_agents(&ctxs, &stats, backends);
        let revision = m.sm.with_book(|_, b| b.revision());
        // Bounded: a node that cannot take this table in is a finding to
        // report, not a hang.
        let caught_up = Instant::now();
        let waited = agents
            .wait_for(revision, Duration::from_secs(CATCH_UP_S))
            .await;
        let catch_up = waited.as_ref().ok().map(|_| caught_up.elapsed());
        let reached = waited.as_ref().map_or_else(|at| at[0], |_| revision);
        if catch_up.is_none() {
            eprintln!("(g) the agent reached revision {reached} of {revision} in {CATCH_UP_S} s");
        }
        let loaded_both = rss_bytes();
        if std::env::var_os("MESH_BENCH_EXIT_LOADED").is_some() {
            // For a heap profiler: what is still allocated at exit is what
            // was live at this measurement.
            eprintln!("(g) exiting loaded: {} MiB", loaded_both >> 20);
            std::process::exit(0);
        }
        let endpoints = m.sm.with_book(|s, b| b.tables(s).endpoints().count());
        assert_eq!(endpoints, total, "every task has its endpoint");
        let state_bytes = m.with_state(|s| control::codec::encode(s).unwrap().len());
        let table_bytes =
            m.sm.with_book(|s, b| control::codec::encode(&b.tables(s)).unwrap().len());
        agents.stop().await;
        drop(ctxs);
        manager.stop().await;
        Measured {
            empty,
            loaded_manager,
            loaded_both,
            state_bytes,
            table_bytes,
            catch_up,
            reached,
            revision,
            failed: stats.failed.lock().unwrap().take(),
        }
    });
    let _ = std::fs::remove_dir_all(&base);
    let per = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / total as f64;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    writeln!(md, "## (g) Memory per endpoint\n").unwrap();
    writeln!(
        md,
        "One manager (gRPC over mTLS, redb with fsync, snapshots every 10k entries) and one \
         agent in this process, its load balancer sized for {backends} backends \
         (`--lb-backends`); {total} endpoints ({} services of {TASKS_PER_SERVICE} \
         tasks placed by the orchestrator, each task one endpoint on one network; the agent's \
         replica, DNS zone and load-balancer view hold every one, as every node's do). Resident \
         memory (VmRSS after `malloc_trim`) above the manager with the network and the node \
         but no service and no agent (so the agent's fixed cost counts as per-endpoint).\n",
        total / TASKS_PER_SERVICE
    )
    .unwrap();
    writeln!(md, "| | resident | per endpoint |").unwrap();
    writeln!(md, "|---|---:|---:|").unwrap();
    writeln!(md, "| empty (baseline) | {:.1} MiB | |", mib(empty)).unwrap();
    writeln!(
        md,
        "| manager, {total} endpoints | {:.1} MiB | {:.0} B |",
        mib(loaded_manager),
        per(empty, loaded_manager)
    )
    .unwrap();
    match catch_up {
        Some(t) => writeln!(
            md,
            "| manager + agent, {total} endpoints (agent caught up in {:.1} s) | {:.1} MiB | **{:.0} B** |",
            t.as_secs_f64(),
            mib(loaded_both),
            per(empty, loaded_both)
        ),
        None => writeln!(
            md,
            "| manager + agent: the agent had applied revision {reached} of {revision} after \
             {CATCH_UP_S} s (not caught up; last apply error: {}) | {:.1} MiB | |",
            failed.as_deref().unwrap_or("none"),
            mib(loaded_both)
        ),
    }
    .unwrap();
    writeln!(
        md,
        "\nFor scale: the state encodes to {:.0} B per endpoint (tasks, services, VIPs), the \
         tables to {:.0} B (target: at most 1 KiB in all, manager plus agent).\n",
        state_bytes as f64 / total as f64,
        table_bytes as f64 / total as f64
    )
    .unwrap();
}
