//! keymint's egress proxy: an agent sends its short-lived `kmt_` token where
//! a provider key would go; the proxy checks it, applies the role's rules and
//! budgets, puts the real key (sealed in the store) on the request and
//! forwards it to the one upstream the role names.
//!
//! Shape of a request (`/proxy/<upstream>/<path>`, any method), one named
//! step each in `request`:
//!
//! 1. route: the upstream must be configured; the path may not leave its
//!    base;
//! 2. authenticate: the token (`Authorization: Bearer`, `x-api-key` or
//!    `api-key`) must be a live lease; the broker decides, through the
//!    [`gate::Gate`] (one authentication path and one token cache for the
//!    API and the proxy);
//! 3. authorise: the role must name this upstream and allow the endpoint
//!    ([`provider`]);
//! 4. envelope: only the client headers the upstream's kind needs go on,
//!    screened like the body, with the query (decoded) and the path;
//! 5. read body: bounded in size and time;
//! 6. screen: secrets in the body are blocked or redacted ([`detect`],
//!    over `keymint-scan`'s rules);
//! 7. reserve: the model must be allowed; the request's maximum use is
//!    reserved against the task's budgets ([`budget`]) and rate limits ([`rates`]);
//! 8. rewrite: output capped to the reservation, the client's credentials
//!    replaced by the upstream's key;
//! 9. send: forwarded within the upstream's timeout;
//! 10. meter: the response passes back (streams chunk by chunk, [`sse`]) and
//!     the reservation is settled against the usage it reports.
//!
//! Refusals answer in the provider's error shape; a refused credential is
//! audited as `auth.failed` and any other refusal as `proxy.denied`, both
//! within the broker's bound (a burst per window, then one summary), and
//! counted in full in the metrics. Budgets live in the store: a request's
//! reservation is recorded (and durable) before it is forwarded and settled
//! after; use is audited per lease and interval from the settled
//! reservations in the store, so a crash loses none of it
//! (docs/design/0015-durable-budgets.md).

pub mod budget;
mod chunks;
pub mod config;
pub mod detect;
pub mod federated;
pub mod gate;
mod h1;
pub mod keys;
pub mod metrics;
pub mod observe;
mod offload;
mod peek;
mod pool;
pub mod provider;
pub mod rates;
mod reflect;
mod request;
pub mod sse;
pub mod within;

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use foldhash::{HashMap, HashMapExt as _};
use keymint_core::audit::{AuditDraft, Outcome};
use keymint_core::keyring::Keyring;
use keymint_core::{Clock, Timestamp};
use keymint_store::{BudgetSettle, ChunkSettle, ReservationFor, Store, StoreError, UsageSummary};
use serde::Serialize;
use zeroize::Zeroizing;

use crate::budget::{Ask, Refusal, Reservation, Usage};
use crate::chunks::{Chunks, Draw, Refill};
use crate::config::{Policy, Prices, ProxySettings, Upstream, UpstreamKind};
use crate::gate::{Caller, Gate};
use crate::metrics::ProxyMetrics;
use crate::rates::{Limits, Rates, Took};
use keymint_core::role::Egress;

/// Where the proxy is mounted.
pub const PREFIX: &str = "/proxy/";

/// Whether `path` is the proxy's: `/proxy/{upstream}` or
/// `/proxy/{upstream}/{*path}`, as axum's router matched them: an upstream
/// without `/` (non-empty when nothing follows it), then nothing, or `/`
/// and at least one more byte. Any other path, `/proxy/`, `/proxy//` and
/// `/proxy/x/` among them, is not the proxy's.
pub fn serves(path: &str) -> bool {
    let Some(after) = path.strip_prefix(PREFIX) else {
        return false;
    };
    match after.split_once('/') {
        None => !after.is_empty(),
        // An empty upstream here is the router's match too (its pattern
        // matched `/proxy//x`); the proxy refuses it as unknown.
        Some((_, rest)) => !rest.is_empty(),
    }
}
/// Largest upstream response body read whole (non-streamed responses).
const MAX_RESPONSE: usize = 64 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// A reservation still open this long after it was made is settled by the
/// sweep as used in full: its request outlived any stream keymint serves,
/// or the process that held it is gone.
pub const RESERVATION_DEADLINE_MS: i64 = 60 * 60 * 1000;
/// Reservations swept or summarised per store call.
const SWEEP_BATCH: u32 = 1000;
/// How long a request waits for a chunk being reserved for its lease
/// before it asks the store on its own.
const CHUNK_WAIT: Duration = Duration::from_secs(5);

/// The sealed-secret name of an upstream's key.
pub fn key_secret_name(upstream: &str) -> String {
    format!("upstream/{upstream}/key")
}

