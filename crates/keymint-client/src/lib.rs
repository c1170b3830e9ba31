//! A client for the keymint `/v1` API over HTTP/1.1 with pooled connections,
//! plain on loopback or over TLS (rustls), optionally presenting a client
//! certificate (an X.509-SVID for mTLS). Errors from the server arrive as
//! their RFC 9457 [`Problem`].
//!
//! [`http`] is keymint's one outbound HTTP client builder, which this client,
//! the approval webhook and JWKS fetching share: one deadline over the whole
//! exchange (body included), a body-size limit on every read, keep-alive
//! pooling, rustls on ring.

pub mod http;
#[cfg(feature = "postgres")]
pub mod postgres_tls;

use std::fmt;
use std::time::Duration;

use ::http::{Method, StatusCode, header};
use bytes::Bytes;
use keymint_proto::Problem;
use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

pub use crate::http::TlsOptions;
use crate::http::{HttpClient, HttpError};

/// The largest answer the API client reads: far above any page the API
/// serves (1,000 audit events, a KRL), and still a bound.
pub const MAX_RESPONSE: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{} ({}): {}", .0.title, .0.code, .0.detail)]
    Api(Problem),
    #[error("cannot reach keymint at {addr}: {detail}")]
    Transport { addr: String, detail: String },
    #[error("unexpected response ({status}): {detail}")]
    Decode { status: u16, detail: String },
    #[error("{0}")]
    Config(String),
    /// 202: policy held the request for a human; it waits as this approval.
    #[error(
        "held for human approval as {approval} (until {expires_at}): an operator runs \
         `keymint approval approve {approval}`, then the requester runs \
         `keymint approval redeem {approval}`"
    )]
    Held {
        approval: String,
        expires_at: String,
    },
}

impl ClientError {
    /// The stable error code, for API errors.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api(p) => Some(&p.code),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api(p) => Some(p.status),
            Self::Decode { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A raw response, for tests and tools that look at status and headers.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: StatusCode,
    pub headers: ::http::HeaderMap,
    pub body: Bytes,
}

impl RawResponse {
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| ClientError::Decode {
            status: self.status.as_u16(),
            detail: e.to_string(),
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<Zeroizing<String>>,
    /// Extra headers sent with every request (a node agent's
    /// `X-Keymint-Entry` / `X-Keymint-Attested`).
    headers: Vec<(header::HeaderName, header::HeaderValue)>,
    http: HttpClient,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Client {
    /// `addr` is `http://host:port` (a bare `host:port` means http) or
    /// `https://host:port`, verified against the Mozilla roots.
    pub fn new(addr: &str, token: Option<String>) -> Result<Self, ClientError> {
        Self::with_tls(addr, token, &TlsOptions::default())
    }

    /// Like [`Client::new`], with TLS settings: the CA to trust instead of
    /// the Mozilla roots, and a client certificate to present.
    pub fn with_tls(
        addr: &str,
        token: Option<String>,
        tls: &TlsOptions,
    ) -> Result<Self, ClientError> {
        let base = if addr.starts_with("https://") || addr.starts_with("http://") {
            addr.trim_end_matches('/').to_owned()
        } else if addr.contains("://") {
            return Err(ClientError::Config(format!(
                "`{addr}`: keymint is reached over http:// or https://"
            )));
        } else {
            format!("http://{}", addr.trim_end_matches('/'))
        };
        if base.starts_with("http://") && tls.is_set() {
            return Err(ClientError::Config(format!(
                "TLS options were given but `{base}` is plain http; use https://"
            )));
        }
        let http = HttpClient::builder()
            .tls(tls)
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1024)
            .max_body(MAX_RESPONSE)
            .build()
            .map_err(|e| ClientError::Config(e.to_string()))?;
        Ok(Self {
            base,
            token: token.map(Zeroizing::new),
            headers: Vec::new(),
            http,
        })
    }

    /// The same client with another bearer token.
    #[must_use]
    pub fn with_token(&self, token: &str) -> Self {
        let mut c = self.clone();
        c.token = Some(Zeroizing::new(token.to_owned()));
        c
    }

    /// The same client with another per-request timeout (default 30 s).
    #[must_use]
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        let mut c = self.clone();
        c.http = c.http.with_timeout(timeout);
        c
    }

