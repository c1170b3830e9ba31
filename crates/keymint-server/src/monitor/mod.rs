//! Misuse monitoring (docs/design/0033-misuse-monitoring.md).
//!
//! The proxy hands every settled request to [`Monitor::observe`] (a
//! bounded channel; a full channel drops the observation and counts it, the
//! request never waits). One task per process ([`run`]) takes them in turn:
//!
//! 1. where from: the connection's peer, or, when the peer is one of
//!    `trusted_proxies`, the last address in `X-Forwarded-For` that is not;
//!    its country from the GeoIP database;
//! 2. count: per-minute buckets in memory for the upstream, the workload
//!    and the task ([`window::Minutes`]), and the hour's figures to add to
//!    the store;
//! 3. judge: each `[[monitoring.rules]]` rule for its subject: an absolute
//!    limit over the window, the window against the trailing baseline read
//!    from the store's hours, or a country the workload has not called
//!    from before;
//! 4. act: a rule that fires is audited (`monitor.alert`) and announced
//!    (the webhook), once per window and subject, and may suspend the
//!    task, the workload or the upstream key (`monitor.suspended`,
//!    [`crate::broker::suspensions`]).
//!
//! Every minute of the clock (and every 10 s) the hours and the callers'
//! addresses are written to the store, and the inventory entry of each
//! upstream key used is given its `last_used_at` (at most every
//! [`LAST_USED_EVERY_MS`]).

pub mod window;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use foldhash::{HashMap, HashMapExt as _};
use keymint_core::Timestamp;
use keymint_core::audit::{AuditDraft, Outcome};
use keymint_core::inventory::{ItemStatus, Origin};
use keymint_core::monitor::{Scope, SourceSeen, Suspension, UsageHour, hour_of};
use keymint_proxy::observe::{Observation, Seen};
use tokio::sync::mpsc;

use crate::broker::Broker;
use crate::monitoring_config::{Action, Cidr, MonitoringConfig, Rule, RuleKind};
use window::{Minutes, Totals};

/// Observations waiting for the monitor task at most.
const QUEUE: usize = 65_536;
/// Observations the task takes from the queue per wake-up (each is still
/// handled on its own, in the order it came).
const BATCH: usize = 256;
/// After a batch, the task lets the queue fill this long before it waits
/// on it again: under load the proxy's threads then queue observations
/// without waking the task for each one (a wake-up of another thread per
/// proxied request), and a lone observation is still judged at once.
const GATHER: Duration = Duration::from_millis(5);
/// The inventory's `last_used_at` of an upstream key is moved at most this
/// often (each move is a versioned write with its audit event).
pub const LAST_USED_EVERY_MS: i64 = 10 * 60 * 1000;
const FLUSH_EVERY: Duration = Duration::from_secs(10);
/// Deliveries tried per alert (1 s, 2 s, 4 s apart): a webhook down for
/// a moment still gets the alert, and a dead one costs at most four
/// attempts of at most 10 s each per alert (the audit trail has it
/// regardless).
const WEBHOOK_ATTEMPTS: u32 = 4;

/// How long a rule whose alert or suspension could not be written stays
/// quiet before it fires again.
const RETRY_FIRE_SECS: u64 = 5;

/// The proxy's side of the monitor.
#[derive(Debug)]
pub struct Monitor {
    tx: mpsc::Sender<Observation>,
    broker: Arc<Broker>,
    /// Observations dropped because the queue was full.
    pub dropped: AtomicU64,
}

