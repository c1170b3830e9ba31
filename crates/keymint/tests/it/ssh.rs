//! SSH certificates against a real OpenSSH: an `sshd` started by the test
//! on a loopback port, trusting keymint's CA and reading keymint's KRL.
//! Outside CI a missing sshd skips these tests; under `CI=true` it fails
//! them.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use keymint_core::model::Role;
use keymint_core::role::{RoleKind, SshRole};
use keymint_proto::{Credential, IssueLease, IssuedLease, Lease, SshCa, Task};
use keymint_testkit::TestServer;

const SSHD: &str = "/usr/sbin/sshd";

pub(crate) fn have_openssh() -> bool {
    let ok = Path::new(SSHD).exists()
        && std::process::Command::new("ssh")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
    assert!(
        ok || !crate::postgres::in_ci(),
        "OpenSSH (sshd, ssh, ssh-keygen) is required in CI"
    );
    if !ok {
        eprintln!("skipping: OpenSSH server not installed");
    }
    ok
}

pub(crate) fn whoami() -> String {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn ssh_role(name: &str, principals: &[&str], force_command: Option<&str>) -> Role {
    Role {
        name: name.into(),
        scopes: vec!["ssh:login".into()],
        default_ttl_secs: 300,
        max_ttl_secs: 600,
        description: None,
        kind: RoleKind::Ssh(SshRole {
            ca: "ops".into(),
            principals: principals.iter().map(|p| (*p).to_owned()).collect(),
            force_command: force_command.map(str::to_owned),
            source_address: None,
            permit_pty: true,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
            permit_x11_forwarding: false,
            permit_user_rc: false,
        }),
    }
}

/// A non-daemonising sshd on a free loopback port, killed on drop.
pub(crate) struct Sshd {
    child: std::process::Child,
    port: u16,
    pub(crate) krl: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn write_krl(s: &TestServer, path: &Path) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keymint"))
        .args(["ssh", "krl", "ops", "--out"])
        .arg(path)
        .env("KEYMINT_ADDR", s.url())
        .env("KEYMINT_TOKEN", &s.admin_token)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn start_sshd(s: &TestServer) -> Sshd {
    let ca: SshCa = s.admin().get("/v1/ssh/cas/ops").await.unwrap();
    let sshd = start_sshd_trusting(&ca.public_key);
    write_krl(s, &sshd.krl).await;
    sshd
}

/// An sshd trusting the CA key `ca_public_key` (OpenSSH format), with an
/// empty KRL file at `Sshd::krl` for the caller to fill.
pub(crate) fn start_sshd_trusting(ca_public_key: &str) -> Sshd {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(d.join("host_key"))
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::write(d.join("ca.pub"), format!("{ca_public_key}\n")).unwrap();
    let krl = d.join("revoked.krl");
    std::fs::write(&krl, b"").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {pid}\n\
         TrustedUserCAKeys {ca}\nRevokedKeys {krl}\nAuthorizedKeysFile none\n\
         UsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
         PubkeyAuthentication yes\nLogLevel VERBOSE\n",
        hk = d.join("host_key").display(),
        pid = d.join("sshd.pid").display(),
        ca = d.join("ca.pub").display(),
        krl = krl.display(),
    );
    std::fs::write(d.join("sshd_config"), config).unwrap();
    // sshd wants its privilege separation directory even when not root.
    let _ = std::fs::create_dir_all("/run/sshd");
    let child = std::process::Command::new(SSHD)
        .args(["-D", "-e", "-f"])
        .arg(d.join("sshd_config"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "sshd did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Sshd {
        child,
        port,
        krl,
        _dir: dir,
    }
}

/// Whether `ssh-keygen -Q` finds the certificate `cert` revoked by the KRL
/// file `krl` (it exits 0 for a certificate the KRL does not list).
pub(crate) fn krl_revokes(krl: &Path, cert: &Path) -> bool {
    let q = std::process::Command::new("ssh-keygen")
        .arg("-Q")
        .arg("-f")
        .arg(krl)
        .arg(cert)
        .output()
        .unwrap();
    !q.status.success() && String::from_utf8_lossy(&q.stdout).contains("REVOKED")
}

/// A workload key pair made with ssh-keygen.
pub(crate) fn workload_key(dir: &Path) -> (PathBuf, String) {
    let key = dir.join("id_ed25519");
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "workload", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(status.success());
    let public = std::fs::read_to_string(dir.join("id_ed25519.pub")).unwrap();
    (key, public)
}

async fn sign(s: &TestServer, task: &str, public: &str, ttl: Option<u64>) -> IssuedLease {
    s.admin()
        .post(
            &format!("/v1/tasks/{task}/leases"),
            &IssueLease {
                ttl_secs: ttl,
                public_key: Some(public.to_owned()),
                ..IssueLease::default()
            },
        )
        .await
        .unwrap()
}

pub(crate) fn cert_text(i: &IssuedLease) -> String {
    match &i.credential {
        Credential::SshCertificate { certificate, .. } => certificate.expose().to_owned(),
        other => panic!("not a certificate: {other:?}"),
    }
}

/// Runs `ssh … user@127.0.0.1 echo logged-in` with the key and cert.
pub(crate) async fn ssh_login(sshd: &Sshd, key: &Path, cert: &Path, user: &str) -> (bool, String) {
    let out = tokio::process::Command::new("ssh")
        .arg("-i")
        .arg(key)
        .arg("-o")
        .arg(format!("CertificateFile={}", cert.display()))
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=5",
            "-F",
            "/dev/null",
            "-p",
        ])
        .arg(sshd.port.to_string())
        .arg(format!("{user}@127.0.0.1"))
        .arg("echo logged-in")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        out.status.success() && stdout.contains("logged-in"),
        format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssh_certificate_logs_in_until_it_expires_or_is_revoked() {
    if !have_openssh() {
        return;
    }
    let me = whoami();
    let s = TestServer::builder()
        .role(ssh_role("deploy", &[&me], None))
        .role(ssh_role("elsewhere", &["someone-else"], None))
        .start()
        .await
        .unwrap();
    let sshd = start_sshd(&s).await;
    let work = tempfile::tempdir().unwrap();
    let (key, public) = workload_key(work.path());
    let cert = work.path().join("id_ed25519-cert.pub");
    let admin = s.admin();

    // Bad input is refused with a 4xx and changes nothing.
    let t = crate::start_task_in(&admin, "deploy", "w").await;
    for body in [
        serde_json::json!({}),
        serde_json::json!({"public_key": "ssh-ed25519 not-base64 x"}),
        serde_json::json!({"public_key": "'; DROP TABLE leases; --"}),
    ] {
        let r = admin
            .raw(
                http::Method::POST,
                &format!("/v1/tasks/{}/leases", t.id),
                Some("application/json"),
                serde_json::to_vec(&body).unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{body}: {}", r.text());
    }
    let demo = crate::start_task(&admin, "w").await;
    let r = admin
        .raw(
            http::Method::POST,
            &format!("/v1/tasks/{}/leases", demo.id),
            Some("application/json"),
            serde_json::to_vec(&serde_json::json!({"public_key": public})).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "a token role takes no public key");

    // A certificate for the role's principal logs in.
    let issued = sign(&s, &t.id, &public, None).await;
    std::fs::write(&cert, cert_text(&issued)).unwrap();
    let Credential::SshCertificate {
        serial,
        key_id,
        principals,
        valid_before,
        ..
    } = &issued.credential
    else {
        unreachable!()
    };
    assert!(key_id.contains(&issued.lease.id) && key_id.contains(&t.id));
    assert_eq!(principals, &vec![me.clone()]);
    assert!(*valid_before as i64 <= issued.lease.expires_at.unix_seconds());
    assert!(*valid_before as i64 <= t.expires_at.unix_seconds());
    let (ok, log) = ssh_login(&sshd, &key, &cert, &me).await;
    assert!(ok, "a valid certificate must log in: {log}");
    // What ssh-keygen reads in it: serial, principals, extensions.
    let shown = std::process::Command::new("ssh-keygen")
        .arg("-L")
        .arg("-f")
        .arg(&cert)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains(&format!("Serial: {serial}")), "{shown}");
    assert!(shown.contains("permit-pty"), "{shown}");
    assert!(!shown.contains("permit-port-forwarding"), "{shown}");
    assert!(!shown.contains("permit-agent-forwarding"), "{shown}");
    // Serials only grow.
    let again = sign(&s, &t.id, &public, None).await;
    let Credential::SshCertificate { serial: s2, .. } = &again.credential else {
        unreachable!()
    };
    assert!(s2 > serial);

    // Another user than the role's principal does not log in.
    let (ok, _) = ssh_login(&sshd, &key, &cert, "nobody").await;
    assert!(!ok, "a principal the role does not grant must not log in");
    let t_else = crate::start_task_in(&admin, "elsewhere", "w").await;
    let other = sign(&s, &t_else.id, &public, None).await;
    let other_cert = work.path().join("other-cert.pub");
    std::fs::write(&other_cert, cert_text(&other)).unwrap();
    let (ok, _) = ssh_login(&sshd, &key, &other_cert, &me).await;
    assert!(!ok, "a certificate for someone else's name must not log in");

    // Revoked: the KRL lists it, ssh-keygen and sshd agree.
    let l: Lease = admin
        .post_empty(&format!("/v1/leases/{}/revoke", issued.lease.id))
        .await
        .unwrap();
    assert_eq!(l.state, keymint_proto::LeaseState::Revoked);
    write_krl(&s, &sshd.krl).await;
    assert!(
        krl_revokes(&sshd.krl, &cert),
        "ssh-keygen -Q must report it revoked"
    );
    let again_cert = work.path().join("again-cert.pub");
    std::fs::write(&again_cert, cert_text(&again)).unwrap();
    assert!(
        !krl_revokes(&sshd.krl, &again_cert),
        "an unrevoked certificate is not in the KRL"
    );
    let (ok, log) = ssh_login(&sshd, &key, &cert, &me).await;
    assert!(!ok, "a revoked certificate must not log in: {log}");
    let (ok, log) = ssh_login(&sshd, &key, &again_cert, &me).await;
    assert!(ok, "the unrevoked one still does: {log}");

    // Expired: a 1-second certificate stops working on its own.
    let short = sign(&s, &t.id, &public, Some(1)).await;
    let short_cert = work.path().join("short-cert.pub");
    std::fs::write(&short_cert, cert_text(&short)).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (ok, _) = ssh_login(&sshd, &key, &short_cert, &me).await;
    assert!(!ok, "an expired certificate must not log in");

    // Ending the task puts all its certificates in the KRL.
    let _: Task = admin
        .post_empty(&format!("/v1/tasks/{}/revoke", t.id))
        .await
        .unwrap();
    write_krl(&s, &sshd.krl).await;
    let (ok, _) = ssh_login(&sshd, &key, &again_cert, &me).await;
    assert!(!ok, "certificates die with their task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_key_is_sealed_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        TestServer::builder()
            .data_dir(dir.path())
            .role(ssh_role("deploy", &["deploy"], Some("/usr/bin/true")))
            .start()
    };
    let s = start().await.unwrap();
    let ca: SshCa = s.admin().get("/v1/ssh/cas/ops").await.unwrap();
    assert!(
        ca.public_key.starts_with("ssh-ed25519 "),
        "{}",
        ca.public_key
    );
    let r = s
        .admin()
        .raw(http::Method::GET, "/v1/ssh/cas/nope", None, vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    // Nor a KRL for a CA that never was, or a name that is not one.
    for path in ["/v1/ssh/cas/nope/krl", "/v1/ssh/cas/..%2Fops/krl"] {
        let r = s
            .admin()
            .raw(http::Method::GET, path, None, vec![])
            .await
            .unwrap();
        assert_eq!(r.status, 404, "{path}");
    }
    let sealed = s
        .broker()
        .store()
        .get_secret("ssh-ca/ops/ed25519-seed")
        .await
        .unwrap()
        .unwrap();
    assert!(sealed.len() > 32, "stored sealed, not as the bare seed");
    s.stop().await;
    let s = start().await.unwrap();
    let again: SshCa = s.admin().get("/v1/ssh/cas/ops").await.unwrap();
    assert_eq!(
        again.public_key, ca.public_key,
        "the same CA after a restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_ca_key_can_be_imported_sealed_and_signs_after_a_restart() {
    if !have_openssh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let start = || {
        TestServer::builder()
            .data_dir(dir.path())
            .role(ssh_role("deploy", &["deploy"], None))
            .start()
    };
    let s = start().await.unwrap();
    let admin = s.admin();
    let keygen = |name: &str, extra: &[&str]| {
        let status = std::process::Command::new("ssh-keygen")
            .args(["-q", "-N", "", "-C", "ops-ca", "-f"])
            .arg(keys.path().join(name))
            .args(extra)
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::read_to_string(keys.path().join(name)).unwrap()
    };
    let ca_key = keygen("ca", &["-t", "ed25519"]);
    let ca_pub = std::fs::read_to_string(keys.path().join("ca.pub")).unwrap();
    let import = |key: String, replace: bool| {
        let admin = admin.clone();
        async move {
            admin
                .raw(
                    http::Method::POST,
                    "/v1/ssh/cas/ops/key",
                    Some("application/json"),
                    serde_json::to_vec(
                        &serde_json::json!({"private_key": key, "replace": replace}),
                    )
                    .unwrap(),
                )
                .await
                .unwrap()
        }
    };
    // The CA already has a generated key: replacing needs to be explicit.
    let r = import(ca_key.clone(), false).await;
    assert_eq!(r.status, 403, "{}", r.text());
    // Not Ed25519, encrypted, or not a key at all: refused, nothing changes.
    let rsa = keygen("rsa", &["-t", "rsa", "-b", "2048"]);
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "a passphrase", "-f"])
        .arg(keys.path().join("enc"))
        .status()
        .unwrap();
    assert!(status.success());
    let enc = std::fs::read_to_string(keys.path().join("enc")).unwrap();
    for (bad, why) in [
        (rsa, "Ed25519"),
        (enc, "encrypted"),
        ("hello".into(), "OpenSSH"),
    ] {
        let r = import(bad, true).await;
        assert_eq!(r.status, 400, "{why}");
        assert!(r.text().contains(why), "{}", r.text());
    }
    let before: SshCa = admin.get("/v1/ssh/cas/ops").await.unwrap();
    assert_ne!(
        before.public_key.split_whitespace().nth(1),
        ca_pub.split_whitespace().nth(1)
    );

    let r = import(ca_key.clone(), true).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let now: SshCa = admin.get("/v1/ssh/cas/ops").await.unwrap();
    assert_eq!(
        now.public_key.split_whitespace().nth(1),
        ca_pub.split_whitespace().nth(1),
        "the imported key is in force"
    );
    // Audited with the public key only.
    let ev: keymint_proto::List<keymint_proto::AuditEvent> =
        admin.get("/v1/audit?limit=100").await.unwrap();
    let text = serde_json::to_string(&ev.items).unwrap();
    assert!(text.contains("ssh.ca_imported"));
    let body_line = ca_key.lines().nth(1).unwrap();
    assert!(
        !text.contains(body_line),
        "no private key in the audit trail"
    );

    // After a restart it still signs with the imported key.
    s.stop().await;
    let s = start().await.unwrap();
    let t: Task = s
        .admin()
        .post(
            "/v1/tasks",
            &keymint_proto::StartTask {
                workload: Some("w".into()),
                role: Some("deploy".into()),
                ttl_secs: Some(300),
                ..keymint_proto::StartTask::default()
            },
        )
        .await
        .unwrap();
    let (_, public) = workload_key(keys.path());
    let issued = sign(&s, &t.id, &public, None).await;
    std::fs::write(keys.path().join("cert.pub"), cert_text(&issued)).unwrap();
    let shown = std::process::Command::new("ssh-keygen")
        .arg("-Lf")
        .arg(keys.path().join("cert.pub"))
        .output()
        .unwrap();
    let fp = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(keys.path().join("ca.pub"))
        .output()
        .unwrap();
    let fp = String::from_utf8_lossy(&fp.stdout);
    let fp = fp.split_whitespace().nth(1).unwrap();
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains(fp),
        "signed by the imported CA"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn principals_come_from_the_role_narrowed_by_the_request_and_policy() {
    let s = TestServer::builder()
        .role(ssh_role("ops", &["deploy", "root"], None))
        .policy(
            r#"@id("ops-work") permit(principal, action, resource);
@id("no-root-certificates")
forbid(principal, action == Keymint::Action::"issue", resource == Keymint::Role::"ops")
when { context.principals.contains("root") };"#,
        )
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t: Task = admin
        .post(
            "/v1/tasks",
            &keymint_proto::StartTask {
                workload: Some("w".into()),
                role: Some("ops".into()),
                ttl_secs: Some(300),
                ..keymint_proto::StartTask::default()
            },
        )
        .await
        .unwrap();
    let keys = tempfile::tempdir().unwrap();
    let (_, public) = workload_key(keys.path());
    let issue = |principals: Option<Vec<&'static str>>| {
        let admin = admin.clone();
        let public = public.clone();
        let task = t.id.clone();
        async move {
            admin
                .post::<_, IssuedLease>(
                    &format!("/v1/tasks/{task}/leases"),
                    &IssueLease {
                        public_key: Some(public),
                        principals: principals.map(|v| v.into_iter().map(Into::into).collect()),
                        ..IssueLease::default()
                    },
                )
                .await
        }
    };
    // All the role grants includes root: policy forbids it, and says so.
    let e = issue(None).await.unwrap_err();
    assert_eq!(e.code(), Some("policy_denied"));
    assert!(e.to_string().contains("no-root-certificates"), "{e}");
    // Narrowed to deploy: certified for deploy only.
    let ok = issue(Some(vec!["deploy"])).await.unwrap();
    match &ok.credential {
        Credential::SshCertificate { principals, .. } => assert_eq!(principals, &["deploy"]),
        other => panic!("{other:?}"),
    }
    // A principal the role does not grant, or none: refused.
    let e = issue(Some(vec!["admin"])).await.unwrap_err();
    assert_eq!(e.code(), Some("invalid_request"), "{e}");
    let e = issue(Some(vec![])).await.unwrap_err();
    assert_eq!(e.code(), Some("invalid_request"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keymint_run_hands_ssh_a_certified_key_and_removes_it() {
    if !have_openssh() {
        return;
    }
    let me = whoami();
    let s = TestServer::builder()
        .role(ssh_role("deploy", &[&me], None))
        .start()
        .await
        .unwrap();
    let sshd = start_sshd(&s).await;
    let script = format!(
        "ssh -i \"$KEYMINT_SSH_IDENTITY\" -o IdentitiesOnly=yes -o BatchMode=yes \
         -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -F /dev/null \
         -p {} {me}@127.0.0.1 echo logged-in && stat -c %a \"$(dirname \"$KEYMINT_SSH_IDENTITY\")\" \
         && echo \"$KEYMINT_SSH_IDENTITY\"",
        sshd.port
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keymint"))
        .args([
            "run",
            "--role",
            "deploy",
            "--workload",
            "w",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .env("KEYMINT_ADDR", s.url())
        .env("KEYMINT_TOKEN", &s.admin_token)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("logged-in"));
    assert_eq!(lines.next(), Some("700"));
    let identity = lines.next().unwrap();
    assert!(
        !Path::new(identity).exists(),
        "the key is removed when the command exits"
    );
}

/// The KRL lists every revoked certificate that has not expired, however
/// many (more than one page of the store, and more than the 10,000 rows a
/// single list returns), and is built once per revocation: fetching it
/// again serves the built one, so a caller cannot make keymint rebuild it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_krl_is_complete_and_rebuilt_only_after_a_revocation() {
    use keymint_core::Clock;
    use keymint_core::audit::AuditDraft;
    use keymint_core::model::{LeaseState, Revocability};
    use keymint_engines::ssh::{CertData, krl};
    use keymint_server::broker::Principal;
    use std::sync::Arc;

    let clock = keymint_core::ManualClock::new(keymint_core::Timestamp(1_900_000_000_000));
    let s = TestServer::builder()
        .clock(clock.clone())
        .role(ssh_role("deploy", &["deploy"], None))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "deploy", "w").await;
    let store = Arc::clone(s.broker().store());
    let now = clock.now();
    let now_secs = u64::try_from(now.unix_seconds()).unwrap();
    // 10,050 revoked certificates still valid (one of them ended a second
    // ago: a host whose clock is behind keymint's within the allowed skew
    // still takes it), and one that has expired beyond that skew.
    fn cert(
        t: &Task,
        now: keymint_core::Timestamp,
        serial: u64,
        state: LeaseState,
        valid_before: u64,
    ) -> keymint_core::model::Lease {
        let mut l = keymint_store::conformance::lease(t, state, now, 3600);
        l.engine = keymint_core::role::EngineKind::Ssh;
        l.revocability = Revocability::ExpireOnly;
        l.engine_data = serde_json::to_value(CertData {
            ca: "ops".into(),
            serial,
            key_id: format!("k{serial}"),
            valid_before,
            ca_key: None,
        })
        .unwrap();
        l
    }
    let mut inserts = tokio::task::JoinSet::new();
    for chunk in 0..21u64 {
        let (store, t) = (Arc::clone(&store), t.clone());
        inserts.spawn(async move {
            for i in 0..=500u64 {
                let serial = chunk * 1000 + i + 1;
                if serial > 20_100 {
                    break;
                }
                let valid = if serial == 7 {
                    now_secs - keymint_engines::ssh::CLOCK_SKEW_SECS - 1
                } else if serial == 8 {
                    now_secs - 1
                } else {
                    now_secs + 3600
                };
                let l = cert(&t, now, serial, LeaseState::Revoked, valid);
                let ev = AuditDraft::new(now, "lease.issued", "admin").lease(&l.id);
                store
                    .insert_lease(&t.id, Box::new(move |_| Ok((l, ev))))
                    .await
                    .unwrap();
            }
        });
    }
    while inserts.join_next().await.is_some() {}
    let mut expected: Vec<u64> = (0..21u64)
        .flat_map(|c| (0..=500u64).map(move |i| c * 1000 + i + 1))
        .filter(|s| *s <= 20_100 && *s != 7)
        .collect();
    assert!(expected.len() > 10_000);

    let p = Principal::Admin;
    let ca =
        ssh_key::PublicKey::from_openssh(&s.broker().ssh_ca_public_key(&p, "ops").await.unwrap())
            .unwrap();
    let expect = |serials: &[u64]| {
        krl::build(
            &[(ca.clone(), serials.to_vec())],
            u64::try_from(clock.now().millis()).unwrap(),
            now_secs,
            "keymint ssh CA ops",
        )
        .unwrap()
    };
    let builds = || {
        s.broker()
            .metrics
            .krl_builds
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let got = s.broker().ssh_krl(&p, "ops").await.unwrap();
    assert!(got == expect(&expected), "every revoked, unexpired serial");
    assert_eq!(builds(), 1);
    // Served as built, whoever asks and however often.
    for _ in 0..5 {
        let again = admin.get_bytes("/v1/ssh/cas/ops/krl").await.unwrap();
        assert!(again[..] == got[..]);
    }
    assert_eq!(builds(), 1, "fetching does not rebuild");

    // A revocation rebuilds it, with the new serial.
    let live = cert(&t, now, 99_999, LeaseState::Active, now_secs + 3600);
    let live_id = live.id.clone();
    let ev = AuditDraft::new(now, "lease.issued", "admin").lease(&live.id);
    store
        .insert_lease(&t.id, Box::new(move |_| Ok((live, ev))))
        .await
        .unwrap();
    let _: Lease = admin
        .post_empty(&format!("/v1/leases/{live_id}/revoke"))
        .await
        .unwrap();
    let got = s.broker().ssh_krl(&p, "ops").await.unwrap();
    expected.push(99_999);
    assert!(got == expect(&expected));
    assert_eq!(builds(), 2);
}

/// A revoked certificate stays in the KRL of the CA that signed it until it
/// expires, whatever the configuration says after: with its role removed,
/// or moved to another CA, or no role naming its CA at all, and keymint
/// restarted, `ssh-keygen -Q` still
/// reports it revoked and sshd still refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_stays_in_the_krl_when_its_role_is_removed_or_moved() {
    if !have_openssh() {
        return;
    }
    let me = whoami();
    let dir = tempfile::tempdir().unwrap();
    // "stays" keeps the CA `ops` configured throughout.
    let stays = ssh_role("stays", &["someone-else"], None);
    let s = TestServer::builder()
        .data_dir(dir.path())
        .role(ssh_role("goes", &[&me], None))
        .role(stays.clone())
        .start()
        .await
        .unwrap();
    let sshd = start_sshd(&s).await;
    let work = tempfile::tempdir().unwrap();
    let (key, public) = workload_key(work.path());
    let cert = work.path().join("id_ed25519-cert.pub");
    let t = crate::start_task_in(&s.admin(), "goes", "w").await;
    let issued = sign(&s, &t.id, &public, None).await;
    std::fs::write(&cert, cert_text(&issued)).unwrap();
    let (ok, log) = ssh_login(&sshd, &key, &cert, &me).await;
    assert!(ok, "a valid certificate must log in: {log}");
    let _: Lease = s
        .admin()
        .post_empty(&format!("/v1/leases/{}/revoke", issued.lease.id))
        .await
        .unwrap();
    let revoked = |krl: &Path| krl_revokes(krl, &cert);
    write_krl(&s, &sshd.krl).await;
    assert!(revoked(&sshd.krl));
    s.stop().await;

    let mut moved = ssh_role("goes", &[&me], None);
    if let RoleKind::Ssh(r) = &mut moved.kind {
        r.ca = "dev".into();
    }
    let mut elsewhere = stays.clone();
    if let RoleKind::Ssh(r) = &mut elsewhere.kind {
        r.ca = "dev".into();
    }
    for (what, roles) in [
        ("removed", vec![stays.clone()]),
        ("moved to another CA", vec![stays.clone(), moved]),
        // No role names the CA any more: its KRL is still served.
        ("removed with every role of its CA", vec![elsewhere]),
    ] {
        let mut b = TestServer::builder().data_dir(dir.path());
        for r in roles {
            b = b.role(r);
        }
        let s = b.start().await.unwrap();
        write_krl(&s, &sshd.krl).await;
        assert!(
            revoked(&sshd.krl),
            "role {what}: the certificate must stay in its CA's KRL"
        );
        let (ok, log) = ssh_login(&sshd, &key, &cert, &me).await;
        assert!(
            !ok,
            "role {what}: a revoked certificate must not log in: {log}"
        );
        s.stop().await;
    }
}

/// A CA key replaced (`POST /v1/ssh/cas/{ca}/key` with `replace`) keeps
/// the certificates the old key signed and keymint revoked in the KRL,
/// under the old key: a host that trusts both keys while it moves to the
/// new one still refuses them (a KRL scopes a serial to the key that
/// signed it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_stays_in_the_krl_after_its_ca_key_is_replaced() {
    if !have_openssh() {
        return;
    }
    let me = whoami();
    let s = TestServer::builder()
        .role(ssh_role("ops", &[&me], None))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let old: SshCa = admin.get("/v1/ssh/cas/ops").await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let (key, public) = workload_key(work.path());
    let t = crate::start_task_in(&admin, "ops", "w").await;
    let issued = sign(&s, &t.id, &public, None).await;
    let cert = work.path().join("id_ed25519-cert.pub");
    std::fs::write(&cert, cert_text(&issued)).unwrap();
    let _: Lease = admin
        .post_empty(&format!("/v1/leases/{}/revoke", issued.lease.id))
        .await
        .unwrap();

    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "new-ca", "-f"])
        .arg(work.path().join("new_ca"))
        .status()
        .unwrap();
    assert!(status.success());
    let new_key = std::fs::read_to_string(work.path().join("new_ca")).unwrap();
    let r = admin
        .raw(
            http::Method::POST,
            "/v1/ssh/cas/ops/key",
            Some("application/json"),
            serde_json::to_vec(&serde_json::json!({"private_key": new_key, "replace": true}))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let new: SshCa = admin.get("/v1/ssh/cas/ops").await.unwrap();
    assert_ne!(old.public_key, new.public_key);

    // A host moving from the old key to the new one trusts both.
    let sshd = start_sshd_trusting(&format!("{}\n{}", old.public_key, new.public_key));
    write_krl(&s, &sshd.krl).await;
    assert!(
        krl_revokes(&sshd.krl, &cert),
        "the old key's revoked certificate must stay revoked"
    );
    let (ok, log) = ssh_login(&sshd, &key, &cert, &me).await;
    assert!(!ok, "a revoked certificate must not log in: {log}");

    // The new key signs, and its certificates log in until revoked.
    let issued = sign(&s, &t.id, &public, None).await;
    std::fs::write(&cert, cert_text(&issued)).unwrap();
    let (ok, log) = ssh_login(&sshd, &key, &cert, &me).await;
    assert!(ok, "a certificate of the new key must log in: {log}");
    let _: Lease = admin
        .post_empty(&format!("/v1/leases/{}/revoke", issued.lease.id))
        .await
        .unwrap();
    write_krl(&s, &sshd.krl).await;
    let (ok, log) = ssh_login(&sshd, &key, &cert, &me).await;
    assert!(!ok, "revoked under the new key too: {log}");
}

/// What the SSH engine refuses to certify, and how: a DSA key, an RSA key
/// under 2048 bits and keymint's own CA key are a 400 naming the problem without the
/// key; 1000 copies of a principal make a certificate with it once; an SSH
/// lease is not renewed (its certificate's end is signed into it), and the
/// lease keeps the certificate's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_issuance_refuses_weak_and_ca_keys_dedups_principals_and_renewal() {
    if !have_openssh() {
        return;
    }
    let s = TestServer::builder()
        .role(ssh_role("ops", &["deploy", "backup"], None))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "ops", "w").await;
    let keys = tempfile::tempdir().unwrap();
    let issue = |public_key: String, principals: Option<Vec<String>>| {
        let admin = admin.clone();
        let task = t.id.clone();
        async move {
            admin
                .raw(
                    http::Method::POST,
                    &format!("/v1/tasks/{task}/leases"),
                    Some("application/json"),
                    serde_json::to_vec(
                        &serde_json::json!({"public_key": public_key, "principals": principals}),
                    )
                    .unwrap(),
                )
                .await
                .unwrap()
        }
    };
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "rsa", "-b", "1024", "-N", "", "-f"])
        .arg(keys.path().join("rsa1024"))
        .status()
        .unwrap();
    assert!(status.success());
    let rsa1024 = std::fs::read_to_string(keys.path().join("rsa1024.pub")).unwrap();
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "dsa", "-N", "", "-f"])
        .arg(keys.path().join("dsa"))
        .status()
        .unwrap();
    assert!(status.success());
    let dsa = std::fs::read_to_string(keys.path().join("dsa.pub")).unwrap();
    let ca: SshCa = admin.get("/v1/ssh/cas/ops").await.unwrap();
    for (key, why) in [
        (rsa1024.clone(), "RSA key of 1024 bits"),
        (dsa, "a DSA key"),
        (ca.public_key.clone(), "a keymint SSH CA"),
    ] {
        let r = issue(key.clone(), None).await;
        assert_eq!(r.status, 400, "{why}: {}", r.text());
        let body = r.text();
        let blob = key.split_whitespace().nth(1).unwrap();
        assert!(body.contains(why) && !body.contains(blob), "{body}");
    }

    let (_, public) = workload_key(keys.path());
    let r = issue(public.clone(), Some(vec!["deploy".into(); 1000])).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let issued: IssuedLease = serde_json::from_slice(&r.body).unwrap();
    let Credential::SshCertificate {
        principals,
        valid_before,
        ..
    } = &issued.credential
    else {
        unreachable!()
    };
    assert_eq!(principals, &["deploy"], "each principal once");

    let r = admin
        .raw(
            http::Method::POST,
            &format!("/v1/leases/{}/renew", issued.lease.id),
            Some("application/json"),
            br#"{"increment_secs":300}"#.to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("cannot be extended"), "{}", r.text());
    let l: Lease = admin
        .get(&format!("/v1/leases/{}", issued.lease.id))
        .await
        .unwrap();
    assert_eq!(
        l.expires_at, issued.lease.expires_at,
        "the lease is unchanged"
    );
    assert!(*valid_before as i64 <= l.expires_at.unix_seconds());
}

