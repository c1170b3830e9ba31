//! The agent's side of the server: node authentication, the entries of
//! this node, and calls made on behalf of an attested workload
//! (`X-Keymint-Entry`, `X-Keymint-Attested`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine as _;
use keymint_attest::{ConfigError, Entry, OBSERVED_ATTRIBUTES, Registry, Selectors};
use keymint_client::{Client, ClientError};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::config::NodeCredential;
use crate::protocol::{ApiError, code};

/// An entry as the server lists it (`GET /v1/entries`).
#[derive(Debug, Clone, Deserialize)]
pub struct RemoteEntry {
    pub id: String,
    pub workload: String,
    pub selectors: Selectors,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct Items {
    items: Vec<RemoteEntry>,
}

/// At most this many task ids in one watch call (the server's bound).
pub const MAX_WATCHED: usize = 1000;

/// `POST /v1/node/watch` (docs/design/0024).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NodeWatch {
    pub tasks: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub end: Vec<String>,
    pub wait_secs: u64,
}

/// Its answer.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NodeWatchAnswer {
    pub ended: Vec<String>,
    pub entries: Vec<String>,
}

/// The synced entries as a registry, with each entry's server id (by the
/// registry's index).
#[derive(Debug)]
pub struct EntrySet {
    pub registry: Registry,
    pub ids: Vec<String>,
}

impl EntrySet {
    pub fn new(remote: Vec<RemoteEntry>) -> Result<Self, ConfigError> {
        let ids = remote.iter().map(|e| e.id.clone()).collect();
        let registry = Registry::new(
            remote
                .into_iter()
                .map(|e| Entry {
                    workload: e.workload,
                    selectors: e.selectors,
                    attributes: e.attributes,
                })
                .collect(),
        )?;
        Ok(Self { registry, ids })
    }
}

/// The server, as this node sees it.
#[derive(Debug)]
pub struct Upstream {
    base: Client,
    timeout: std::time::Duration,
    credential: NodeCredential,
    reachable: AtomicBool,
    /// Whether the server accepted the node's credential on the last
    /// node call (`false` after a 401/403 to the entry sync).
    authorized: AtomicBool,
    /// Told when the server answers again after being unreachable, so
    /// refreshers waiting out a backoff retry at once.
    back: tokio::sync::Notify,
}

/// Only the observed attributes go to the server (it adds the entry's own).
pub fn observed(attributes: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    attributes
        .iter()
        .filter(|(k, _)| OBSERVED_ATTRIBUTES.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The `X-Keymint-Attested` header value: base64url (no padding) of the
/// JSON object.
pub fn attested_header(observed: &BTreeMap<String, String>) -> String {
    let json = serde_json::to_vec(observed).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

impl Upstream {
    pub fn new(
        server: &str,
        credential: NodeCredential,
        tls: &keymint_client::TlsOptions,
        timeout: std::time::Duration,
    ) -> Result<Self, ClientError> {
        Ok(Self {
            base: Client::with_tls(server, None, tls)?.with_timeout(timeout),
            timeout,
            credential,
            reachable: AtomicBool::new(false),
            authorized: AtomicBool::new(true),
            back: tokio::sync::Notify::new(),
        })
    }

    /// Whether the last call got an answer from the server.
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Whether the server accepted the node's credential at the last entry
    /// sync (it may answer and still refuse it: a wrong or revoked token).
    pub fn authorized(&self) -> bool {
        self.authorized.load(Ordering::Relaxed)
    }

    /// Completes the next time the server answers after being unreachable.
    pub async fn returned(&self) {
        self.back.notified().await;
    }

    fn node(&self) -> Result<Client, ApiError> {
        let token = self.credential.bearer().map_err(|e| {
            tracing::error!(error = %e, "cannot read the node credential");
            ApiError::new(
                code::UNAVAILABLE,
                "the agent cannot read its node credential",
            )
        })?;
        Ok(match token {
            Some(t) => self.base.with_token(t.expose()),
            None => self.base.clone(),
        })
    }

    /// The server's roles (a token role's egress part says which proxy upstream
    /// a role uses).
    pub async fn roles(&self) -> Result<Vec<keymint_proto::Role>, ApiError> {
        let c = self.node()?;
        let items: keymint_proto::List<keymint_proto::Role> =
            self.note(c.get("/v1/roles").await)?;
        Ok(items.items)
    }

    /// Where a workload reaches the egress proxy's `upstream` on the server.
    pub fn proxy_url(&self, upstream: &str) -> String {
        format!(
            "{}/proxy/{}",
            self.base.base(),
            keymint_client::encode(upstream)
        )
    }

    /// The entries of this node.
    pub async fn entries(&self) -> Result<Vec<RemoteEntry>, ApiError> {
        let c = self.node()?;
        let r: Result<Items, ClientError> = c.get("/v1/entries").await;
        match &r {
            Ok(_) => self.authorized.store(true, Ordering::Relaxed),
            Err(e) if matches!(e.status(), Some(401 | 403)) => {
                if self.authorized.swap(false, Ordering::Relaxed) {
                    tracing::error!(
                        "the keymint server refuses this node's credential; check the node token"
                    );
                }
            }
            Err(_) => {}
        }
        let items: Items = self.note(r)?;
        Ok(items.items)
    }

    /// The server's long poll for this node (`POST /v1/node/watch`): which
    /// of `tasks` are over, and the node's entry ids; ends `end` (tasks of
    /// entries this agent saw deleted).
    pub async fn node_watch(&self, req: &NodeWatch) -> Result<NodeWatchAnswer, ApiError> {
        let c = self.node()?;
        self.note(c.post("/v1/node/watch", req).await)
    }

    /// How long the server may hold a long poll: under the call timeout.
    pub fn watch_wait(&self) -> std::time::Duration {
        self.timeout
            .saturating_sub(std::time::Duration::from_secs(2))
            .min(std::time::Duration::from_secs(20))
    }

    /// A client that acts as the entry's workload.
    pub fn on_behalf(
        &self,
        entry: &str,
        observed: &BTreeMap<String, String>,
    ) -> Result<OnBehalf<'_>, ApiError> {
        let internal = |e: ClientError| {
            tracing::error!(error = %e, "cannot build the on-behalf headers");
            ApiError::new(code::INTERNAL, "the agent cannot build its request")
        };
        let c = self
            .node()?
            .with_header("x-keymint-entry", entry)
            .map_err(internal)?
            .with_header("x-keymint-attested", &attested_header(observed))
            .map_err(internal)?;
        Ok(OnBehalf { up: self, c })
    }

    /// Records whether the server answered, and turns a client error into
    /// what the workload is told.
    fn note<T>(&self, r: Result<T, ClientError>) -> Result<T, ApiError> {
        let answered = !matches!(r, Err(ClientError::Transport { .. }));
        if self.reachable.swap(answered, Ordering::Relaxed) != answered {
            if answered {
                tracing::info!("the keymint server is reachable");
                self.back.notify_waiters();
            } else {
                tracing::warn!("the keymint server is unreachable");
            }
        }
        r.map_err(to_api)
    }
}

/// Requests as one workload.
#[derive(Debug)]
pub struct OnBehalf<'a> {
    up: &'a Upstream,
    c: Client,
}

impl OnBehalf<'_> {
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.up.note(self.c.get(path).await)
    }

    pub async fn post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        self.up.note(self.c.post(path, body).await)
    }
}

