//! A client for the keymint `/v1` API over HTTP/1.1 with pooled connections,
//! plain on loopback or over TLS (rustls), optionally presenting a client
//! certificate (an X.509-SVID for mTLS). Errors from the server arrive as
//! their RFC 9457 [`Problem`].

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{ConfigBuilderExt as _, HttpsConnector};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keymint_proto::Problem;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

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
    pub headers: http::HeaderMap,
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
    http: HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
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
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.client_config()?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let http = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1024)
            .build(https);
        Ok(Self {
            base,
            token: token.map(Zeroizing::new),
            headers: Vec::new(),
            http,
            timeout: Duration::from_secs(30),
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
        c.timeout = timeout;
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
        let mut b = Request::builder()
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
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let transport = |detail: String| ClientError::Transport {
            addr: self.base.clone(),
            detail,
        };
        let res = tokio::time::timeout(self.timeout, self.http.request(req))
            .await
            .map_err(|_| transport("timed out".into()))?
            .map_err(|e| transport(error_chain(&e)))?;
        let (parts, body) = res.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| transport(e.to_string()))?
            .to_bytes();
        Ok(RawResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
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
            return res.json();
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

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::DELETE, path, None).await
    }

    pub async fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::POST, path, None).await
    }
}

/// Percent-encodes a query value.
pub fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~:".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// TLS settings for [`Client::with_tls`]. PEM files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// CA certificates to trust instead of the Mozilla roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (and its chain) to present: an X.509-SVID.
    pub cert_file: Option<PathBuf>,
    /// Its private key.
    pub key_file: Option<PathBuf>,
}

impl TlsOptions {
    fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    fn client_config(&self) -> Result<rustls::ClientConfig, ClientError> {
        let bad = |what: &str, p: &PathBuf, e: &dyn fmt::Display| {
            ClientError::Config(format!("cannot read {what} `{}`: {e}", p.display()))
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let builder = match &self.ca_file {
            Some(p) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(p).map_err(|e| bad("CA file", p, &e))? {
                    let c = c.map_err(|e| bad("CA file", p, &e))?;
                    roots.add(c).map_err(|e| bad("CA certificate in", p, &e))?;
                }
                if roots.is_empty() {
                    return Err(ClientError::Config(format!(
                        "CA file `{}` holds no certificate",
                        p.display()
                    )));
                }
                builder.with_root_certificates(roots)
            }
            None => builder.with_webpki_roots(),
        };
        match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => {
                let chain = CertificateDer::pem_file_iter(c)
                    .map_err(|e| bad("certificate file", c, &e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad("certificate file", c, &e))?;
                let key = PrivateKeyDer::from_pem_file(k).map_err(|e| bad("key file", k, &e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| ClientError::Config(format!("client certificate: {e}")))
            }
            (None, None) => Ok(builder.with_no_client_auth()),
            _ => Err(ClientError::Config(
                "a client certificate needs both its certificate and its key file".into(),
            )),
        }
    }
}

/// An error and its sources, `a: b: c` (hyper's own message for a failed
/// connection is only "client error (Connect)"; the TLS reason is below).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
