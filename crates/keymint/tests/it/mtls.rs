//! TLS and mTLS with X.509-SVIDs against the real binary, with certificates
//! made by openssl and requests made by curl: a client presenting an SVID
//! of the trust bundle is its SPIFFE ID; others get nothing.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client X.509-SVID.
fn make_pki(dir: &Path, ca: &str, client: &str, spiffe: &str) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let (key, pem) = (format!("{ca}.key"), format!("{ca}.pem"));
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        &key,
        "-out",
        &pem,
        "-subj",
        "/CN=test CA",
        "-days",
        "1",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &a);
    for (name, cn, ext) in [
        (
            "server".to_owned(),
            "localhost",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n".to_owned(),
        ),
        (
            client.to_owned(),
            "agent",
            format!(
                "subjectAltName=URI:{spiffe}\nextendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n"
            ),
        ),
    ] {
        if name == "server" && dir.join("server.pem").exists() {
            continue;
        }
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        let mut r = vec!["req".to_owned()];
        r.extend(ec.iter().map(|s| s.to_string()));
        r.extend([
            "-keyout".into(),
            format!("{name}.key"),
            "-out".into(),
            format!("{name}.csr"),
            "-subj".into(),
            format!("/CN={cn}"),
        ]);
        openssl(dir, &r.iter().map(String::as_str).collect::<Vec<_>>());
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "1",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
}

fn curl(
    dir: &Path,
    port: u16,
    cert: Option<&str>,
    path: &str,
    body: Option<&str>,
) -> (String, String) {
    let mut c = Command::new("curl");
    c.current_dir(dir)
        .args(["-s", "-w", "\n%{http_code}", "--cacert", "ca.pem"])
        .arg(format!("https://127.0.0.1:{port}{path}"));
    if let Some(name) = cert {
        c.args([
            "--cert",
            &format!("{name}.pem"),
            "--key",
            &format!("{name}.key"),
        ]);
    }
    if let Some(b) = body {
        c.args([
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            b,
        ]);
    }
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
    (code.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_x509_svid_is_the_workload_it_names() {
    let have = |c: &str| Command::new(c).arg("version").output().is_ok();
    if !have("openssl") || Command::new("curl").arg("--version").output().is_err() {
        assert!(
            !crate::postgres::in_ci(),
            "openssl and curl are required under CI=true"
        );
        eprintln!("skipped: openssl or curl missing");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d, "ca", "agent", "spiffe://example.org/agent");
    // A client from another trust bundle.
    let other = d.join("other");
    std::fs::create_dir(&other).unwrap();
    make_pki(&other, "ca", "agent", "spiffe://example.org/agent");

    std::fs::write(
        d.join("p.cedar"),
        r#"@id("svid-agent") permit(principal == Keymint::Workload::"spiffe://example.org/agent", action, resource)
when { principal.method == "spiffe" && principal.issuer == "spiffe://example.org" };"#,
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = d.join("keymint.toml");
    std::fs::write(
        &cfg,
        format!(
            "version = 1\n[server]\nlisten = \"127.0.0.1:{port}\"\n\
             [server.tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n\
             [storage]\ndata_dir = {:?}\n[policy]\npaths = [{:?}]\n\
             [[roles]]\nname = \"demo\"\nengine = \"token\"\nscopes = [\"llm:chat\"]\n\
             default_ttl = \"5m\"\nmax_ttl = \"10m\"\n",
            d.join("server.pem").display().to_string(),
            d.join("server.key").display().to_string(),
            d.join("ca.pem").display().to_string(),
            d.join("data").display().to_string(),
            d.join("p.cedar").display().to_string(),
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_keymint"))
        .args(["server", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let dd = d.to_owned();
        let (code, _) =
            tokio::task::spawn_blocking(move || curl(&dd, port, None, "/v1/health", None))
                .await
                .unwrap();
        if code == "200" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the TLS server did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let run = |dir: std::path::PathBuf, cert: Option<&'static str>, body: Option<&'static str>| {
        tokio::task::spawn_blocking(move || curl(&dir, port, cert, "/v1/tasks", body))
    };
    // The SVID starts a task for itself: no token at all.
    let (code, body) = run(
        d.to_owned(),
        Some("agent"),
        Some(r#"{"role":"demo","ttl_secs":60}"#),
    )
    .await
    .unwrap();
    assert_eq!(code, "201", "{body}");
    let t: keymint_proto::Task = serde_json::from_str(&body).unwrap();
    assert_eq!(t.workload, "spiffe://example.org/agent");
    // Without a certificate (TLS, no mTLS): no principal.
    let (code, body) = run(d.to_owned(), None, Some(r#"{"role":"demo"}"#))
        .await
        .unwrap();
    assert_eq!(code, "401", "{body}");
    // A certificate from another CA: the handshake fails.
    std::fs::copy(other.join("agent.pem"), d.join("stranger.pem")).unwrap();
    std::fs::copy(other.join("agent.key"), d.join("stranger.key")).unwrap();
    let (code, _) = run(d.to_owned(), Some("stranger"), Some(r#"{"role":"demo"}"#))
        .await
        .unwrap();
    assert_eq!(code, "000", "refused at the handshake");
    // Plain HTTP to the TLS port gets nothing.
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://127.0.0.1:{port}/v1/health"),
        ])
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&out.stdout), "200");
    let _ = child.start_kill();
    let _ = child.wait().await;
}
