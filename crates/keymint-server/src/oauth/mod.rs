//! The OAuth 2 endpoints (docs/design/0026-oauth-token-service.md):
//! RFC 8414 metadata at `/.well-known/oauth-authorization-server`, the
//! token endpoint `/oauth/token` (RFC 8693 token exchange, DPoP-bound on
//! request) and revocation `/oauth/revoke` (RFC 7009). Introspection is
//! `/v1/introspect` (RFC 7662), which knows these tokens too.
//!
//! OAuth speaks forms and its own error shape (RFC 6749 §5.2:
//! `{"error", "error_description"}`), not the API's problem documents, so
//! these routes sit beside the API router rather than in it.

pub mod dpop;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::broker::Broker;
use crate::broker::oauth::{OAuthError, TokenRequest};

/// Largest form accepted at the token and revocation endpoints.
const MAX_FORM: usize = 64 * 1024;
/// Most parameters in one form: a token request has about a dozen, and
/// checking for repeats costs the square of the count (16,000 one-letter
/// names fit in 64 KiB: a quarter of a second of a worker per request).
const MAX_PARAMS: usize = 64;

#[derive(Clone)]
struct OAuthState {
    broker: Arc<Broker>,
    dpop: Arc<dpop::Dpop>,
}

/// The OAuth routes, for `start()` to merge beside the API.
pub fn router(broker: Arc<Broker>) -> Router {
    let state = OAuthState {
        broker,
        dpop: Arc::new(dpop::Dpop),
    };
    Router::new()
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .route(
            "/.well-known/oauth-authorization-server/{*path}",
            get(metadata_at_path),
        )
        .route("/oauth/token", post(token))
        .route("/oauth/revoke", post(revoke))
        // Another method: the API's problem document beside `Allow`.
        .method_not_allowed_fallback(crate::api::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM))
        .with_state(state)
}

async fn metadata(State(s): State<OAuthState>) -> Response {
    match s.broker.oauth_metadata() {
        Some(doc) => {
            let mut r = axum::Json(doc).into_response();
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300"),
            );
            r
        }
        None => oauth_error(&OAuthError::InvalidRequest(
            "this server is not an authorization server (no `[issuer]`)".into(),
        ))
        .with_status(StatusCode::NOT_FOUND),
    }
}

/// RFC 8414 §3.1: the metadata of an issuer whose URL has a path is at the
/// well-known URL with that path inserted after it
/// (`https://h/p` → `https://h/.well-known/oauth-authorization-server/p`),
/// where RFC 8414 clients (the MCP SDK among them) look first. Any other
/// path is not found.
async fn metadata_at_path(
    State(s): State<OAuthState>,
    path: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    let ours = s.broker.oidc().map(|i| issuer_path(i.url()).to_owned());
    match (path, ours) {
        (Ok(axum::extract::Path(p)), Some(ours))
            if !ours.is_empty() && p.trim_start_matches('/') == ours =>
        {
            metadata(State(s)).await
        }
        _ => crate::api::not_found().await.into_response(),
    }
}

/// The path of an issuer URL (checked at load: no query, no fragment),
/// without its leading and terminating `/`: `""` for `https://h` and
/// `https://h/`, `"p/q"` for `https://h/p/q/`.
fn issuer_path(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.find('/').map_or("", |i| &rest[i..]).trim_matches('/')
}

/// The form's parameters. RFC 6749 §3.2: none may repeat, except
/// `resource` (RFC 8707 §2) and `audience` (RFC 8693 §2.1).
fn parse_form(headers: &HeaderMap, body: &[u8]) -> Result<Vec<(String, String)>, OAuthError> {
    let form = crate::api::is_media_type(
        headers.get(header::CONTENT_TYPE),
        "application/x-www-form-urlencoded",
    );
    if !form {
        return Err(OAuthError::InvalidRequest(
            "the body must be application/x-www-form-urlencoded".into(),
        ));
    }
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
        .map_err(|_| OAuthError::InvalidRequest("the form body does not parse".into()))?;
    if pairs.len() > MAX_PARAMS {
        return Err(OAuthError::InvalidRequest(format!(
            "the form has more than {MAX_PARAMS} parameters"
        )));
    }
    for (i, (k, _)) in pairs.iter().enumerate() {
        if k != "resource" && k != "audience" && pairs[..i].iter().any(|(k2, _)| k2 == k) {
            return Err(OAuthError::InvalidRequest(format!(
                "`{}` appears more than once",
                param_name(k)
            )));
        }
    }
    Ok(pairs)
}

