//! A trust bundle per SPIFFE trust domain, for mTLS with X.509-SVIDs
//! (docs/design/0025-database-tls-and-trust-domains.md).
//!
//! `[[server.tls.trust_domains]]` names a trust domain and where its bundle
//! comes from: a PEM file read at start, or a SPIFFE bundle endpoint (a
//! JWK Set over HTTPS whose `x509-svid` keys carry the CA certificates in
//! `x5c`), fetched at start in the background and again at the bundle's
//! `spiffe_refresh_hint`. The last good bundle is kept through failed
//! fetches. [`crate::tls`]'s verifier checks an SVID against the bundle of
//! the trust domain its SPIFFE ID names, and only that one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine as _;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;
use serde::Deserialize;

/// One trust domain and the source of its bundle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustDomainConfig {
    /// The trust domain, as in `spiffe://NAME/...` (`example.org`).
    pub name: String,
    /// PEM: the domain's X.509 CA certificates.
    #[serde(default)]
    pub bundle_file: Option<PathBuf>,
    /// `https://…`: the domain's SPIFFE bundle endpoint (web PKI
    /// authentication: the server's certificate is checked against
    /// `endpoint_ca_file`, or the Mozilla roots).
    #[serde(default)]
    pub bundle_endpoint: Option<String>,
    /// PEM: the CA to trust for `bundle_endpoint`'s server.
    #[serde(default)]
    pub endpoint_ca_file: Option<PathBuf>,
}

/// How long a fetched bundle is used before it is fetched again, unless it
/// says otherwise (`spiffe_refresh_hint`, held between the two bounds).
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
const MIN_REFRESH: Duration = Duration::from_secs(5);
const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// After a failed fetch.
const RETRY: Duration = Duration::from_secs(5);
/// A bundle document larger than this is refused.
const MAX_BUNDLE: usize = 1 << 20;

type Slot = Arc<RwLock<Option<Arc<dyn ClientCertVerifier>>>>;

/// The verifier of each configured trust domain (none yet for an endpoint
/// that has not answered).
#[derive(Clone, Default)]
pub(crate) struct Bundles(Arc<HashMap<String, Slot>>);

impl std::fmt::Debug for Bundles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl Bundles {
    pub(crate) fn contains(&self, trust_domain: &str) -> bool {
        self.0.contains_key(trust_domain)
    }

    pub(crate) fn verifier(&self, trust_domain: &str) -> Option<Arc<dyn ClientCertVerifier>> {
        self.0.get(trust_domain)?.read().ok()?.clone()
    }
}

/// Checks the configuration, reads the bundle files and starts fetching
/// from the bundle endpoints (on the current tokio runtime).
pub(crate) fn load(
    configs: &[TrustDomainConfig],
    provider: &Arc<CryptoProvider>,
) -> anyhow::Result<Bundles> {
    let mut map = HashMap::new();
    for c in configs {
        let name = &c.name;
        if name.contains('/') || !crate::tls::valid_spiffe_id(&format!("spiffe://{name}")) {
            bail!(
                "`server.tls.trust_domains`: a trust domain name is lower-case letters, digits, \
                 `.`, `-` and `_`"
            );
        }
        if map.contains_key(name) {
            bail!("`server.tls.trust_domains`: `{name}` is listed twice");
        }
        let slot: Slot = Arc::new(RwLock::new(None));
        match (&c.bundle_file, &c.bundle_endpoint) {
            (Some(path), None) => {
                if c.endpoint_ca_file.is_some() {
                    bail!("trust domain `{name}`: `endpoint_ca_file` goes with `bundle_endpoint`");
                }
                let roots = crate::tls::read_pem_roots(path)
                    .with_context(|| format!("the bundle of trust domain `{name}`"))?;
                let v = crate::tls::bundle_verifier(roots, provider)
                    .with_context(|| format!("the bundle of trust domain `{name}`"))?;
                *slot.write().map_err(|_| anyhow::anyhow!("poisoned"))? = Some(v);
            }
            (None, Some(url)) => {
                if !url.starts_with("https://") {
                    bail!("trust domain `{name}`: `bundle_endpoint` must be an https:// URL");
                }
                let client = keymint_client::http::HttpClient::builder()
                    .timeout(Duration::from_secs(10))
                    .max_body(MAX_BUNDLE)
                    .tls(&keymint_client::TlsOptions {
                        ca_file: c.endpoint_ca_file.clone(),
                        ..Default::default()
                    })
                    .build()
                    .with_context(|| format!("trust domain `{name}`: the endpoint client"))?;
                let handle = tokio::runtime::Handle::try_current()
                    .context("bundle endpoints are fetched on the tokio runtime")?;
                handle.spawn(refresh(
                    name.clone(),
                    url.clone(),
                    client,
                    Arc::clone(&slot),
                    Arc::clone(provider),
                ));
            }
            _ => bail!("trust domain `{name}`: give one of `bundle_file` and `bundle_endpoint`"),
        }
        map.insert(name.clone(), slot);
    }
    Ok(Bundles(Arc::new(map)))
}

