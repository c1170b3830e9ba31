//! What the provider-key engines (`openai`, `openrouter`) share: the
//! provider's admin API, reached with keymint's one outbound HTTP client
//! (`keymint_client::http`, one deadline over each whole exchange) and
//! authenticated with an admin key that keymint keeps sealed, and the name
//! keymint gives what it creates there.
//!
//! Errors name the provider, the step and the HTTP status only: never the
//! provider's body (it may quote the request) nor the admin key.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Method, StatusCode};
use keymint_client::http::{HttpClient, HttpError};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::EngineError;

/// Where an engine reads an admin key: the sealed key of an
/// `[[upstreams]]` entry (`keymint upstream set NAME`), opened at each use
/// so that a rotated key takes effect at once.
#[async_trait]
pub trait AdminKeys: Send + Sync + fmt::Debug {
    /// The key sealed under upstream `name`; `None` when none is set.
    async fn admin_key(&self, name: &str) -> Result<Option<Zeroizing<String>>, EngineError>;
}

/// The largest answer read from an admin API.
const MAX_BODY: usize = 1 << 20;

/// One provider admin API: a base URL (the upstream's), the upstream whose
/// sealed key authenticates, and the deadline of each call.
#[derive(Clone)]
pub struct AdminApi {
    /// `openai` or `openrouter`, for messages.
    provider: &'static str,
    /// The `[[upstreams]]` entry that holds the admin key.
    upstream: String,
    /// The upstream's base URL, without a trailing `/`.
    base_url: String,
    http: HttpClient,
    keys: Arc<dyn AdminKeys>,
    /// Where the admin key goes: `Authorization: Bearer` (`None`), or a
    /// header of its own (Anthropic's `x-api-key`) with fixed extra
    /// headers (`anthropic-version`).
    key_header: Option<(&'static str, &'static [(&'static str, &'static str)])>,
}

impl fmt::Debug for AdminApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminApi")
            .field("provider", &self.provider)
            .field("upstream", &self.upstream)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

/// An answer of the admin API: its status and its JSON body (`Null` when
/// it has none or it is not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
}

impl AdminApi {
    pub fn new(
        provider: &'static str,
        upstream: &str,
        base_url: &str,
        timeout: Duration,
        keys: Arc<dyn AdminKeys>,
    ) -> Result<Self, EngineError> {
        let http = HttpClient::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .max_body(MAX_BODY)
            .build()
            .map_err(|e| EngineError::Internal(format!("{provider}: http client: {e}")))?;
        Ok(Self {
            provider,
            upstream: upstream.to_owned(),
            base_url: base_url.trim_end_matches('/').to_owned(),
            http,
            keys,
            key_header: None,
        })
    }

    /// The same API, with the admin key sent in header `name` (instead of
    /// `Authorization: Bearer`) and `extra` headers on every call.
    #[must_use]
    pub fn with_key_header(
        mut self,
        name: &'static str,
        extra: &'static [(&'static str, &'static str)],
    ) -> Self {
        self.key_header = Some((name, extra));
        self
    }

