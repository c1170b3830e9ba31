//! The console's pages. Each one calls the broker as the signed-in
//! principal and renders what it answers; a refusal is shown with the
//! broker's own message (the API's error text, which names fields, never
//! values). Lists are one page from the store with a cursor.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use keymint_core::Timestamp;
use keymint_core::audit::AuditEvent;
use keymint_core::id;
use keymint_core::model::{ApprovalStatus, Lease, LeaseState, Task, TaskStatus};
use keymint_store::{LeaseFilter, TaskFilter};

use super::html::{self, csrf_field, esc, query, ts};
use super::session::{Session, check_csrf, csrf_refused};
use super::{Console, PathId, Shared, spend};
use crate::broker::{Broker, BrokerError};

/// Rows per page.
const PAGE: u32 = 50;
/// Audit events read at most to fill one filtered page.
const AUDIT_SCAN: u64 = 20_000;

/// The outcome of the last chain verification, for the overview.
#[derive(Debug, Clone)]
pub struct Verified {
    at: Timestamp,
    events: u64,
    problem: Option<String>,
}

/// A refusal or failure of the broker, as a page.
fn failed(s: &Session, e: BrokerError) -> Response {
    let (status, title) = match &e {
        BrokerError::NotFound(_) => (StatusCode::NOT_FOUND, "Not found"),
        BrokerError::Forbidden(_) | BrokerError::Policy { .. } => {
            (StatusCode::FORBIDDEN, "Not allowed")
        }
        BrokerError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "Not allowed"),
        BrokerError::BadRequest(_) | BrokerError::Rule(_) => {
            (StatusCode::BAD_REQUEST, "Not possible")
        }
        BrokerError::Held(_) => (StatusCode::CONFLICT, "Held for approval"),
        BrokerError::Conflict(_) => (StatusCode::CONFLICT, "Not possible now"),
        BrokerError::Unavailable(_)
        | BrokerError::Engine(_)
        | BrokerError::Store(keymint_store::StoreError::Unavailable(_)) => {
            (StatusCode::SERVICE_UNAVAILABLE, "Unavailable")
        }
        BrokerError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "Internal error"),
    };
    html::error_page(Some(s), status, title, &message(e))
}

/// What a refusal says: the API's text, except for internal detail.
fn message(e: BrokerError) -> String {
    match e {
        BrokerError::Store(inner @ keymint_store::StoreError::Unavailable(_)) => {
            tracing::error!(error = %inner, "console: the store cannot write");
            "the store cannot write now; retry later".into()
        }
        BrokerError::Store(inner) => {
            tracing::error!(error = %inner, "console: store error");
            "internal error; the server log has details".into()
        }
        BrokerError::Engine(inner) => {
            tracing::warn!(error = %inner, "console: engine error");
            "the credential's provider could not be reached; the server log has details".into()
        }
        other => other.to_string(),
    }
}

fn bad_filter(s: &Session, what: &str) -> Response {
    html::error_page(
        Some(s),
        StatusCode::BAD_REQUEST,
        "Invalid filter",
        &format!("`{what}` is not a valid value for this filter"),
    )
}

/// The longest query parameter (name or value, decoded) the console
/// takes: the filter inputs' `maxlength`, which only the browser applies.
const QUERY_VALUE_MAX: usize = 256;

/// Query parameters as a struct; unknown ones are ignored. `None` (a 400)
/// if unreadable or any name or value is over [`QUERY_VALUE_MAX`] bytes:
/// such a value reaches neither the store nor the page.
fn params<T: serde::de::DeserializeOwned + Default>(q: Option<String>) -> Option<T> {
    match q {
        None => Some(T::default()),
        Some(q) => {
            let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&q).ok()?;
            if pairs
                .iter()
                .any(|(k, v)| k.len() > QUERY_VALUE_MAX || v.len() > QUERY_VALUE_MAX)
            {
                return None;
            }
            serde_urlencoded::from_str(&q).ok()
        }
    }
}

fn invalid_query(s: &Session) -> Response {
    html::error_page(
        Some(s),
        StatusCode::BAD_REQUEST,
        "Invalid query",
        "the query string could not be read, or a value in it is over 256 bytes",
    )
}

/// Fixed notices after an action (never text from the request).
fn notice(done: Option<&str>) -> String {
    let text = match done {
        Some("ended") => "The task was ended; its leases and sub-tasks are being revoked.",
        Some("revoked") => "The lease was revoked.",
        Some("approved") => "The request was approved; its requester may now redeem it.",
        Some("denied") => "The request was denied.",
        _ => return String::new(),
    };
    format!("<p class=\"notice\" role=\"status\">{text}</p>")
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct Done {
    done: Option<String>,
}

fn status_class(s: &str) -> &'static str {
    match s {
        "active" | "approved" | "pending" => "st-live",
        "revoking" | "failed" => "st-warn",
        _ => "st-done",
    }
}

fn badge(s: &str) -> String {
    format!(
        "<span class=\"badge {}\">{}</span>",
        status_class(s),
        esc(s)
    )
}

fn day_start(now: Timestamp) -> Timestamp {
    Timestamp(now.millis() - now.millis().rem_euclid(86_400_000))
}

// ------------------------------------------------------------- overview

