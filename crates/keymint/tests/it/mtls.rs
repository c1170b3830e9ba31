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
    // An existing CA signs the new client (several SVIDs of one CA).
    let have_ca = dir.join(&pem).exists();
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
    if !have_ca {
        openssl(dir, &a);
    }
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
        sign_cert(dir, ca, &name, cn, &ext);
    }
}

/// A certificate `NAME.pem` (key `NAME.key`) with the extensions `ext`,
/// signed by the CA `CA.pem`.
fn sign_cert(dir: &Path, ca: &str, name: &str, cn: &str, ext: &str) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
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

/// `keymint server` with TLS on a free port, the client CA of `make_pki`,
/// the policy in `p.cedar`, a role `demo` and `extra` configuration;
/// returns when it answers on `/v1/health`.
async fn start_tls_server(d: &Path, extra: &str) -> (tokio::process::Child, u16) {
    start_tls_server_with(d, extra, true).await
}

/// [`start_tls_server`], with or without `client_ca_file`.
async fn start_tls_server_with(
    d: &Path,
    extra: &str,
    client_ca: bool,
) -> (tokio::process::Child, u16) {
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
             [server.tls]\ncert_file = {:?}\nkey_file = {:?}\n{}\
             [storage]\ndata_dir = {:?}\n[policy]\npaths = [{:?}]\n\
             [[roles]]\nname = \"demo\"\nengine = \"token\"\nscopes = [\"llm:chat\"]\n\
             default_ttl = \"5m\"\nmax_ttl = \"10m\"\n{extra}",
            d.join("server.pem").display().to_string(),
            d.join("server.key").display().to_string(),
            if client_ca {
                format!(
                    "client_ca_file = {:?}\n",
                    d.join("ca.pem").display().to_string()
                )
            } else {
                String::new()
            },
            d.join("data").display().to_string(),
            d.join("p.cedar").display().to_string(),
        ),
    )
    .unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_keymint"))
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
    (child, port)
}

fn have_openssl_and_curl() -> bool {
    let have = |c: &str| Command::new(c).arg("version").output().is_ok();
    if !have("openssl") || Command::new("curl").arg("--version").output().is_err() {
        assert!(
            !crate::postgres::in_ci(),
            "openssl and curl are required under CI=true"
        );
        eprintln!("skipped: openssl or curl missing");
        return false;
    }
    true
}