/// Fetches the endpoint's bundle now and again at its refresh hint, for
/// the life of the process.
async fn refresh(
    name: String,
    url: String,
    client: keymint_client::http::HttpClient,
    slot: Slot,
    provider: Arc<CryptoProvider>,
) {
    loop {
        let wait = match fetch(&client, &url).await {
            Ok((roots, hint)) => match crate::tls::bundle_verifier(roots, &provider) {
                Ok(v) => {
                    if let Ok(mut s) = slot.write() {
                        *s = Some(v);
                    }
                    tracing::info!(trust_domain = %name, "trust bundle fetched");
                    hint.unwrap_or(DEFAULT_REFRESH)
                        .clamp(MIN_REFRESH, MAX_REFRESH)
                }
                Err(e) => {
                    tracing::warn!(trust_domain = %name, error = %e, "trust bundle unusable; keeping the last one");
                    RETRY
                }
            },
            Err(e) => {
                tracing::warn!(trust_domain = %name, error = %e, "trust bundle fetch failed; keeping the last one");
                RETRY
            }
        };
        tokio::time::sleep(wait).await;
    }
}

async fn fetch(
    client: &keymint_client::http::HttpClient,
    url: &str,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, Option<Duration>)> {
    let req = http::Request::get(url)
        .header(http::header::ACCEPT, "application/json")
        .body(bytes::Bytes::new())
        .context("the bundle request")?;
    let res = client.send(req).await.context("the bundle endpoint")?;
    if !res.status.is_success() {
        bail!("the bundle endpoint answered {}", res.status.as_u16());
    }
    parse_bundle(&res.body)
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
    #[serde(default)]
    spiffe_refresh_hint: Option<u64>,
}

#[derive(Deserialize)]
struct Jwk {
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    x5c: Vec<String>,
}

/// The X.509 authorities of a SPIFFE bundle (JWK Set): the `x5c`
/// certificate of each key whose `use` is `x509-svid`; and its refresh
/// hint. A bundle without one is refused (it would trust nothing, and a
/// broken endpoint should not empty a working bundle).
pub(crate) fn parse_bundle(
    body: &[u8],
) -> anyhow::Result<(Vec<CertificateDer<'static>>, Option<Duration>)> {
    let doc: Jwks = serde_json::from_slice(body).context("the bundle is not a JWK Set")?;
    let mut roots = Vec::new();
    for k in doc.keys {
        if k.use_.as_deref() != Some("x509-svid") {
            continue;
        }
        // SPIFFE: exactly one certificate per x509-svid key.
        let [cert] = k.x5c.as_slice() else {
            bail!("an `x509-svid` key must carry exactly one certificate in `x5c`");
        };
        let der = base64::engine::general_purpose::STANDARD
            .decode(cert)
            .context("an `x5c` certificate is not base64")?;
        roots.push(CertificateDer::from(der));
    }
    if roots.is_empty() {
        bail!("the bundle holds no `x509-svid` authority");
    }
    Ok((roots, doc.spiffe_refresh_hint.map(Duration::from_secs)))
}

#[cfg(test)]
mod tests {
    use super::parse_bundle;

    #[test]
    fn spiffe_bundles_are_read_strictly() {
        let (roots, hint) = parse_bundle(
            br#"{"keys":[{"use":"x509-svid","kty":"EC","x5c":["AQID"]},
                {"use":"jwt-svid","kty":"EC","kid":"a"}],"spiffe_refresh_hint":60}"#,
        )
        .unwrap();
        assert_eq!(roots.len(), 1);
        assert_eq!(roots[0].as_ref(), &[1, 2, 3]);
        assert_eq!(hint, Some(std::time::Duration::from_secs(60)));
        for bad in [
            &br#"{"keys":[]}"#[..],
            br#"{"keys":[{"use":"jwt-svid","x5c":["AQID"]}]}"#,
            br#"{"keys":[{"use":"x509-svid","x5c":["AQID","AQID"]}]}"#,
            br#"{"keys":[{"use":"x509-svid","x5c":["%%%"]}]}"#,
            br#"[1]"#,
        ] {
            assert!(
                parse_bundle(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