pub async fn overview(State(c): Shared, s: Session) -> Response {
    let b = &c.broker;
    let mut body = String::from("<h1>Overview</h1>");
    let pending = match b
        .list_approvals(&s.principal, Some(ApprovalStatus::Pending), 1000)
        .await
    {
        Ok(v) => v.len(),
        Err(e) => return failed(&s, e),
    };
    let approvals = format!(
        "<div class=\"card\"><h2>Approvals waiting</h2><p class=\"big\">{}</p>\
         <p><a href=\"/ui/approvals\">Review approvals</a></p></div>",
        if pending >= 1000 {
            "1000+".to_owned()
        } else {
            pending.to_string()
        }
    );
    if !s.is_admin() {
        body.push_str("<div class=\"cards\">");
        body.push_str(&approvals);
        body.push_str("</div>");
        return html::page(Some(&s), StatusCode::OK, "Overview", "/ui", &body);
    }
    let store = b.store();
    let counts = match store.counts().await {
        Ok(c) => c,
        Err(e) => return failed(&s, e.into()),
    };
    let leases = |st: LeaseState| {
        counts
            .leases
            .iter()
            .find(|(x, _)| *x == st)
            .map_or(0, |(_, n)| *n)
    };
    // Revocations still being retried: one page of `revoking` leases.
    let revoking = match b
        .list_leases(
            &s.principal,
            LeaseFilter {
                state: Some(LeaseState::Revoking),
                limit: 1000,
                ..LeaseFilter::default()
            },
        )
        .await
    {
        Ok(v) => v,
        Err(e) => return failed(&s, e),
    };
    let failing = revoking.iter().filter(|l| l.revoke_attempts > 0).count();
    let _ = write!(
        body,
        "<div id=\"live\" data-refresh=\"10\" aria-live=\"polite\"><div class=\"cards\">\
         <div class=\"card\"><h2>Active tasks</h2><p class=\"big\">{}</p>\
         <p><a href=\"/ui/tasks?status=active\">Active tasks</a></p></div>\
         <div class=\"card\"><h2>Active leases</h2><p class=\"big\">{}</p>\
         <p>{} pending</p><p><a href=\"/ui/leases?state=active\">Active leases</a></p></div>\
         <div class=\"card\"><h2>Revocations</h2><p class=\"big\">{}</p>\
         <p>being revoked; {}{} failing and retried</p>\
         <p><a href=\"/ui/leases?state=revoking\">Leases being revoked</a></p></div>{approvals}",
        counts.tasks_active,
        leases(LeaseState::Active),
        leases(LeaseState::Pending),
        leases(LeaseState::Revoking),
        failing,
        if revoking.len() >= 1000 { "+" } else { "" },
    );
    let verified = c
        .last_verify
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let chain = match verified {
        None => "not verified since the server started".to_owned(),
        Some(v) => match v.problem {
            None => format!("intact: {} events verified at {}", v.events, ts(v.at)),
            Some(p) => format!("BROKEN at {}: {}", ts(v.at), esc(&p)),
        },
    };
    let _ = write!(
        body,
        "<div class=\"card\"><h2>Audit chain</h2><p class=\"big\">{}</p><p>events; {chain}</p>\
         <p><a href=\"/ui/audit/verify\">Verify the chain now</a></p></div></div>",
        counts.audit_head
    );
    let now = b.now();
    match spend::since(&**store, day_start(now), now).await {
        Ok(sp) => {
            body.push_str("<h2>Spend today (UTC) per upstream</h2>");
            if sp.by_upstream.is_empty() {
                body.push_str("<p>No use through the egress proxy today.</p>");
            } else {
                use_table(
                    &mut body,
                    "Spend today per upstream",
                    "Upstream",
                    &sp.by_upstream,
                );
            }
        }
        Err(e) => return failed(&s, e.into()),
    }
    body.push_str("</div>");
    live_toggle(&mut body);
    html::page(Some(&s), StatusCode::OK, "Overview", "/ui", &body)
}

fn live_toggle(body: &mut String) {
    body.push_str(
        "<p class=\"live\"><input type=\"checkbox\" id=\"live-toggle\" checked>\
         <label for=\"live-toggle\">Live updates (refresh every few seconds)</label></p>",
    );
}

fn use_table(
    out: &mut String,
    caption: &str,
    head: &str,
    rows: &std::collections::BTreeMap<String, spend::Use>,
) {
    let _ = write!(
        out,
        "<table><caption>{}</caption><thead><tr><th scope=\"col\">{}</th><th scope=\"col\">Requests</th>\
         <th scope=\"col\">Input tokens</th><th scope=\"col\">Output tokens</th><th scope=\"col\">Spend (USD)</th></tr></thead><tbody>",
        esc(caption),
        esc(head)
    );
    for (k, u) in rows {
        let _ = write!(
            out,
            "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td><td>{:.4}</td></tr>",
            esc(k),
            u.requests,
            u.input,
            u.output,
            u.spend_usd
        );
    }
    out.push_str("</tbody></table>");
}

// ---------------------------------------------------------------- tasks

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct TaskQuery {
    status: String,
    workload: String,
    role: String,
    q: String,
    before: String,
}

fn select(out: &mut String, name: &str, label: &str, options: &[&str], current: &str) {
    let _ = write!(
        out,
        "<label for=\"f-{name}\">{label}</label><select id=\"f-{name}\" name=\"{name}\"><option value=\"\">any</option>"
    );
    for o in options {
        let sel = if *o == current { " selected" } else { "" };
        let _ = write!(out, "<option value=\"{o}\"{sel}>{o}</option>");
    }
    out.push_str("</select>");
}

fn text_input(out: &mut String, name: &str, label: &str, value: &str) {
    let _ = write!(
        out,
        "<label for=\"f-{name}\">{label}</label><input id=\"f-{name}\" name=\"{name}\" value=\"{}\" maxlength=\"256\">",
        esc(value)
    );
}

/// Where a search for an id goes, if it is one.
fn jump(q: &str) -> Option<String> {
    let q = q.trim();
    for (prefix, path) in [
        ("tsk_", "/ui/tasks/"),
        ("lse_", "/ui/leases/"),
        ("apr_", "/ui/approvals/"),
    ] {
        if id::is_valid(prefix, q) {
            return Some(format!("{path}{q}"));
        }
    }
    None
}

fn task_row(out: &mut String, t: &Task) {
    let _ = write!(
        out,
        "<tr><td><a href=\"/ui/tasks/{id}\">{id}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        esc(&t.workload),
        esc(&t.role),
        badge(t.status.as_str()),
        t.parent
            .as_deref()
            .map(|p| format!("<a href=\"/ui/tasks/{0}\">{0}</a>", esc(p)))
            .unwrap_or_default(),
        ts(t.created_at),
        ts(t.expires_at),
        id = esc(&t.id),
    );
}

fn task_table(out: &mut String, caption: &str, tasks: &[Task]) {
    let _ = write!(
        out,
        "<table><caption>{}</caption><thead><tr><th scope=\"col\">Task</th><th scope=\"col\">Workload</th>\
         <th scope=\"col\">Role</th><th scope=\"col\">Status</th><th scope=\"col\">Parent</th>\
         <th scope=\"col\">Started</th><th scope=\"col\">Ends</th></tr></thead><tbody>",
        esc(caption)
    );
    for t in tasks {
        task_row(out, t);
    }
    if tasks.is_empty() {
        out.push_str("<tr><td colspan=\"7\">None.</td></tr>");
    }
    out.push_str("</tbody></table>");
}

