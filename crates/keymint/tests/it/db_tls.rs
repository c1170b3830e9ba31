//! TLS on the engines' admin connections, against private PostgreSQL and
//! MariaDB servers started by the test (own data directory and port, a
//! CA and a server certificate made by openssl at test time), so the
//! shared servers are left as they are. Each server refuses plain-text
//! connections (`hostssl` only; `require_secure_transport`), so a user
//! issued through keymint proves the admin connection was TLS.
//!
//! Outside CI missing binaries skip these tests with a message; under
//! `CI=true` they fail them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keymint_core::role::EngineKind;
use keymint_engines::{DbTls, EngineError};
use keymint_proto::{Credential, LeaseState};
use keymint_server::config::DatabaseConfig;
use keymint_testkit::TestServer;
use mysql_async::prelude::Queryable;

use crate::postgres::in_ci;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn have(what: &str, path: &str) -> bool {
    if Path::new(path).exists() {
        return true;
    }
    assert!(!in_ci(), "{what} (`{path}`) is required under CI=true");
    eprintln!("skipped: no {what} at `{path}`");
    false
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `program` as `user` when the tests run as root (PostgreSQL refuses to
/// run as root), else as ourselves.
fn as_user(user: &str, program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", user, "--", program]);
        c
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `ca.pem` (the servers' CA), `server.pem`/`server.key` for 127.0.0.1,
/// and `other.pem`, a CA that signed nothing here.
fn make_pki(d: &Path) {
    let ossl = |args: &[&str]| run(Command::new("openssl").current_dir(d).args(args));
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    for ca in ["ca", "other"] {
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        let (key, pem) = (format!("{ca}.key"), format!("{ca}.pem"));
        a.extend([
            "-keyout",
            &key,
            "-out",
            &pem,
            "-subj",
            "/CN=keymint test database CA",
            "-days",
            "1",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        ossl(&a);
    }
    std::fs::write(
        d.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    ossl(&a);
    ossl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "server.ext",
    ]);
    // PostgreSQL refuses a key others can read.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(d.join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A private PostgreSQL: `ssl = on` with the test certificate, TCP only
/// with TLS (`hostssl`), the Unix socket in its directory for the test's
/// own setup. Stopped when dropped.
struct PrivatePg {
    dir: PathBuf,
    port: u16,
}

impl PrivatePg {
    fn start(dir: &Path) -> Self {
        let port = free_port();
        let data = dir.join("pg");
        if is_root() {
            run(Command::new("chown").args(["-R", "postgres"]).arg(dir));
        }
        run(as_user("postgres", &format!("{PG_BIN}/initdb"))
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(&data));
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{d}'\n\
             ssl = on\nssl_cert_file = '{d}/server.pem'\nssl_key_file = '{d}/server.key'\n\
             fsync = off\nshared_buffers = 16MB\n",
            d = dir.display()
        );
        let mut c = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        c.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), c).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        if is_root() {
            run(Command::new("chown").args(["-R", "postgres"]).arg(dir));
        }
        run(as_user("postgres", &format!("{PG_BIN}/pg_ctl"))
            .args(["-w", "-t", "60", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(dir.join("pg.log"))
            .arg("start"));
        Self {
            dir: dir.to_owned(),
            port,
        }
    }

    /// The test's own connection, over the Unix socket.
    async fn local(&self) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(
            &format!(
                "host={} port={} user=postgres dbname=postgres",
                self.dir.display(),
                self.port
            ),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        c
    }

    fn admin(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = as_user("postgres", &format!("{PG_BIN}/pg_ctl"))
            .args(["-m", "immediate", "-D"])
            .arg(self.dir.join("pg"))
            .arg("stop")
            .output();
    }
}

fn pg_engine(
    admin: &str,
    tls: &DbTls,
) -> Result<keymint_engines::postgres::PostgresEngine, String> {
    let db = keymint_engines::postgres::Database::parse("main", admin)?.with_tls(tls)?;
    Ok(keymint_engines::postgres::PostgresEngine::new(
        vec![db],
        "inst",
    ))
}

fn unavailable(e: EngineError) -> String {
    match e {
        EngineError::Unavailable(m) => m,
        other => panic!("expected the database to be unavailable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_admin_connections_speak_verified_tls_and_never_fall_back() {
    if !have("PostgreSQL 15", &format!("{PG_BIN}/initdb")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d);
    let pg = PrivatePg::start(d);
    let local = pg.local().await;
    let schema = crate::postgres::schema(&local).await;
    let ca = d.join("ca.pem");

    // The right CA: the server issues a user (its pg_hba takes TCP only
    // over TLS, so this admin connection was TLS).
    let s = TestServer::builder()
        .database(DatabaseConfig {
            name: "main".into(),
            engine: EngineKind::Postgres,
            connection: pg.admin(),
            tls: DbTls::Require {
                ca_file: Some(ca.clone()),
            },
        })
        .role(crate::postgres::pg_role("analyst", &schema))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "analyst", "w").await;
    let (issued, _) = crate::issue(&admin, &t.id).await;
    assert_eq!(issued.lease.state, LeaseState::Active);
    let Credential::Database { username, tls, .. } = &issued.credential else {
        panic!("not a database credential");
    };
    // keymint reaches the server over TLS, so the credential says the
    // user must too (`keymint run` sets `PGSSLMODE=require`).
    assert!(*tls, "the credential must tell the user to use TLS");
    let n: i64 = local
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname = $1",
            &[username],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the user exists on the private server");
    // The admin's sessions on the server are TLS.
    let plain: i64 = local
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.client_addr IS NOT NULL AND NOT s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(plain, 0);
    s.stop().await;

    // The wrong CA: refused at the handshake, and said so.
    let e = pg_engine(
        &pg.admin(),
        &DbTls::Require {
            ca_file: Some(d.join("other.pem")),
        },
    )
    .unwrap()
    .check_admin("main")
    .await
    .unwrap_err();
    let m = unavailable(e);
    assert!(
        m.contains("TLS handshake failed") && m.contains("certificate"),
        "{m}"
    );
    // The right CA, but a certificate that does not name the host the
    // connection is for (`host` is the name checked, `hostaddr` where it
    // goes): refused.
    let m = unavailable(
        pg_engine(
            &format!(
                "host=db.wrong.example hostaddr=127.0.0.1 port={} user=postgres dbname=postgres",
                pg.port
            ),
            &DbTls::Require {
                ca_file: Some(ca.clone()),
            },
        )
        .unwrap()
        .check_admin("main")
        .await
        .unwrap_err(),
    );
    assert!(
        m.contains("TLS handshake failed") && m.contains("not valid for name"),
        "{m}"
    );
    // The Mozilla roots do not vouch for a private CA either.
    let m = unavailable(
        pg_engine(&pg.admin(), &DbTls::Require { ca_file: None })
            .unwrap()
            .check_admin("main")
            .await
            .unwrap_err(),
    );
    assert!(m.contains("TLS handshake failed"), "{m}");
    // A CA file that holds no certificate fails at load, naming the key.
    std::fs::write(d.join("empty.pem"), "not a certificate\n").unwrap();
    let e = pg_engine(
        &pg.admin(),
        &DbTls::Require {
            ca_file: Some(d.join("empty.pem")),
        },
    )
    .unwrap_err();
    assert!(
        e.contains("database `main`") && e.contains("empty.pem"),
        "{e}"
    );
    // Plain text to this server is refused by the server.
    let m = unavailable(
        pg_engine(&pg.admin(), &DbTls::Disable)
            .unwrap()
            .check_admin("main")
            .await
            .unwrap_err(),
    );
    assert!(m.contains("pg_hba.conf"), "{m}");

    // The server stops offering TLS: a TLS-required admin connection is
    // refused, not downgraded (tokio-postgres' default would go on in
    // clear text). `sslmode=require` in the connection string alone means
    // the same.
    local
        .batch_execute("ALTER SYSTEM SET ssl = off")
        .await
        .unwrap();
    std::fs::write(
        d.join("pg/pg_hba.conf"),
        "local all all trust\nhost all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    local
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let t0 = Instant::now();
    loop {
        let r = pg_engine(&pg.admin(), &DbTls::Disable)
            .unwrap()
            .check_admin("main")
            .await;
        if r.is_ok() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "reload: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for engine in [
        pg_engine(
            &pg.admin(),
            &DbTls::Require {
                ca_file: Some(ca.clone()),
            },
        )
        .unwrap(),
        keymint_engines::postgres::PostgresEngine::new(
            vec![
                keymint_engines::postgres::Database::parse(
                    "main",
                    &format!("{} sslmode=require", pg.admin()),
                )
                .unwrap(),
            ],
            "inst",
        ),
    ] {
        let m = unavailable(engine.check_admin("main").await.unwrap_err());
        assert!(m.contains("TLS"), "{m}");
    }
}

/// A private MariaDB: TLS with the test certificate, plain text refused
/// (`require_secure_transport`). Stopped when dropped.
struct PrivateMaria {
    child: std::process::Child,
    port: u16,
}

impl PrivateMaria {
    async fn start(dir: &Path) -> Self {
        let data = dir.join("my");
        std::fs::create_dir_all(&data).unwrap();
        let user = if is_root() { "root" } else { "" };
        let mut install = Command::new("mariadb-install-db");
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
        if !user.is_empty() {
            install.arg(format!("--user={user}"));
        }
        run(&mut install);
        let port = free_port();
        let mut c = Command::new("mariadbd");
        c.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", dir.join("my.sock").display()))
            .arg(format!("--pid-file={}", dir.join("my.pid").display()))
            .arg(format!("--ssl-cert={}", dir.join("server.pem").display()))
            .arg(format!("--ssl-key={}", dir.join("server.key").display()))
            .args([
                "--require-secure-transport=ON",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=16M",
                "--event-scheduler=ON",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if !user.is_empty() {
            c.arg(format!("--user={user}"));
        }
        let child = c.spawn().unwrap();
        let me = Self { child, port };
        let t0 = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "mariadbd did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        me
    }

    fn admin(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/mysql", self.port)
    }
}

impl Drop for PrivateMaria {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens one admin connection to `url` with `tls`, as the engine does.
async fn my_connect(url: &str, tls: &DbTls) -> Result<(), EngineError> {
    let db = keymint_engines::mysql::Database::parse("shop", url)
        .and_then(|d| d.with_tls(tls))
        .map_err(EngineError::Internal)?;
    db.admin().await.map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_admin_connections_speak_verified_tls_and_never_fall_back() {
    if !have("MariaDB", "/usr/sbin/mariadbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d);
    let my = PrivateMaria::start(d).await;
    let ca = d.join("ca.pem");
    let tls = DbTls::Require {
        ca_file: Some(ca.clone()),
    };
    // The test's own admin connection, over verified TLS too.
    let ssl = mysql_async::SslOpts::default()
        .with_root_certs(vec![ca.clone().into()])
        .with_disable_built_in_roots(true);
    let mut local = mysql_async::Conn::new(
        mysql_async::OptsBuilder::from_opts(mysql_async::Opts::from_url(&my.admin()).unwrap())
            .prefer_socket(false)
            .ssl_opts(ssl.clone()),
    )
    .await
    .unwrap();
    let db = crate::mysql::schema(&mut local).await;

    let s = TestServer::builder()
        .database(DatabaseConfig {
            name: "shop".into(),
            engine: EngineKind::Mysql,
            connection: format!("mysql://root@127.0.0.1:{}/{db}", my.port),
            tls: tls.clone(),
        })
        .role(crate::mysql::my_role("clerk", &db))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "clerk", "w").await;
    let (issued, _) = crate::issue(&admin, &t.id).await;
    assert_eq!(issued.lease.state, LeaseState::Active);
    let Credential::Database {
        username, password, ..
    } = &issued.credential
    else {
        panic!("not a database credential");
    };
    // The new user logs in (over TLS: the server takes nothing else) and
    // reads what it was granted.
    let mut user = mysql_async::Conn::new(
        mysql_async::OptsBuilder::default()
            .ip_or_hostname("127.0.0.1")
            .tcp_port(my.port)
            .user(Some(username))
            .pass(Some(password.expose()))
            .db_name(Some(&db))
            .prefer_socket(false)
            .ssl_opts(ssl),
    )
    .await
    .unwrap();
    let n: Option<i64> = user
        .query_first(format!("SELECT COUNT(*) FROM `{db}`.orders"))
        .await
        .unwrap();
    assert_eq!(n, Some(2));
    // The account requires TLS itself (`REQUIRE SSL`): with the server's
    // own requirement off, it is still refused in clear text, while the
    // admin is not.
    let Credential::Database { tls: told, .. } = &issued.credential else {
        unreachable!()
    };
    assert!(*told, "the credential must tell the user to use TLS");
    local
        .query_drop("SET GLOBAL require_secure_transport = OFF")
        .await
        .unwrap();
    my_connect(&my.admin(), &DbTls::Disable)
        .await
        .expect("the server takes clear text now");
    let plain = mysql_async::Conn::new(
        mysql_async::OptsBuilder::default()
            .ip_or_hostname("127.0.0.1")
            .tcp_port(my.port)
            .user(Some(username))
            .pass(Some(password.expose()))
            .db_name(Some(&db))
            .prefer_socket(false),
    )
    .await;
    match plain {
        Err(mysql_async::Error::Server(e)) => assert_eq!(e.code, 1045, "{e:?}"),
        Err(e) => panic!("expected access denied, got {e}"),
        Ok(_) => panic!("a leased user must not log in in clear text"),
    }
    local
        .query_drop("SET GLOBAL require_secure_transport = ON")
        .await
        .unwrap();
    s.stop().await;

    // The wrong CA: refused at the handshake, and said so.
    let m = unavailable(
        my_connect(
            &my.admin(),
            &DbTls::Require {
                ca_file: Some(d.join("other.pem")),
            },
        )
        .await
        .unwrap_err(),
    );
    assert!(
        m.contains("TLS handshake failed") && m.contains("certificate"),
        "{m}"
    );
    // A CA file that is not PEM fails at load, naming the key and file.
    std::fs::write(d.join("empty.pem"), "not a certificate\n").unwrap();
    let e = keymint_engines::mysql::Database::parse("shop", &my.admin())
        .unwrap()
        .with_tls(&DbTls::Require {
            ca_file: Some(d.join("empty.pem")),
        })
        .unwrap_err();
    assert!(e.contains("ca_file") && e.contains("empty.pem"), "{e}");
    // Plain text to this server: the server refuses it.
    assert!(my_connect(&my.admin(), &DbTls::Disable).await.is_err());
    // And TLS with the right CA, directly.
    my_connect(&my.admin(), &tls).await.unwrap();
    // TLS required from a server that offers none (the shared MariaDB on
    // 3306 runs without TLS): refused, not downgraded.
    if crate::mysql::admin_conn().await.is_some() {
        let m = unavailable(my_connect(crate::mysql::ADMIN, &tls).await.unwrap_err());
        assert!(m.contains("TLS is required"), "{m}");
    }
}
