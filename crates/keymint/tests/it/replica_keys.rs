//! What replicas on one PostgreSQL database must agree on: the keys they
//! generate at their first start (an SSH CA's, the OIDC issuer's), what an
//! operator changes on one of them (a CA key imported), the SSH serials
//! and the KRL; and a replica told to stay out of the background duties
//! never takes them (docs/design/0022-duties-and-replicas.md).

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use keymint_client::Client;
use keymint_proto::{IssueLease, IssuedLease, Lease, SshCa};
use serde_json::{Value, json};

use crate::failover::{Replica, fresh_database, holder, start_task};
use crate::ssh::{cert_text, have_openssh, ssh_login, start_sshd_trusting, whoami, workload_key};

/// A root key and an admin token for replicas started at once (as a
/// deployment hands every replica the same two files).
fn seed_dir(base: &Path) -> std::path::PathBuf {
    let seed = base.join("seed");
    std::fs::create_dir_all(&seed).unwrap();
    let root = keymint_core::keyring::Keyring::generate_root_hex().unwrap();
    let admin =
        keymint_core::token::Token::generate(keymint_core::token::TokenKind::Admin).unwrap();
    for (file, text) in [
        ("root.key", root.as_str().to_owned()),
        ("admin.token", admin.expose().to_owned()),
    ] {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(seed.join(file))
            .unwrap();
        std::io::Write::write_all(&mut f, format!("{text}\n").as_bytes()).unwrap();
    }
    seed
}

async fn ca_key(c: &Client) -> String {
    let ca: SshCa = c.get("/v1/ssh/cas/ops").await.unwrap();
    ca.public_key
}

async fn sign(c: &Client, public: &str) -> IssuedLease {
    let t = start_task(c, "deploy", 600).await;
    c.post(
        &format!("/v1/tasks/{}/leases", t.id),
        &IssueLease {
            public_key: Some(public.to_owned()),
            ..IssueLease::default()
        },
    )
    .await
    .unwrap()
}

fn serial(i: &IssuedLease) -> u64 {
    match &i.credential {
        keymint_proto::Credential::SshCertificate { serial, .. } => *serial,
        other => panic!("not a certificate: {other:?}"),
    }
}