fn pager(out: &mut String, base: &str, pairs: &[(&str, &str)], next: Option<&str>) {
    out.push_str("<nav class=\"pager\" aria-label=\"Pages\">");
    let first = query(pairs);
    let _ = write!(out, "<a href=\"{base}{}\">Newest</a>", esc(&first));
    if let Some(n) = next {
        let mut p: Vec<(&str, &str)> = pairs.to_vec();
        p.push(("before", n));
        let _ = write!(
            out,
            " <a href=\"{base}{}\" rel=\"next\">Older</a>",
            esc(&query(&p))
        );
    }
    out.push_str("</nav>");
}

pub async fn tasks(State(c): Shared, s: Session, RawQuery(q): RawQuery) -> Response {
    let Some(q) = params::<TaskQuery>(q) else {
        return invalid_query(&s);
    };
    if let Some(to) = jump(&q.q) {
        return Redirect::to(&to).into_response();
    }
    let status = match q.status.as_str() {
        "" => None,
        v => match TaskStatus::parse(v) {
            Some(st) => Some(st),
            None => return bad_filter(&s, "status"),
        },
    };
    let workload = if q.workload.is_empty() {
        &q.q
    } else {
        &q.workload
    };
    let f = TaskFilter {
        status,
        workload: (!workload.is_empty()).then(|| workload.clone()),
        role: (!q.role.is_empty()).then(|| q.role.clone()),
        parent: None,
        before: (!q.before.is_empty()).then(|| q.before.clone()),
        limit: PAGE,
    };
    let list = match c.broker.list_tasks(&s.principal, f).await {
        Ok(l) => l,
        Err(e) => return failed(&s, e),
    };
    let mut body = String::from("<h1>Tasks</h1>");
    body.push_str(
        "<form method=\"get\" action=\"/ui/tasks\" class=\"filters\" role=\"search\" aria-label=\"Filter tasks\">",
    );
    let names: Vec<&str> = TaskStatus::ALL.iter().map(|s| s.as_str()).collect();
    select(&mut body, "status", "Status", &names, &q.status);
    text_input(&mut body, "workload", "Workload", &q.workload);
    text_input(&mut body, "role", "Role", &q.role);
    text_input(&mut body, "q", "Search (an id or a workload)", &q.q);
    body.push_str("<button type=\"submit\">Filter</button></form>");
    body.push_str("<div id=\"live\" data-refresh=\"5\" aria-live=\"polite\">");
    task_table(&mut body, "Tasks, newest first", &list);
    body.push_str("</div>");
    let next = (list.len() == PAGE as usize)
        .then(|| list.last().map(|t| t.id.clone()))
        .flatten();
    pager(
        &mut body,
        "/ui/tasks",
        &[
            ("status", &q.status),
            ("workload", &q.workload),
            ("role", &q.role),
            ("q", &q.q),
        ],
        next.as_deref(),
    );
    live_toggle(&mut body);
    html::page(Some(&s), StatusCode::OK, "Tasks", "/ui/tasks", &body)
}

/// The sub-tree below `root` as nested lists, depth-first, bounded.
async fn subtree(b: &Broker, s: &Session, root: &str) -> Result<String, BrokerError> {
    const MAX_NODES: usize = 300;
    const MAX_DEPTH: usize = 6;
    let children_of = |parent: String| async move {
        b.list_tasks(
            &s.principal,
            TaskFilter {
                parent: Some(parent),
                limit: 100,
                ..TaskFilter::default()
            },
        )
        .await
    };
    // Pre-order: (depth from 1, task).
    let mut nodes: Vec<(usize, Task)> = Vec::new();
    let mut stack: Vec<(usize, Task)> = children_of(root.to_owned())
        .await?
        .into_iter()
        .rev()
        .map(|t| (1, t))
        .collect();
    while let Some((d, t)) = stack.pop() {
        if nodes.len() >= MAX_NODES {
            break;
        }
        if d < MAX_DEPTH {
            for child in children_of(t.id.clone()).await?.into_iter().rev() {
                stack.push((d + 1, child));
            }
        }
        nodes.push((d, t));
    }
    if nodes.is_empty() {
        return Ok("<p>No sub-tasks.</p>".into());
    }
    let mut out = String::from("<ul class=\"tree\">");
    let mut prev = 0usize;
    for (d, t) in &nodes {
        if prev > 0 {
            if *d > prev {
                out.push_str("<ul>");
            } else {
                out.push_str("</li>");
                for _ in *d..prev {
                    out.push_str("</ul></li>");
                }
            }
        }
        let _ = write!(
            out,
            "<li><a href=\"/ui/tasks/{id}\">{id}</a> {} · {} · {}",
            esc(&t.workload),
            esc(&t.role),
            badge(t.status.as_str()),
            id = esc(&t.id)
        );
        prev = *d;
    }
    out.push_str("</li>");
    for _ in 1..prev {
        out.push_str("</ul></li>");
    }
    out.push_str("</ul>");
    if nodes.len() >= MAX_NODES {
        let _ = write!(
            out,
            "<p class=\"help\">Only the first {MAX_NODES} sub-tasks are shown.</p>"
        );
    }
    Ok(out)
}

fn field(out: &mut String, name: &str, value: &str) {
    let _ = write!(out, "<dt>{}</dt><dd>{}</dd>", esc(name), value);
}