/// What the proxy is built from.
#[derive(Debug)]
pub struct ProxyParts {
    pub store: Arc<dyn Store>,
    pub keyring: Arc<Keyring>,
    pub clock: Arc<dyn Clock>,
    /// Who may call: the broker's authentication and bounded audit.
    pub gate: Arc<dyn Gate>,
    pub upstreams: Vec<Upstream>,
    /// The egress part of each role that names an upstream, by role name.
    pub roles: Vec<(String, Egress)>,
    pub prices: Prices,
    pub settings: ProxySettings,
    /// Tokens of the upstreams that authenticate by federation.
    pub tokens: Option<Arc<dyn federated::UpstreamTokens>>,
    /// Misuse monitoring (docs/design/0033), told of every settled request.
    pub monitor: Option<Arc<dyn observe::Monitor>>,
}

/// An upstream as shown by the API: never its key.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct UpstreamInfo {
    pub name: String,
    pub kind: UpstreamKind,
    pub base_url: String,
    pub key_set: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no upstream named `{0}`")]
    UnknownUpstream(String),
    #[error("{0}")]
    Invalid(&'static str),
    #[error("the key could not be stored")]
    Store,
}

pub struct Proxy {
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    clock: Arc<dyn Clock>,
    gate: Arc<dyn Gate>,
    /// Each upstream by name, with its connections.
    upstreams: HashMap<String, (Upstream, Arc<pool::Pool>)>,
    roles: Arc<HashMap<String, Egress>>,
    prices: Prices,
    settings: ProxySettings,
    rates: Rates,
    /// Budget reserved in chunks, drawn from in memory (docs/design/0030).
    chunks: Chunks,
    /// One chunk flush at a time: a part that closes a chunk is never
    /// recorded before an earlier part of it.
    flushing: tokio::sync::Mutex<()>,
    /// The outbound secret screen (`None`: its rules did not compile, and
    /// the proxy refuses what it cannot screen).
    screen: Option<&'static keymint_scan::Screen>,
    keys: RwLock<HashMap<String, Arc<Zeroizing<String>>>>,
    tokens: Option<Arc<dyn federated::UpstreamTokens>>,
    monitor: Option<Arc<dyn observe::Monitor>>,
    pub metrics: ProxyMetrics,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("upstreams", &self.upstreams.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Settles a reservation once: at the end of the response, or (with no
/// usage known, so at the full reservation) when dropped. If even that
/// never happens (a crash), the reservation stays open in the store and
/// the sweep charges it in full.
pub(crate) struct Settlement {
    pub(crate) proxy: Arc<Proxy>,
    pub(crate) upstream: String,
    pub(crate) res: Option<Reservation>,
    /// Who sent the request, for misuse monitoring.
    pub(crate) seen: Option<observe::Seen>,
}

impl Settlement {
    /// Settles, and returns once the settle is recorded in the store.
    pub(crate) async fn settle(&mut self, actual: Option<(u64, u64)>) {
        if let Some(f) = self.settling(actual) {
            f.await;
        }
    }

    /// The settle, to be awaited (`None` if already settled).
    pub(crate) fn settling(
        &mut self,
        actual: Option<(u64, u64)>,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let res = self.res.take()?;
        let proxy = Arc::clone(&self.proxy);
        let upstream = std::mem::take(&mut self.upstream);
        let seen = self.seen.take();
        Some(async move { proxy.settle(upstream, res, actual, seen).await })
    }

    /// Settles in the background (a drop).
    pub(crate) fn finish(&mut self, actual: Option<(u64, u64)>) {
        let Some(f) = self.settling(actual) else {
            return;
        };
        // Outside a runtime the reservation stays open: the sweep charges
        // it in full.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(f);
        }
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        self.finish(None);
    }
}

/// A reservation the store made for a request that may have gone away
/// while it was being made: given back unused if dropped before the
/// request takes it (the request was never sent).
struct Unsent {
    proxy: Arc<Proxy>,
    upstream: String,
    /// The rate-limit tokens the request took.
    tokens: u64,
    res: Option<Reservation>,
}

impl Drop for Unsent {
    fn drop(&mut self) {
        if let Some(res) = self.res.take() {
            self.proxy.release(&self.upstream, res, self.tokens);
        }
    }
}

/// A request's take from the rate limits, made in the store for a request
/// that may have gone away meanwhile: given back (the request and its
/// tokens) if dropped before the request takes it (`task` set).
struct RatesTaken {
    proxy: Arc<Proxy>,
    task: Option<String>,
    took: Took,
    tokens: u64,
}

impl Drop for RatesTaken {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            let now = self.proxy.clock.now();
            self.proxy
                .rates
                .give_back(&task, self.took, self.tokens, 0, true, now);
        }
    }
}