    /// The API base an SDK takes (the upstream's base URL).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// Calls `method path` (under the base URL) with the admin key and an
    /// optional JSON body. Transport failures, time-outs, 429 and 5xx are
    /// [`EngineError::Unavailable`]; a refused admin key (401, 403) is
    /// [`EngineError::Rejected`]; other statuses are returned for the
    /// caller to judge.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        step: &str,
    ) -> Result<Answer, EngineError> {
        let p = self.provider;
        let key = self.keys.admin_key(&self.upstream).await?.ok_or_else(|| {
            EngineError::Rejected(format!(
                "{p}: no admin key is set for upstream `{}` (keymint upstream set {})",
                self.upstream, self.upstream
            ))
        })?;
        let mut auth = Zeroizing::new(String::with_capacity(key.len() + 7));
        if self.key_header.is_none() {
            auth.push_str("Bearer ");
        }
        auth.push_str(&key);
        let mut value = http::HeaderValue::from_str(&auth).map_err(|_| {
            EngineError::Rejected(format!(
                "{p}: the admin key of upstream `{}` is not a valid header value",
                self.upstream
            ))
        })?;
        value.set_sensitive(true);
        let bytes = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b).map_err(|_| {
                EngineError::Internal(format!("{p}: {step}: cannot encode the request"))
            })?),
            None => Bytes::new(),
        };
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base_url))
            .header(http::header::ACCEPT, "application/json");
        match self.key_header {
            None => req = req.header(http::header::AUTHORIZATION, value),
            Some((name, extra)) => {
                req = req.header(name, value);
                for (k, v) in extra {
                    req = req.header(*k, *v);
                }
            }
        }
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(bytes)
            .map_err(|_| EngineError::Internal(format!("{p}: {step}: bad request URL")))?;
        let res = self.http.send(req).await.map_err(|e| match e {
            HttpError::Timeout => EngineError::Unavailable(format!(
                "{p}: {step}: no answer within {}s",
                self.http.timeout().as_secs_f32()
            )),
            HttpError::TooLarge(_) => {
                EngineError::Unavailable(format!("{p}: {step}: answer too large"))
            }
            HttpError::Transport(_) | HttpError::Config(_) => {
                EngineError::Unavailable(format!("{p}: {step}: cannot reach the API"))
            }
        })?;
        let status = res.status;
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(EngineError::Rejected(format!(
                "{p}: {step}: the admin key of upstream `{}` was refused (HTTP {})",
                self.upstream,
                status.as_u16()
            )));
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Err(EngineError::Unavailable(format!(
                "{p}: {step}: HTTP {}",
                status.as_u16()
            )));
        }
        let body = serde_json::from_slice(&res.body).unwrap_or(Value::Null);
        Ok(Answer { status, body })
    }

    /// An error for an answer the caller did not expect.
    pub fn unexpected(&self, step: &str, status: StatusCode) -> EngineError {
        EngineError::Rejected(format!(
            "{}: {step}: HTTP {}",
            self.provider,
            status.as_u16()
        ))
    }

    /// An error for a success whose body lacks what the documentation says
    /// it holds.
    pub fn malformed(&self, step: &str) -> EngineError {
        EngineError::Unavailable(format!(
            "{}: {step}: the answer is not the documented shape",
            self.provider
        ))
    }
}

/// What keymint names what it creates at a provider for a lease:
/// `keymint-<installation>-<lease id>`. The installation id tells this
/// keymint's from another's sharing the same project or account;
/// reconciliation only ever touches names of this form with its own id.
pub fn managed_name(installation: &str, lease_id: &str) -> String {
    format!("keymint-{installation}-{lease_id}")
}

/// The lease id in a name [`managed_name`] made for `installation`.
pub fn lease_of<'a>(installation: &str, name: &'a str) -> Option<&'a str> {
    let rest = name.strip_prefix("keymint-")?;
    let lease = rest.strip_prefix(installation)?.strip_prefix('-')?;
    (lease.starts_with("lse_")
        && lease.len() <= 64
        && lease
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    .then_some(lease)
}

/// Percent-encodes one URL path segment (an id the provider gave).
pub fn segment(s: &str) -> String {
    keymint_client::encode(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_installation_and_the_lease() {
        let n = managed_name("0123abcd", "lse_abcXYZ09");
        assert_eq!(n, "keymint-0123abcd-lse_abcXYZ09");
        assert_eq!(lease_of("0123abcd", &n), Some("lse_abcXYZ09"));
        // Another installation's, or a name a person chose, is not ours.
        assert_eq!(lease_of("ffff0000", &n), None);
        assert_eq!(lease_of("0123abcd", "keymint-0123abcd-prod"), None);
        assert_eq!(lease_of("0123abcd", "keymint-0123abcd-lse_a/b"), None);
        assert_eq!(lease_of("0123abcd", "my key"), None);
    }
}