impl keymint_proxy::observe::Monitor for Monitor {
    fn observe(&self, o: Observation) {
        if self.tx.try_send(o).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn upstream_suspended(&self, upstream: &str) -> Option<String> {
        self.broker
            .suspensions()
            .upstream(upstream)
            .map(|id| format!("`{id}`"))
    }
}

/// Builds the monitor and its task (to be spawned).
pub fn start(
    broker: Arc<Broker>,
    mut config: MonitoringConfig,
    webhook: Option<String>,
) -> (
    Arc<Monitor>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let monitor = Arc::new(Monitor {
        tx,
        broker: Arc::clone(&broker),
        dropped: AtomicU64::new(0),
    });
    let keep_secs = config
        .rules
        .iter()
        .map(Rule::window_secs)
        .max()
        .unwrap_or(60)
        .max(60);
    let worker = Worker {
        broker,
        rules: std::mem::take(&mut config.rules).into(),
        config,
        webhook,
        keep_secs,
        state: State::default(),
        dropped_seen: 0,
        monitor: Arc::downgrade(&monitor),
        marked: HashMap::new(),
    };
    (monitor, run(worker, rx))
}

/// Maps by scope ([`slot`]) and subject: a subject is looked up as the
/// `&str` the observation holds, and copied only the first time it is seen.
type ByScope<V> = [HashMap<String, V>; 3];

/// Where a scope's map sits in a [`ByScope`].
const fn slot(s: Scope) -> usize {
    match s {
        Scope::Upstream => 0,
        Scope::Workload => 1,
        Scope::Task => 2,
    }
}

const SCOPES: [Scope; 3] = [Scope::Upstream, Scope::Workload, Scope::Task];

/// Applies `f` to the value of `k`, a default one inserted first (the key
/// copied) only if `k` is not there yet.
fn update<K, V, Q>(m: &mut HashMap<K, V>, k: &Q, f: impl FnOnce(&mut V))
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: ToOwned<Owned = K> + std::hash::Hash + Eq + ?Sized,
    V: Default,
{
    match m.get_mut(k) {
        Some(v) => f(v),
        None => {
            let mut v = V::default();
            f(&mut v);
            m.insert(k.to_owned(), v);
        }
    }
}

#[derive(Debug, Default)]
struct State {
    minutes: ByScope<Minutes>,
    /// The hour's figures to add to the store, by hour, scope and subject.
    hours: HashMap<i64, ByScope<Totals>>,
    /// Callers' addresses by workload and address.
    sources: HashMap<String, HashMap<IpAddr, SourceSeen>>,
    /// Countries each workload called from (loaded from the store once).
    countries: HashMap<String, BTreeSet<String>>,
    /// Baseline totals by subject, for the period ending at the key's hour.
    baselines: ByScope<(Timestamp, Totals)>,
    /// Rules that fired, by rule and subject: quiet until then.
    fired: HashMap<(String, String), Timestamp>,
    upstreams_used: HashMap<String, Timestamp>,
    flushed_minute: i64,
}

struct Worker {
    broker: Arc<Broker>,
    /// The rules, taken out of `config` (which then holds none) and shared
    /// with each observation's pass over them.
    rules: Arc<[Rule]>,
    config: MonitoringConfig,
    webhook: Option<String>,
    keep_secs: u64,
    state: State,
    dropped_seen: u64,
    monitor: std::sync::Weak<Monitor>,
    /// When this process last saw each upstream key's `last_used_at`
    /// recorded: within [`LAST_USED_EVERY_MS`] of it the inventory is not
    /// read again.
    marked: HashMap<String, Timestamp>,
}

async fn run(mut w: Worker, mut rx: mpsc::Receiver<Observation>) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    w.flush().await;
                    return;
                }
                for o in batch.drain(..) {
                    w.handle(o).await;
                }
                if n < BATCH {
                    tokio::time::sleep(GATHER).await;
                }
            }
            _ = tick.tick() => w.flush().await,
        }
    }
}

/// The caller's address: the peer, or behind a trusted proxy the last
/// address in `X-Forwarded-For` that is not a trusted proxy itself.
///
/// An IPv4 address written as IPv6 (`::ffff:203.0.113.9`: a dual-stack
/// listener's peer, or a proxy's report of one) is the IPv4 address: it is
/// looked up, kept and compared as such. Until session 28 it was kept as
/// written, so a country database without the IPv4-mapped alias (the
/// IPv4 tree is reached through `::a.b.c.d` in a database built with
/// `ipv4_compatible`) found no country for it, and a workload calling from
/// a new country through a dual-stack listener raised no alert.
pub fn source(seen: &Seen, trusted: &[Cidr]) -> Option<IpAddr> {
    source_as_written(seen, trusted).map(|ip| ip.to_canonical())
}

