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
    // Too old: fetched again behind the next token; a failing issuer leaves
    // the cached keys in use.
    *server.state.fail_status.lock().unwrap() = Some(500);
    assert!(v.verify(&t, now().plus_secs(300)).await.is_ok());
    v.refreshes_settled().await;
    assert_eq!(server.hits(), 2);
    assert!(v.verify(&t, now().plus_secs(310)).await.is_ok());
    v.refreshes_settled().await;
    assert_eq!(server.hits(), 2, "rate-limited");
    // The issuer drops the key: once fetched, it is gone (the token that
    // started the refresh was served with the keys it found).
    *server.state.fail_status.lock().unwrap() = None;
    server.set_jwks(jwks(&[&TestKey::ed25519("other")]));
    assert!(v.verify(&t, now().plus_secs(331)).await.is_ok());
    v.refreshes_settled().await;
    assert_eq!(server.hits(), 3);
    assert_eq!(
        v.verify(&t, now().plus_secs(332)).await,
        Err(AuthError::UnknownKey)
    );
    assert_eq!(server.hits(), 3);
}

/// Keys that no fetch has confirmed for `jwks_max_stale` verify nothing:
/// while the issuer's endpoint keeps failing, its tokens are refused
/// (`keys_stale`, a 503), rate-limited fetches go on, and the first fetch
/// that succeeds brings the issuer back. Time is the `now` passed in; the
/// issuer is a real HTTP server.
#[tokio::test]
async fn keys_past_jwks_max_stale_are_refused_until_a_fetch_succeeds() {
    let k = TestKey::ed25519("kid-marker-5f1c");
    let server = JwksServer::start(jwks(&[&k])).await;
    let mut c = server.config();
    c.jwks_max_age_secs = 300;
    c.jwks_max_stale_secs = 3600;
    let v = Verifier::new(vec![c]).unwrap();
    let t = k.token(&claims(&server.url));
    let at = |secs: i64| now().plus_secs(u64::try_from(secs).unwrap());
    let check = |secs: i64| {
        let t = k.token(&json!({
            "iss": server.url, "sub": "agent-7", "aud": AUD,
            "iat": NOW_SECS + secs - 60, "exp": NOW_SECS + secs + 600,
        }));
        let (v, when) = (&v, at(secs));
        async move {
            let r = v.verify(&t, when).await;
            v.refreshes_settled().await;
            r.map(|_| ())
        }
    };
    assert!(v.verify(&t, now()).await.is_ok());
    assert_eq!(server.hits(), 1);

    // The issuer's endpoint fails from now on (down, or cut off).
    *server.state.fail_status.lock().unwrap() = Some(503);
    for secs in [300, 1000, 2000, 3500] {
        assert_eq!(
            check(secs).await,
            Ok(()),
            "at +{secs}s, within jwks_max_stale"
        );
    }
    let hits = server.hits();
    assert_eq!(hits, 5, "one failed fetch per use after jwks_max_age");

    // Past `jwks_max_stale`: refused, after one more (failed) fetch.
    let e = check(3600).await.unwrap_err();
    assert_eq!(e, AuthError::KeysStale);
    assert_eq!(e.code(), "keys_stale");
    assert!(e.is_unavailable());
    assert_eq!(server.hits(), hits + 1);
    // The error says why, and nothing of the token or the key.
    for shown in [e.to_string(), format!("{e:?}")] {
        assert!(
            !shown.contains("marker") && !shown.contains(&t[..20]),
            "{shown}"
        );
    }
    // Still refused, and fetches stay rate-limited.
    assert_eq!(check(3610).await, Err(AuthError::KeysStale));
    assert_eq!(server.hits(), hits + 1);
    assert_eq!(check(3640).await, Err(AuthError::KeysStale));
    assert_eq!(server.hits(), hits + 2);

    // The issuer answers again: the next fetch brings it back.
    *server.state.fail_status.lock().unwrap() = None;
    assert_eq!(check(3670).await, Ok(()));
    assert_eq!(server.hits(), hits + 3);
    assert_eq!(check(3671).await, Ok(()));
    assert_eq!(server.hits(), hits + 3);
}

/// Keys merely past `jwks_max_age` serve the kids they know at once, while
/// one refresh (single flight, rate-limited) runs in the background; a
/// token with an unknown `kid` still waits for a fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_keys_serve_known_kids_while_one_refresh_runs_behind() {
    use std::time::Duration;
    let (k, rotated) = (TestKey::ed25519("k"), TestKey::ed25519("rotated"));
    let server = JwksServer::start(jwks(&[&k])).await;
    let mut c = server.config();
    c.jwks_max_age_secs = 300;
    let v = Arc::new(Verifier::new(vec![c]).unwrap());
    let iss = server.url.clone();
    assert!(v.verify(&k.token(&claims(&iss)), now()).await.is_ok());
    assert_eq!(server.hits(), 1);

    // The issuer now takes 3 s to answer, and has rotated in a new key.
    server.state.delay_ms.store(3000, Ordering::SeqCst);
    server.set_jwks(jwks(&[&k, &rotated]));
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (v, t) = (v.clone(), k.token(&claims(&iss)));
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(
                Duration::from_millis(1000),
                v.verify(&t, now().plus_secs(300 + i)),
            )
            .await
        }));
    }
    for t in tasks {
        let r = t
            .await
            .unwrap()
            .expect("a known kid does not wait on the refresh");
        assert!(r.is_ok(), "{r:?}");
    }
    // One refresh, started by the first of them, still in flight.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while server.hits() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.hits(), 2);

    // A kid the old keys do not know waits for a fetch: the one in flight.
    let started = std::time::Instant::now();
    assert!(
        v.verify(&rotated.token(&claims(&iss)), now().plus_secs(345))
            .await
            .is_ok()
    );
    assert!(started.elapsed() >= Duration::from_millis(500));
    v.refreshes_settled().await;
    assert_eq!(server.hits(), 2, "single flight");
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
