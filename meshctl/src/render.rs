//! How meshctl prints things: durations, the `ps` table, port columns, logs.

use crate::*;

pub(crate) fn title<T: std::fmt::Debug>(v: T) -> String {
    let s = format!("{v:?}");
    let mut chars = s.chars();
    match chars.next() {
        Some(f) => f
            .to_uppercase()
            .chain(chars.map(|c| c.to_ascii_lowercase()))
            .collect(),
        None => s,
    }
}

pub(crate) fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Docker's wording for how long ago ("About a minute", "8 minutes").
pub(crate) fn human_duration(secs: u64) -> String {
    let (minutes, hours) = (secs / 60, (secs as f64 / 3600.0).round() as u64);
    match () {
        _ if secs < 1 => "Less than a second".into(),
        _ if secs == 1 => "1 second".into(),
        _ if secs < 60 => format!("{secs} seconds"),
        _ if minutes == 1 => "About a minute".into(),
        _ if minutes < 60 => format!("{minutes} minutes"),
        _ if hours == 1 => "About an hour".into(),
        _ if hours < 48 => format!("{hours} hours"),
        _ if hours < 24 * 7 * 2 => format!("{} days", hours / 24),
        _ if hours < 24 * 30 * 2 => format!("{} weeks", hours / 24 / 7),
        _ if hours < 24 * 365 * 2 => format!("{} months", hours / 24 / 30),
        _ => format!("{} years", hours / 24 / 365),
    }
}

/// `service ps`: per slot (or node, for a global service) the newest task,
/// then the older ones as `\_` rows; slots in order.
pub(crate) fn ps_table(tasks: &[TaskView], s: &Service, no_trunc: bool, now_ms: u64) -> Table {
    let mut groups: BTreeMap<(u32, &str), Vec<&TaskView>> = BTreeMap::new();
    for t in tasks {
        groups.entry(t.task.slot()).or_default().push(t);
    }
    // Host-mode ports are the task's own (ingress ones belong to the mesh).
    let host_ports = s
        .ports
        .iter()
        .filter(|p| p.mode == PublishMode::Host)
        .map(|p| {
            format!(
                "*:{}->{}/{}",
                p.published.unwrap_or(p.target),
                p.target,
                p.protocol
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let mut table = Table::new(&[
        "ID",
        "NAME",
        "NODE",
        "DESIRED STATE",
        "CURRENT STATE",
        "ERROR",
        "PORTS",
    ]);
    for group in groups.values_mut() {
        group.sort_by_key(|t| std::cmp::Reverse(t.task.seq));
        for (i, v) in group.iter().enumerate() {
            let t = &v.task;
            let error = match (&t.error, t.exit_code) {
                (Some(e), _) => format!("{e:?}"),
                (None, Some(code)) if code != 0 => format!("\"task: non-zero exit ({code})\""),
                _ => String::new(),
            };
            let running = t.observed == TaskState::Running;
            table.row(vec![
                if no_trunc {
                    t.id.clone()
                } else {
                    short(&t.id).into()
                },
                if i == 0 {
                    v.name.clone()
                } else {
                    format!(" \\_ {}", v.name)
                },
                v.node_hostname.clone(),
                title(t.desired),
                match t.since_ms {
                    // Nothing reported yet: no time to show.
                    0 => title(t.observed),
                    since => format!(
                        "{} {} ago",
                        title(t.observed),
                        human_duration(now_ms.saturating_sub(since) / 1000)
                    ),
                },
                error,
                if running {
                    host_ports.clone()
                } else {
                    String::new()
                },
            ]);
        }
    }
    table
}

pub(crate) fn ports_column(s: &Service) -> String {
    s.ports
        .iter()
        .map(|p| match p.mode {
            PublishMode::Ingress => format!(
                "*:{}->{}/{}",
                p.published.unwrap_or_default(),
                p.target,
                p.protocol
            ),
            PublishMode::Host => format!(
                "host:{}->{}/{}",
                p.published.unwrap_or(p.target),
                p.target,
                p.protocol
            ),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `docker service logs`' shape: `name.id@node    | line`, the prefix
/// padded to one width.
pub(crate) fn logs_text(
    logs: &[model::api::TaskLog],
    tail: Option<usize>,
    no_trunc: bool,
) -> String {
    let prefix = |l: &model::api::TaskLog| {
        let id = if no_trunc {
            l.id.as_str()
        } else {
            short(&l.id)
        };
        format!("{}.{id}@{}", l.name, l.node_hostname)
    };
    let width = logs.iter().map(|l| prefix(l).len()).max().unwrap_or(0);
    let mut out = String::new();
    for l in logs {
        let lines: Vec<&str> = l.text.lines().collect();
        let from = tail.map_or(0, |n| lines.len().saturating_sub(n));
        for line in &lines[from..] {
            out.push_str(&format!("{:<width$}    | {line}\n", prefix(l)));
        }
    }
    out
}