/// Runs `work` in a task of its own and answers its output; `None` if the
/// task ended without one (its runtime is stopping). A caller that stops
/// waiting (a client that went away drops the request's future) does not
/// stop `work`: its output is dropped where it lies, and gives back in its
/// `Drop` whatever it holds.
async fn to_the_end<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = tx.send(work.await);
    });
    rx.await.ok()
}

impl Proxy {
    pub fn new(p: ProxyParts) -> Self {
        let https = pool::connector(CONNECT_TIMEOUT);
        let metrics = ProxyMetrics::new(p.upstreams.iter().map(|u| u.name.as_str()));
        Self {
            gate: p.gate,
            store: p.store,
            keyring: p.keyring,
            clock: p.clock,
            upstreams: p
                .upstreams
                .into_iter()
                .map(|u| {
                    let pool = Arc::new(pool::Pool::new(https.clone()));
                    (u.name.clone(), (u, pool))
                })
                .collect(),
            roles: Arc::new(p.roles.into_iter().collect()),
            prices: p.prices,
            settings: p.settings,
            rates: Rates::default(),
            chunks: Chunks::default(),
            flushing: tokio::sync::Mutex::new(()),
            screen: detect::screen(),
            keys: RwLock::new(HashMap::new()),
            tokens: p.tokens,
            monitor: p.monitor,
            metrics,
        }
    }