fn source_as_written(seen: &Seen, trusted: &[Cidr]) -> Option<IpAddr> {
    let peer = seen.peer?;
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return Some(peer);
    }
    let Some(xff) = &seen.forwarded_for else {
        return Some(peer);
    };
    let mut last = peer;
    for part in xff.rsplit(',') {
        let Ok(ip) = part.trim().parse::<IpAddr>() else {
            // Not an address: what is left of it cannot be believed.
            return Some(last);
        };
        if !is_trusted(ip) {
            return Some(ip);
        }
        last = ip;
    }
    Some(last)
}

impl Worker {
    async fn handle(&mut self, o: Observation) {
        let now = o.at;
        let caller = Arc::clone(&o.seen.caller);
        let addr = source(&o.seen, &self.config.trusted_proxies);
        let country = match (&self.config.geoip, addr) {
            (Some(g), Some(ip)) => g.country(ip),
            _ => None,
        };
        let t = Totals {
            requests: 1,
            tokens: o.tokens,
            spend_nusd: o.spend_nusd,
        };
        let subjects: [&str; 3] = [&o.upstream, &caller.workload, &caller.task];
        let hours = self.state.hours.entry(hour_of(now).0).or_default();
        for (scope, subject) in SCOPES.into_iter().zip(subjects) {
            update(&mut self.state.minutes[slot(scope)], subject, |m| {
                m.add(now, t);
            });
            update(&mut hours[slot(scope)], subject, |h| h.add(t));
        }
        if let Some(ip) = addr {
            update(
                &mut self.state.sources,
                caller.workload.as_str(),
                |by_addr| {
                    let s = by_addr.entry(ip).or_insert_with(|| SourceSeen {
                        workload: caller.workload.clone(),
                        address: ip.to_string(),
                        country: country.clone(),
                        first_seen: now,
                        last_seen: now,
                        requests: 0,
                    });
                    s.last_seen = s.last_seen.max(now);
                    s.requests += 1;
                },
            );
        }
        update(
            &mut self.state.upstreams_used,
            o.upstream.as_str(),
            |used| {
                *used = (*used).max(now);
            },
        );
        if now.0.div_euclid(60_000) != self.state.flushed_minute {
            self.flush().await;
        }
        let rules = Arc::clone(&self.rules);
        for rule in rules.iter() {
            let subject = match rule.scope {
                Scope::Upstream => &o.upstream,
                Scope::Workload => &caller.workload,
                Scope::Task => &caller.task,
            };
            if let Some(detail) = self
                .judge(rule, subject, now, country.as_deref(), &caller.workload)
                .await
            {
                self.fire(rule, subject, &o, addr, country.as_deref(), detail)
                    .await;
            }
        }
    }

    /// What `rule` sees for `subject` now, in words, if it fires.
    async fn judge(
        &mut self,
        rule: &Rule,
        subject: &str,
        now: Timestamp,
        country: Option<&str>,
        workload: &str,
    ) -> Option<String> {
        let minutes = &self.state.minutes[slot(rule.scope)];
        match &rule.kind {
            RuleKind::Limit {
                metric,
                window_secs,
                limit,
            } => {
                let cur = minutes.get(subject)?.sum(now, *window_secs).get(*metric);
                (cur > *limit).then(|| {
                    format!(
                        "{} {} within {}s, above the limit {}",
                        metric.as_str(),
                        metric.shown(cur as f64),
                        window_secs,
                        metric.shown(*limit as f64)
                    )
                })
            }
            RuleKind::Baseline {
                metric,
                window_secs,
                factor,
                baseline_secs,
                min_baseline,
            } => {
                let cur = minutes.get(subject)?.sum(now, *window_secs).get(*metric);
                let (from, to) = window::baseline_period(now, *window_secs, *baseline_secs);
                let base = self.baseline(rule.scope, subject, from, to).await?;
                let avg = window::above_baseline(
                    cur,
                    base.get(*metric),
                    *factor,
                    *min_baseline,
                    *baseline_secs,
                    *window_secs,
                )?;
                Some(format!(
                    "{} {} within {}s, above {} x the trailing average {:.6} ({}s of history)",
                    metric.as_str(),
                    metric.shown(cur as f64),
                    window_secs,
                    factor,
                    metric.shown(avg),
                    baseline_secs
                ))
            }
            RuleKind::NewCountry => {
                let country = country?;
                let known = self.countries(workload).await?;
                if known.contains(country) {
                    return None;
                }
                let first = known.is_empty();
                let before: Vec<String> = known.iter().cloned().collect();
                known.insert(country.to_owned());
                // A workload's first country is learned, not alerted.
                (!first).then(|| {
                    format!(
                        "a request from {country}; this workload called before from {}",
                        before.join(", ")
                    )
                })
            }
        }
    }