/// What a workload is told about a failed server call: the server's own
/// code and detail (written for clients), or `unavailable`; transport and
/// decoding details go to the log only.
fn to_api(e: ClientError) -> ApiError {
    match e {
        ClientError::Api(p) => ApiError::new(&p.code, p.detail),
        ClientError::Transport { detail, .. } => {
            tracing::warn!(detail, "keymint server call failed");
            ApiError::new(
                code::UNAVAILABLE,
                "the keymint server cannot be reached; nothing new can be issued now",
            )
        }
        ClientError::Held {
            approval,
            expires_at,
        } => ApiError::new(
            "approval_required",
            format!(
                "held for human approval as `{approval}` (until {expires_at}); redeem it with \
                 `keymint approval redeem`"
            ),
        ),
        ClientError::Decode { status, .. } => {
            tracing::warn!(status, "unexpected response from the keymint server");
            ApiError::new(
                code::INTERNAL,
                format!("unexpected response from the keymint server (status {status})"),
            )
        }
        ClientError::Config(_) => {
            ApiError::new(code::INTERNAL, "the agent cannot build its request")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attested_header_is_base64url_json_of_observed_attributes_only() {
        let mut a = BTreeMap::new();
        a.insert("uid".to_owned(), "1000".to_owned());
        a.insert("exe_sha256".to_owned(), "ab".repeat(32));
        a.insert("team".to_owned(), "support".to_owned());
        let o = observed(&a);
        assert!(!o.contains_key("team"));
        let h = attested_header(&o);
        assert!(!h.contains('=') && !h.contains('+') && !h.contains('/'));
        let back: BTreeMap<String, String> = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(back, o);
    }

    #[test]
    fn entries_from_the_server_load_as_a_registry() {
        let items: Items = serde_json::from_value(serde_json::json!({"items": [
            {"id": "ent_a", "workload": "a", "node": "n1", "selectors": {"uid": 5},
             "attributes": {}, "created_at": "2025-01-01T00:00:00Z"},
            {"id": "ent_b", "workload": "b", "node": "n1",
             "selectors": {"uid": 5, "exe_sha256": "ab".repeat(32)}}
        ]}))
        .unwrap();
        let set = EntrySet::new(items.items).unwrap();
        assert_eq!(set.ids, vec!["ent_a", "ent_b"]);
        assert_eq!(set.registry.entries()[1].workload, "b");
    }

    #[test]
    fn transport_errors_are_unavailable_and_do_not_leak_details() {
        let e = to_api(ClientError::Transport {
            addr: "http://10.0.0.1".into(),
            detail: "connection refused".into(),
        });
        assert_eq!(e.code, code::UNAVAILABLE);
        assert!(!e.message.contains("10.0.0.1"));
    }
}