/// A certificate cannot be taken back, so it never outlives the task's
/// current deadline, idle timeout included; and a sub-task ends with its
/// parent, so a certificate signed in a sub-task never outlives the
/// parent's idle deadline either: a sub-task is no way around the idle
/// timeout that `keymint run` gives its task (DESIGN.md invariant 1).
#[tokio::test]
async fn a_certificate_in_a_sub_task_never_outlives_its_parents_idle_deadline() {
    if !have_openssh() {
        return;
    }
    let s = TestServer::builder()
        .role(ssh_role("ops", &["deploy"], None))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let parent: Task = admin
        .post(
            "/v1/tasks",
            &keymint_proto::StartTask {
                workload: Some("supervisor".into()),
                role: Some("ops".into()),
                ttl_secs: Some(600),
                idle_timeout_secs: Some(15),
                ..keymint_proto::StartTask::default()
            },
        )
        .await
        .unwrap();
    let child: Task = admin
        .post(
            "/v1/tasks",
            &keymint_proto::StartTask {
                workload: Some("sub-agent".into()),
                parent: Some(parent.id.clone()),
                ..keymint_proto::StartTask::default()
            },
        )
        .await
        .unwrap();
    let parent_deadline = parent.last_seen_at.plus_secs(15);
    assert!(
        child.expires_at > parent_deadline,
        "the sub-task itself follows its parent's hard end"
    );
    let keys = tempfile::tempdir().unwrap();
    let (_, public) = workload_key(keys.path());

    // By default: capped at the parent's idle deadline.
    let issued = sign(&s, &child.id, &public, None).await;
    assert!(
        issued.lease.expires_at <= parent_deadline,
        "{} > {}",
        issued.lease.expires_at.rfc3339(),
        parent_deadline.rfc3339()
    );
    let Credential::SshCertificate { valid_before, .. } = &issued.credential else {
        panic!("not a certificate");
    };
    assert!(*valid_before as i64 <= parent_deadline.unix_seconds());

    // Asked past it: refused, as in the parent itself.
    let e = s
        .admin()
        .post::<_, IssuedLease>(
            &format!("/v1/tasks/{}/leases", child.id),
            &IssueLease {
                ttl_secs: Some(300),
                public_key: Some(public.clone()),
                ..IssueLease::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("ttl_exceeds_limit"), "{e}");

    // The parent heartbeats: the cap moves with its deadline.
    let beat: Task = admin
        .post_empty(&format!("/v1/tasks/{}/heartbeat", parent.id))
        .await
        .unwrap();
    let issued = sign(&s, &child.id, &public, None).await;
    assert!(issued.lease.expires_at <= beat.last_seen_at.plus_secs(15));
}

/// A certificate is valid from 30 s before issue, for hosts whose clock
/// runs up to that much behind keymint's (`CLOCK_SKEW_SECS`). Such a host
/// also takes a certificate for up to 30 s after keymint's clock has passed
/// its end: a revoked one must stay in the KRL that long. Here keymint's
/// clock is 20 s ahead of sshd's (the machine's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_stays_in_the_krl_while_a_host_behind_keymints_clock_takes_it() {
    if !have_openssh() {
        return;
    }
    let me = whoami();
    use keymint_core::Clock;
    let real_ms = keymint_core::SystemClock.now().millis();
    let clock = keymint_core::ManualClock::new(keymint_core::Timestamp(real_ms + 20_000));
    let s = TestServer::builder()
        .clock(clock.clone())
        .role(ssh_role("deploy", &[&me], None))
        .start()
        .await
        .unwrap();
    let sshd = start_sshd(&s).await;
    let work = tempfile::tempdir().unwrap();
    let (key, public) = workload_key(work.path());
    let cert = work.path().join("id_ed25519-cert.pub");
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "deploy", "w").await;
    let issued = sign(&s, &t.id, &public, Some(30)).await;
    std::fs::write(&cert, cert_text(&issued)).unwrap();
    let (ok, log) = ssh_login(&sshd, &key, &cert, &me).await;
    assert!(ok, "the host, 20 s behind, takes the certificate: {log}");
    let _: Lease = admin
        .post_empty(&format!("/v1/leases/{}/revoke", issued.lease.id))
        .await
        .unwrap();
    // By keymint's clock the certificate has just ended; by the host's it
    // has about 20 s to go.
    clock.advance_secs(31);
    let Credential::SshCertificate { valid_before, .. } = &issued.credential else {
        unreachable!()
    };
    let host_now = u64::try_from(keymint_core::SystemClock.now().unix_seconds()).unwrap();
    assert!(*valid_before > host_now + 5, "the host still takes it");
    write_krl(&s, &sshd.krl).await;
    assert!(
        krl_revokes(&sshd.krl, &cert),
        "the revoked certificate left the KRL while a host within the skew keymint allows still takes it"
    );
    let (ok, log) = ssh_login(&sshd, &key, &cert, &me).await;
    assert!(!ok, "a revoked certificate must not log in: {log}");
}