async fn krl(c: &Client) -> Vec<u8> {
    let r = c
        .raw(http::Method::GET, "/v1/ssh/cas/ops/krl", None, vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    r.body.to_vec()
}

/// Whether `ssh-keygen -Q` finds `cert` in the KRL `bytes`.
fn krl_lists(dir: &Path, bytes: &[u8], cert: &Path) -> bool {
    let file = dir.join(format!(
        "krl-{}",
        keymint_core::token::random_base62(6).unwrap().as_str()
    ));
    std::fs::write(&file, bytes).unwrap();
    let q = std::process::Command::new("ssh-keygen")
        .arg("-Q")
        .arg("-f")
        .arg(&file)
        .arg(cert)
        .output()
        .unwrap();
    String::from_utf8_lossy(&q.stdout).contains("REVOKED")
}

async fn jwks_kids(c: &Client) -> Vec<String> {
    let r = c
        .raw(http::Method::GET, "/.well-known/jwks.json", None, vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    let mut kids: Vec<String> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect();
    kids.sort();
    kids
}

/// Three replicas started at the same moment on an empty database: one SSH
/// CA key and one issuer key set win and all three use them; certificates
/// from every replica log in to one sshd, with distinct serials from the
/// store; a certificate revoked on one replica is in the other replicas'
/// KRLs at once (though they had built and cached theirs before); a CA key
/// imported on one replica signs on the others within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_agree_on_keys_serials_and_revocations_of_ssh_certificates() {
    if !have_openssh() {
        return;
    }
    let Some(db) = fresh_database().await else {
        return;
    };
    let me = whoami();
    let base = tempfile::tempdir().unwrap();
    let seed = seed_dir(base.path());
    let extra = format!(
        r#"
[issuer]
url = "http://127.0.0.1:9"
algorithms = ["ES256"]
[[roles]]
name = "deploy"
engine = "ssh"
scopes = ["ssh:login"]
default_ttl = "5m"
max_ttl = "1h"
[roles.ssh]
ca = "ops"
principals = ["{me}"]
"#
    );
    let (a, b, c) = tokio::join!(
        Replica::start_with(base.path(), "a", &db, "", &extra, Some(&seed)),
        Replica::start_with(base.path(), "b", &db, "", &extra, Some(&seed)),
        Replica::start_with(base.path(), "c", &db, "", &extra, Some(&seed)),
    );
    let mut replicas = [a, b, c];
    let clients: Vec<Client> = replicas.iter().map(|r| r.admin.clone()).collect();

    // One CA key and one issuer key set, whichever replica generated them.
    let ca = ca_key(&clients[0]).await;
    let kids = jwks_kids(&clients[0]).await;
    assert!(!kids.is_empty());
    for c in &clients[1..] {
        assert_eq!(
            ca_key(c).await,
            ca,
            "replicas started at once use one CA key"
        );
        assert_eq!(jwks_kids(c).await, kids, "and one issuer key set");
    }

    // A certificate from each replica logs in; serials come from the store.
    let sshd = start_sshd_trusting(&ca);
    let work = tempfile::tempdir().unwrap();
    let (key, public) = workload_key(work.path());
    let mut serials = std::collections::HashSet::new();
    let mut certs = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let issued = sign(c, &public).await;
        assert!(
            serial(&issued) >= 1 << 62,
            "serials come from the store's sequence"
        );
        assert!(serials.insert(serial(&issued)), "a serial was given twice");
        let cert = work.path().join(format!("cert-{i}.pub"));
        std::fs::write(&cert, cert_text(&issued)).unwrap();
        let (ok, log) = ssh_login(&sshd, &key, &cert, &me).await;
        assert!(ok, "a certificate from replica {i} must log in: {log}");
        certs.push((issued, cert));
    }
    for c in &clients {
        for _ in 0..5 {
            assert!(serials.insert(serial(&sign(c, &public).await)));
        }
    }

    // Every replica builds (and caches) its KRL; then replica A revokes.
    for c in &clients {
        assert!(!krl_lists(work.path(), &krl(c).await, &certs[0].1));
    }
    let l: Lease = clients[0]
        .post_empty(&format!("/v1/leases/{}/revoke", certs[0].0.lease.id))
        .await
        .unwrap();
    assert_ne!(l.state, keymint_proto::LeaseState::Active);
    let t0 = Instant::now();
    for (i, c) in clients.iter().enumerate() {
        while !krl_lists(work.path(), &krl(c).await, &certs[0].1) {
            assert!(
                t0.elapsed() < Duration::from_secs(3),
                "replica {i}'s KRL does not list a certificate revoked on replica A"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!krl_lists(work.path(), &krl(c).await, &certs[1].1));
    }
    eprintln!("revoked on A, listed in every KRL after {:?}", t0.elapsed());
    std::fs::write(&sshd.krl, krl(&clients[2]).await).unwrap();
    let (ok, _) = ssh_login(&sshd, &key, &certs[0].1, &me).await;
    assert!(
        !ok,
        "a certificate revoked on A must not log in with C's KRL"
    );
    let (ok, log) = ssh_login(&sshd, &key, &certs[1].1, &me).await;
    assert!(ok, "the others still log in: {log}");

    // An operator imports a new CA key on replica B: every replica serves
    // it and signs with it within seconds, and hosts trusting only the new
    // key accept what any replica signs.
    let new_ca = work.path().join("new_ca");
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "new-ca", "-f"])
        .arg(&new_ca)
        .status()
        .unwrap();
    assert!(status.success());
    let private = std::fs::read_to_string(&new_ca).unwrap();
    let new_public = std::fs::read_to_string(new_ca.with_extension("pub")).unwrap();
    let new_public = new_public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let r = clients[1]
        .raw(
            http::Method::POST,
            "/v1/ssh/cas/ops/key",
            Some("application/json"),
            json!({"private_key": private, "replace": true})
                .to_string()
                .into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let sshd_new = start_sshd_trusting(&new_public);
    let t0 = Instant::now();
    for (i, c) in clients.iter().enumerate() {
        while ca_key(c).await != new_public {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "replica {i} still serves the old CA key"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let cert = work.path().join(format!("new-cert-{i}.pub"));
        std::fs::write(&cert, cert_text(&sign(c, &public).await)).unwrap();
        let (ok, log) = ssh_login(&sshd_new, &key, &cert, &me).await;
        assert!(ok, "replica {i} must sign with the imported key: {log}");
        let (ok, _) = ssh_login(&sshd, &key, &cert, &me).await;
        assert!(!ok, "hosts trusting only the old key must refuse it");
    }
    eprintln!(
        "imported on B, in force everywhere after {:?}",
        t0.elapsed()
    );
    for r in &mut replicas {
        r.kill_9().await;
    }
}

/// `[server] duties = false` keeps a replica (a `keymint proxy`, say) out
/// of the background duties: started first, it leaves them to the next
/// replica, and it does not take them when that replica dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_duties_never_takes_them() {
    let Some(db) = fresh_database().await else {
        return;
    };
    let base = tempfile::tempdir().unwrap();
    let seed = seed_dir(base.path());
    let roles = r#"
[[roles]]
name = "demo"
engine = "token"
scopes = ["llm:chat"]
default_ttl = "5m"
max_ttl = "10m"
"#;
    let quiet = Replica::start_with(
        base.path(),
        "quiet",
        &db,
        "duties = false",
        roles,
        Some(&seed),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(quiet.holds_duties().await, Some(false));
    let worker = Replica::start_with(base.path(), "worker", &db, "", roles, Some(&seed)).await;
    let mut replicas = [quiet, worker];
    assert_eq!(
        holder(&replicas, Duration::from_secs(10)).await,
        Some(1),
        "the replica that may run duties takes them"
    );
    // The quiet replica still serves.
    start_task(&replicas[0].admin, "demo", 60).await;
    replicas[1].kill_9().await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        replicas[0].holds_duties().await,
        Some(false),
        "a replica without duties must not take them over"
    );
    replicas[0].kill_9().await;
}