pub async fn task(
    State(c): Shared,
    s: Session,
    PathId(id): PathId,
    RawQuery(q): RawQuery,
) -> Response {
    let done: Done = params(q).unwrap_or_default();
    let b = &c.broker;
    let t = match b.get_task(&s.principal, &id).await {
        Ok(t) => t,
        Err(e) => return failed(&s, e),
    };
    let mut body = format!("<h1>Task <code>{}</code></h1>", esc(&t.id));
    body.push_str(&notice(done.done.as_deref()));
    body.push_str("<div id=\"live\" data-refresh=\"5\" aria-live=\"polite\"><dl class=\"facts\">");
    field(&mut body, "Status", &badge(t.status.as_str()));
    field(&mut body, "Workload", &esc(&t.workload).to_string());
    field(&mut body, "Role", &esc(&t.role).to_string());
    field(
        &mut body,
        "Intent",
        &esc(t.intent.as_deref().unwrap_or("")).to_string(),
    );
    field(
        &mut body,
        "Purpose",
        &esc(t.purpose.as_deref().unwrap_or("")).to_string(),
    );
    field(
        &mut body,
        "Environment",
        &esc(t.environment.as_deref().unwrap_or("")).to_string(),
    );
    field(&mut body, "Scopes", &esc(&t.scopes.join(" ")).to_string());
    field(&mut body, "Started", &ts(t.created_at));
    field(&mut body, "Ends", &ts(t.expires_at));
    field(&mut body, "Last seen", &ts(t.last_seen_at));
    if let Some(e) = t.ended_at {
        field(&mut body, "Ended", &ts(e));
    }
    if !t.delegation.is_empty() {
        field(
            &mut body,
            "Delegated by",
            &esc(&t.delegation.join(" → ")).to_string(),
        );
    }
    body.push_str("</dl>");
    // Ancestors, root first.
    let mut chain = Vec::new();
    let mut cur = t.parent.clone();
    while let Some(p) = cur.take() {
        if chain.len() >= 32 {
            break;
        }
        match b.get_task(&s.principal, &p).await {
            Ok(pt) => {
                cur = pt.parent.clone();
                chain.push(pt);
            }
            Err(_) => break,
        }
    }
    if !chain.is_empty() {
        body.push_str("<h2>Parents</h2><ol class=\"chain\">");
        for pt in chain.iter().rev() {
            let _ = write!(
                body,
                "<li><a href=\"/ui/tasks/{id}\">{id}</a> {} {}</li>",
                esc(&pt.workload),
                badge(pt.status.as_str()),
                id = esc(&pt.id)
            );
        }
        body.push_str("</ol>");
    }
    body.push_str("<h2>Sub-agents</h2>");
    match subtree(b, &s, &t.id).await {
        Ok(tree) => body.push_str(&tree),
        Err(e) => return failed(&s, e),
    }
    let leases = match b
        .list_leases(
            &s.principal,
            LeaseFilter {
                task: Some(t.id.clone()),
                limit: 100,
                ..LeaseFilter::default()
            },
        )
        .await
    {
        Ok(l) => l,
        Err(e) => return failed(&s, e),
    };
    body.push_str("<h2>Leases</h2>");
    lease_table(&mut body, "Leases of this task, newest first", &leases);
    if leases.len() == 100 {
        let _ = write!(
            body,
            "<p><a href=\"/ui/leases{}\">All leases of this task</a></p>",
            esc(&query(&[("task", &t.id)]))
        );
    }
    body.push_str("</div>");
    if t.status == TaskStatus::Active {
        let _ = write!(
            body,
            "<p><a class=\"button danger\" href=\"/ui/tasks/{}/end\">End this task…</a></p>",
            esc(&t.id)
        );
    }
    live_toggle(&mut body);
    html::page(Some(&s), StatusCode::OK, "Task", "/ui/tasks", &body)
}