    /// The totals of `subject` over the stored hours `[from, to)`.
    async fn baseline(
        &mut self,
        scope: Scope,
        subject: &str,
        from: Timestamp,
        to: Timestamp,
    ) -> Option<Totals> {
        if let Some((at, t)) = self.state.baselines[slot(scope)].get(subject)
            && *at == to
        {
            return Some(*t);
        }
        let hours = match self
            .broker
            .store()
            .usage_hours(scope, subject, from, to)
            .await
        {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "monitor: cannot read a baseline");
                return None;
            }
        };
        let mut t = Totals::default();
        for h in hours {
            t.add(Totals {
                requests: h.requests,
                tokens: h.tokens,
                spend_nusd: h.spend_nusd,
            });
        }
        self.state.baselines[slot(scope)].insert(subject.to_owned(), (to, t));
        Some(t)
    }

    async fn countries(&mut self, workload: &str) -> Option<&mut BTreeSet<String>> {
        if !self.state.countries.contains_key(workload) {
            let known = match self.broker.store().source_countries(workload).await {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(error = %e, "monitor: cannot read a workload's countries");
                    return None;
                }
            };
            self.state
                .countries
                .insert(workload.to_owned(), known.into_iter().collect());
        }
        self.state.countries.get_mut(workload)
    }

    /// Audits, announces and, if the rule says so, suspends; once per
    /// rule, subject and window.
    async fn fire(
        &mut self,
        rule: &Rule,
        subject: &str,
        o: &Observation,
        addr: Option<IpAddr>,
        country: Option<&str>,
        detail: String,
    ) {
        let now = o.at;
        // A new country fires once by being learned (`judge`): a quiet
        // window would hide the next new country, learned meanwhile and so
        // never alerted (until session 28).
        let quiet = (!matches!(rule.kind, RuleKind::NewCountry))
            .then(|| (rule.name.clone(), subject.to_owned()));
        if let Some(q) = &quiet
            && self.state.fired.get(q).is_some_and(|until| *until > now)
        {
            return;
        }
        // The quiet window starts only once the alert and its suspension
        // are written: a write that failed (the store busy, a failover)
        // leaves the rule quiet for `RETRY_FIRE_SECS` only, then it fires
        // again on the next observation, instead of the task running
        // unsuspended for the whole window (until the sweep of
        // 2026-12-06). Not at once: while the store is down, that would be
        // a webhook call for every request above the threshold.
        let mut written = true;
        let c = &o.seen.caller;
        let broker = &self.broker;
        let mut ev = AuditDraft::new(now, "monitor.alert", "keymint")
            .outcome(Outcome::Failure)
            .reason(detail.clone())
            .task(&c.task)
            .lease(&c.lease)
            .workload(&c.workload)
            .role(&c.role)
            .data("rule", rule.name.clone())
            .data("scope", rule.scope.as_str())
            .data("subject", subject)
            .data("upstream", o.upstream.clone())
            .data("action", rule.action.as_str());
        if let Some(ip) = addr {
            ev = ev.data("source", ip.to_string());
        }
        if let Some(cc) = country {
            ev = ev.data("country", cc);
        }
        if let Err(e) = broker.store().append_audit(ev).await {
            written = false;
            tracing::error!(error = %e, "monitor: cannot audit an alert");
        }
        tracing::warn!(rule = %rule.name, subject, detail, "misuse monitoring: rule fired");
        let target = match rule.action {
            Action::Alert => None,
            Action::SuspendTask => Some((Scope::Task, c.task.clone())),
            Action::SuspendWorkload => Some((Scope::Workload, c.workload.clone())),
            Action::SuspendUpstream => Some((Scope::Upstream, o.upstream.clone())),
        };
        let mut suspension = None;
        if let Some((scope, what)) = target {
            let s = Suspension {
                id: keymint_core::id::suspension_id(now),
                scope,
                subject: what.clone(),
                rule: rule.name.clone(),
                reason: detail.clone(),
                created_at: now,
                created_by: "keymint".into(),
                lifted_at: None,
                lifted_by: None,
            };
            let mut ev = AuditDraft::new(now, "monitor.suspended", "keymint")
                .outcome(Outcome::Denied)
                .reason(detail.clone())
                .data("suspension", s.id.clone())
                .data("rule", rule.name.clone())
                .data("scope", scope.as_str())
                .data("subject", what);
            ev = match scope {
                Scope::Task => ev.task(&c.task).workload(&c.workload),
                Scope::Workload => ev.workload(&c.workload),
                Scope::Upstream => ev.data("upstream", o.upstream.clone()),
            };
            match broker.suspend(s.clone(), ev).await {
                Ok(true) => suspension = Some(s.id),
                Ok(false) => {}
                Err(e) => {
                    written = false;
                    tracing::error!(error = %e, "monitor: cannot store a suspension; the rule fires again on the next request");
                }
            }
        }
        if let Some(q) = quiet {
            let secs = if written {
                rule.window_secs().max(60)
            } else {
                RETRY_FIRE_SECS
            };
            self.state.fired.insert(q, now.plus_secs(secs));
        }
        broker.notify_audit();
        if let Some(url) = self.webhook.clone() {
            let body = serde_json::json!({
                "type": "keymint.monitor.alert",
                "rule": rule.name,
                "scope": rule.scope.as_str(),
                "subject": subject,
                "detail": detail,
                "action": rule.action.as_str(),
                "suspension": suspension,
                "task": c.task,
                "workload": c.workload,
                "upstream": o.upstream,
                "country": country,
                "at": now.rfc3339(),
            });
            let broker = Arc::clone(broker);
            tokio::spawn(async move {
                let client = crate::webhook::Client::new();
                for attempt in 1..=WEBHOOK_ATTEMPTS {
                    match client.post_json(&url, &body).await {
                        Ok(()) => return,
                        Err(e) => {
                            broker
                                .metrics
                                .webhook_failures
                                .fetch_add(1, Ordering::Relaxed);
                            if attempt == WEBHOOK_ATTEMPTS {
                                tracing::warn!(attempt, error = %e, "monitor webhook failed; the alert is in the audit trail only");
                                return;
                            }
                            tracing::warn!(attempt, error = %e, "monitor webhook failed; will retry");
                        }
                    }
                    let wait = crate::broker::backoff_ms(attempt);
                    tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())).await;
                }
            });
        }
    }

    /// Writes the hours and sources, moves `last_used_at`, forgets what no
    /// window needs.
    async fn flush(&mut self) {
        let now = self.broker.now();
        self.state.flushed_minute = now.0.div_euclid(60_000);
        let store = Arc::clone(self.broker.store());
        let mut hours: Vec<UsageHour> = Vec::new();
        for (hour, by_scope) in self.state.hours.drain() {
            for (scope, subjects) in SCOPES.into_iter().zip(by_scope) {
                hours.extend(subjects.into_iter().map(|(subject, t)| UsageHour {
                    hour: Timestamp(hour),
                    scope,
                    subject,
                    requests: t.requests,
                    tokens: t.tokens,
                    spend_nusd: t.spend_nusd,
                }));
            }
        }
        if !hours.is_empty() {
            for b in &mut self.state.baselines {
                b.clear();
            }
            if let Err(e) = store.add_usage_hours(hours.clone()).await {
                tracing::warn!(error = %e, "monitor: cannot record the hours; kept for the next try");
                for h in hours {
                    let by_scope = self.state.hours.entry(h.hour.0).or_default();
                    by_scope[slot(h.scope)]
                        .entry(h.subject)
                        .or_default()
                        .add(Totals {
                            requests: h.requests,
                            tokens: h.tokens,
                            spend_nusd: h.spend_nusd,
                        });
                }
            }
        }
        let sources: Vec<SourceSeen> = self
            .state
            .sources
            .drain()
            .flat_map(|(_, by_addr)| by_addr.into_values())
            .collect();
        if !sources.is_empty()
            && let Err(e) = store.note_sources(sources).await
        {
            tracing::warn!(error = %e, "monitor: cannot record the callers' addresses");
        }
        let used: Vec<(String, Timestamp)> = self.state.upstreams_used.drain().collect();
        for (upstream, at) in used {
            if self
                .marked
                .get(&upstream)
                .is_some_and(|t| at.0 - t.0 < LAST_USED_EVERY_MS)
            {
                continue;
            }
            match mark_used(&self.broker, &upstream, at).await {
                Ok(Some(recorded)) => {
                    self.marked.insert(upstream, recorded);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "monitor: cannot record an upstream key's last use");
                }
            }
        }
        let keep = self.keep_secs;
        for m in &mut self.state.minutes {
            m.retain(|_, m| !m.prune(now, keep));
        }
        self.state.fired.retain(|_, until| *until > now);
        if let Some(m) = self.monitor.upgrade() {
            let d = m.dropped.load(Ordering::Relaxed);
            if d > self.dropped_seen {
                tracing::warn!(
                    dropped = d - self.dropped_seen,
                    "monitor: observations dropped, the queue was full"
                );
                self.dropped_seen = d;
            }
        }
    }
}