/// keymint's own client over TLS: the CLI trusts the CA it is given (and
/// only that), and a node proves itself with its X.509-SVID (`[[nodes]]
/// identity` = its SPIFFE ID), then acts for its entry's workload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_proves_itself_with_an_x509_svid_through_keymints_client() {
    if !have_openssl_and_curl() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d, "ca", "node", "spiffe://example.org/node/a");
    std::fs::write(
        d.join("p.cedar"),
        "@id(\"all\") permit(principal, action, resource);",
    )
    .unwrap();
    let (mut child, port) = start_tls_server(
        d,
        "[[nodes]]\nname = \"node-a\"\nidentity = \"spiffe://example.org/node/a\"\n",
    )
    .await;
    let url = format!("https://127.0.0.1:{port}");
    let admin_token = std::fs::read_to_string(d.join("data/admin.token")).unwrap();
    let p = |f: &str| d.join(f).display().to_string();
    let cli = |args: Vec<String>| {
        let out = Command::new(env!("CARGO_BIN_EXE_keymint"))
            .args(&args)
            .env("KEYMINT_ADDR", &url)
            .env_remove("KEYMINT_TOKEN")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    // The admin over https, trusting the test CA.
    let mut args = s(&[
        "entry",
        "create",
        "--workload",
        "triage",
        "--node",
        "node-a",
        "--uid",
        "0",
    ]);
    args.extend(s(&[
        "--ca-file",
        &p("ca.pem"),
        "--token",
        admin_token.trim(),
    ]));
    let (code, id, err) = cli(args);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_owned();
    // Without the CA (the Mozilla roots) the server is not trusted.
    let (code, _, err) = cli(s(&["entry", "list", "--token", admin_token.trim()]));
    assert_ne!(code, 0);
    assert!(err.contains("certificate"), "{err}");
    // A certificate without its key is refused before any connection.
    let (code, _, err) = cli(s(&[
        "entry",
        "list",
        "--ca-file",
        &p("ca.pem"),
        "--client-cert",
        &p("node.pem"),
    ]));
    assert_ne!(code, 0);
    assert!(err.contains("key"), "{err}");
    // The node, by its SVID alone: its entries.
    let (code, out, err) = cli(s(&[
        "entry",
        "list",
        "--ca-file",
        &p("ca.pem"),
        "--client-cert",
        &p("node.pem"),
        "--client-key",
        &p("node.key"),
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&id), "{out}");

    // The client library as a node agent uses it: for the entry's workload.
    let tls = keymint_client::TlsOptions {
        ca_file: Some(d.join("ca.pem")),
        cert_file: Some(d.join("node.pem")),
        key_file: Some(d.join("node.key")),
    };
    let node = keymint_client::Client::with_tls(&url, None, &tls).unwrap();
    use base64::Engine as _;
    let seen = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"uid":"0"}"#);
    let t: keymint_proto::Task = node
        .with_header("x-keymint-entry", &id)
        .unwrap()
        .with_header("x-keymint-attested", &seen)
        .unwrap()
        .post(
            "/v1/tasks",
            &keymint_proto::StartTask {
                role: Some("demo".into()),
                ttl_secs: Some(60),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(t.workload, "triage");
    // The real agent, proving the node by its SVID alone over https, and
    // `keymint run` through it (this uid matches the entry).
    let hport = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sock = d.join("agent/agent.sock");
    let mut agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_keymint"))
        .args(["agent", "--server", &url, "--ca-file", &p("ca.pem")])
        .args([
            "--client-cert",
            &p("node.pem"),
            "--client-key",
            &p("node.key"),
        ])
        .arg("--socket")
        .arg(&sock)
        .args(["--deliver-dir", &p("deliver"), "--sync-interval", "1"])
        .args(["--health", &format!("127.0.0.1:{hport}")])
        .env_remove("KEYMINT_TOKEN")
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let health = keymint_client::Client::new(&format!("http://127.0.0.1:{hport}"), None).unwrap();
    let t0 = Instant::now();
    loop {
        match health
            .raw(http::Method::GET, "/ready", None, Vec::new())
            .await
        {
            Ok(r) if r.status == 200 => break,
            _ => {}
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the agent never synced over mTLS"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_keymint"))
        .args(["run", "--role", "demo", "--agent"])
        .arg(&sock)
        .args(["--", "sh", "-c", "test -n \"$KEYMINT_TOKEN\""])
        .env_remove("KEYMINT_TOKEN")
        .env("KEYMINT_ADDR", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let admin = keymint_client::Client::with_tls(
        &url,
        Some(admin_token.trim().to_owned()),
        &keymint_client::TlsOptions {
            ca_file: Some(d.join("ca.pem")),
            ..Default::default()
        },
    )
    .unwrap();
    let tasks: keymint_proto::List<keymint_proto::Task> = admin.get("/v1/tasks").await.unwrap();
    assert_eq!(tasks.items.len(), 2, "the client's task and keymint run's");
    assert!(tasks.items.iter().all(|t| t.workload == "triage"));
    let _ = agent.start_kill();
    let _ = agent.wait().await;

    // TLS options with a plain http:// address are a mistake, said at once.
    let e = keymint_client::Client::with_tls(&format!("http://127.0.0.1:{port}"), None, &tls)
        .unwrap_err();
    assert!(e.to_string().contains("plain http"), "{e}");
    let _ = child.start_kill();
    let _ = child.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_x509_svid_is_the_workload_it_names() {
    if !have_openssl_and_curl() {
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
    let (mut child, port) = start_tls_server(d, "").await;
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
    // Certificates of the bundle's CA naming the same SPIFFE ID, but with
    // key usages a leaf SVID must not have (X.509-SVID §4.3: it may sign
    // certificates or CRLs, or it may not sign at all): no principal.
    // So is one without a key usage extension (§4.3: every SVID has one),
    // and one naming the trust domain itself (§3.1: a leaf's SPIFFE ID
    // has a path).
    let leaf = |id: &str, usage: &str| {
        format!("subjectAltName=URI:{id}\nextendedKeyUsage=clientAuth\n{usage}")
    };
    let agent = "spiffe://example.org/agent";
    for (name, ext) in [
        (
            "signer",
            leaf(agent, "keyUsage=critical,digitalSignature,keyCertSign\n"),
        ),
        (
            "crls",
            leaf(agent, "keyUsage=critical,digitalSignature,cRLSign\n"),
        ),
        ("nosign", leaf(agent, "keyUsage=critical,keyEncipherment\n")),
        ("nousage", leaf(agent, "")),
        (
            "domain",
            leaf(
                "spiffe://example.org",
                "keyUsage=critical,digitalSignature\n",
            ),
        ),
    ] {
        sign_cert(d, "ca", name, "agent", &ext);
        let (code, body) = run(
            d.to_owned(),
            Some(name),
            Some(r#"{"role":"demo","ttl_secs":60}"#),
        )
        .await
        .unwrap();
        assert_eq!(code, "401", "{name}: {body}");
    }
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

/// A bundle per trust domain: a CA of one domain cannot vouch for a SPIFFE
/// ID of another, though it is trusted for its own; SVIDs of each domain
/// are accepted with their own CA. A domain without a bundle of its own
/// falls back to `client_ca_file`, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_trust_domain_is_verified_against_its_own_bundle() {
    if !have_openssl_and_curl() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // `ca` is domain a's CA (and the server's); `ca_b` is domain b's.
    make_pki(d, "ca", "a_agent", "spiffe://a.example/agent");
    make_pki(d, "ca_b", "b_agent", "spiffe://b.example/agent");
    // Domain a's CA signs an SVID claiming domain b, and one for domain c,
    // which has no bundle of its own.
    make_pki(d, "ca", "forged", "spiffe://b.example/agent");
    make_pki(d, "ca", "c_agent", "spiffe://c.example/agent");
    std::fs::write(
        d.join("p.cedar"),
        "@id(\"all\") permit(principal, action, resource);",
    )
    .unwrap();
    let extra = format!(
        "[[server.tls.trust_domains]]\nname = \"a.example\"\nbundle_file = {:?}\n\
         [[server.tls.trust_domains]]\nname = \"b.example\"\nbundle_file = {:?}\n",
        d.join("ca.pem").display().to_string(),
        d.join("ca_b.pem").display().to_string(),
    );
    let (mut child, port) = start_tls_server(d, &extra).await;
    let start = |cert: &'static str| {
        let dir = d.to_owned();
        tokio::task::spawn_blocking(move || {
            curl(
                &dir,
                port,
                Some(cert),
                "/v1/tasks",
                Some(r#"{"role":"demo","ttl_secs":60}"#),
            )
        })
    };
    for (cert, workload) in [
        ("a_agent", "spiffe://a.example/agent"),
        ("b_agent", "spiffe://b.example/agent"),
        ("c_agent", "spiffe://c.example/agent"),
    ] {
        let (code, body) = start(cert).await.unwrap();
        assert_eq!(code, "201", "{cert}: {body}");
        let t: keymint_proto::Task = serde_json::from_str(&body).unwrap();
        assert_eq!(t.workload, workload);
    }
    // Domain a's CA vouching for domain b: refused at the handshake.
    let (code, body) = start("forged").await.unwrap();
    assert_eq!(code, "000", "{body}");
    let _ = child.start_kill();
    let _ = child.wait().await;

    // Without `client_ca_file`, a domain with no bundle is refused too;
    // and domain b's bundle comes from its SPIFFE bundle endpoint (a JWK
    // Set over HTTPS, served here by Python with the server certificate).
    let strict = d.join("strict");
    std::fs::create_dir(&strict).unwrap();
    for f in [
        "ca.pem",
        "ca_b.pem",
        "server.pem",
        "server.key",
        "p.cedar",
        "a_agent.pem",
        "a_agent.key",
        "b_agent.pem",
        "b_agent.key",
        "c_agent.pem",
        "c_agent.key",
        "forged.pem",
        "forged.key",
    ] {
        std::fs::copy(d.join(f), strict.join(f)).unwrap();
    }
    let der = Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in"])
        .arg(d.join("ca_b.pem"))
        .output()
        .unwrap()
        .stdout;
    use base64::Engine as _;
    let bundle = serde_json::json!({
        "keys": [{"use": "x509-svid", "kty": "EC", "crv": "P-256",
                  "x5c": [base64::engine::general_purpose::STANDARD.encode(&der)]}],
        "spiffe_refresh_hint": 60,
    });
    std::fs::write(strict.join("bundle.json"), bundle.to_string()).unwrap();
    std::fs::write(
        strict.join("serve.py"),
        "import http.server, ssl, sys\n\
         body = open(sys.argv[2], 'rb').read()\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_GET(self):\n\
         \x20       self.send_response(200)\n\
         \x20       self.send_header('content-type', 'application/json')\n\
         \x20       self.send_header('content-length', str(len(body)))\n\
         \x20       self.end_headers()\n\
         \x20       self.wfile.write(body)\n\
         \x20   def log_message(self, *a):\n\
         \x20       pass\n\
         s = http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H)\n\
         ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
         ctx.load_cert_chain('server.pem', 'server.key')\n\
         s.socket = ctx.wrap_socket(s.socket, server_side=True)\n\
         s.serve_forever()\n",
    )
    .unwrap();
    let bport = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut endpoint = tokio::process::Command::new("python3")
        .current_dir(&strict)
        .args(["serve.py", &bport.to_string(), "bundle.json"])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let extra = format!(
        "[[server.tls.trust_domains]]\nname = \"a.example\"\nbundle_file = {:?}\n\
         [[server.tls.trust_domains]]\nname = \"b.example\"\n\
         bundle_endpoint = \"https://127.0.0.1:{bport}/bundle\"\nendpoint_ca_file = {:?}\n",
        strict.join("ca.pem").display().to_string(),
        strict.join("ca.pem").display().to_string(),
    );
    let (mut child, port) = start_tls_server_with(&strict, &extra, false).await;
    let run = |cert: &'static str| {
        let dir = strict.clone();
        tokio::task::spawn_blocking(move || {
            curl(
                &dir,
                port,
                Some(cert),
                "/v1/tasks",
                Some(r#"{"role":"demo"}"#),
            )
        })
    };
    assert_eq!(run("a_agent").await.unwrap().0, "201");
    assert_eq!(run("c_agent").await.unwrap().0, "000");
    // Domain b is accepted once its bundle is fetched (in the background).
    let t0 = Instant::now();
    loop {
        let (code, body) = run("b_agent").await.unwrap();
        if code == "201" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the fetched bundle was never used: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(run("forged").await.unwrap().0, "000");
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = endpoint.start_kill();
    let _ = endpoint.wait().await;
}

/// RFC 8693 with an X.509-SVID as the subject (docs/design/0026): the
/// mTLS caller names the SPIFFE ID its certificate proved and gets an
/// access token in a task of its own; naming another ID, or asking
/// without a certificate, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_x509_svid_is_the_subject_of_a_token_exchange() {
    if !have_openssl_and_curl() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d, "ca", "agent", "spiffe://example.org/agent");
    std::fs::write(d.join("p.cedar"), "permit(principal, action, resource);").unwrap();
    let (mut child, port) = start_tls_server(
        d,
        "[[roles]]\nname = \"tools\"\nengine = \"jwt\"\nscopes = [\"tools:read\"]\n\
         default_ttl = \"5m\"\nmax_ttl = \"10m\"\n[roles.jwt]\naudience = \"https://mcp.example/tools\"\n",
    )
    .await;
    let exchange = |cert: Option<&'static str>, subject: &'static str| {
        let d = d.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut c = Command::new("curl");
            c.current_dir(&d)
                .args(["-s", "-w", "\n%{http_code}", "--cacert", "ca.pem"])
                .arg(format!("https://127.0.0.1:{port}/oauth/token"));
            if let Some(name) = cert {
                c.args([
                    "--cert",
                    &format!("{name}.pem"),
                    "--key",
                    &format!("{name}.key"),
                ]);
            }
            c.args([
                "--data-urlencode",
                "grant_type=urn:ietf:params:oauth:grant-type:token-exchange",
                "--data-urlencode",
                &format!("subject_token={subject}"),
                "--data-urlencode",
                "subject_token_type=urn:keymint:params:oauth:token-type:x509-svid",
                "--data-urlencode",
                "resource=https://mcp.example/tools",
            ]);
            let out = c.output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
            (code.to_owned(), body.to_owned())
        })
    };
    let (code, body) = exchange(Some("agent"), "spiffe://example.org/agent")
        .await
        .unwrap();
    assert_eq!(code, "200", "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let at = v["access_token"].as_str().unwrap();
    let claims: serde_json::Value = {
        use base64::Engine as _;
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(at.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(claims["sub"], "spiffe://example.org/agent");
    assert_eq!(claims["aud"], "https://mcp.example/tools");
    assert!(claims["task_id"].as_str().unwrap().starts_with("tsk_"));
    for (cert, subject) in [
        (Some("agent"), "spiffe://example.org/admin"),
        (None, "spiffe://example.org/agent"),
    ] {
        let (code, body) = exchange(cert, subject).await.unwrap();
        assert_eq!(code, "400", "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "invalid_grant", "{body}");
        assert!(!body.contains("example.org"), "{body}");
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// An upstream's headers that act on the origin (cookies, `Alt-Svc`,
/// `Clear-Site-Data`, CORS, ...: `keymint_proxy::ORIGIN_BOUND`) never
/// reach the agent through keymint's TLS origin, where the console's
/// `__Host-` session cookie lives: not on an LLM route's answer nor its
/// event stream, not on an `http` upstream's; HSTS stays keymint's own.
/// The upstream's ordinary headers (a request id, its timing) still pass,
/// and each answer that carried such headers is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_headers_that_act_on_the_origin_never_reach_the_agent() {
    use keymint_testkit::upstream::{ORDINARY_HEADERS, ORIGIN_HEADERS};
    if !have_openssl_and_curl() {
        return;
    }
    let up = keymint_testkit::upstream::FakeUpstream::start(crate::budgets::KEY)
        .await
        .unwrap();
    up.send_origin_headers(true);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d, "ca", "agent", "spiffe://example.org/agent");
    std::fs::write(
        d.join("p.cedar"),
        "@id(\"all\") permit(principal, action, resource);",
    )
    .unwrap();
    let extra = format!(
        "{}\n[[upstreams]]\nname = \"tickets\"\nkind = \"http\"\nbase_url = \"{}/api\"\n\
         key_header = \"X-Api-Key\"\n\n[[roles]]\nname = \"tickets\"\nengine = \"token\"\n\
         upstream = \"tickets\"\nscopes = [\"http:read\"]\ndefault_ttl = \"15m\"\n\
         max_ttl = \"1h\"\n[roles.proxy]\nendpoints = [\"GET /tickets*\"]\n",
        crate::budgets::config(&up),
        up.url()
    );
    let (mut child, port) = start_tls_server_with(d, &extra, false).await;
    let token = std::fs::read_to_string(d.join("data/admin.token")).unwrap();
    let tls = keymint_client::TlsOptions {
        ca_file: Some(d.join("ca.pem")),
        ..Default::default()
    };
    let admin = keymint_client::Client::with_tls(
        &format!("https://127.0.0.1:{port}"),
        Some(token.trim().to_owned()),
        &tls,
    )
    .unwrap();
    for name in ["openai", "tickets"] {
        crate::set_upstream_key(&admin, name, crate::budgets::KEY).await;
    }
    let chat = crate::start_task_in(&admin, "hundred", "agent").await;
    let chat = admin.with_token(&crate::budgets::token_for(&admin, &chat.id).await);
    let tickets = crate::start_task_in(&admin, "tickets", "agent").await;
    let tickets = admin.with_token(&crate::budgets::token_for(&admin, &tickets.id).await);

    let stream = serde_json::json!({"model": "gpt-4o-mini", "stream": true,
        "messages": [{"role": "user", "content": "hi"}]});
    let answers = [
        (
            "chat",
            crate::budgets::post_chat(&chat, None).await.unwrap(),
        ),
        (
            "chat stream",
            chat.raw(
                http::Method::POST,
                "/proxy/openai/chat/completions",
                Some("application/json"),
                stream.to_string().into_bytes(),
            )
            .await
            .unwrap(),
        ),
        (
            "http",
            tickets
                .raw(http::Method::GET, "/proxy/tickets/tickets/7", None, vec![])
                .await
                .unwrap(),
        ),
    ];
    for (what, r) in &answers {
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        for (name, _) in ORIGIN_HEADERS {
            if name == "strict-transport-security" {
                continue;
            }
            assert!(
                r.headers.get(name).is_none(),
                "{what}: `{name}` reached the agent: {:?}",
                r.headers
            );
        }
        let hsts: Vec<_> = r
            .headers
            .get_all("strict-transport-security")
            .iter()
            .collect();
        assert_eq!(hsts, ["max-age=31536000"], "{what}");
        for (name, value) in ORDINARY_HEADERS {
            assert_eq!(
                r.headers.get(name).map(|v| v.to_str().unwrap()),
                Some(value),
                "{what}: `{name}`"
            );
        }
    }
    assert!(
        answers[1].1.text().contains("data: [DONE]"),
        "{}",
        answers[1].1.text()
    );
    let metrics = admin
        .raw(http::Method::GET, "/metrics", None, vec![])
        .await
        .unwrap()
        .text();
    for (upstream, n) in [("openai", 2), ("tickets", 1)] {
        let series =
            format!("keymint_proxy_origin_headers_dropped_total{{upstream=\"{upstream}\"}} {n}\n");
        assert!(metrics.contains(&series), "{series}");
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// `SIGTERM` to a TLS server: a request in flight (proxied, held 800 ms
/// by the upstream) is answered in full before keymint exits 0. The TLS
/// listener used to stop on the spot, its connections cut when the process
/// ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_request_in_flight_over_tls_finish() {
    if !have_openssl_and_curl() {
        return;
    }
    let up = keymint_testkit::upstream::FakeUpstream::start(crate::budgets::KEY)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d, "ca", "agent", "spiffe://example.org/agent");
    std::fs::write(
        d.join("p.cedar"),
        "@id(\"all\") permit(principal, action, resource);",
    )
    .unwrap();
    let (mut child, port) = start_tls_server_with(d, &crate::budgets::config(&up), false).await;
    let token = std::fs::read_to_string(d.join("data/admin.token")).unwrap();
    let tls = keymint_client::TlsOptions {
        ca_file: Some(d.join("ca.pem")),
        ..Default::default()
    };
    let admin = keymint_client::Client::with_tls(
        &format!("https://127.0.0.1:{port}"),
        Some(token.trim().to_owned()),
        &tls,
    )
    .unwrap();
    crate::set_upstream_key(&admin, "openai", crate::budgets::KEY).await;
    let t = crate::start_task_in(&admin, "hundred", "agent").await;
    let tok = crate::budgets::token_for(&admin, &t.id).await;
    let (answer, status) =
        crate::budgets::terminated_while_in_flight(&up, &admin.with_token(&tok), &mut child).await;
    assert_eq!(answer, 200, "the request in flight is answered");
    assert!(status.success(), "keymint after SIGTERM: {status}");
}

/// The console over TLS: every answer carries `Strict-Transport-Security`,
/// and the session cookie is a `__Host-` cookie (`Secure`, `Path=/`, no
/// `Domain`), so no sibling host or plain-HTTP page can plant or shadow it;
/// the browser's next request with it is signed in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_over_tls_sends_hsts_and_a_host_only_secure_cookie() {
    if !have_openssl_and_curl() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d, "ca", "client", "spiffe://example.org/client");
    std::fs::write(
        d.join("p.cedar"),
        "@id(\"all\") permit(principal, action, resource);",
    )
    .unwrap();
    let (mut child, port) = start_tls_server_with(d, "", false).await;
    let admin_token = std::fs::read_to_string(d.join("data/admin.token")).unwrap();
    let origin = format!("https://127.0.0.1:{port}");
    // Status line and headers (lower-case names) of one curl exchange.
    let head = |args: Vec<String>| {
        let out = Command::new("curl")
            .current_dir(d)
            .args(["-s", "-o", "/dev/null", "-D", "-", "--cacert", "ca.pem"])
            .args(&args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines();
        let status = lines.next().unwrap_or_default().to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        (status, headers)
    };
    let get = |h: &[(String, String)], name: &str| {
        h.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    };
    let (status, h) = head(vec![format!("{origin}/ui/login")]);
    assert!(status.contains(" 200"), "{status}");
    let hsts = get(&h, "strict-transport-security").expect("HSTS over TLS");
    assert!(
        hsts.starts_with("max-age=") && !hsts.starts_with("max-age=0"),
        "{hsts}"
    );

    let (status, h) = head(vec![
        "-X".into(),
        "POST".into(),
        "-H".into(),
        format!("Origin: {origin}"),
        "--data-urlencode".into(),
        format!("token={}", admin_token.trim()),
        format!("{origin}/ui/login"),
    ]);
    assert!(status.contains(" 303"), "{status}");
    assert!(get(&h, "strict-transport-security").is_some());
    let cookie = get(&h, "set-cookie").unwrap();
    let attrs: Vec<&str> = cookie.split(';').map(str::trim).collect();
    assert!(attrs[0].starts_with("__Host-keymint_session="), "{cookie}");
    assert!(attrs.contains(&"Secure"), "{cookie}");
    assert!(attrs.contains(&"Path=/"), "{cookie}");
    assert!(attrs.contains(&"HttpOnly") && attrs.contains(&"SameSite=Strict"));
    assert!(
        !attrs
            .iter()
            .any(|a| a.to_ascii_lowercase().starts_with("domain")),
        "{cookie}"
    );

    // The browser sends it back: signed in.
    let (status, _) = head(vec![
        "-H".into(),
        format!("Cookie: {}", attrs[0]),
        format!("{origin}/ui"),
    ]);
    assert!(status.contains(" 200"), "{status}");
    // The plain-HTTP name is not a session over TLS.
    let value = attrs[0].trim_start_matches("__Host-");
    let (status, _) = head(vec![
        "-H".into(),
        format!("Cookie: {value}"),
        format!("{origin}/ui"),
    ]);
    assert!(status.contains(" 303"), "{status}");
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// HSTS binds a host, so every answer of a TLS listener carries it, not
/// only the console's: the API's (a success, a refusal, the OpenAPI
/// document), the proxy's refusals in the provider's shape, a 404 of the
/// router and the metrics. A browser that ever reached any of them over
/// TLS comes back over TLS only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_over_tls_carries_hsts() {
    if !have_openssl_and_curl() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d, "ca", "client", "spiffe://example.org/client");
    std::fs::write(
        d.join("p.cedar"),
        "@id(\"all\") permit(principal, action, resource);",
    )
    .unwrap();
    let (mut child, port) = start_tls_server_with(
        d,
        "[[upstreams]]\nname = \"openai\"\nkind = \"openai\"\n\
         base_url = \"http://127.0.0.1:9/v1\"\n",
        false,
    )
    .await;
    let origin = format!("https://127.0.0.1:{port}");
    for (path, want) in [
        ("/v1/health", " 200"),
        ("/v1/tasks", " 401"),
        ("/v1/openapi.json", " 401"),
        ("/proxy/openai/chat/completions", " 401"),
        ("/proxy/nope/x", " 404"),
        ("/nowhere", " 404"),
        ("/metrics", " 200"),
        ("/ui/login", " 200"),
    ] {
        let out = Command::new("curl")
            .current_dir(d)
            .args(["-s", "-o", "/dev/null", "-D", "-", "--cacert", "ca.pem"])
            .arg(format!("{origin}{path}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        let status = text.lines().next().unwrap_or_default();
        assert!(status.contains(want), "{path}: {status}");
        let hsts: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("strict-transport-security:"))
            .map(str::trim)
            .collect();
        assert_eq!(hsts, ["max-age=31536000"], "{path}: {text}");
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}