    /// Serves one request on the proxy's path ([`serves`]), any method.
    /// Called directly by the listener's front, ahead of any router
    /// (design 0029, "Fifth pass").
    ///
    /// Not an `async fn` of its own: the request's future is
    /// [`request::handle`]'s, not one wrapped around it.
    pub fn handle<'a>(
        self: &'a Arc<Self>,
        req: axum::extract::Request,
    ) -> impl Future<Output = axum::response::Response> + Send + 'a {
        request::handle(self, req)
    }

    /// Counts and logs a response that carried the upstream's key back
    /// (redacted before the agent saw it). The key is never logged.
    pub(crate) fn key_reflected(&self, upstream: &str) {
        if let Some(c) = self.metrics.upstream(upstream) {
            c.key_reflections
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        tracing::warn!(
            upstream,
            "proxy: the upstream's response carried its own key; redacted before it reached the agent"
        );
    }

    /// Why `upstream`'s key may not be used now (misuse monitoring).
    pub(crate) fn upstream_suspended(&self, upstream: &str) -> Option<String> {
        self.monitor.as_ref()?.upstream_suspended(upstream)
    }

    pub fn has_upstreams(&self) -> bool {
        !self.upstreams.is_empty()
    }

    // ------------------------------------------------------------ keys

    /// Seals and stores an upstream's key. The key is never returned.
    pub async fn set_key(
        &self,
        upstream: &str,
        key: Zeroizing<String>,
        actor: &str,
    ) -> Result<(), KeyError> {
        match self.upstreams.get(upstream) {
            None => return Err(KeyError::UnknownUpstream(upstream.to_owned())),
            Some((u, _)) if u.federation.is_some() => {
                return Err(KeyError::Invalid(
                    "this upstream authenticates by federation and takes no key",
                ));
            }
            Some(_) => {}
        }
        let key = Zeroizing::new(key.trim().to_owned());
        if key.is_empty() {
            return Err(KeyError::Invalid("the key is empty"));
        }
        if key.len() > 8192 {
            return Err(KeyError::Invalid("the key is longer than 8192 bytes"));
        }
        // INVARIANT: the key goes into a header or a query; a control
        // character would let it forge another header.
        if !key.bytes().all(|b| (0x21..0x7f).contains(&b)) {
            return Err(KeyError::Invalid(
                "the key must be printable ASCII without spaces",
            ));
        }
        let name = key_secret_name(upstream);
        let sealed = self
            .keyring
            .seal(&name, key.as_bytes())
            .map_err(|_| KeyError::Store)?;
        let now = self.clock.now();
        self.store
            .put_secret(&name, sealed, now)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "proxy: cannot store an upstream key");
                KeyError::Store
            })?;
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(upstream.to_owned(), Arc::new(key.clone()));
        let ev = AuditDraft::new(now, "upstream.key_set", actor)
            .fingerprint(self.keyring.fingerprint(key.as_bytes()))
            .data("upstream", upstream);
        if let Err(e) = self.store.append_audit(ev).await {
            tracing::error!(error = %e, "proxy: cannot audit an upstream key change");
        }
        Ok(())
    }

    async fn key(&self, upstream: &str) -> Option<Arc<Zeroizing<String>>> {
        if let Some(k) = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(upstream)
        {
            return Some(Arc::clone(k));
        }
        let name = key_secret_name(upstream);
        let sealed = match self.store.get_secret(&name).await {
            Ok(s) => s?,
            Err(e) => {
                tracing::error!(error = %e, "proxy: cannot read an upstream key");
                return None;
            }
        };
        let opened = match self.keyring.open(&name, &sealed) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(upstream, error = %e, "proxy: cannot open an upstream key");
                return None;
            }
        };
        let key = Arc::new(Zeroizing::new(String::from_utf8(opened.to_vec()).ok()?));
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(upstream.to_owned(), Arc::clone(&key));
        Some(key)
    }

    /// The federated token of `upstream`, each refresh and each failed
    /// exchange audited (`upstream.token_refreshed`,
    /// `upstream.token_failed`, by fingerprint and provider message only).
    pub(crate) async fn federated_token(
        &self,
        upstream: &str,
    ) -> Result<Arc<Zeroizing<String>>, federated::TokenUnavailable> {
        let Some(source) = &self.tokens else {
            return Err(federated::TokenUnavailable {
                message: "no token source is configured".into(),
                attempted: false,
            });
        };
        let now = self.clock.now();
        match source.token(upstream).await {
            Ok(t) => {
                if let Some(exp) = t.refreshed {
                    let ev = AuditDraft::new(now, "upstream.token_refreshed", "keymint")
                        .fingerprint(self.keyring.fingerprint(t.token.as_bytes()))
                        .data("upstream", upstream)
                        .data("expires_at", exp.rfc3339());
                    if let Err(e) = self.store.append_audit(ev).await {
                        tracing::error!(error = %e, "proxy: cannot audit a token refresh");
                    }
                }
                Ok(t.token)
            }
            Err(e) => {
                if e.attempted {
                    tracing::warn!(upstream, error = %e, "proxy: no federated token");
                    let ev = AuditDraft::new(now, "upstream.token_failed", "keymint")
                        .outcome(Outcome::Failure)
                        .data("upstream", upstream)
                        .data("error", e.message.clone());
                    if let Err(e) = self.store.append_audit(ev).await {
                        tracing::error!(error = %e, "proxy: cannot audit a failed token exchange");
                    }
                }
                Err(e)
            }
        }
    }

    /// Every upstream, and whether its key is set.
    pub async fn upstreams(&self) -> Vec<UpstreamInfo> {
        let mut v = Vec::with_capacity(self.upstreams.len());
        for (u, _) in self.upstreams.values() {
            let key_set = matches!(
                self.store.get_secret(&key_secret_name(&u.name)).await,
                Ok(Some(_))
            );
            v.push(UpstreamInfo {
                name: u.name.clone(),
                kind: u.kind,
                base_url: u.base_url(),
                key_set,
            });
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    // ------------------------------------------------------------ budgets

    /// Reserves `ask` for `caller`'s task against its budgets (in the store:
    /// the task's and every ancestor's; drawn from a chunk this process
    /// holds for the lease when it can) and its rate limits (in the store,
    /// spent from what this process holds: [`rates`]).
    pub(crate) async fn reserve(
        self: &Arc<Self>,
        caller: &Caller,
        upstream: &str,
        policy: &Policy,
        ask: Ask,
    ) -> Result<Reservation, Refusal> {
        if ask.metered && policy.max_spend_nusd().is_some() && ask.price.is_none() {
            return Err(Refusal::UnknownCost);
        }
        let now = self.clock.now();
        let tokens = if ask.metered {
            ask.input.saturating_add(ask.output)
        } else {
            0
        };
        let limits = Limits::of(policy);
        let took = Took { limits, at: now };
        if let Some(short) = self.rates.take_held(&caller.task, limits, tokens, now) {
            // The store's buckets are asked in a task of their own, as the
            // budget is below (`hold`): a request dropped meanwhile gives
            // back what it took (`RatesTaken`).
            let proxy = Arc::clone(self);
            let (taken, mut guard) = to_the_end(async move {
                let answer = proxy.store.take_rates(short.asks(), now).await;
                let taken = proxy.rates.taken(&short, answer, proxy.clock.now());
                let task = taken.is_ok().then_some(short.task);
                (
                    taken,
                    RatesTaken {
                        proxy,
                        task,
                        took,
                        tokens,
                    },
                )
            })
            .await
            .ok_or(Refusal::Unavailable)?;
            guard.task = None;
            taken?;
        }
        let res = match self.hold(caller, upstream, ask, now, took, tokens).await {
            Ok(r) => r,
            Err(e) => {
                self.rates
                    .give_back(&caller.task, took, tokens, 0, true, self.clock.now());
                return Err(e);
            }
        };
        // The token bucket keeps only what was granted.
        self.rates.give_back(
            &caller.task,
            took,
            tokens,
            res.input.saturating_add(res.output),
            false,
            now,
        );
        Ok(res)
    }

    /// The budget part of [`Proxy::reserve`]: a share of a chunk when this
    /// process holds one with room for the lease, else a reservation in the
    /// store: a chunk (sized by [`budget::fit_chunk`]) for the one request
    /// that reserves the lease's next chunk, exactly one request's amount
    /// for any other.
    async fn hold(
        self: &Arc<Self>,
        caller: &Caller,
        upstream: &str,
        ask: Ask,
        now: Timestamp,
        took: Took,
        tokens: u64,
    ) -> Result<Reservation, Refusal> {
        let share = budget::share(ask);
        let mut reserver: Option<Refill> = None;
        if let Some(share) = share {
            let mut waited = false;
            loop {
                match self.chunks.draw(&caller.lease, upstream, share, now) {
                    Draw::Drawn { id, refill } => {
                        if let Some(r) = refill {
                            self.refill(caller, upstream, ask, r);
                        }
                        return Ok(drawn(&caller.task, &caller.lease, id, share, ask, took));
                    }
                    Draw::Wait(mut rx) if !waited => {
                        waited = true;
                        let _ = tokio::time::timeout(CHUNK_WAIT, rx.wait_for(|done| *done)).await;
                    }
                    Draw::Wait(_) => break,
                    Draw::Reserve(tx) => {
                        reserver = tx;
                        break;
                    }
                }
            }
        }
        // The store is asked in a task of its own. A client that goes away
        // meanwhile drops this request's future, and with it the wait; the
        // reservation the store makes after that is given back unused at
        // once (`Unsent`), where it would otherwise stay open until the
        // sweep charged it in full (`RESERVATION_DEADLINE_MS`). The chunk a
        // reserver asked for still reaches the lease's pool.
        let proxy = Arc::clone(self);
        let who = self.reserver(caller, upstream);
        let (task, lease) = (caller.task.clone(), caller.lease.clone());
        let held = to_the_end(async move {
            let upstream = who.upstream.clone();
            let held = proxy
                .hold_in_store(
                    who, &task, &lease, &upstream, ask, took, share, reserver, now,
                )
                .await;
            held.map(|res| Unsent {
                proxy,
                upstream,
                tokens,
                res: Some(res),
            })
        })
        .await;
        match held {
            Some(Ok(mut unsent)) => unsent.res.take().ok_or(Refusal::Unavailable),
            Some(Err(refusal)) => Err(refusal),
            None => Err(Refusal::Unavailable),
        }
    }

    /// The store part of [`Proxy::hold`]: a reservation of the request's
    /// own, or (for `reserver`) the lease's next chunk with the request's
    /// share drawn from it.
    #[allow(clippy::too_many_arguments)]
    async fn hold_in_store(
        &self,
        who: ReservationFor,
        task: &str,
        lease: &str,
        upstream: &str,
        ask: Ask,
        took: Took,
        share: Option<Usage>,
        reserver: Option<Refill>,
        now: Timestamp,
    ) -> Result<Reservation, Refusal> {
        let roles = Arc::clone(&self.roles);
        let chunk_of = reserver.as_ref().map(|r| r.most);
        // INVARIANT (DESIGN.md 2 and 6): the reservation (a chunk, or the
        // request's own) is durable before the request is forwarded, and
        // held against every ancestor task.
        let decided = self
            .store
            .reserve_budget(
                who,
                Box::new(move |levels| {
                    let of = |r: &str| roles.get(r).map(|e| &e.proxy);
                    match chunk_of {
                        Some(most) => budget::fit_chunk(levels, of, ask, most),
                        None => budget::fit(levels, of, ask),
                    }
                }),
            )
            .await;
        let held = match decided {
            Ok(h) => h,
            Err(e) => {
                // A request larger than a budget allows in all says nothing
                // of the next ones: the pool goes exact only when a budget
                // is used up.
                let exhausted = matches!(e, StoreError::BudgetExhausted(what)
                    if budget::more_than_allowed(what).is_none());
                if let Some(r) = reserver {
                    self.chunks
                        .reserved_none(lease, upstream, exhausted, r.done);
                }
                return Err(match e {
                    StoreError::BudgetExhausted(what) => Refusal::Budget(what),
                    e => {
                        tracing::error!(error = %e, "proxy: cannot reserve budget");
                        Refusal::Unavailable
                    }
                });
            }
        };
        if let (Some(Refill { done, .. }), Some(share)) = (reserver, share) {
            if held.amount.requests > 1 {
                self.chunks.add(
                    lease,
                    upstream,
                    held.id.clone(),
                    held.amount,
                    Some(share),
                    now,
                    Some(done),
                );
                return Ok(drawn(task, lease, held.id, share, ask, took));
            }
            // One request's amount: the budget is near its end.
            self.chunks.reserved_none(lease, upstream, true, done);
        }
        Ok(Reservation {
            id: held.id,
            task: task.to_owned(),
            input: held.amount.input,
            output: held.amount.output,
            spend: held.amount.spend_nusd,
            price: ask.price,
            chunk: None,
            rates: took,
        })
    }

    fn reserver(&self, caller: &Caller, upstream: &str) -> ReservationFor {
        ReservationFor {
            task: caller.task.clone(),
            lease: caller.lease.clone(),
            workload: caller.workload.clone(),
            role: caller.role.clone(),
            fingerprint: caller.fingerprint.clone(),
            upstream: upstream.to_owned(),
            now: self.clock.now(),
        }
    }

    /// Reserves the lease's next chunk in the background, ahead of need.
    /// Only a chunk of two requests or more: near the end of a budget
    /// nothing is held that no request asked for.
    fn refill(
        self: &Arc<Self>,
        caller: &Caller,
        upstream: &str,
        ask: Ask,
        Refill { done, most }: Refill,
    ) {
        let proxy = Arc::clone(self);
        let who = self.reserver(caller, upstream);
        tokio::spawn(async move {
            let roles = Arc::clone(&proxy.roles);
            let (lease, upstream) = (who.lease.clone(), who.upstream.clone());
            let r = proxy
                .store
                .reserve_budget(
                    who,
                    Box::new(move |levels| {
                        let c = budget::fit_chunk(
                            levels,
                            |r| roles.get(r).map(|e| &e.proxy),
                            ask,
                            most,
                        )?;
                        if c.requests < 2 {
                            return Err("chunk");
                        }
                        Ok(c)
                    }),
                )
                .await;
            match r {
                Ok(held) => proxy.chunks.add(
                    &lease,
                    &upstream,
                    held.id,
                    held.amount,
                    None,
                    proxy.clock.now(),
                    Some(done),
                ),
                Err(StoreError::BudgetExhausted(_)) => {
                    proxy.chunks.reserved_none(&lease, &upstream, true, done);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "proxy: cannot reserve a budget chunk ahead of need");
                    proxy.chunks.reserved_none(&lease, &upstream, false, done);
                }
            }
        });
    }

    /// Gives back, unused, a reservation whose request was never sent: the
    /// request and its tokens to the rate limits, its share to what its
    /// chunk has free, or the reservation of its own to the budget, closed
    /// with nothing used (so nothing is audited as use).
    fn release(self: &Arc<Self>, upstream: &str, res: Reservation, tokens: u64) {
        let now = self.clock.now();
        self.rates
            .give_back(&res.task, res.rates, tokens, 0, true, now);
        if let Some(lease) = &res.chunk {
            self.chunks.undraw(lease, upstream, &res.id, res.share());
            return;
        }
        let close = ChunkSettle {
            id: res.id,
            held: Usage::default(),
            used: Usage::default(),
            unmetered: 0,
            release: Usage::default(),
            close: true,
            now,
        };
        let proxy = Arc::clone(self);
        // Outside a runtime the reservation stays open: the sweep charges
        // it in full.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = proxy.store.settle_chunks(vec![close]).await {
                    // INVARIANT: never an overspend. It stays open and
                    // counted; the sweep charges it in full.
                    tracing::error!(error = %e, "proxy: cannot give back an unused budget reservation");
                }
            });
        }
    }

    /// Settles a reservation (the whole of it when `actual` is unknown) and
    /// counts it in the metrics: a share of a chunk in memory (recorded in
    /// the store by the next chunk flush), a reservation of its own in the
    /// store.
    async fn settle(
        &self,
        upstream: String,
        res: Reservation,
        actual: Option<(u64, u64)>,
        seen: Option<observe::Seen>,
    ) {
        let now = self.clock.now();
        let charged = res.charge(actual);
        if let Some(c) = self.metrics.upstream(&upstream) {
            c.input_tokens.fetch_add(charged.input, Ordering::Relaxed);
            c.output_tokens.fetch_add(charged.output, Ordering::Relaxed);
            c.spend_nusd
                .fetch_add(charged.spend_nusd, Ordering::Relaxed);
        }
        self.rates.give_back(
            &res.task,
            res.rates,
            res.input.saturating_add(res.output),
            charged.input.saturating_add(charged.output),
            false,
            now,
        );
        if let Some(lease) = &res.chunk {
            self.chunks.finish(
                lease,
                &upstream,
                &res.id,
                res.share(),
                charged,
                actual.is_none(),
            );
        }
        // Told last, so that the upstream's name moves into the
        // observation instead of being copied.
        if let (Some(m), Some(seen)) = (&self.monitor, seen) {
            m.observe(observe::Observation {
                at: now,
                upstream,
                seen,
                tokens: charged.input.saturating_add(charged.output),
                spend_nusd: charged.spend_nusd,
            });
        }
        if res.chunk.is_some() {
            return;
        }
        let settle = BudgetSettle {
            id: res.id,
            used: actual.map(|_| charged),
            now,
        };
        if let Err(e) = self.store.settle_budget(vec![settle]).await {
            // INVARIANT: never an overspend. The reservation stays open and
            // counted; the sweep charges it in full.
            tracing::error!(error = %e, "proxy: cannot settle a budget reservation");
        }
    }

    /// Records the chunks' finished requests in the store, and gives back
    /// what idle, old or retired chunks hold unused (`all`: what every
    /// chunk holds, at shutdown). On a store error the parts wait for the
    /// next flush; the store holds them meanwhile (an over-charge at worst
    /// if the process dies first).
    async fn flush_chunks(&self, all: bool) {
        let _one = self.flushing.lock().await;
        // Rate-limit units idle tasks hold go back to the store's buckets
        // (lost on an error: the limit errs strict).
        let gives = self.rates.due(self.clock.now(), all);
        if let Err(e) = self.store.give_rates(gives, self.clock.now()).await {
            tracing::warn!(error = %e, "proxy: cannot give rate-limit units back");
        }
        let parts = self.chunks.due(self.clock.now(), all);
        if parts.is_empty() {
            return;
        }
        let settles = parts.iter().map(chunks::Part::settle).collect();
        let ok = match self.store.settle_chunks(settles).await {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(error = %e, "proxy: cannot settle budget chunks");
                false
            }
        };
        self.chunks.settled(parts, ok);
    }

    /// Requests the chunks of this process hold and no request has drawn.
    pub fn chunked_requests(&self) -> u64 {
        self.chunks.free_requests()
    }

    /// At shutdown: records the chunks' use, gives back what they hold
    /// unused, and flushes the use to the audit trail.
    pub async fn shutdown(&self) {
        self.flush_chunks(true).await;
        self.flush().await;
        if self.chunks.open() > 0 {
            // Requests still in flight: their chunks stay open in the store
            // and are charged in full at the next start.
            tracing::warn!("proxy: budget chunks with requests in flight left open");
        }
    }

    /// What a task and its sub-tasks have used through the proxy (settled).
    pub async fn task_usage(&self, task: &str) -> Usage {
        self.flush_chunks(false).await;
        match self.store.budget_of(task).await {
            Ok((used, _)) => used,
            Err(e) => {
                tracing::error!(error = %e, "proxy: cannot read a budget");
                Usage::default()
            }
        }
    }

    /// At start, before any request: every reservation still open was left
    /// by a process that died (one process per data directory), so its
    /// request may have been forwarded. Each is charged in full, then the
    /// use is audited.
    pub async fn recover(&self) -> Result<u64, StoreError> {
        let now = self.clock.now();
        let mut swept = 0;
        loop {
            let n = self
                .store
                .settle_stale_reservations(now.plus_millis(1), now, SWEEP_BATCH)
                .await?;
            swept += n;
            if n < u64::from(SWEEP_BATCH) {
                break;
            }
        }
        if swept > 0 {
            tracing::warn!(
                reservations = swept,
                "proxy: reservations left open by an earlier crash charged in full"
            );
        }
        self.flush().await;
        Ok(swept)
    }

    /// Charges reservations open past [`RESERVATION_DEADLINE_MS`] in full,
    /// then writes the settled use to the audit trail: one `proxy.usage`
    /// event per lease, built from the store's settled reservations.
    pub async fn flush(&self) {
        self.flush_chunks(false).await;
        let now = self.clock.now();
        for _ in 0..100 {
            match self
                .store
                .settle_stale_reservations(
                    now.plus_millis(-RESERVATION_DEADLINE_MS),
                    now,
                    SWEEP_BATCH,
                )
                .await
            {
                Ok(n) if n == u64::from(SWEEP_BATCH) => {}
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(error = %e, "proxy: cannot sweep stale reservations");
                    break;
                }
            }
        }
        for _ in 0..100 {
            match self
                .store
                .summarise_usage(SWEEP_BATCH, Box::new(move |u| usage_event(u, now)))
                .await
            {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "proxy: cannot record usage in the audit trail");
                    break;
                }
            }
        }
    }

    /// Settles the chunks' finished requests every [`chunks::FLUSH_EVERY`]
    /// and flushes usage to the audit trail every `audit_interval`, until
    /// dropped.
    pub async fn run_flush(self: Arc<Self>) {
        let every = Duration::from_secs(self.settings.audit_interval_secs);
        let chunks = async {
            let mut tick = tokio::time::interval(chunks::FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                self.flush_chunks(false).await;
            }
        };
        let audit = async {
            loop {
                tokio::time::sleep(every).await;
                self.flush().await;
            }
        };
        tokio::join!(chunks, audit);
    }

    async fn deny(
        &self,
        caller: Option<&Caller>,
        upstream: &str,
        reason: &'static str,
        message: &str,
        extra: &[(&str, serde_json::Value)],
    ) {
        self.metrics.denied(reason);
        let actor = caller.map_or_else(
            || "anonymous".to_owned(),
            |c| format!("workload:{}", c.workload),
        );
        let mut ev = AuditDraft::new(self.clock.now(), "proxy.denied", actor)
            .outcome(Outcome::Denied)
            .reason(message)
            .data("upstream", upstream)
            .data("check", reason);
        if let Some(c) = caller {
            ev = ev
                .task(&c.task)
                .lease(&c.lease)
                .workload(&c.workload)
                .role(&c.role)
                .fingerprint(&c.fingerprint);
        }
        for (k, v) in extra {
            ev = ev.data(k, v.clone());
        }
        self.gate.record_denial(ev, reason).await;
    }

    /// Renders the proxy's metrics (Prometheus text) after `out`.
    pub fn render_metrics(&self, out: &mut String) {
        self.metrics.render(out);
    }
}

