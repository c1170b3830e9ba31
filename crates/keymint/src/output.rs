//! Output for people (aligned tables) and for scripts (`--output json`).

use keymint_proto::{AuditEvent, Lease, Task};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

pub fn json<T: Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot render JSON: {e}"),
    }
}

/// Prints rows as columns separated by two spaces, the header first.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn opt(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".into())
}

pub fn tasks(fmt: Format, items: &[Task]) {
    if fmt == Format::Json {
        return json(&items);
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.status.as_str().to_owned(),
                t.workload.clone(),
                t.role.clone(),
                t.expires_at.to_string(),
                opt(&t.parent),
                opt(&t.intent),
            ]
        })
        .collect();
    table(
        &[
            "ID", "STATUS", "WORKLOAD", "ROLE", "EXPIRES", "PARENT", "INTENT",
        ],
        &rows,
    );
}

pub fn task(fmt: Format, t: &Task) {
    if fmt == Format::Json {
        return json(t);
    }
    let mut rows = vec![
        ("id", t.id.clone()),
        ("status", t.status.as_str().to_owned()),
        ("workload", t.workload.clone()),
        ("role", t.role.clone()),
        ("scopes", t.scopes.join(" ")),
        ("created", t.created_at.to_string()),
        ("expires", t.expires_at.to_string()),
        ("last seen", t.last_seen_at.to_string()),
    ];
    for (k, v) in [
        ("parent", &t.parent),
        ("intent", &t.intent),
        ("purpose", &t.purpose),
        ("environment", &t.environment),
    ] {
        if let Some(v) = v {
            rows.push((k, v.clone()));
        }
    }
    if let Some(i) = t.idle_timeout_secs {
        rows.push(("idle timeout", keymint_core::duration::format_secs(i)));
    }
    if let Some(e) = t.ended_at {
        rows.push(("ended", e.to_string()));
    }
    if !t.delegation.is_empty() {
        rows.push(("delegated by", t.delegation.join(" > ")));
    }
    for (k, v) in rows {
        println!("{k:<13} {v}");
    }
}

pub fn leases(fmt: Format, items: &[Lease]) {
    if fmt == Format::Json {
        return json(&items);
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|l| {
            vec![
                l.id.clone(),
                l.state.as_str().to_owned(),
                l.task.clone(),
                l.workload.clone(),
                l.role.clone(),
                l.expires_at.to_string(),
                l.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "STATE",
            "TASK",
            "WORKLOAD",
            "ROLE",
            "EXPIRES",
            "LAST ERROR",
        ],
        &rows,
    );
}

pub fn events(fmt: Format, items: &[AuditEvent]) {
    if fmt == Format::Json {
        for e in items {
            println!("{}", e.to_json());
        }
        return;
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|e| {
            let subject = e
                .lease
                .clone()
                .or_else(|| e.task.clone())
                .unwrap_or_default();
            vec![
                e.seq.to_string(),
                e.time.to_string(),
                e.kind.clone(),
                format!("{:?}", e.outcome).to_lowercase(),
                e.actor.clone(),
                subject,
                e.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "SEQ", "TIME", "KIND", "OUTCOME", "ACTOR", "SUBJECT", "REASON",
        ],
        &rows,
    );
}
