//! A small HTTP client for notifications (the approval webhook) and for
//! asking a provider whether a key works (`keymint scan --verify`):
//! HTTPS with the platform's web roots or plain HTTP, a timeout on every
//! attempt, and no redirects followed.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Client {
    inner: HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    pub fn new() -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(TIMEOUT));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Self {
            inner: HyperClient::builder(TokioExecutor::new()).build(https),
        }
    }

    /// GETs `url` with `headers` and returns the status (for checking
    /// whether a credential is accepted; the body is not read).
    pub async fn get_status(&self, url: &str, headers: &[(&str, String)]) -> Result<u16, String> {
        let mut b = http::Request::get(url).header(http::header::USER_AGENT, "keymint");
        for (k, v) in headers {
            b = b.header(*k, v.as_str());
        }
        let req = b
            .body(Full::new(Bytes::new()))
            .map_err(|_| "bad request headers".to_owned())?;
        let res = tokio::time::timeout(TIMEOUT, self.inner.request(req))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| format!("cannot reach {url}: {e}"))?;
        Ok(res.status().as_u16())
    }

    /// POSTs `body`; any 2xx is delivered, anything else an error that
    /// says what happened (never the body).
    pub async fn post_json(&self, url: &str, body: &serde_json::Value) -> Result<(), String> {
        let bytes = serde_json::to_vec(body).map_err(|e| e.to_string())?;
        let req = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "keymint")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| format!("bad webhook request: {e}"))?;
        let res = tokio::time::timeout(TIMEOUT, self.inner.request(req))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| format!("cannot reach the webhook: {e}"))?;
        if res.status().is_success() {
            Ok(())
        } else {
            Err(format!("the webhook answered {}", res.status()))
        }
    }
}