pub async fn end_task_confirm(State(c): Shared, s: Session, PathId(id): PathId) -> Response {
    let t = match c.broker.get_task(&s.principal, &id).await {
        Ok(t) => t,
        Err(e) => return failed(&s, e),
    };
    let body = format!(
        "<h1>End task <code>{id}</code>?</h1>\
         <p>The task of <strong>{}</strong> (role {}) ends as <em>revoked</em>; every lease \
         and sub-task under it is revoked now. This cannot be undone.</p>\
         <form method=\"post\" action=\"/ui/tasks/{id}/end\">{}\
         <label for=\"reason\">Reason (for the audit trail)</label>\
         <input id=\"reason\" name=\"reason\" maxlength=\"1024\">\
         <p><button type=\"submit\" class=\"danger\">End the task and revoke its leases</button> \
         <a href=\"/ui/tasks/{id}\">Cancel</a></p></form>",
        esc(&t.workload),
        esc(&t.role),
        csrf_field(&s),
        id = esc(&t.id),
    );
    html::page(Some(&s), StatusCode::OK, "End task", "/ui/tasks", &body)
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct ActionForm {
    csrf: String,
    reason: String,
    note: String,
    decision: String,
}

fn form_of(body: &[u8]) -> ActionForm {
    serde_urlencoded::from_bytes(body).unwrap_or_default()
}

pub async fn end_task(
    State(c): Shared,
    s: Session,
    PathId(id): PathId,
    headers: HeaderMap,
    super::FormBody(body): super::FormBody,
) -> Response {
    let form = form_of(&body);
    if !check_csrf(&c, &s, &headers, &form.csrf) {
        return csrf_refused(&c, Some(&s), &headers, "end_task").await;
    }
    let reason = (!form.reason.trim().is_empty()).then(|| form.reason.trim().to_owned());
    match c.broker.end_task(&s.principal, &id, None, reason).await {
        Ok(t) => Redirect::to(&format!("/ui/tasks/{}?done=ended", t.id)).into_response(),
        Err(e) => failed(&s, e),
    }
}

// --------------------------------------------------------------- leases

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct LeaseQuery {
    task: String,
    workload: String,
    role: String,
    state: String,
    before: String,
}

fn lease_table(out: &mut String, caption: &str, leases: &[Lease]) {
    let _ = write!(
        out,
        "<table><caption>{}</caption><thead><tr><th scope=\"col\">Lease</th><th scope=\"col\">Task</th>\
         <th scope=\"col\">Workload</th><th scope=\"col\">Role</th><th scope=\"col\">Engine</th>\
         <th scope=\"col\">State</th><th scope=\"col\">Expires</th><th scope=\"col\">Revocation</th></tr></thead><tbody>",
        esc(caption)
    );
    for l in leases {
        let retry = if l.revoke_attempts > 0 {
            format!(
                "{} attempts{}",
                l.revoke_attempts,
                l.next_attempt_at
                    .map(|t| format!(", next {}", ts(t)))
                    .unwrap_or_default()
            )
        } else {
            String::new()
        };
        let _ = write!(
            out,
            "<tr><td><a href=\"/ui/leases/{id}\">{id}</a></td><td><a href=\"/ui/tasks/{task}\">{task}</a></td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&l.workload),
            esc(&l.role),
            esc(&l.engine.to_string()),
            badge(l.state.as_str()),
            ts(l.expires_at),
            esc(&retry),
            id = esc(&l.id),
            task = esc(&l.task),
        );
    }
    if leases.is_empty() {
        out.push_str("<tr><td colspan=\"8\">None.</td></tr>");
    }
    out.push_str("</tbody></table>");
}

pub async fn leases(State(c): Shared, s: Session, RawQuery(q): RawQuery) -> Response {
    let Some(q) = params::<LeaseQuery>(q) else {
        return invalid_query(&s);
    };
    let state = match q.state.as_str() {
        "" => None,
        v => match LeaseState::parse(v) {
            Some(st) => Some(st),
            None => return bad_filter(&s, "state"),
        },
    };
    let opt = |v: &String| (!v.is_empty()).then(|| v.clone());
    let f = LeaseFilter {
        task: opt(&q.task),
        workload: opt(&q.workload),
        role: opt(&q.role),
        state,
        before: opt(&q.before),
        engine: None,
        expires_after: None,
        limit: PAGE,
    };
    let list = match c.broker.list_leases(&s.principal, f).await {
        Ok(l) => l,
        Err(e) => return failed(&s, e),
    };
    let mut body = String::from("<h1>Leases</h1>");
    body.push_str(
        "<form method=\"get\" action=\"/ui/leases\" class=\"filters\" role=\"search\" aria-label=\"Filter leases\">",
    );
    let names: Vec<&str> = LeaseState::ALL.iter().map(|s| s.as_str()).collect();
    select(&mut body, "state", "State", &names, &q.state);
    text_input(&mut body, "task", "Task", &q.task);
    text_input(&mut body, "workload", "Workload", &q.workload);
    text_input(&mut body, "role", "Role", &q.role);
    body.push_str("<button type=\"submit\">Filter</button></form>");
    body.push_str("<div id=\"live\" data-refresh=\"5\" aria-live=\"polite\">");
    lease_table(&mut body, "Leases, newest first", &list);
    body.push_str("</div>");
    let next = (list.len() == PAGE as usize)
        .then(|| list.last().map(|l| l.id.clone()))
        .flatten();
    pager(
        &mut body,
        "/ui/leases",
        &[
            ("state", &q.state),
            ("task", &q.task),
            ("workload", &q.workload),
            ("role", &q.role),
        ],
        next.as_deref(),
    );
    live_toggle(&mut body);
    html::page(Some(&s), StatusCode::OK, "Leases", "/ui/leases", &body)
}

pub async fn lease(
    State(c): Shared,
    s: Session,
    PathId(id): PathId,
    RawQuery(q): RawQuery,
) -> Response {
    let done: Done = params(q).unwrap_or_default();
    let l = match c.broker.get_lease(&s.principal, &id).await {
        Ok(l) => l,
        Err(e) => return failed(&s, e),
    };
    let mut body = format!("<h1>Lease <code>{}</code></h1>", esc(&l.id));
    body.push_str(&notice(done.done.as_deref()));
    body.push_str("<dl class=\"facts\">");
    field(&mut body, "State", &badge(l.state.as_str()));
    field(
        &mut body,
        "Task",
        &format!("<a href=\"/ui/tasks/{0}\">{0}</a>", esc(&l.task)),
    );
    field(&mut body, "Workload", &esc(&l.workload).to_string());
    field(&mut body, "Role", &esc(&l.role).to_string());
    field(&mut body, "Engine", &esc(&l.engine.to_string()).to_string());
    field(&mut body, "Scopes", &esc(&l.scopes.join(" ")).to_string());
    field(&mut body, "Issued", &ts(l.created_at));
    field(&mut body, "Expires", &ts(l.expires_at));
    if let Some(e) = l.ended_at {
        field(&mut body, "Ended", &ts(e));
    }
    if let Some(r) = l.end_reason {
        field(&mut body, "End reason", &esc(r.as_str()).to_string());
    }
    if l.revoke_attempts > 0 {
        field(
            &mut body,
            "Revocation attempts",
            &l.revoke_attempts.to_string(),
        );
    }
    if let Some(e) = &l.last_error {
        field(&mut body, "Last revocation error", &esc(e).to_string());
    }
    field(
        &mut body,
        "Fingerprint",
        &format!("<code>{}</code>", esc(&l.fingerprint)),
    );
    body.push_str("</dl>");
    if matches!(l.state, LeaseState::Active | LeaseState::Pending) {
        let _ = write!(
            body,
            "<p><a class=\"button danger\" href=\"/ui/leases/{}/revoke\">Revoke this lease…</a></p>",
            esc(&l.id)
        );
    }
    html::page(Some(&s), StatusCode::OK, "Lease", "/ui/leases", &body)
}

pub async fn revoke_lease_confirm(State(c): Shared, s: Session, PathId(id): PathId) -> Response {
    let l = match c.broker.get_lease(&s.principal, &id).await {
        Ok(l) => l,
        Err(e) => return failed(&s, e),
    };
    let body = format!(
        "<h1>Revoke lease <code>{id}</code>?</h1>\
         <p>The {} credential of <strong>{}</strong> stops working now. Its task goes on.</p>\
         <form method=\"post\" action=\"/ui/leases/{id}/revoke\">{}\
         <p><button type=\"submit\" class=\"danger\">Revoke the lease</button> \
         <a href=\"/ui/leases/{id}\">Cancel</a></p></form>",
        esc(&l.engine.to_string()),
        esc(&l.workload),
        csrf_field(&s),
        id = esc(&l.id),
    );
    html::page(
        Some(&s),
        StatusCode::OK,
        "Revoke lease",
        "/ui/leases",
        &body,
    )
}

pub async fn revoke_lease(
    State(c): Shared,
    s: Session,
    PathId(id): PathId,
    headers: HeaderMap,
    super::FormBody(body): super::FormBody,
) -> Response {
    let form = form_of(&body);
    if !check_csrf(&c, &s, &headers, &form.csrf) {
        return csrf_refused(&c, Some(&s), &headers, "revoke_lease").await;
    }
    match c.broker.revoke_lease(&s.principal, &id).await {
        Ok(l) => Redirect::to(&format!("/ui/leases/{}?done=revoked", l.id)).into_response(),
        Err(e) => failed(&s, e),
    }
}

// ------------------------------------------------------------ approvals

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct ApprovalQuery {
    status: Option<String>,
}

pub async fn approvals(State(c): Shared, s: Session, RawQuery(q): RawQuery) -> Response {
    let Some(q) = params::<ApprovalQuery>(q) else {
        return invalid_query(&s);
    };
    // Pending unless asked otherwise; `status=` (empty) is every status.
    let status_text = q.status.unwrap_or_else(|| "pending".into());
    let status = match status_text.as_str() {
        "" => None,
        v => match serde_json::from_value::<ApprovalStatus>(serde_json::Value::String(v.into())) {
            Ok(st) => Some(st),
            Err(_) => return bad_filter(&s, "status"),
        },
    };
    let list = match c.broker.list_approvals(&s.principal, status, 100).await {
        Ok(l) => l,
        Err(e) => return failed(&s, e),
    };
    let mut body = String::from("<h1>Approvals</h1>");
    body.push_str(
        "<form method=\"get\" action=\"/ui/approvals\" class=\"filters\" aria-label=\"Filter approvals\">",
    );
    let names: Vec<&str> = ApprovalStatus::ALL.iter().map(|s| s.as_str()).collect();
    select(&mut body, "status", "Status", &names, &status_text);
    body.push_str("<button type=\"submit\">Filter</button></form>");
    body.push_str(
        "<div id=\"live\" data-refresh=\"5\" aria-live=\"polite\"><table><caption>Requests held for a human, newest first (at most 100)</caption>\
         <thead><tr><th scope=\"col\">Approval</th><th scope=\"col\">Action</th><th scope=\"col\">Requester</th>\
         <th scope=\"col\">Workload</th><th scope=\"col\">Role</th><th scope=\"col\">Status</th>\
         <th scope=\"col\">Expires</th></tr></thead><tbody>",
    );
    for a in &list {
        let _ = write!(
            body,
            "<tr><td><a href=\"/ui/approvals/{id}\">{id}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&a.action),
            esc(&a.requester),
            esc(&a.workload),
            esc(&a.role),
            badge(a.status.as_str()),
            ts(a.expires_at),
            id = esc(&a.id)
        );
    }
    if list.is_empty() {
        body.push_str("<tr><td colspan=\"7\">None.</td></tr>");
    }
    body.push_str("</tbody></table></div>");
    live_toggle(&mut body);
    html::page(
        Some(&s),
        StatusCode::OK,
        "Approvals",
        "/ui/approvals",
        &body,
    )
}

async fn approval_page(
    c: &Console,
    s: &Session,
    id: &str,
    status: StatusCode,
    top: &str,
) -> Response {
    let a = match c.broker.get_approval(&s.principal, id).await {
        Ok(a) => a,
        Err(e) => return failed(s, e),
    };
    let mut body = format!("<h1>Approval <code>{}</code></h1>{top}", esc(&a.id));
    body.push_str("<dl class=\"facts\">");
    field(&mut body, "Status", &badge(a.status.as_str()));
    field(&mut body, "Held action", &esc(&a.action).to_string());
    field(&mut body, "Requester", &esc(&a.requester).to_string());
    field(&mut body, "Workload", &esc(&a.workload).to_string());
    field(&mut body, "Role", &esc(&a.role).to_string());
    if let Some(t) = &a.task {
        field(
            &mut body,
            "Task",
            &format!("<a href=\"/ui/tasks/{0}\">{0}</a>", esc(t)),
        );
    }
    field(
        &mut body,
        "Held by policies",
        &esc(&a.policies.join(", ")).to_string(),
    );
    field(&mut body, "Asked", &ts(a.created_at));
    field(&mut body, "Expires", &ts(a.expires_at));
    if let Some(by) = &a.decided_by {
        field(&mut body, "Decided by", &esc(by).to_string());
    }
    if let Some(n) = &a.note {
        field(&mut body, "Note", &esc(n).to_string());
    }
    body.push_str("</dl><h2>The held request</h2>");
    let pretty = serde_json::to_string_pretty(&a.request).unwrap_or_default();
    let _ = write!(
        body,
        "<pre class=\"json\" tabindex=\"0\">{}</pre>",
        esc(&pretty)
    );
    if a.status == ApprovalStatus::Pending {
        let _ = write!(
            body,
            "<h2>Decide</h2><form method=\"post\" action=\"/ui/approvals/{id}/decide\" class=\"decide\">{}\
             <label for=\"note\">Note for the requester and the audit trail (optional)</label>\
             <input id=\"note\" name=\"note\" maxlength=\"1024\">\
             <p><button type=\"submit\" name=\"decision\" value=\"approve\">Approve</button> \
             <button type=\"submit\" name=\"decision\" value=\"deny\" class=\"danger\">Deny</button></p></form>",
            csrf_field(s),
            id = esc(&a.id)
        );
        if s.is_admin() {
            body.push_str(
                "<p class=\"help\">Deciding needs an operator token; the admin token may not decide.</p>",
            );
        }
    }
    html::page(Some(s), status, "Approval", "/ui/approvals", &body)
}

pub async fn approval(
    State(c): Shared,
    s: Session,
    PathId(id): PathId,
    RawQuery(q): RawQuery,
) -> Response {
    let done: Done = params(q).unwrap_or_default();
    approval_page(&c, &s, &id, StatusCode::OK, &notice(done.done.as_deref())).await
}

pub async fn decide(
    State(c): Shared,
    s: Session,
    PathId(id): PathId,
    headers: HeaderMap,
    super::FormBody(body): super::FormBody,
) -> Response {
    let form = form_of(&body);
    if !check_csrf(&c, &s, &headers, &form.csrf) {
        return csrf_refused(&c, Some(&s), &headers, "decide").await;
    }
    let approve = match form.decision.as_str() {
        "approve" => true,
        "deny" => false,
        _ => {
            return html::error_page(
                Some(&s),
                StatusCode::BAD_REQUEST,
                "Not possible",
                "`decision` must be `approve` or `deny`",
            );
        }
    };
    let note = (!form.note.trim().is_empty()).then(|| form.note.trim().to_owned());
    match c
        .broker
        .decide_approval(&s.principal, &id, approve, note)
        .await
    {
        Ok(a) => Redirect::to(&format!(
            "/ui/approvals/{}?done={}",
            a.id,
            if approve { "approved" } else { "denied" }
        ))
        .into_response(),
        // The broker's refusal (own request, not permitted, no longer
        // pending), shown above the request.
        Err(e) => {
            let status = match &e {
                BrokerError::Forbidden(_) | BrokerError::Policy { .. } => StatusCode::FORBIDDEN,
                BrokerError::NotFound(_) => StatusCode::NOT_FOUND,
                BrokerError::Store(keymint_store::StoreError::Unavailable(_))
                | BrokerError::Unavailable(_)
                | BrokerError::Engine(_) => StatusCode::SERVICE_UNAVAILABLE,
                BrokerError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::CONFLICT,
            };
            let top = format!(
                "<p class=\"error\" role=\"alert\" id=\"decide-error\">Refused: {}</p>",
                esc(&message(e))
            );
            html::retry_later(approval_page(&c, &s, &id, status, &top).await)
        }
    }
}

// ---------------------------------------------------------------- audit

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct AuditQuery {
    kind: String,
    actor: String,
    task: String,
    workload: String,
    before: String,
}

impl AuditQuery {
    fn matches(&self, e: &AuditEvent) -> bool {
        let kind_ok = self.kind.is_empty()
            || e.kind == self.kind
            || (self.kind.ends_with('.') && e.kind.starts_with(&self.kind));
        kind_ok
            && (self.actor.is_empty() || e.actor == self.actor)
            && (self.task.is_empty() || e.task.as_deref() == Some(&self.task))
            && (self.workload.is_empty() || e.workload.as_deref() == Some(&self.workload))
    }
}

pub async fn audit(State(c): Shared, s: Session, RawQuery(q): RawQuery) -> Response {
    if let Err(e) = Broker::require_admin(&s.principal) {
        return failed(&s, e);
    }
    let Some(q) = params::<AuditQuery>(q) else {
        return invalid_query(&s);
    };
    let store = c.broker.store();
    let head = match store.audit_tail(1).await {
        Ok(v) => v.first().map_or(0, |e| e.seq),
        Err(e) => return failed(&s, e.into()),
    };
    // Events with seq < `hi`, read backwards in batches until a page is
    // full or AUDIT_SCAN events were read.
    let mut hi = match q.before.as_str() {
        "" => head + 1,
        v => match v.parse::<u64>() {
            Ok(n) => n.min(head + 1),
            Err(_) => return bad_filter(&s, "before"),
        },
    };
    let mut rows: Vec<AuditEvent> = Vec::new();
    let mut scanned = 0u64;
    while hi > 1 && rows.len() < PAGE as usize && scanned < AUDIT_SCAN {
        let after = hi.saturating_sub(1 + 500);
        let n = hi - 1 - after;
        let batch = match store.audit_after(after, n as u32).await {
            Ok(b) => b,
            Err(e) => return failed(&s, e.into()),
        };
        scanned += n;
        let mut whole = true;
        for e in batch.into_iter().rev() {
            if rows.len() >= PAGE as usize {
                whole = false;
                break;
            }
            // Examined: the next page starts below it.
            hi = e.seq;
            if q.matches(&e) {
                rows.push(e);
            }
        }
        if whole {
            hi = after + 1;
        }
    }
    let mut body = String::from("<h1>Audit trail</h1>");
    body.push_str(
        "<p><a class=\"button\" href=\"/ui/audit/verify\">Verify the chain</a> \
         <a class=\"button\" href=\"/ui/audit/export\" download>Export as JSON lines</a></p>",
    );
    body.push_str(
        "<form method=\"get\" action=\"/ui/audit\" class=\"filters\" role=\"search\" aria-label=\"Filter the audit trail\">",
    );
    text_input(
        &mut body,
        "kind",
        "Kind (e.g. task.ended, or lease. for all)",
        &q.kind,
    );
    text_input(&mut body, "actor", "Actor", &q.actor);
    text_input(&mut body, "task", "Task", &q.task);
    text_input(&mut body, "workload", "Workload", &q.workload);
    body.push_str("<button type=\"submit\">Filter</button></form>");
    body.push_str(
        "<table><caption>Audit events, newest first</caption><thead><tr><th scope=\"col\">Seq</th>\
         <th scope=\"col\">Time</th><th scope=\"col\">Kind</th><th scope=\"col\">Outcome</th>\
         <th scope=\"col\">Actor</th><th scope=\"col\">Task</th><th scope=\"col\">Lease</th>\
         <th scope=\"col\">Reason</th></tr></thead><tbody>",
    );
    for e in &rows {
        let outcome = serde_json::to_value(e.outcome)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e.seq,
            ts(e.time),
            esc(&e.kind),
            esc(&outcome),
            esc(&e.actor),
            e.task
                .as_deref()
                .map(|t| format!("<a href=\"/ui/tasks/{0}\">{0}</a>", esc(t)))
                .unwrap_or_default(),
            e.lease
                .as_deref()
                .map(|l| format!("<a href=\"/ui/leases/{0}\">{0}</a>", esc(l)))
                .unwrap_or_default(),
            esc(e.reason.as_deref().unwrap_or("")),
        );
    }
    if rows.is_empty() {
        body.push_str("<tr><td colspan=\"8\">No matching events in this range.</td></tr>");
    }
    body.push_str("</tbody></table>");
    let next = (hi > 1).then(|| hi.to_string());
    if scanned >= AUDIT_SCAN && rows.len() < PAGE as usize {
        let _ = write!(
            body,
            "<p class=\"help\">Searched {scanned} events; older ones are on the next page.</p>"
        );
    }
    pager(
        &mut body,
        "/ui/audit",
        &[
            ("kind", &q.kind),
            ("actor", &q.actor),
            ("task", &q.task),
            ("workload", &q.workload),
        ],
        next.as_deref(),
    );
    html::page(Some(&s), StatusCode::OK, "Audit", "/ui/audit", &body)
}