/// A request's share drawn from chunk `id` of `lease` (of `task`).
fn drawn(task: &str, lease: &str, id: String, share: Usage, ask: Ask, took: Took) -> Reservation {
    Reservation {
        id,
        task: task.to_owned(),
        input: share.input,
        output: share.output,
        spend: share.spend_nusd,
        price: ask.price,
        chunk: Some(lease.to_owned()),
        rates: took,
    }
}

/// The `proxy.usage` event of one lease's settled use.
fn usage_event(u: &UsageSummary, now: Timestamp) -> AuditDraft {
    AuditDraft::new(now, "proxy.usage", format!("workload:{}", u.workload))
        .task(&u.task)
        .lease(&u.lease)
        .workload(&u.workload)
        .role(&u.role)
        .fingerprint(&u.fingerprint)
        .data("upstream", u.upstream.as_str())
        .data("requests", u.used.requests)
        .data("input_tokens", u.used.input)
        .data("output_tokens", u.used.output)
        .data("spend_usd", u.used.spend_nusd as f64 / 1e9)
        .data("unmetered", u.unmetered)
        .data("since", u.since.rfc3339())
}

pub use pool::set_home;
pub use request::{
    ORIGIN_BOUND, Presented, Repeated, acts_on_origin, header_once, identity_coded, presented_token,
};

