//! The key cache: refresh on unknown `kid`, rate limit, shared fetches,
//! discovery, failures.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keymint_identity::{AuthError, JwksSource, JwtIssuerConfig, Verifier};
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn an_unknown_kid_refreshes_once_then_a_rotated_key_is_accepted() {
    let old = TestKey::p256("old");
    let new = TestKey::ed25519("new");
    let server = JwksServer::start(jwks(&[&old])).await;
    let v = Verifier::new(vec![server.config()]).unwrap();
    let t0 = now();
    assert!(v.verify(&old.token(&claims(&server.url)), t0).await.is_ok());
    assert_eq!(server.hits(), 1);

    // The issuer rotates; within the rate-limit window the new kid is unknown
    // and nothing is fetched.
    server.set_jwks(jwks(&[&old, &new]));
    let t_new = new.token(&claims(&server.url));
    assert_eq!(
        v.verify(&t_new, t0.plus_secs(10)).await,
        Err(AuthError::UnknownKey)
    );
    assert_eq!(server.hits(), 1);

    // After the window: exactly one refresh, and the new key works.
    assert!(v.verify(&t_new, t0.plus_secs(30)).await.is_ok());
    assert_eq!(server.hits(), 2);
    assert!(v.verify(&t_new, t0.plus_secs(31)).await.is_ok());
    assert!(
        v.verify(&old.token(&claims(&server.url)), t0.plus_secs(31))
            .await
            .is_ok()
    );
    assert_eq!(server.hits(), 2, "known kids never fetch");

    // An unknown kid right after the refresh: refused without a fetch.
    let stranger = TestKey::p256("stranger").token(&claims(&server.url));
    assert_eq!(
        v.verify(&stranger, t0.plus_secs(40)).await,
        Err(AuthError::UnknownKey)
    );
    assert_eq!(server.hits(), 2);
    // Later, one fetch, still unknown.
    assert_eq!(
        v.verify(&stranger, t0.plus_secs(61)).await,
        Err(AuthError::UnknownKey)
    );
    assert_eq!(server.hits(), 3);
    // A `now` from the past does not reopen the window.
    assert_eq!(v.verify(&stranger, t0).await, Err(AuthError::UnknownKey));
    assert_eq!(server.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_random_kids_cause_at_most_one_fetch_per_window() {
    let k = TestKey::p256("real");
    let server = JwksServer::start(jwks(&[&k])).await;
    server.state.delay_ms.store(200, Ordering::SeqCst);
    let v = Arc::new(Verifier::new(vec![server.config()]).unwrap());
    let iss = server.url.clone();

    for (window, start) in [
        (1, now()),
        (2, now().plus_secs(30)),
        (3, now().plus_secs(60)),
    ] {
        let mut tasks = Vec::new();
        for i in 0..100 {
            let v = v.clone();
            let key = TestKey::p256(&format!("random-{window}-{i}-{}", rand_kid()));
            let token = key.token(&claims(&iss));
            tasks.push(tokio::spawn(async move {
                v.verify(&token, start.plus_millis(i)).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Err(AuthError::UnknownKey));
        }
        assert_eq!(server.hits(), window, "one fetch in window {window}");
    }
    // The real key still works, from the cache.
    assert!(
        v.verify(&k.token(&claims(&iss)), now().plus_secs(61))
            .await
            .is_ok()
    );
    assert_eq!(server.hits(), 3);
}

fn rand_kid() -> String {
    let mut b = [0u8; 12];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    b64(&b)
}

#[tokio::test]
async fn discovery_finds_the_jwks_and_checks_the_issuer() {
    let k = TestKey::rsa("k");
    let server = JwksServer::start(jwks(&[&k])).await;
    let mut c = server.config();
    c.jwks = JwksSource::Discovery;
    let v = Verifier::new(vec![c.clone()]).unwrap();
    assert!(
        v.verify(&k.token(&claims(&server.url)), now())
            .await
            .is_ok()
    );
    assert_eq!(server.state.discovery_hits.load(Ordering::SeqCst), 1);
    assert_eq!(server.hits(), 1);

    // A discovery document naming another issuer is not trusted.
    *server.state.discovery_issuer.lock().unwrap() = Some("https://evil.test".into());
    let v = Verifier::new(vec![c]).unwrap();
    assert_eq!(
        v.verify(&k.token(&claims(&server.url)), now()).await,
        Err(AuthError::KeysUnavailable)
    );
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn an_unreachable_issuer_is_unavailable_and_not_hammered() {
    let k = TestKey::p256("k");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let url = format!("http://{addr}");
    let c = JwtIssuerConfig::new(
        "down",
        &url,
        vec![AUD.into()],
        JwksSource::Url(format!("{url}/jwks")),
    );
    let v = Verifier::new(vec![c]).unwrap();
    let err = v.verify(&k.token(&claims(&url)), now()).await.unwrap_err();
    assert_eq!(err, AuthError::KeysUnavailable);
    assert!(err.is_unavailable());
    assert_eq!(err.code(), "keys_unavailable");
}

#[tokio::test]
async fn old_keys_are_refreshed_and_kept_when_the_issuer_fails() {
    let k = TestKey::ed25519("k");
    let server = JwksServer::start(jwks(&[&k])).await;
    let mut c = server.config();
    c.jwks_max_age_secs = 300;
    let v = Verifier::new(vec![c]).unwrap();
    let t = k.token(&claims(&server.url));
    assert!(v.verify(&t, now()).await.is_ok());
    assert!(v.verify(&t, now().plus_secs(299)).await.is_ok());
    assert_eq!(server.hits(), 1);
    // Too old: fetched again on the next token; a failing issuer leaves the
    // cached keys in use.
    *server.state.fail_status.lock().unwrap() = Some(500);
    assert!(v.verify(&t, now().plus_secs(300)).await.is_ok());
    assert_eq!(server.hits(), 2);
    assert!(v.verify(&t, now().plus_secs(310)).await.is_ok());
    assert_eq!(server.hits(), 2, "rate-limited");
    // The issuer drops the key: once fetched, it is gone.
    *server.state.fail_status.lock().unwrap() = None;
    server.set_jwks(jwks(&[&TestKey::ed25519("other")]));
    assert_eq!(
        v.verify(&t, now().plus_secs(331)).await,
        Err(AuthError::UnknownKey)
    );
    assert_eq!(server.hits(), 3);
}

#[tokio::test]
async fn oversized_key_sets_are_refused() {
    let k = TestKey::p256("k");
    let server = JwksServer::start(json!({"keys": [k.jwk()], "pad": "x".repeat(300 * 1024)})).await;
    let v = Verifier::new(vec![server.config()]).unwrap();
    assert_eq!(
        v.verify(&k.token(&claims(&server.url)), now()).await,
        Err(AuthError::KeysUnavailable)
    );
}

#[tokio::test]
async fn file_key_sets_are_read_again_on_refresh() {
    let (a, b) = (TestKey::p256("a"), TestKey::rsa("b"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks(&[&a]).to_string()).unwrap();
    let iss = "https://file.test";
    let v = Verifier::new(vec![JwtIssuerConfig::new(
        "file",
        iss,
        vec![AUD.into()],
        JwksSource::File(path.clone()),
    )])
    .unwrap();
    assert!(v.verify(&a.token(&claims(iss)), now()).await.is_ok());
    std::fs::write(&path, jwks(&[&a, &b]).to_string()).unwrap();
    assert!(
        v.verify(&b.token(&claims(iss)), now().plus_secs(30))
            .await
            .is_ok()
    );
}