pub async fn audit_verify(State(c): Shared, s: Session) -> Response {
    let report = match c.broker.audit_verify(&s.principal).await {
        Ok(r) => r,
        Err(e) => return failed(&s, e),
    };
    let v = Verified {
        at: c.broker.now(),
        events: report.events,
        problem: report.problem.as_ref().map(ToString::to_string),
    };
    *c.last_verify.lock().unwrap_or_else(|p| p.into_inner()) = Some(v.clone());
    let mut body = String::from("<h1>Audit chain</h1>");
    match &v.problem {
        None => {
            let _ = write!(
                body,
                "<p class=\"notice\" role=\"status\" id=\"verify-result\">The chain is intact: \
                 {} events, each naming the hash of the one before.</p>",
                report.events
            );
            if let (Some(seq), Some(h)) = (report.last_seq, &report.last_hash) {
                let _ = write!(
                    body,
                    "<p>Last event {seq}, hash <code>{}</code>.</p>",
                    esc(h)
                );
            }
        }
        Some(p) => {
            let _ = write!(
                body,
                "<p class=\"error\" role=\"alert\" id=\"verify-result\">The chain is broken: {}</p>",
                esc(p)
            );
        }
    }
    body.push_str("<p><a href=\"/ui/audit\">Back to the audit trail</a></p>");
    html::page(Some(&s), StatusCode::OK, "Audit chain", "/ui/audit", &body)
}