/// A parameter's name for an error message: only names keymint knows are
/// repeated back.
fn param_name(k: &str) -> &'static str {
    const KNOWN: [&str; 16] = [
        "assertion",
        "client_secret",
        "grant_type",
        "subject_token",
        "subject_token_type",
        "actor_token",
        "actor_token_type",
        "scope",
        "requested_lifetime",
        "approval",
        "token",
        "token_type_hint",
        "client_id",
        "requested_token_type",
        "client_assertion",
        "client_assertion_type",
    ];
    KNOWN.into_iter().find(|n| *n == k).unwrap_or("a parameter")
}

fn token_request(pairs: Vec<(String, String)>) -> Result<TokenRequest, OAuthError> {
    let mut r = TokenRequest::default();
    for (k, v) in pairs {
        match k.as_str() {
            "grant_type" => r.grant_type = v,
            "subject_token" => r.subject_token = Some(v),
            "subject_token_type" => r.subject_token_type = Some(v),
            "actor_token" => r.actor_token = Some(v),
            "actor_token_type" => r.actor_token_type = Some(v),
            "resource" | "audience" => r.resources.push(v),
            "scope" => r.scope = Some(v),
            "requested_lifetime" => {
                r.lifetime_secs = Some(v.parse().map_err(|_| {
                    OAuthError::InvalidRequest(
                        "`requested_lifetime` must be a number of seconds".into(),
                    )
                })?);
            }
            "approval" => r.approval = Some(v),
            "assertion" => r.assertion = Some(v),
            "client_id" => r.client_id = Some(v),
            "client_assertion" => r.client_assertion = Some(v),
            "client_assertion_type" => r.client_assertion_type = Some(v),
            "requested_token_type" if v != crate::broker::oauth::TT_ACCESS_TOKEN => {
                return Err(OAuthError::InvalidRequest(
                    "`requested_token_type` must be an access token".into(),
                ));
            }
            _ => {}
        }
    }
    if r.grant_type.is_empty() {
        return Err(OAuthError::InvalidRequest(
            "`grant_type` is required".into(),
        ));
    }
    Ok(r)
}

/// The body, or the endpoint's refusal in OAuth's shape (axum's own is
/// `text/plain`).
fn form_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, OAuthError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            OAuthError::BodyTooLarge { limit: MAX_FORM }
        } else {
            OAuthError::InvalidRequest("the body could not be read".into())
        }
    })
}

/// The token endpoint's URL as the client must have used it (`htu`).
fn token_url(b: &Broker) -> String {
    b.token_endpoint().unwrap_or_default()
}

async fn token(
    State(s): State<OAuthState>,
    svid: Option<axum::Extension<crate::tls::PeerSvid>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let now = s.broker.now();
    let result = async {
        no_client_secret(&headers)?;
        let body = form_body(body)?;
        let pairs = parse_form(&headers, &body)?;
        no_secret_in_form(&pairs)?;
        let mut req = token_request(pairs)?;
        // The SPIFFE ID of the client certificate the TLS layer verified.
        req.peer_svid = svid.and_then(|axum::Extension(crate::tls::PeerSvid(id))| id);
        let proofs: Vec<&HeaderValue> = headers.get_all("dpop").iter().collect();
        match proofs.as_slice() {
            [] => {}
            [one] => {
                let proof = one.to_str().map_err(|_| {
                    OAuthError::InvalidDpopProof("the DPoP proof is not a JWS".into())
                })?;
                let proven = s
                    .dpop
                    .check(
                        s.broker.keyring(),
                        proof,
                        "POST",
                        &token_url(&s.broker),
                        None,
                        true,
                        now,
                    )
                    .map_err(|e| match e {
                        dpop::DpopError::UseNonce => OAuthError::UseDpopNonce,
                        dpop::DpopError::Invalid(m) => OAuthError::InvalidDpopProof(m.into()),
                    })?;
                let fresh = s
                    .broker
                    .store()
                    .claim_once(&proven.replay_key, proven.until, now)
                    .await
                    .map_err(|_| OAuthError::Unavailable("the store cannot write now".into()))?;
                if !fresh {
                    return Err(OAuthError::InvalidDpopProof(
                        "the DPoP proof was already used".into(),
                    ));
                }
                req.dpop_jkt = Some(proven.jkt);
            }
            _ => {
                return Err(OAuthError::InvalidDpopProof("send one DPoP proof".into()));
            }
        }
        s.broker.token(req).await
    }
    .await;
    let nonce = dpop::Dpop::nonce(s.broker.keyring(), now);
    let mut res = match result {
        Ok(t) => axum::Json(t).into_response(),
        Err(e) => basic_challenge(&headers, &e, oauth_error(&e)),
    };
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&nonce) {
        h.insert("dpop-nonce", v);
    }
    res
}