/// Moves the `last_used_at` of `upstream`'s key in the inventory to `at`,
/// if it is older than [`LAST_USED_EVERY_MS`] (a lost race is left to the
/// next flush). Answers the `last_used_at` the entry now has, `None` if
/// there is no entry or the write lost a race.
async fn mark_used(
    broker: &Broker,
    upstream: &str,
    at: Timestamp,
) -> crate::broker::Result<Option<Timestamp>> {
    let items = broker.store().list_inventory(None, 1000).await?;
    let Some(item) = items.into_iter().find(|i| {
        i.origin == Origin::Upstream
            && i.status == ItemStatus::Active
            && i.upstream.as_deref() == Some(upstream)
    }) else {
        return Ok(None);
    };
    if let Some(t) = item.last_used_at
        && at.0 - t.0 < LAST_USED_EVERY_MS
    {
        return Ok(Some(t));
    }
    let read = item.version;
    let mut next = item;
    next.last_used_at = Some(at);
    let ev = AuditDraft::new(broker.now(), "inventory.used", "keymint")
        .fingerprint(next.fingerprint.clone())
        .data("upstream", upstream)
        .data("last_used_at", at.rfc3339());
    Ok(broker.put_item(next, read, ev).await?.map(|_| at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keymint_proxy::gate::Caller;

    fn seen(peer: &str, xff: Option<&str>) -> Seen {
        Seen {
            caller: Arc::new(Caller {
                lease: "l".into(),
                task: "t".into(),
                workload: "w".into(),
                role: "r".into(),
                fingerprint: "f".into(),
            }),
            peer: Some(peer.parse().unwrap()),
            forwarded_for: xff.map(str::to_owned),
        }
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
        // Not from a trusted proxy: the header is the caller's word.
        assert_eq!(
            source(&seen("203.0.113.5", Some("198.51.100.1")), &trusted),
            ip("203.0.113.5")
        );
        // From one: the last address that is not a trusted proxy.
        assert_eq!(
            source(
                &seen("10.0.0.1", Some("198.51.100.1, 192.0.2.9, 10.0.0.7")),
                &trusted
            ),
            ip("192.0.2.9")
        );
        // No header, or nothing but proxies: the last proxy.
        assert_eq!(source(&seen("10.0.0.1", None), &trusted), ip("10.0.0.1"));
        assert_eq!(
            source(&seen("10.0.0.1", Some("10.0.0.2")), &trusted),
            ip("10.0.0.2")
        );
        // Garbage stops the walk at what was believed so far.
        assert_eq!(
            source(&seen("10.0.0.1", Some("198.51.100.1, not-an-ip")), &trusted),
            ip("10.0.0.1")
        );
        // Nothing trusted: never the header.
        assert_eq!(
            source(&seen("10.0.0.1", Some("198.51.100.1")), &[]),
            ip("10.0.0.1")
        );
    }
}
