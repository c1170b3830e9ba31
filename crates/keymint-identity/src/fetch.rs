//! Fetching key sets: HTTPS (rustls with the `ring` provider and the
//! Mozilla roots from `webpki-roots`), plain HTTP on loopback, and files.
//! Every fetch has a timeout that covers reading the body and a body-size
//! cap; redirects are not followed. The HTTP client is keymint's one
//! outbound builder, [`keymint_client::http`].

use std::time::Duration;

use bytes::Bytes;
use keymint_client::http::{HttpClient, HttpError};

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

/// The HTTP client shared by every issuer.
#[derive(Debug, Clone)]
pub(crate) struct Fetcher {
    client: HttpClient,
    max_body: usize,
}

/// The longest `fetch_timeout` a configuration may set; each fetch passes
/// its own.
const MAX_TIMEOUT: Duration = Duration::from_secs(120);

impl Fetcher {
    pub(crate) fn new(max_body: usize) -> Result<Self, ConfigError> {
        let client = HttpClient::builder()
            .timeout(MAX_TIMEOUT)
            .connect_timeout(MAX_TIMEOUT)
            .max_body(max_body)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ConfigError::Invalid(format!("TLS set-up: {e}")))?;
        Ok(Self { client, max_body })
    }

    /// GETs `url` and returns its body if the status is 200. `timeout`
    /// covers the whole exchange, reading the body included.
    pub(crate) async fn get(&self, url: &str, timeout: Duration) -> Result<Bytes, FetchError> {
        let req = http::Request::get(url)
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, "keymint")
            .body(Bytes::new())
            .map_err(|e| FetchError::Request(e.to_string()))?;
        let resp = self
            .client
            .with_timeout(timeout)
            .send(req)
            .await
            .map_err(|e| match e {
                HttpError::Timeout => FetchError::Timeout,
                HttpError::TooLarge(_) => FetchError::TooLarge(self.max_body),
                HttpError::Transport(m) | HttpError::Config(m) => FetchError::Request(m),
            })?;
        if resp.status != http::StatusCode::OK {
            return Err(FetchError::Status(resp.status.as_u16()));
        }
        Ok(resp.body)
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

    /// A server on port 0 that answers every connection with a JWKS-like
    /// 200 whose `len`-byte body is sent whole, or one byte per 50 ms.
    async fn server(len: usize, trickle: bool) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", l.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 4096];
                    let _ = s.read(&mut b).await;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
                    );
                    if s.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    if !trickle {
                        let _ = s.write_all(&vec![b' '; len]).await;
                        return;
                    }
                    let mut tick = tokio::time::interval(Duration::from_millis(50));
                    for _ in 0..len {
                        tick.tick().await;
                        if s.write_all(b" ").await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        url
    }

    #[tokio::test]
    async fn a_key_set_that_trickles_past_the_fetch_timeout_is_cut_off() {
        let f = Fetcher::new(64 * 1024).unwrap();
        let url = server(1000, true).await;
        let started = std::time::Instant::now();
        let e = f.get(&url, Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(e, FetchError::Timeout), "{e:?}");
        // Cut off at the timeout, not after the 50 s the body would take.
        assert!(started.elapsed() < Duration::from_secs(5));
        // Discovery goes through the same path.
        let e = f
            .discover_jwks_uri(&url, true, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::Timeout), "{e:?}");
    }

    #[tokio::test]
    async fn a_key_set_larger_than_the_document_limit_is_refused() {
        let f = Fetcher::new(1024).unwrap();
        let ok = f
            .get(&server(1024, false).await, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(ok.len(), 1024);
        let e = f
            .get(&server(1025, false).await, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::TooLarge(1024)), "{e:?}");
        assert_eq!(e.to_string(), "response larger than 1024 bytes");
    }
}
