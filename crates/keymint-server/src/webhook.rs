//! A small HTTP client for notifications (the approval webhook) and for
//! asking a provider whether a key works (`keymint scan --verify`), on
//! keymint's one outbound HTTP client ([`keymint_client::http`]): HTTPS with
//! the Mozilla roots or plain HTTP, a timeout on every attempt that covers
//! reading the answer, a cap on the answer's size, and no redirects
//! followed.

use std::time::Duration;

use bytes::Bytes;
use keymint_client::http::{HttpClient, HttpError};

const TIMEOUT: Duration = Duration::from_secs(10);

/// The largest webhook answer read: receivers answer with a word or a small
/// JSON document; a larger answer counts as a failed delivery.
const MAX_ANSWER: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct Client {
    inner: Option<HttpClient>,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    pub fn new() -> Self {
        Self::with_limits(TIMEOUT, MAX_ANSWER)
    }

    /// A client whose attempts end after `timeout` (the answer's body
    /// included) and that reads answers of at most `max_answer` bytes.
    pub fn with_limits(timeout: Duration, max_answer: usize) -> Self {
        let inner = HttpClient::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .max_body(max_answer)
            .pool_max_idle_per_host(4)
            .build();
        match inner {
            Ok(c) => Self { inner: Some(c) },
            Err(e) => {
                // Only a broken TLS provider gets here; every call then
                // fails with this reason.
                tracing::error!(error = %e, "cannot set up the outbound HTTP client");
                Self { inner: None }
            }
        }
    }

    fn http(&self) -> Result<&HttpClient, String> {
        self.inner
            .as_ref()
            .ok_or_else(|| "the outbound HTTP client could not be set up".to_owned())
    }

    /// GETs `url` with `headers` and returns the status (for checking
    /// whether a credential is accepted; the body is not read).
    pub async fn get_status(&self, url: &str, headers: &[(&str, String)]) -> Result<u16, String> {
        let mut b = http::Request::get(url).header(http::header::USER_AGENT, "keymint");
        for (k, v) in headers {
            b = b.header(*k, v.as_str());
        }
        let req = b
            .body(Bytes::new())
            .map_err(|_| "bad request headers".to_owned())?;
        let status = self.http()?.status(req).await.map_err(|e| match e {
            HttpError::Timeout => "timed out".to_owned(),
            e => format!("cannot reach {url}: {e}"),
        })?;
        Ok(status.as_u16())
    }

    /// POSTs `body`; any 2xx is delivered, anything else an error that
    /// says what happened (never the body).
    pub async fn post_json(&self, url: &str, body: &serde_json::Value) -> Result<(), String> {
        let bytes = serde_json::to_vec(body).map_err(|e| e.to_string())?;
        let req = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "keymint")
            .body(Bytes::from(bytes))
            .map_err(|e| format!("bad webhook request: {e}"))?;
        let res = self.http()?.send(req).await.map_err(|e| match e {
            HttpError::Timeout => "timed out".to_owned(),
            HttpError::TooLarge(n) => format!("the webhook's answer is larger than {n} bytes"),
            e => format!("cannot reach the webhook: {e}"),
        })?;
        if res.status.is_success() {
            Ok(())
        } else {
            Err(format!("the webhook answered {}", res.status))
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A webhook receiver on port 0 that answers 200 with a `len`-byte
    /// body, sent whole or one byte per 50 ms.
    async fn receiver(len: usize, trickle: bool) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 4096];
                    let _ = s.read(&mut b).await;
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
                    if s.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    if !trickle {
                        let _ = s.write_all(&vec![b'k'; len]).await;
                        return;
                    }
                    let mut tick = tokio::time::interval(Duration::from_millis(50));
                    for _ in 0..len {
                        tick.tick().await;
                        if s.write_all(b"k").await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        url
    }

    #[tokio::test]
    async fn a_webhook_that_trickles_its_answer_is_cut_off() {
        let c = Client::with_limits(Duration::from_millis(300), 1024);
        let url = receiver(1000, true).await;
        let started = std::time::Instant::now();
        let e = c
            .post_json(&url, &serde_json::json!({"approval": "apr_1"}))
            .await
            .unwrap_err();
        assert_eq!(e, "timed out");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_webhook_answer_past_the_limit_is_refused() {
        let c = Client::with_limits(Duration::from_secs(10), 1024);
        let body = serde_json::json!({"approval": "apr_1"});
        c.post_json(&receiver(2, false).await, &body).await.unwrap();
        let e = c
            .post_json(&receiver(1025, false).await, &body)
            .await
            .unwrap_err();
        assert_eq!(e, "the webhook's answer is larger than 1024 bytes");
    }
}
