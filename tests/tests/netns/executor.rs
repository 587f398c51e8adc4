//! The built-in executor: a task is a real process in its own network and
//! mount namespaces and its own cgroup, with its output captured and its
//! exit status read as Docker reads it.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use mesh_tests::require_root;
use node::executor::{Executor as _, ProcessExecutor, RunningTask as _, TaskRun};

/// An executor whose namespaces, cgroups and files carry this test's own
/// names; all of them are removed on Drop, also after a panic.
struct Scratch {
    exec: ProcessExecutor,
    dir: PathBuf,
    prefix: String,
    group: PathBuf,
}

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("mesh-exec-{pid}-{tag}"));
        let group = format!("mesh-test-{pid}-{tag}");
        let prefix = format!("{group}-");
        let exec = ProcessExecutor::new(&dir, &prefix, &group).expect("executor");
        let group = node::executor::cgroup2_mount().unwrap().join(&group);
        Scratch {
            exec,
            dir,
            prefix,
            group,
        }
    }

    fn run(&self, id: &str, script: &str) -> TaskRun {
        TaskRun {
            id: id.into(),
            name: format!("web.{id}"),
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec!["MODE=test".into(), "EMPTY=".into()],
        }
    }

    fn log(&self, id: &str) -> String {
        std::fs::read_to_string(self.exec.log_path(id)).unwrap_or_default()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let scope = self.prefix.trim_end_matches('-');
        mesh_tests::meshd::remove_task_scope(scope);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Running, not ended (a zombie whose new parent has not reaped it yet has
/// ended).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

#[test]
fn a_task_runs_in_its_own_namespaces_and_cgroup_and_reports_its_exit() {
    let Some(_root) = require_root("a_task_runs_in_its_own_namespaces_and_cgroup") else {
        return;
    };
    let s = Scratch::new("run");
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let host_ns = std::fs::read_link("/proc/self/ns/net").unwrap();
    runtime().block_on(async {
        let mut task = s
            .exec
            .start(&s.run(
                "t1",
                "echo out; echo err >&2; cat /etc/resolv.conf; readlink /proc/self/ns/net; \
                 cat /proc/self/cgroup; ip -o link show up; echo \"HOST=$HOSTNAME MODE=$MODE\"; \
                 read line || echo stdin-closed; sleep 0.3; exit 3",
            ))
            .await
            .expect("start");
        let netns = task.netns().to_owned();
        assert!(netns.starts_with("/run/netns") && netns.exists());
        let pid = task.pid().unwrap() as i32;
        // The process (and whatever its script has forked by now) is in
        // its cgroup.
        let pids = task.pids().unwrap();
        assert!(pids.contains(&pid), "{pid} not in its cgroup: {pids:?}");
        assert_eq!(task.wait().await.unwrap(), 3, "exit code");
        let log = s.log("t1");
        for want in [
            "out\n",
            "err\n",
            "nameserver 127.0.0.11\n",
            "HOST=web.t1 MODE=test\n",
            "stdin-closed\n",
            &format!(
                "0::/{}/t1\n",
                s.group.file_name().unwrap().to_str().unwrap()
            ),
        ] {
            assert!(log.contains(want), "{want:?} not in the task's log:\n{log}");
        }
        // Its own network namespace, with lo up and nothing else.
        let ns_line = log.lines().find(|l| l.starts_with("net:[")).unwrap();
        assert_ne!(
            ns_line,
            host_ns.to_str().unwrap(),
            "same namespace as the host"
        );
        let up: Vec<&str> = log.lines().filter(|l| l.contains("state ")).collect();
        assert!(
            up.len() == 1 && up[0].contains(": lo:"),
            "links up in the task: {up:?}"
        );
        // The bind mount stayed in the task's mount namespace.
        assert_eq!(
            std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            host_resolv
        );
        task.remove().await.unwrap();
        assert!(!netns.exists(), "namespace left behind");
        assert!(!s.exec.cgroup_path("t1").exists(), "cgroup left behind");
        assert!(s.log("t1").contains("out\n"), "the log outlives the task");
    });
}

#[test]
fn stop_ends_every_process_of_the_task_and_a_kill_reads_137() {
    let Some(_root) = require_root("stop_ends_every_process_of_the_task") else {
        return;
    };
    let s = Scratch::new("stop");
    runtime().block_on(async {
        // Ignores SIGTERM and leaves a child behind: stop must escalate, and
        // the child must go too.
        let mut stubborn = s
            .exec
            .start(&s.run("t2", "trap '' TERM; sleep 600 & echo ready; wait; wait"))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !s.log("t2").contains("ready") || stubborn.pids().unwrap().len() < 2 {
            assert!(Instant::now() < deadline, "task never got ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pids = stubborn.pids().unwrap();
        // 137: SIGTERM was ignored, so the stop escalated to SIGKILL.
        assert_eq!(
            stubborn.stop(Duration::from_millis(300)).await.unwrap(),
            137
        );
        // The left-behind child ends too (its new parent reaps it).
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some(pid) = pids.iter().find(|p| alive(**p)) {
            assert!(
                Instant::now() < deadline,
                "pid {pid} of the task survived its stop"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stubborn.remove().await.unwrap();

        // A polite one ends on SIGTERM: 143.
        let mut polite = s.exec.start(&s.run("t3", "exec sleep 600")).await.unwrap();
        assert_eq!(polite.stop(Duration::from_secs(5)).await.unwrap(), 143);
        polite.remove().await.unwrap();

        // Killed from outside: "task: non-zero exit (137)".
        let mut killed = s.exec.start(&s.run("t4", "exec sleep 600")).await.unwrap();
        // SAFETY: the pid of a process this test started.
        unsafe { libc::kill(killed.pid().unwrap() as i32, libc::SIGKILL) };
        assert_eq!(killed.wait().await.unwrap(), 137);
        killed.remove().await.unwrap();

        // A meshd that was killed leaves its tasks running; the next one
        // reaps them: processes, cgroup and namespace gone.
        let left = s.exec.start(&s.run("t6", "exec sleep 600")).await.unwrap();
        let pid = left.pid().unwrap() as i32;
        let ns = s.exec.netns_path("t6");
        std::mem::forget(left);
        assert!(ns.exists());
        assert_eq!(s.exec.reap(), 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        // SAFETY: signal 0 only checks that the pid exists.
        while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
            // Reap the zombie: the test process is its parent.
            // SAFETY: waiting on a child this test started.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // SAFETY: as above.
        assert_ne!(unsafe { libc::kill(pid, 0) }, 0, "the left task still runs");
        assert!(!ns.exists(), "its namespace is still there");
        assert!(!s.exec.cgroup_path("t6").exists());
        assert_eq!(s.exec.reap(), 0, "nothing left the second time");

        // A restarted meshd adopts instead: the same process, watched
        // again through a pidfd (this executor is not its parent).
        let left = s.exec.start(&s.run("t7", "exec sleep 600")).await.unwrap();
        let pid = left.pid().unwrap();
        std::mem::forget(left);
        let again =
            ProcessExecutor::new(&s.dir, &s.prefix, s.prefix.trim_end_matches('-')).unwrap();
        assert!(
            again.adopt("t8").is_none(),
            "nothing to adopt under another id"
        );
        let mut adopted = again.adopt("t7").expect("the task is adopted");
        assert!(adopted.adopted());
        assert_eq!(adopted.pid(), Some(pid));
        // Killed from outside: its end is seen, its status is not.
        // SAFETY: the pid of a process this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let code = tokio::time::timeout(Duration::from_secs(5), adopted.wait())
            .await
            .expect("the adopted task's end is seen")
            .unwrap();
        assert_eq!(code, node::executor::EXIT_UNKNOWN);
        // SAFETY: reaping the zombie of a child this test started.
        unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), 0) };
        adopted.remove().await.unwrap();
        // A stale record (the pid is gone) is not adopted.
        assert!(again.adopt("t7").is_none());
    });
}

#[test]
fn a_task_that_cannot_start_says_why_and_leaves_nothing() {
    let Some(_root) = require_root("a_task_that_cannot_start_says_why") else {
        return;
    };
    let s = Scratch::new("bad");
    runtime().block_on(async {
        let mut run = s.run("t5", "true");
        run.command = vec!["/nonexistent/web".into()];
        let err = s.exec.start(&run).await.unwrap_err().to_string();
        assert!(
            err.starts_with("task t5: start \"/nonexistent/web\":"),
            "{err}"
        );
        assert!(!s.exec.netns_path("t5").exists(), "namespace left behind");
        assert!(!s.exec.cgroup_path("t5").exists(), "cgroup left behind");
        run.id = "../etc".into();
        let err = s.exec.start(&run).await.unwrap_err().to_string();
        assert!(err.contains("a task id is 1 to 64 letters"), "{err}");
        run.id = "t6".into();
        run.command = vec![];
        let err = s.exec.start(&run).await.unwrap_err().to_string();
        assert_eq!(err, "task t6: no command to run");
    });
}
