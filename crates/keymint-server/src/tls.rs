//! TLS for the listener, and mTLS with X.509-SVIDs: a client certificate
//! that chains to the configured trust bundle and carries a `spiffe://` URI
//! SAN makes a request without a bearer token act as that SPIFFE ID. With
//! `trust_domains`, each trust domain has its own bundle and an SVID is
//! checked against its own domain's (`trust_domains.rs`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use rustls::DigitallySignedStruct;
use rustls::DistinguishedName;
use rustls::SignatureScheme;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The SPIFFE ID of a verified client certificate, for this connection.
#[derive(Debug, Clone)]
pub struct PeerSvid(pub Option<String>);

/// Builds the acceptor: the server's certificate and key, and a client
/// verifier for the trust bundle (optional client certificates unless
/// `require_client_cert`).
pub fn acceptor(cfg: &TlsConfig) -> anyhow::Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_file)
        .with_context(|| format!("cannot read `{}`", cfg.cert_file.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("`{}` is not PEM certificates", cfg.cert_file.display()))?;
    if certs.is_empty() {
        bail!("`{}` holds no certificate", cfg.cert_file.display());
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .with_context(|| format!("`{}` holds no usable private key", cfg.key_file.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = if cfg.client_ca_file.is_none() && cfg.trust_domains.is_empty() {
        if cfg.require_client_cert {
            bail!("`server.tls.require_client_cert` needs `client_ca_file` or `trust_domains`")
        }
        builder.with_no_client_auth()
    } else {
        let fallback = match &cfg.client_ca_file {
            Some(path) => Some(bundle_verifier(read_pem_roots(path)?, &provider)?),
            None => None,
        };
        let domains = crate::trust_domains::load(&cfg.trust_domains, &provider)?;
        builder.with_client_cert_verifier(Arc::new(SpiffeVerifier {
            domains,
            fallback,
            mandatory: cfg.require_client_cert,
            provider: Arc::clone(&provider),
        }))
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("the server certificate and key do not go together")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The CA certificates of a PEM file.
pub(crate) fn read_pem_roots(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let roots = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read `{}`", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("`{}` is not PEM certificates", path.display()))?;
    if roots.is_empty() {
        bail!("`{}` holds no certificate", path.display());
    }
    Ok(roots)
}

/// A webpki client verifier for one bundle (chain, validity, `clientAuth`).
/// Client certificates stay optional here; [`SpiffeVerifier`] says whether
/// one is required.
pub(crate) fn bundle_verifier(
    roots: Vec<CertificateDer<'static>>,
    provider: &Arc<CryptoProvider>,
) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    let mut store = rustls::RootCertStore::empty();
    for c in roots {
        store
            .add(c)
            .context("a certificate of the trust bundle is unusable")?;
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(store),
        Arc::clone(provider),
    )
    .allow_unauthenticated()
    .build()
    .context("the client trust bundle")
}

/// Verifies a client certificate against the bundle of the trust domain
/// its SPIFFE ID names, so a CA of one domain cannot vouch for an ID of
/// another. A certificate whose trust domain has no bundle of its own (or
/// that carries no SPIFFE ID) is verified against `client_ca_file`, the
/// one bundle of older configurations; without it, it is refused.
#[derive(Debug)]
struct SpiffeVerifier {
    domains: crate::trust_domains::Bundles,
    fallback: Option<Arc<dyn ClientCertVerifier>>,
    mandatory: bool,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for SpiffeVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Several bundles, some fetched later: no hints (clients send their
        // SVID regardless).
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let domain = spiffe_id(end_entity).and_then(|id| {
            let td = trust_domain(&id).to_owned();
            self.domains.contains(&td).then_some(td)
        });
        let verifier = match domain {
            // INVARIANT: an SVID of a configured trust domain is checked
            // against that domain's bundle only.
            Some(td) => self.domains.verifier(&td).ok_or_else(|| {
                rustls::Error::General("no trust bundle yet for the client's trust domain".into())
            })?,
            None => self
                .fallback
                .clone()
                .ok_or(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer,
                ))?,
        };
        verifier.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The trust domain of a valid SPIFFE ID (`spiffe://TD/...` → `TD`).
pub(crate) fn trust_domain(id: &str) -> &str {
    let rest = id.strip_prefix("spiffe://").unwrap_or(id);
    rest.split_once('/').map_or(rest, |(td, _)| td)
}

/// The `spiffe://` URI SAN of a (verified) leaf certificate, if it is an
/// X.509-SVID: exactly one URI SAN, a SPIFFE ID with a path (§3.1: the
/// trust domain's own ID names no workload), and a key usage extension
/// that lets it sign and not sign certificates or CRLs (§4.3: the
/// extension MUST be set on every SVID).
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_cert::der::Decode;
    use x509_cert::ext::pkix::KeyUsage;
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;
    let cert = x509_cert::Certificate::from_der(cert.as_ref()).ok()?;
    let mut uris = Vec::new();
    let mut key_usage = false;
    for ext in cert.tbs_certificate.extensions.iter().flatten() {
        if ext.extn_id == const_oid_key_usage() {
            key_usage = true;
            // X.509-SVID §4.3: a leaf signs (digitalSignature) and never
            // signs certificates or CRLs. A certificate that may is not an
            // SVID, whatever its URI says.
            let ku = KeyUsage::from_der(ext.extn_value.as_bytes()).ok()?;
            if !ku.digital_signature() || ku.key_cert_sign() || ku.crl_sign() {
                return None;
            }
            continue;
        }
        if ext.extn_id != const_oid_san() {
            continue;
        }
        let san = SubjectAltName::from_der(ext.extn_value.as_bytes()).ok()?;
        for n in san.0 {
            if let GeneralName::UniformResourceIdentifier(u) = n {
                uris.push(u.as_str().to_owned());
            }
        }
    }
    let has_path = |id: &str| {
        id.strip_prefix("spiffe://")
            .is_some_and(|r| r.contains('/'))
    };
    match uris.as_slice() {
        [one] if key_usage && valid_spiffe_id(one) && has_path(one) => Some(one.clone()),
        _ => None,
    }
}

fn const_oid_san() -> x509_cert::der::oid::ObjectIdentifier {
    x509_cert::der::oid::ObjectIdentifier::new_unwrap("2.5.29.17")
}

fn const_oid_key_usage() -> x509_cert::der::oid::ObjectIdentifier {
    x509_cert::der::oid::ObjectIdentifier::new_unwrap("2.5.29.15")
}

/// `spiffe://TRUST-DOMAIN[/PATH]` with the characters the standard allows.
pub(crate) fn valid_spiffe_id(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return false;
    };
    if s.len() > 2048 {
        return false;
    }
    let (td, path) = match rest.split_once('/') {
        Some((td, p)) => (td, Some(p)),
        None => (rest, None),
    };
    let td_ok = !td.is_empty()
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    let path_ok = path.is_none_or(|p| {
        p.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        })
    });
    td_ok && path_ok
}

/// Serves `router` over TLS on `listener` until `shutdown` completes, then
/// lets every connection finish the request it is answering and waits for
/// them all (at most 30 s), as the plain listener does. Each connection is
/// handed to a per-core runtime as the plain listener's are, and its
/// handshake is made there.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: crate::Front,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    crate::cores::serve_as(
        listener,
        router,
        shutdown,
        crate::cores::Cores::process(),
        &crate::cores::Listener::Tls(acceptor),
        crate::cores::SHUTDOWN_GRACE,
    )
    .await;
}