/// A public key whose "signatures" anyone can make turns a certificate for
/// it into a bearer credential: whoever holds the certificate text logs in
/// (OpenSSH 9.2's sshd takes a constant signature for the Ed25519 identity
/// point, and the padded hash itself for an RSA key with exponent 1;
/// docs/design/0006). keymint refuses to certify such keys, with a 400
/// that does not echo the key, and records no lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_whose_signatures_anyone_can_forge_are_not_certified() {
    use base64::Engine as _;
    if !have_openssh() {
        return;
    }
    let s = TestServer::builder()
        .role(ssh_role("ops", &["deploy"], None))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "ops", "w").await;
    let string = |b: &[u8]| {
        let mut v = u32::try_from(b.len()).unwrap().to_be_bytes().to_vec();
        v.extend_from_slice(b);
        v
    };
    let text = |alg: &str, parts: &[Vec<u8>]| {
        let mut blob = string(alg.as_bytes());
        for p in parts {
            blob.extend(string(p));
        }
        format!(
            "{alg} {} QZKWJVB-weak",
            base64::engine::general_purpose::STANDARD.encode(blob)
        )
    };
    let mut identity = [0u8; 32];
    identity[0] = 1;
    // 2048 bits, odd; `0x00` first keeps the mpint positive.
    let mut n = vec![0u8];
    n.extend([0xffu8; 256]);
    let weak = [
        (
            text("ssh-ed25519", &[identity.to_vec()]),
            "the identity point",
        ),
        (text("ssh-ed25519", &[vec![0u8; 32]]), "a point of order 4"),
        (text("ssh-rsa", &[vec![1], n.clone()]), "RSA exponent 1"),
        (
            text("ssh-rsa", &[vec![2], n.clone()]),
            "an even RSA exponent",
        ),
    ];
    for (key, what) in &weak {
        let r = admin
            .raw(
                http::Method::POST,
                &format!("/v1/tasks/{}/leases", t.id),
                Some("application/json"),
                serde_json::to_vec(&serde_json::json!({ "public_key": key })).unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        let blob = key.split_whitespace().nth(1).unwrap();
        assert!(!r.text().contains(blob), "{what}: the key is echoed");
    }
    let leases: keymint_proto::List<Lease> = admin
        .get(&format!("/v1/leases?task={}", t.id))
        .await
        .unwrap();
    assert!(leases.items.is_empty(), "nothing was certified");
    // Ordinary keys still are.
    let keys = tempfile::tempdir().unwrap();
    let (_, public) = workload_key(keys.path());
    sign(&s, &t.id, &public, None).await;
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "rsa", "-b", "2048", "-N", "", "-f"])
        .arg(keys.path().join("rsa"))
        .status()
        .unwrap();
    assert!(status.success());
    let rsa = std::fs::read_to_string(keys.path().join("rsa.pub")).unwrap();
    sign(&s, &t.id, &rsa, None).await;
}