#[cfg(test)]
mod tests {
    use super::serves;
    use tower::ServiceExt as _;

    /// The listener's front takes exactly the paths a router with the
    /// proxy's two patterns would have routed to it; every other path,
    /// near misses included, still goes to the router (and its 404).
    #[tokio::test]
    async fn the_proxy_serves_exactly_the_paths_its_routes_matched() {
        let router = axum::Router::new()
            .route(
                "/proxy/{upstream}/{*path}",
                axum::routing::any(|| async { "proxy" }),
            )
            .route(
                "/proxy/{upstream}",
                axum::routing::any(|| async { "proxy" }),
            );
        let paths = [
            "/proxy/openai",
            "/proxy/openai/v1/chat/completions",
            "/proxy/openai/v1/",
            "/proxy/openai//x",
            "/proxy/openai/%2e%2e/x",
            "/proxy/a%2Fb/x",
            "/proxy/o/..",
            "/proxy/",
            "/proxy",
            "/proxy//",
            "/proxy//x",
            "/proxy///x",
            "/proxy/a//",
            "/proxy/a///",
            "/proxy/openai/",
            "/proxyx/openai",
            "/Proxy/openai",
            "/v1/proxy/openai",
            "/",
            "/v1/health",
        ];
        for path in paths {
            let req = http::Request::get(path)
                .body(axum::body::Body::empty())
                .unwrap();
            let routed = router.clone().oneshot(req).await.unwrap().status() == 200;
            assert_eq!(serves(path), routed, "{path}");
        }
    }
}
