//! Fetching key sets: HTTPS (rustls with the `ring` provider and the
//! Mozilla roots from `webpki-roots`), plain HTTP on loopback, and files.
//! Every fetch has a timeout and a body-size cap; redirects are not
//! followed.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::error::ConfigError;

/// Checks that keys may be fetched from `url`: `https://`, or `http://` to
/// a loopback host, or any `http://` when `allow_http` says so.
pub(crate) fn check_url(url: &str, allow_http: bool) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("`{url}` is not a URL"))?;
    let host = uri.host().ok_or_else(|| format!("`{url}` has no host"))?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if allow_http || is_loopback(host) => Ok(()),
        Some("http") => Err(format!(
            "`{url}` is plain HTTP to a host that is not loopback (set `dangerous_allow_http` to allow it)"
        )),
        _ => Err(format!("`{url}` must be an https:// URL")),
    }
}

fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Why a fetch failed; logged, never returned to a token's presenter.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("timed out")]
    Timeout,
    #[error("request failed: {0}")]
    Request(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading `{0}`: {1}")]
    File(String, String),
    #[error("{0}")]
    Invalid(String),
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The HTTP client shared by every issuer.
#[derive(Clone)]
pub(crate) struct Fetcher {
    client: HttpsClient,
    max_body: usize,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

impl Fetcher {
    pub(crate) fn new(max_body: usize) -> Result<Self, ConfigError> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| ConfigError::Invalid(format!("TLS set-up: {e}")))?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Self { client, max_body })
    }

    /// GETs `url` and returns its body if the status is 200.
    pub(crate) async fn get(&self, url: &str, timeout: Duration) -> Result<Bytes, FetchError> {
        match tokio::time::timeout(timeout, self.get_inner(url)).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout),
        }
    }

    async fn get_inner(&self, url: &str) -> Result<Bytes, FetchError> {
        let req = http::Request::get(url)
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, "keymint")
            .body(Empty::new())
            .map_err(|e| FetchError::Request(e.to_string()))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| FetchError::Request(error_chain(&e)))?;
        if resp.status() != http::StatusCode::OK {
            return Err(FetchError::Status(resp.status().as_u16()));
        }
        let body = Limited::new(resp.into_body(), self.max_body)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    FetchError::TooLarge(self.max_body)
                } else {
                    FetchError::Request(e.to_string())
                }
            })?;
        Ok(body.to_bytes())
    }

    /// Reads a key file, with the same size cap.
    pub(crate) async fn read_file(&self, path: &std::path::Path) -> Result<Bytes, FetchError> {
        use tokio::io::AsyncReadExt as _;
        let shown = path.display().to_string();
        let f = tokio::fs::File::open(path)
            .await
            .map_err(|e| FetchError::File(shown.clone(), e.to_string()))?;
        let mut buf = Vec::new();
        let cap = u64::try_from(self.max_body)
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        f.take(cap)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| FetchError::File(shown, e.to_string()))?;
        if buf.len() > self.max_body {
            return Err(FetchError::TooLarge(self.max_body));
        }
        Ok(buf.into())
    }

    /// OpenID Connect discovery: the `jwks_uri` of `issuer`, after checking
    /// that the document names the same issuer (OIDC Discovery §4.3).
    pub(crate) async fn discover_jwks_uri(
        &self,
        issuer: &str,
        allow_http: bool,
        timeout: Duration,
    ) -> Result<String, FetchError> {
        #[derive(serde::Deserialize)]
        struct Doc {
            issuer: String,
            jwks_uri: String,
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let body = self.get(&url, timeout).await?;
        let doc: Doc = serde_json::from_slice(&body)
            .map_err(|e| FetchError::Invalid(format!("discovery document: {e}")))?;
        if doc.issuer != issuer {
            return Err(FetchError::Invalid(format!(
                "discovery document names issuer `{}`, not `{issuer}`",
                doc.issuer
            )));
        }
        check_url(&doc.jwks_uri, allow_http).map_err(FetchError::Invalid)?;
        Ok(doc.jwks_uri)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(check_url("https://token.actions.githubusercontent.com", false).is_ok());
        assert!(check_url("http://127.0.0.1:8080/jwks", false).is_ok());
        assert!(check_url("http://[::1]:8080/jwks", false).is_ok());
        assert!(check_url("http://localhost/jwks", false).is_ok());
        assert!(check_url("http://issuer.example/jwks", false).is_err());
        assert!(check_url("http://issuer.example/jwks", true).is_ok());
        assert!(check_url("ftp://issuer.example/jwks", true).is_err());
        assert!(check_url("not a url", true).is_err());
    }
}