/// What keymint accepts as a role's `source_address` is what sshd accepts
/// in a certificate. Each entry is paired with `127.0.0.1`, so that a
/// certificate sshd reads logs in from here; the roles reach the test
/// server as they are (past the configuration's check), keymint signs,
/// and the real sshd decides. A certificate sshd cannot read is refused
/// whatever the address: one such entry locks the role out everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keymint_accepts_the_source_addresses_sshd_accepts() {
    if !have_openssh() {
        return;
    }
    let me = whoami();
    let entries = [
        "10.0.0.0/8",
        "10.0.0.1/8",
        "10.0.0.0/33",
        "10.0.0.1/",
        "::1/129",
        "::/0",
        "10.0.0.0/0",
        "10.0.0.0/008",
        "fe80::1/10",
        "::ffff:10.0.0.0/104",
        "10.0.0.0/8/8",
        "127.0.0.0/8",
    ];
    let limited = |name: &str, source: String| {
        let mut r = ssh_role(name, &[&me], None);
        let RoleKind::Ssh(ssh) = &mut r.kind else {
            unreachable!()
        };
        ssh.source_address = Some(source);
        r
    };
    let mut b = TestServer::builder().role(limited("elsewhere", "10.0.0.0/8".into()));
    for (i, e) in entries.iter().enumerate() {
        b = b.role(limited(&format!("r{i}"), format!("{e},127.0.0.1")));
    }
    let s = b.start().await.unwrap();
    let sshd = start_sshd(&s).await;
    let work = tempfile::tempdir().unwrap();
    let (key, public) = workload_key(work.path());
    let cert = work.path().join("id_ed25519-cert.pub");
    let admin = s.admin();
    let login_as = |role: String| {
        let (admin, s, sshd, key, cert, public, me) =
            (&admin, &s, &sshd, &key, &cert, &public, &me);
        async move {
            let t = crate::start_task_in(admin, &role, "w").await;
            let issued = sign(s, &t.id, public, None).await;
            std::fs::write(cert, cert_text(&issued)).unwrap();
            ssh_login(sshd, key, cert, me).await
        }
    };
    // The option is enforced: a certificate for 10.0.0.0/8 only does not
    // log in from 127.0.0.1.
    let (ok, log) = login_as("elsewhere".into()).await;
    assert!(!ok, "source-address must hold: {log}");
    for (i, e) in entries.iter().enumerate() {
        let (ok, log) = login_as(format!("r{i}")).await;
        let ours = keymint_core::role::check_source_address(e);
        assert_eq!(
            ok,
            ours.is_ok(),
            "`{e}`: keymint says {ours:?}, sshd: {log}"
        );
    }
}