/// A response body fed from a channel (the export, in batches). An error
/// ends it without the final chunk, so the download fails visibly.
struct ChannelBody(tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>);

impl http_body::Body for ChannelBody {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| b.map(http_body::Frame::data)))
    }
}

/// The whole chain as stored, one JSON event per line, streamed in
/// batches: `keymint audit verify --file` checks the download.
///
/// The first batch is read before anything is answered: a store that
/// cannot be read gets a 503 page, never a `200` with no events (an empty
/// file that reads as an intact chain). A later batch that fails ends the
/// body with an error: the connection is cut without the final chunk, so
/// the download fails instead of saving a prefix of the chain as if whole.
pub async fn audit_export(State(c): Shared, s: Session) -> Response {
    const BATCH: u32 = 1000;
    if let Err(e) = Broker::require_admin(&s.principal) {
        return failed(&s, e);
    }
    let store = Arc::clone(c.broker.store());
    let mut lines = match store.audit_lines_after(0, BATCH).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "console: audit export failed");
            return html::error_page(
                Some(&s),
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                "the audit trail cannot be read now; nothing was exported, try again shortly",
            );
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        while let Some(&(after, _)) = lines.last() {
            let mut buf = String::new();
            for (_, l) in &lines {
                buf.push_str(l);
                buf.push('\n');
            }
            if tx.send(Ok(bytes::Bytes::from(buf))).await.is_err() {
                return;
            }
            lines = match store.audit_lines_after(after, BATCH).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "console: audit export failed part-way");
                    let cut = std::io::Error::other("the audit trail could not be read to its end");
                    let _ = tx.send(Err(cut)).await;
                    return;
                }
            };
        }
    });
    let mut res = axum::body::Body::new(ChannelBody(rx)).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/jsonl"),
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"keymint-audit.jsonl\""),
    );
    res
}