async fn revoke(
    State(s): State<OAuthState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        no_client_secret(&headers)?;
        let body = form_body(body)?;
        let pairs = parse_form(&headers, &body)?;
        no_secret_in_form(&pairs)?;
        let token = pairs
            .into_iter()
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v)
            .ok_or_else(|| OAuthError::InvalidRequest("`token` is required".into()))?;
        s.broker.revoke_token(&token).await
    }
    .await;
    match result {
        // RFC 7009 §2.2: 200 whether or not the token was known.
        Ok(()) => {
            let mut r = StatusCode::OK.into_response();
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => basic_challenge(&headers, &e, oauth_error(&e)),
    }
}

/// Whether the request authenticates its client with `Authorization:
/// Basic` (a client secret, RFC 6749 §2.3.1).
fn sends_basic(headers: &HeaderMap) -> bool {
    headers.get_all(header::AUTHORIZATION).iter().any(|v| {
        v.as_bytes()
            .get(..6)
            .is_some_and(|s| s.eq_ignore_ascii_case(b"basic "))
    })
}

/// keymint takes no client secrets: a client authenticates with a signed
/// assertion (`private_key_jwt`) or its certificate. One that sends a
/// secret is refused (`invalid_client`) rather than served as if it had
/// sent none, which it would take for authentication that held.
fn no_client_secret(headers: &HeaderMap) -> Result<(), OAuthError> {
    if sends_basic(headers) {
        return Err(secret_refused("`Authorization: Basic`"));
    }
    Ok(())
}

/// The refusal of a client secret sent as `how`.
fn secret_refused(how: &str) -> OAuthError {
    OAuthError::InvalidClient(format!(
        "client secrets are not accepted ({how}): authenticate the client with a signed \
         assertion (private_key_jwt) or a client certificate"
    ))
}

/// The same for a secret in the form (`client_secret_post`, RFC 6749
/// §2.3.1), which was ignored and the request served. An empty one (what
/// some libraries send for a public client) proves nothing and is read as
/// none.
fn no_secret_in_form(pairs: &[(String, String)]) -> Result<(), OAuthError> {
    if pairs
        .iter()
        .any(|(k, v)| k == "client_secret" && !v.is_empty())
    {
        return Err(secret_refused("`client_secret`"));
    }
    Ok(())
}

/// RFC 6749 §5.2: an `invalid_client` answer to a client that tried the
/// `Authorization` header carries a challenge of the scheme it used.
fn basic_challenge(headers: &HeaderMap, e: &OAuthError, mut res: Response) -> Response {
    if matches!(e, OAuthError::InvalidClient(_)) && sends_basic(headers) {
        res.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"keymint\""),
        );
    }
    res
}

trait WithStatus {
    fn with_status(self, s: StatusCode) -> Response;
}

impl WithStatus for Response {
    fn with_status(mut self, s: StatusCode) -> Response {
        *self.status_mut() = s;
        self
    }
}

/// An RFC 6749 §5.2 error response.
pub(crate) fn oauth_error(e: &OAuthError) -> Response {
    let status = match e {
        OAuthError::InvalidClient(_) => StatusCode::UNAUTHORIZED,
        OAuthError::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
        OAuthError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        OAuthError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    let mut body = serde_json::json!({
        "error": e.code(),
        "error_description": e.to_string(),
    });
    if let OAuthError::AuthorizationPending { approval } = e {
        body["approval"] = serde_json::Value::String(approval.clone());
    }
    let mut r = (status, axum::Json(body)).into_response();
    if matches!(e, OAuthError::Unavailable(_)) {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::issuer_path;

    #[test]
    fn the_issuers_path_is_what_rfc_8414_inserts() {
        assert_eq!(issuer_path("https://km.example"), "");
        assert_eq!(issuer_path("https://km.example/"), "");
        assert_eq!(issuer_path("https://km.example:8443/a/b/"), "a/b");
        assert_eq!(issuer_path("http://127.0.0.1:9/keymint"), "keymint");
    }
}