    /// The same client, sending `name: value` with every request as well.
    pub fn with_header(&self, name: &str, value: &str) -> Result<Self, ClientError> {
        let n = header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| ClientError::Config(format!("bad header name `{name}`: {e}")))?;
        let v = header::HeaderValue::from_str(value)
            .map_err(|e| ClientError::Config(format!("bad value for header `{name}`: {e}")))?;
        let mut c = self.clone();
        c.headers.retain(|(k, _)| k != n);
        c.headers.push((n, v));
        Ok(c)
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request with an optional body and content type.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<RawResponse, ClientError> {
        let mut b = ::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {}", t.as_str()));
        }
        for (k, v) in &self.headers {
            b = b.header(k, v);
        }
        if let Some(ct) = content_type {
            b = b.header(header::CONTENT_TYPE, ct);
        }
        let req = b
            .body(Bytes::from(body))
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let res = self.http.send(req).await.map_err(|e| match e {
            HttpError::Config(m) => ClientError::Config(m),
            e => ClientError::Transport {
                addr: self.base.clone(),
                detail: e.to_string(),
            },
        })?;
        Ok(RawResponse {
            status: res.status,
            headers: res.headers,
            body: res.body,
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        Ok(self.call_with_headers(method, path, body).await?.0)
    }

    /// [`Self::call`], with the response's headers.
    async fn call_with_headers<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(T, ::http::HeaderMap), ClientError> {
        let ct = body.as_ref().map(|_| "application/json");
        let res = self.raw(method, path, ct, body.unwrap_or_default()).await?;
        if res.status == StatusCode::ACCEPTED {
            let v: serde_json::Value = res.json()?;
            return Err(ClientError::Held {
                approval: v["id"].as_str().unwrap_or_default().to_owned(),
                expires_at: v["expires_at"].as_str().unwrap_or_default().to_owned(),
            });
        }
        if res.status.is_success() {
            return Ok((res.json()?, res.headers));
        }
        match serde_json::from_slice::<Problem>(&res.body) {
            Ok(p) => Err(ClientError::Api(p)),
            Err(_) => Err(ClientError::Decode {
                status: res.status.as_u16(),
                detail: res.text().chars().take(200).collect(),
            }),
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None).await
    }

    /// GETs a binary body (a KRL, …); errors are problem+json as usual.
    pub async fn get_bytes(&self, path: &str) -> Result<Bytes, ClientError> {
        let res = self.raw(Method::GET, path, None, Vec::new()).await?;
        if res.status.is_success() {
            return Ok(res.body);
        }
        match serde_json::from_slice::<Problem>(&res.body) {
            Ok(p) => Err(ClientError::Api(p)),
            Err(_) => Err(ClientError::Decode {
                status: res.status.as_u16(),
                detail: res.text().chars().take(200).collect(),
            }),
        }
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Config(e.to_string()))?;
        self.call(Method::POST, path, Some(bytes)).await
    }

    /// [`Self::post`], with the response's headers (`Keymint-Already-Ended`,
    /// …).
    pub async fn post_with_headers<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(T, ::http::HeaderMap), ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Config(e.to_string()))?;
        self.call_with_headers(Method::POST, path, Some(bytes))
            .await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::DELETE, path, None).await
    }

    pub async fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::POST, path, None).await
    }
}

/// The bytes [`encode`] escapes: all but ASCII letters, digits and
/// `-_.~:`.
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b':');

/// Percent-encodes a query value (or a path segment).
pub fn encode(v: &str) -> String {
    percent_encoding::utf8_percent_encode(v, QUERY_VALUE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("abc-XYZ_0.9~a:b"), "abc-XYZ_0.9~a:b");
        assert_eq!(encode("a b/c?d&e=f#g%"), "a%20b%2Fc%3Fd%26e%3Df%23g%25");
        assert_eq!(encode("é"), "%C3%A9");
        assert_eq!(encode(""), "");
    }

    #[test]
    fn addresses_are_checked_before_any_connection() {
        let e = Client::new("ftp://127.0.0.1:1", None).unwrap_err();
        assert!(matches!(e, ClientError::Config(_)), "{e:?}");
        let tls = TlsOptions {
            ca_file: Some("ca.pem".into()),
            ..TlsOptions::default()
        };
        let e = Client::with_tls("http://127.0.0.1:1", None, &tls).unwrap_err();
        assert!(e.to_string().contains("use https://"), "{e}");
        let c = Client::new("127.0.0.1:1/", None).unwrap();
        assert_eq!(c.base(), "http://127.0.0.1:1");
    }
}