// ------------------------------------------------------------ upstreams

pub async fn upstreams(State(c): Shared, s: Session) -> Response {
    if let Err(e) = Broker::require_admin(&s.principal) {
        return failed(&s, e);
    }
    let mut body = String::from("<h1>Upstreams and spend</h1>");
    let ups = match &c.proxy {
        Some(p) => p.upstreams().await,
        None => Vec::new(),
    };
    body.push_str(
        "<table><caption>Upstreams of the egress proxy</caption><thead><tr><th scope=\"col\">Name</th>\
         <th scope=\"col\">Kind</th><th scope=\"col\">Base URL</th><th scope=\"col\">Key</th></tr></thead><tbody>",
    );
    for u in &ups {
        let kind = serde_json::to_value(u.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let _ = write!(
            body,
            "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&u.name),
            esc(&kind),
            esc(&u.base_url),
            if u.key_set { "set" } else { "not set" }
        );
    }
    if ups.is_empty() {
        body.push_str("<tr><td colspan=\"4\">No upstreams configured.</td></tr>");
    }
    body.push_str("</tbody></table>");
    let now = c.broker.now();
    let from = Timestamp(now.millis() - now.millis().rem_euclid(3_600_000) - 23 * 3_600_000);
    let sp = match spend::since(&**c.broker.store(), from, now).await {
        Ok(sp) => sp,
        Err(e) => return failed(&s, e.into()),
    };
    body.push_str("<h2>Last 24 hours</h2>");
    body.push_str(&spend::chart(&sp.hourly, from));
    if sp.truncated {
        let _ = write!(
            body,
            "<p class=\"help\">Only the newest {} audit events were read.</p>",
            spend::SCAN_LIMIT
        );
    }
    if sp.by_upstream.is_empty() {
        body.push_str("<p>No use through the egress proxy in the last 24 hours.</p>");
    } else {
        use_table(&mut body, "Use per upstream", "Upstream", &sp.by_upstream);
        use_table(&mut body, "Use per role", "Role", &sp.by_role);
        use_table(&mut body, "Use per workload", "Workload", &sp.by_workload);
    }
    html::page(
        Some(&s),
        StatusCode::OK,
        "Upstreams and spend",
        "/ui/upstreams",
        &body,
    )
}

// -------------------------------------------------------------- entries

pub async fn entries(State(c): Shared, s: Session) -> Response {
    let list = match c.broker.list_entries(&s.principal, None).await {
        Ok(l) => l,
        Err(e) => return failed(&s, e),
    };
    let mut body = String::from("<h1>Registration entries</h1>");
    body.push_str(
        "<table><caption>Which processes on which node are which workload</caption><thead><tr>\
         <th scope=\"col\">Entry</th><th scope=\"col\">Workload</th><th scope=\"col\">Node</th>\
         <th scope=\"col\">Selectors</th><th scope=\"col\">Created</th></tr></thead><tbody>",
    );
    for e in &list {
        let _ = write!(
            body,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
            esc(&e.id),
            esc(&e.workload),
            esc(&e.node),
            esc(&e.selectors.to_string()),
            ts(e.created_at)
        );
    }
    if list.is_empty() {
        body.push_str("<tr><td colspan=\"5\">None.</td></tr>");
    }
    body.push_str("</tbody></table>");
    html::page(Some(&s), StatusCode::OK, "Entries", "/ui/entries", &body)
}

/// A method a page does not take (`PUT /ui/tasks`): the console's page,
/// with the `Allow` header axum adds.
pub async fn method_not_allowed() -> Response {
    html::error_page(
        None,
        StatusCode::METHOD_NOT_ALLOWED,
        "Method not allowed",
        "this page does not take that method",
    )
}

pub async fn not_found(s: Session) -> Response {
    html::error_page(
        Some(&s),
        StatusCode::NOT_FOUND,
        "Not found",
        "there is no such page",
    )
}
