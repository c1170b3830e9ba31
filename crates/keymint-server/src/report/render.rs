//! The report as JSON, as one self-contained HTML page (inline CSS and
//! SVG, no script, nothing fetched), and as Markdown.
//!
//! Every string that is not a literal of this module passes through
//! [`esc`] (HTML) or [`md`] (Markdown): inventory names, owners,
//! purposes, locations and policy ids are whatever was stored.

use std::fmt::Write as _;

use super::{Bucket, Control, Latency, Report, Status};
use crate::console::html::esc;

/// The report as pretty JSON (the shape of `docs/report.schema.json`).
pub fn json(r: &Report) -> String {
    serde_json::to_string_pretty(r).unwrap_or_else(|_| "{}".into())
}

/// Text made safe for a Markdown table cell or line: HTML's specials as
/// entities (Markdown renders raw HTML), Markdown's punctuation escaped,
/// line breaks and bidirectional formatting characters as spaces.
pub fn md(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\\' | '`' | '*' | '_' | '{' | '}' | '[' | ']' | '(' | ')' | '#' | '+' | '!' | '|'
            | '~' => {
                out.push('\\');
                out.push(ch);
            }
            c if keymint_core::model::is_unsafe_char(c) => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = r#"
:root { color-scheme: light; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328; background: #ffffff; margin: 0; }
header, main, footer { max-width: 72rem; margin: 0 auto; padding: 0 1.5rem; }
header { padding-top: 1.5rem; border-bottom: 1px solid #d0d7de; }
h1 { font-size: 1.8rem; margin: 0 0 .25rem; }
h2 { font-size: 1.35rem; margin: 2rem 0 .5rem; border-bottom: 1px solid #d0d7de; padding-bottom: .25rem; }
h3 { font-size: 1.1rem; margin: 1.5rem 0 .5rem; }
p.meta { color: #424a53; margin: 0 0 1rem; }
table { border-collapse: collapse; width: 100%; margin: .5rem 0 1rem; }
caption { text-align: left; font-weight: 600; padding: .25rem 0; color: #1f2328; }
th, td { border: 1px solid #d0d7de; padding: .4rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td ul { margin: 0; padding-left: 1.1rem; }
.status { display: inline-block; padding: .05rem .5rem; border-radius: 1rem; font-weight: 600; white-space: nowrap; }
.met { background: #dafbe1; color: #0a3d1a; }
.partly { background: #fff8c5; color: #4d2d00; }
.not_met { background: #ffebe9; color: #82071e; }
.not_applicable { background: #eaeef2; color: #24292f; }
.charts { display: flex; flex-wrap: wrap; gap: 1.5rem; }
figure { margin: 0; flex: 1 1 28rem; max-width: 40rem; }
figcaption { font-weight: 600; margin-bottom: .25rem; }
svg text { font: 12px system-ui, sans-serif; fill: #1f2328; }
a { color: #0550ae; }
footer { color: #424a53; border-top: 1px solid #d0d7de; margin-top: 2rem; padding-bottom: 2rem; }
@media print { .charts { display: block; } }
"#;

fn badge(s: Status) -> String {
    format!(
        r#"<span class="status {}">{}</span>"#,
        s.as_str(),
        s.label()
    )
}

/// A horizontal bar chart: one bar per `(label, value)`, labelled with
/// its value; `id` names its title for assistive technology.
fn bars(id: &str, title: &str, unit: &str, rows: &[(String, u64)], color: &str) -> String {
    let max = rows.iter().map(|r| r.1).max().unwrap_or(0).max(1);
    let row_h = 26;
    let label_w = 170;
    let bar_w = 280;
    let h = rows.len() as u64 * row_h + 10;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg role="img" aria-labelledby="{id}-t {id}-d" width="100%" viewBox="0 0 {} {h}" xmlns="http://www.w3.org/2000/svg"><title id="{id}-t">{}</title><desc id="{id}-d">"#,
        label_w + bar_w + 90,
        esc(title)
    );
    let desc: Vec<String> = rows
        .iter()
        .map(|(l, v)| format!("{l}: {v} {unit}"))
        .collect();
    let _ = write!(s, "{}</desc>", esc(&desc.join("; ")));
    for (i, (label, v)) in rows.iter().enumerate() {
        let y = i as u64 * row_h + 5;
        let w = v * bar_w / max;
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{}" y="{y}" width="{w}" height="18" fill="{color}"/><text x="{}" y="{}">{v}</text>"#,
            label_w - 8,
            y + 13,
            esc(label),
            label_w,
            label_w + w + 6,
            y + 13,
        );
    }
    s.push_str("</svg>");
    s
}

fn latency_rows(name: &str, l: &Latency) -> Vec<(String, u64)> {
    let v = |x: Option<i64>| x.map_or(0, |m| u64::try_from(m).unwrap_or(0));
    vec![
        (format!("{name} p50"), v(l.p50_ms)),
        (format!("{name} p99"), v(l.p99_ms)),
        (format!("{name} max"), v(l.max_ms)),
    ]
}

fn ul(items: &[String]) -> String {
    if items.is_empty() {
        return "—".into();
    }
    let mut s = String::from("<ul>");
    for i in items {
        let _ = write!(s, "<li>{}</li>", esc(i));
    }
    s.push_str("</ul>");
    s
}

fn opt(v: Option<&String>) -> String {
    v.map_or("—".into(), |s| esc(s).to_string())
}

fn controls_table(s: &mut String, caption: &str, controls: &[Control]) {
    let _ = write!(
        s,
        r#"<table><caption>{}</caption><thead><tr><th scope="col">Control</th><th scope="col">Status</th><th scope="col">Evidence</th><th scope="col">Missing or not visible to keymint</th></tr></thead><tbody>"#,
        esc(caption)
    );
    for c in controls {
        let _ = write!(
            s,
            r#"<tr><th scope="row">{} {}</th><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            esc(c.id),
            esc(c.name),
            badge(c.status),
            ul(&c.evidence),
            ul(&c.missing)
        );
    }
    s.push_str("</tbody></table>");
}

/// The report as one HTML page.
pub fn html(r: &Report) -> String {
    let e = &r.evidence;
    let mut s = String::with_capacity(64 * 1024);
    let _ = write!(
        s,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>keymint compliance report</title><style>{STYLE}</style></head><body><header><h1>keymint compliance report</h1><p class="meta">Issuer <strong>{}</strong>, generated {} from the live store, audit trail and configuration.</p></header><main>"#,
        esc(&r.issuer),
        esc(&r.generated_at)
    );

    // Summary.
    let sm = &r.summary;
    s.push_str(r#"<section aria-labelledby="summary"><h2 id="summary">Summary</h2>"#);
    s.push_str(r#"<table><caption>Controls by status, over the four frameworks</caption><thead><tr><th scope="col">Framework</th><th scope="col">Met</th><th scope="col">Partly met</th><th scope="col">Not met</th><th scope="col">Not applicable</th></tr></thead><tbody>"#);
    for f in &r.frameworks {
        let n = |st: Status| f.controls.iter().filter(|c| c.status == st).count();
        let _ = write!(
            s,
            r##"<tr><th scope="row"><a href="#{}">{}</a></th><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"##,
            esc(f.id),
            esc(f.name),
            n(Status::Met),
            n(Status::Partly),
            n(Status::NotMet),
            n(Status::NotApplicable)
        );
    }
    let _ = write!(
        s,
        r#"<tr><th scope="row">All</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></tbody></table>"#,
        sm.met, sm.partly, sm.not_met, sm.not_applicable
    );
    let audit = if e.audit.chain_intact {
        format!(
            "The audit chain verifies: {} events, intact.",
            e.audit.events
        )
    } else {
        format!(
            "The audit chain does NOT verify after {} events: {}.",
            e.audit.events,
            e.audit.problem.as_deref().unwrap_or("unknown problem")
        )
    };
    let _ = write!(s, "<p>{}</p></section>", esc(&audit));

    // Evidence, with charts.
    s.push_str(r#"<section aria-labelledby="evidence"><h2 id="evidence">Evidence</h2><div class="charts">"#);
    let ages: Vec<(String, u64)> = e
        .inventory
        .age_buckets
        .iter()
        .map(|Bucket { label, count }| ((*label).to_owned(), *count))
        .collect();
    let _ = write!(
        s,
        "<figure><figcaption>Live keys by age</figcaption>{}</figure>",
        bars("ages", "Live stored keys by age", "keys", &ages, "#0969da")
    );
    let findings: Vec<(String, u64)> = e
        .inventory
        .findings
        .iter()
        .map(|(k, v)| (k.replace('_', " "), *v))
        .collect();
    let findings = if findings.is_empty() {
        vec![("no findings".to_owned(), 0)]
    } else {
        findings
    };
    let _ = write!(
        s,
        "<figure><figcaption>Findings by kind</figcaption>{}</figure>",
        bars(
            "findings",
            "Findings on live keys, by kind",
            "keys",
            &findings,
            "#bc4c00"
        )
    );
    let mut lat = latency_rows("revocation", &e.leases.revocation);
    lat.extend(latency_rows("leak contained", &e.leaks.time_to_contain));
    let _ = write!(
        s,
        "<figure><figcaption>Revocation latency (ms)</figcaption>{}</figure></div>",
        bars(
            "latency",
            "Revocation and leak containment latency, in milliseconds",
            "ms",
            &lat,
            "#8250df"
        )
    );

    s.push_str(r#"<h3>Key figures</h3><table><caption>Figures from the store and the audit trail</caption><tbody>"#);
    let oldest = e.inventory.oldest.as_ref().map_or("—".to_owned(), |o| {
        format!(
            "{} ({}, {}), {} days old",
            o.name, o.provider, o.id, o.age_days
        )
    });
    let rows: Vec<(&str, String)> = vec![
        (
            "Stored inventory entries",
            format!(
                "{} ({} live){}",
                e.inventory.entries,
                e.inventory.live,
                if e.inventory.truncated {
                    ", only the newest read"
                } else {
                    ""
                }
            ),
        ),
        ("Live leases", e.inventory.live_leases.to_string()),
        ("Oldest live key", oldest),
        (
            "Without owner / without expiry",
            format!(
                "{} / {}",
                e.inventory.findings.get("no_owner").copied().unwrap_or(0),
                e.inventory.findings.get("no_expiry").copied().unwrap_or(0)
            ),
        ),
        (
            "Leaks reported / entries leaked / still active",
            format!(
                "{} / {} / {}",
                e.leaks.reported, e.leaks.leaked_entries, e.leaks.still_active
            ),
        ),
        (
            "Tasks started / active / delegated",
            format!(
                "{} / {} / {}",
                e.tasks.started, e.tasks.active, e.tasks.delegated
            ),
        ),
        (
            "Approvals requested / approved / denied / redeemed / cancelled",
            format!(
                "{} / {} / {} / {} / {}",
                e.approvals.requested,
                e.approvals.approved,
                e.approvals.denied,
                e.approvals.redeemed,
                e.approvals.cancelled
            ),
        ),
        ("Cedar policies in force", e.policy.policies.join(", ")),
        (
            "Transport and identity",
            format!(
                "TLS {}, client certificates {}, {} JWT issuers, {} operators, storage {}",
                if e.deployment.tls { "on" } else { "off" },
                if e.deployment.client_certificates {
                    "on"
                } else {
                    "off"
                },
                e.deployment.jwt_issuers,
                e.deployment.operators,
                e.deployment.storage
            ),
        ),
    ];
    for (k, v) in rows {
        let _ = write!(
            s,
            r#"<tr><th scope="row">{}</th><td>{}</td></tr>"#,
            esc(k),
            esc(&v)
        );
    }
    s.push_str("</tbody></table>");

    s.push_str(r#"<h3>Needs attention</h3>"#);
    if e.inventory.attention.is_empty() {
        s.push_str("<p>No live key has a finding.</p>");
    } else {
        s.push_str(r#"<table><caption>Live keys with findings (newest first)</caption><thead><tr><th scope="col">Entry</th><th scope="col">Provider</th><th scope="col">Owner</th><th scope="col">Purpose</th><th scope="col">Environment</th><th scope="col">Seen at</th><th scope="col">Findings</th></tr></thead><tbody>"#);
        for a in &e.inventory.attention {
            let _ = write!(
                s,
                r#"<tr><th scope="row">{}<br><small>{}</small></th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
                esc(&a.name),
                esc(&a.id),
                esc(&a.provider),
                opt(a.owner.as_ref()),
                opt(a.purpose.as_ref()),
                opt(a.environment.as_ref()),
                ul(&a.locations),
                ul(&a.findings)
            );
        }
        s.push_str("</tbody></table>");
    }
    s.push_str("</section>");

    for f in &r.frameworks {
        let _ = write!(
            s,
            r#"<section aria-labelledby="{id}"><h2 id="{id}">{}</h2><p>Control ids and names from <a href="{}">{}</a>.</p>"#,
            esc(f.name),
            esc(f.source),
            esc(f.source),
            id = esc(f.id)
        );
        controls_table(
            &mut s,
            &format!("{}: controls and evidence", f.name),
            &f.controls,
        );
        s.push_str("</section>");
    }
    let _ = write!(
        s,
        r#"</main><footer><p>Statuses are computed from what keymint can see; each control lists what it cannot. Schema: {}.</p></footer></body></html>"#,
        esc(r.schema)
    );
    s
}

/// The report as Markdown, for pull requests and tickets.
pub fn markdown(r: &Report) -> String {
    let e = &r.evidence;
    let mut s = String::new();
    let _ = writeln!(s, "# keymint compliance report\n");
    let _ = writeln!(
        s,
        "Issuer **{}**, generated {} from the live store, audit trail and configuration.\n",
        md(&r.issuer),
        md(&r.generated_at)
    );
    let _ = writeln!(s, "## Summary\n");
    let _ = writeln!(
        s,
        "| Framework | Met | Partly met | Not met | Not applicable |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for f in &r.frameworks {
        let n = |st: Status| f.controls.iter().filter(|c| c.status == st).count();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            md(f.name),
            n(Status::Met),
            n(Status::Partly),
            n(Status::NotMet),
            n(Status::NotApplicable)
        );
    }
    let sm = &r.summary;
    let _ = writeln!(
        s,
        "| All | {} | {} | {} | {} |\n",
        sm.met, sm.partly, sm.not_met, sm.not_applicable
    );
    let _ = writeln!(
        s,
        "Audit chain: {}\n",
        if e.audit.chain_intact {
            format!("verified, {} events, intact.", e.audit.events)
        } else {
            format!(
                "**does not verify** after {} events: {}.",
                e.audit.events,
                md(e.audit.problem.as_deref().unwrap_or("unknown problem"))
            )
        }
    );
    let _ = writeln!(s, "## Evidence\n");
    let _ = writeln!(
        s,
        "- Inventory: {} stored entries ({} live), {} live leases",
        e.inventory.entries, e.inventory.live, e.inventory.live_leases
    );
    if let Some(o) = &e.inventory.oldest {
        let _ = writeln!(
            s,
            "- Oldest live key: {} ({}, {}), {} days old",
            md(&o.name),
            md(&o.provider),
            md(&o.id),
            o.age_days
        );
    }
    let findings: Vec<String> = e
        .inventory
        .findings
        .iter()
        .map(|(k, v)| format!("{} {v}", md(k)))
        .collect();
    let _ = writeln!(
        s,
        "- Findings: {}",
        if findings.is_empty() {
            "none".into()
        } else {
            findings.join(", ")
        }
    );
    let _ = writeln!(
        s,
        "- Leaks: {} reported, {} entries leaked, {} revoked, {} suspended, {} still active",
        e.leaks.reported,
        e.leaks.leaked_entries,
        e.leaks.revoked,
        e.leaks.suspended,
        e.leaks.still_active
    );
    let ms = |x: Option<i64>| x.map_or("—".to_owned(), |v| format!("{v} ms"));
    let _ = writeln!(
        s,
        "- Revocation latency: {} samples, p50 {}, p99 {}; leak containment p50 {}, max {}",
        e.leases.revocation.samples,
        ms(e.leases.revocation.p50_ms),
        ms(e.leases.revocation.p99_ms),
        ms(e.leaks.time_to_contain.p50_ms),
        ms(e.leaks.time_to_contain.max_ms)
    );
    let _ = writeln!(
        s,
        "- Approvals: {} requested, {} approved, {} denied, {} redeemed, {} cancelled with their task",
        e.approvals.requested,
        e.approvals.approved,
        e.approvals.denied,
        e.approvals.redeemed,
        e.approvals.cancelled
    );
    let policies: Vec<String> = e.policy.policies.iter().map(|p| md(p)).collect();
    let _ = writeln!(s, "- Cedar policies in force: {}\n", policies.join(", "));
    if !e.inventory.attention.is_empty() {
        let _ = writeln!(s, "### Needs attention\n");
        let _ = writeln!(
            s,
            "| Entry | Provider | Owner | Purpose | Environment | Findings |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for a in &e.inventory.attention {
            let _ = writeln!(
                s,
                "| {} ({}) | {} | {} | {} | {} | {} |",
                md(&a.name),
                md(&a.id),
                md(&a.provider),
                a.owner.as_deref().map_or("—".into(), md),
                a.purpose.as_deref().map_or("—".into(), md),
                a.environment.as_deref().map_or("—".into(), md),
                md(&a.findings.join(", "))
            );
        }
        s.push('\n');
    }
    for f in &r.frameworks {
        let _ = writeln!(s, "## {}\n", md(f.name));
        let _ = writeln!(s, "Source: <{}>\n", f.source);
        let _ = writeln!(s, "| Control | Status | Evidence | Missing |");
        let _ = writeln!(s, "|---|---|---|---|");
        for c in &f.controls {
            let join = |v: &[String]| -> String {
                if v.is_empty() {
                    "—".into()
                } else {
                    v.iter().map(|x| md(x)).collect::<Vec<_>>().join("<br>")
                }
            };
            let _ = writeln!(
                s,
                "| {} {} | {} | {} | {} |",
                md(c.id),
                md(c.name),
                c.status.label(),
                join(&c.evidence),
                join(&c.missing)
            );
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Attention, Evidence, SCHEMA, Summary, controls};

    fn hostile() -> Report {
        let mut e = Evidence::default();
        e.inventory.attention.push(Attention {
            id: "inv_1".into(),
            name: "<img src=x onerror=alert(1)>".into(),
            provider: "openai".into(),
            owner: Some("</td><script>alert(1)</script>".into()),
            purpose: Some("a | b ** [x](javascript:alert(1))".into()),
            environment: Some("prod\n# heading".into()),
            locations: vec!["src/\"><svg onload=alert(1)>.env:1".into()],
            findings: vec!["no_expiry".into()],
        });
        e.policy.policies = vec!["<b>bold</b>".into()];
        e.audit.chain_intact = true;
        let frameworks = controls::judge(&e);
        Report {
            schema: SCHEMA,
            generated_at: "2026-12-03T20:00:00Z".into(),
            issuer: "<i>keymint</i>".into(),
            summary: Summary::default(),
            evidence: e,
            frameworks,
        }
    }

    #[test]
    fn html_escapes_every_stored_string() {
        let h = html(&hostile());
        for bad in ["<script", "<img", "<svg onload", "<b>", "<i>keymint"] {
            assert!(!h.contains(bad), "`{bad}` reached the page");
        }
        assert!(h.contains("&lt;/td&gt;&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(h.contains("&lt;img src=x onerror=alert(1)&gt;"));
        // Self-contained: no script, nothing fetched.
        assert!(!h.contains("<script"));
        assert!(!h.contains("src=\"http"));
        assert!(!h.contains("<link"));
        assert!(h.contains("<h1>keymint compliance report</h1>"));
    }

    #[test]
    fn markdown_escapes_every_stored_string() {
        let m = markdown(&hostile());
        assert!(!m.contains("<script"));
        assert!(!m.contains("<img"));
        assert!(!m.contains("<b>"));
        assert!(m.contains("&lt;/td&gt;&lt;script&gt;alert\\(1\\)&lt;/script&gt;"));
        // A pipe cannot open a new cell, a newline cannot open a heading.
        assert!(m.contains("a \\| b \\*\\* \\[x\\]\\(javascript:alert\\(1\\)\\)"));
        assert!(m.contains("prod \\# heading"));
        for f in [
            "## OWASP Non-Human Identities Top 10 (2025)",
            "## OWASP Top 10 for Agentic Applications (2026)",
            "## NIST AI RMF 1.0",
            "## NIST Cybersecurity Framework 2.0",
        ] {
            assert!(
                m.contains(&md(f.trim_start_matches("## ")).to_string()),
                "{f}"
            );
        }
    }
}