/// Serves one TLS connection: the handshake (at most
/// [`HANDSHAKE_TIMEOUT`]), then HTTP as on every listener, each request
/// carrying the client's SPIFFE ID if it presented an X.509-SVID.
pub(crate) async fn serve_connection(
    tcp: tokio::net::TcpStream,
    addr: std::net::SocketAddr,
    acceptor: TlsAcceptor,
    router: crate::Front,
    member: crate::cores::Member,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let svid = PeerSvid(
        tls.get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(spiffe_id),
    );
    crate::cores::serve_http(
        tls,
        addr,
        router,
        Some(svid),
        member,
        crate::cores::HEADER_READ_TIMEOUT,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::valid_spiffe_id;

    /// A self-signed certificate for 127.0.0.1 made by openssl in `dir`:
    /// the server's configuration, and the certificate to trust.
    fn self_signed(dir: &std::path::Path) -> crate::config::TlsConfig {
        let out = std::process::Command::new("openssl")
            .current_dir(dir)
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-addext",
                "basicConstraints=critical,CA:FALSE",
            ])
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        crate::config::TlsConfig {
            cert_file: dir.join("cert.pem"),
            key_file: dir.join("key.pem"),
            client_ca_file: None,
            require_client_cert: false,
            trust_domains: Vec::new(),
        }
    }

    /// TLS connections are handed to the per-core runtimes as plain ones
    /// are (the handshake and every request on the connection's core), and
    /// at shutdown the request in progress is answered before `serve`
    /// returns.
    #[tokio::test]
    async fn tls_connections_are_served_on_the_cores() {
        use rustls::pki_types::pem::PemObject as _;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let dir = tempfile::tempdir().unwrap();
        let cfg = self_signed(dir.path());
        let acceptor = super::acceptor(&cfg).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_file(&cfg.cert_file).unwrap())
            .unwrap();
        let client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
        // A route's own HSTS (as an upstream's could come back through the
        // proxy) is replaced by keymint's on a TLS connection.
        async fn who() -> ([(http::HeaderName, &'static str); 1], String) {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            (
                [(
                    http::header::STRICT_TRANSPORT_SECURITY,
                    "max-age=0; includeSubDomains",
                )],
                std::thread::current().name().unwrap_or("-").to_owned(),
            )
        }
        let front =
            crate::Front::router(axum::Router::new().route("/who", axum::routing::get(who)));
        let cores: &'static crate::cores::Cores =
            Box::leak(Box::new(crate::cores::Cores::start(2).unwrap()));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            crate::cores::serve_as(
                l,
                front,
                async {
                    let _ = rx.await;
                },
                Some(cores),
                &crate::cores::Listener::Tls(acceptor),
                std::time::Duration::from_secs(10),
            )
            .await;
        });
        let mut tx = Some(tx);
        let mut answers = Vec::new();
        for i in 0..2 {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            tls.write_all(b"GET /who HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            if i == 1 {
                // Shut down while this request is in progress.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                tx.take().unwrap().send(()).unwrap();
            }
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while let Ok(n @ 1..) = tls.read(&mut buf).await {
                got.extend_from_slice(&buf[..n]);
            }
            answers.push(String::from_utf8(got).unwrap());
        }
        for a in &answers {
            assert!(a.starts_with("HTTP/1.1 200"), "{a}");
            let body = a.rsplit("\r\n\r\n").next().unwrap();
            assert!(body.starts_with("keymint-front-"), "served on a core: {a}");
            let hsts: Vec<&str> = a
                .lines()
                .filter_map(|l| l.strip_prefix("strict-transport-security: "))
                .collect();
            assert_eq!(hsts, ["max-age=31536000"], "{a}");
        }
        tokio::time::timeout(std::time::Duration::from_secs(10), server)
            .await
            .expect("serve returns after the answer")
            .unwrap();
    }

    #[test]
    fn spiffe_ids_are_checked() {
        for ok in [
            "spiffe://example.org/agent",
            "spiffe://prod.example.org/ns/default/sa/api",
            "spiffe://example.org",
        ] {
            assert!(valid_spiffe_id(ok), "{ok}");
        }
        for bad in [
            "https://example.org/agent",
            "spiffe://",
            "spiffe://Example.org/a",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a?x=1",
            "spiffe://example.org/",
        ] {
            assert!(!valid_spiffe_id(bad), "{bad}");
        }
    }

    fn openssl(dir: &std::path::Path, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `NAME.pem` with extensions `ext`, signed by `CA.pem`; its DER.
    fn leaf(dir: &std::path::Path, ca: &str, name: &str, ext: &str) -> Vec<u8> {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        let (k, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &k,
                "-out",
                &csr,
                "-subj",
                "/CN=leaf",
            ],
        );
        let (ca_pem, ca_key, extfile) = (
            format!("{ca}.pem"),
            format!("{ca}.key"),
            format!("{name}.ext"),
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "1",
                "-extfile",
                &extfile,
            ],
        );
        use rustls::pki_types::pem::PemObject as _;
        rustls::pki_types::CertificateDer::from_pem_file(dir.join(pem))
            .unwrap()
            .to_vec()
    }

    fn ca(dir: &std::path::Path, name: &str) {
        let (k, pem) = (format!("{name}.key"), format!("{name}.pem"));
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &k,
                "-out",
                &pem,
                "-subj",
                "/CN=ca",
                "-days",
                "1",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
    }

    /// X.509-SVIDs an outside evaluator would try: each trust domain's
    /// bundle vouches for its own ids only; a leaf that is a CA, or is
    /// used outside its validity, fails the chain; a certificate naming
    /// two SPIFFE ids, or one that is not a SPIFFE id as the standard
    /// spells it, is nobody (it may still chain, as a plain client).
    #[test]
    fn x509_svids_under_attack() {
        use rustls::pki_types::{CertificateDer, UnixTime};
        use rustls::server::danger::ClientCertVerifier as _;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        ca(d, "ca_a");
        ca(d, "ca_b");
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let domains = crate::trust_domains::load(
            &[
                crate::trust_domains::TrustDomainConfig {
                    name: "a.test".into(),
                    bundle_file: Some(d.join("ca_a.pem")),
                    bundle_endpoint: None,
                    endpoint_ca_file: None,
                },
                crate::trust_domains::TrustDomainConfig {
                    name: "b.test".into(),
                    bundle_file: Some(d.join("ca_b.pem")),
                    bundle_endpoint: None,
                    endpoint_ca_file: None,
                },
            ],
            &provider,
        )
        .unwrap();
        let v = super::SpiffeVerifier {
            domains,
            fallback: None,
            mandatory: false,
            provider,
        };
        let svid = |san: &str, extra: &str| {
            format!(
                "subjectAltName={san}\nextendedKeyUsage=clientAuth\n\
                 keyUsage=critical,digitalSignature\n{extra}"
            )
        };
        // A minute on: the leaves below are made after this line, valid
        // from the second openssl makes each (a `now` read before would
        // fall before a leaf's `notBefore` when a second passes between).
        let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            UnixTime::now().as_secs() + 60,
        ));
        let check = |der: &[u8], at: UnixTime| {
            v.verify_client_cert(&CertificateDer::from(der.to_vec()), &[], at)
        };
        // A's SVID, with DNS SANs beside its one URI SAN: a.test's agent.
        let good = leaf(
            d,
            "ca_a",
            "good",
            &svid("URI:spiffe://a.test/agent,DNS:agent.a.test", ""),
        );
        assert!(check(&good, now).is_ok());
        assert_eq!(
            super::spiffe_id(&CertificateDer::from(good.clone())).as_deref(),
            Some("spiffe://a.test/agent")
        );
        // B's CA naming an id of A: refused at the chain.
        let cross = leaf(d, "ca_b", "cross", &svid("URI:spiffe://a.test/agent", ""));
        assert!(check(&cross, now).is_err());
        // A leaf that is a CA, though its key usage is a leaf's.
        let ca_leaf = leaf(
            d,
            "ca_a",
            "caleaf",
            &svid(
                "URI:spiffe://a.test/agent",
                "basicConstraints=critical,CA:TRUE\n",
            ),
        );
        assert!(check(&ca_leaf, now).is_err());
        // Outside its validity (one day from now): expired, not yet valid.
        let day = 86_400;
        let secs = now.as_secs();
        assert!(
            check(
                &good,
                UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs + 2 * day))
            )
            .is_err()
        );
        assert!(
            check(
                &good,
                UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs - day))
            )
            .is_err()
        );
        // Two SPIFFE ids, or ids the standard does not allow: nobody.
        for (name, san) in [
            ("two", "URI:spiffe://a.test/agent,URI:spiffe://a.test/admin"),
            ("pct", "URI:spiffe://a.test/ag%65nt"),
            ("dots", "URI:spiffe://a.test/x/../admin"),
            ("upper", "URI:spiffe://A.test/agent"),
            ("slash", "URI:spiffe://a.test/agent/"),
            ("query", "URI:spiffe://a.test/agent?x=1"),
            // `#` starts a comment in an openssl extension file.
            ("frag", "URI:spiffe://a.test/agent\\#x"),
            ("user", "URI:spiffe://u@a.test/agent"),
            ("port", "URI:spiffe://a.test:443/agent"),
            ("scheme", "URI:SPIFFE://a.test/agent"),
        ] {
            let der = leaf(d, "ca_a", name, &svid(san, ""));
            // The certificate names what the case says (openssl kept it).
            let uri = san.rsplit("URI:").next().unwrap().replace("\\#", "#");
            assert!(der.windows(uri.len()).any(|w| w == uri.as_bytes()), "{uri}");
            assert_eq!(super::spiffe_id(&CertificateDer::from(der)), None, "{san}");
        }
    }
}
