//! The [`Verifier`]: a token in, a [`Workload`] out.

use std::collections::{BTreeMap, HashMap};

use keymint_core::Timestamp;
use serde::Serialize;
use serde_json::Value;

use crate::cache::KeyCache;
use crate::claims::{self, MAX_ATTRIBUTE_LEN};
use crate::config::{IdentityConfig, IssuerSpec, JwtIssuerConfig};
use crate::error::{AuthError, ConfigError};
use crate::fetch::Fetcher;
use crate::jose;
use crate::profile::{self, Profile};

/// How a workload proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Method {
    /// A JWT from an OIDC issuer (including Kubernetes and GitHub Actions).
    Jwt,
    /// A SPIFFE JWT-SVID.
    Spiffe,
}

/// A verified workload identity.
///
/// `id` is unique only together with `issuer_name`: two clusters both have a
/// `k8s:default/default`. Policies should name both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// The workload id from the issuer's template (`k8s:NS/SA`,
    /// `github:OWNER_ID/REPO_ID:OWNER/REPO@REF`, a SPIFFE ID, or `sub`); at
    /// most 256 bytes, no control characters.
    pub id: String,
    pub method: Method,
    /// The issuer: the configured `issuer`, which the token's `iss` equals;
    /// for a SPIFFE issuer configured without one, the trust domain as
    /// `spiffe://TD` (whatever `iss` the SVID carries).
    pub issuer: String,
    /// The configured name of the issuer that vouched for the token.
    pub issuer_name: String,
    /// Attributes from the profile and the claim mappings.
    pub attributes: BTreeMap<String, String>,
    /// The token's `exp`: the identity is not good after this.
    pub expires_at: Timestamp,
}

#[derive(Debug)]
struct Issuer {
    spec: IssuerSpec,
    keys: KeyCache,
}

/// Verifies workload JWTs against the configured issuers.
///
/// Build it once (it holds the key caches and the HTTP client) and share it
/// (`Arc<Verifier>`); [`Verifier::verify`] takes `&self`. Key fetches need a
/// tokio runtime.
#[derive(Debug)]
pub struct Verifier {
    issuers: Vec<Issuer>,
    by_iss: HashMap<String, usize>,
    by_trust_domain: HashMap<String, usize>,
    fetcher: Fetcher,
    max_token_size: usize,
}

impl Verifier {
    /// A verifier for these issuers, with the default limits.
    pub fn new(configs: Vec<JwtIssuerConfig>) -> Result<Self, ConfigError> {
        Self::from_config(IdentityConfig {
            jwt: configs,
            ..IdentityConfig::default()
        })
    }

    /// A verifier for a whole [`IdentityConfig`].
    pub fn from_config(config: IdentityConfig) -> Result<Self, ConfigError> {
        if !(1024..=64 * 1024).contains(&config.max_token_size) {
            return Err(ConfigError::Invalid(
                "`max_token_size` must be 1 KiB to 64 KiB".into(),
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&config.max_document_size) {
            return Err(ConfigError::Invalid(
                "`max_document_size` must be 1 KiB to 16 MiB".into(),
            ));
        }
        let mut issuers = Vec::new();
        let mut by_iss = HashMap::new();
        let mut by_trust_domain = HashMap::new();
        let mut names = std::collections::BTreeSet::new();
        for c in &config.jwt {
            let spec = c.validate()?;
            if !names.insert(spec.name.clone()) {
                return Err(ConfigError::Invalid(format!(
                    "two issuers are named `{}`",
                    spec.name
                )));
            }
            let i = issuers.len();
            if let Some(td) = &spec.trust_domain {
                if by_trust_domain.insert(td.clone(), i).is_some() {
                    return Err(ConfigError::Invalid(format!(
                        "two issuers serve trust domain `{td}`"
                    )));
                }
            } else if let Some(iss) = &spec.issuer
                && by_iss.insert(iss.clone(), i).is_some()
            {
                return Err(ConfigError::Invalid(format!(
                    "two issuers are configured for `{iss}`"
                )));
            }
            let keys = KeyCache::new(&spec);
            issuers.push(Issuer { spec, keys });
        }
        Ok(Self {
            issuers,
            by_iss,
            by_trust_domain,
            fetcher: Fetcher::new(config.max_document_size)?,
            max_token_size: config.max_token_size,
        })
    }

    /// The configured issuer names.
    pub fn issuer_names(&self) -> impl Iterator<Item = &str> {
        self.issuers.iter().map(|i| i.spec.name.as_str())
    }

    /// Waits until no key fetch is in flight, in the foreground or in the
    /// background (keys past `jwks_max_age` are refreshed behind the
    /// requests that use them). For tests and orderly shutdowns; requests
    /// never need it.
    pub async fn refreshes_settled(&self) {
        for i in &self.issuers {
            i.keys.settled().await;
        }
    }

    /// Verifies `token` (the compact JWS, without `Bearer `) at time `now`.
    ///
    /// The checks, in order (each failure is its own [`AuthError`]): size;
    /// shape; header and `alg` (only RS256, ES256, EdDSA, never `none` or
    /// HMAC); payload; issuer (by `iss`, or by the trust domain of a SPIFFE
    /// `sub`); the issuer's algorithm allow-list; the key (by `kid`,
    /// refreshing the issuer's keys once if unknown) and its fit with `alg`;
    /// the signature; `exp`, `nbf`, `iat` with leeway and the maximum
    /// lifetime; `aud`; the profile; `bound_claims`; the workload id and
    /// attributes. Nothing is read from the claims before the signature has
    /// been checked except `iss` and `sub` to find the issuer.
    pub async fn verify(&self, token: &str, now: Timestamp) -> Result<Workload, AuthError> {
        if token.len() > self.max_token_size {
            return Err(AuthError::TooLarge);
        }
        let jws = jose::parse(token)?;

        let issuer = self.route(&jws.claims)?;
        let spec = &issuer.spec;
        if !spec.algorithms.contains(&jws.alg) {
            return Err(AuthError::AlgorithmNotAllowed);
        }
        let keys = issuer
            .keys
            .keys_for(spec, &self.fetcher, jws.kid.as_deref(), jws.alg, now)
            .await?;
        keys.verify(
            jws.kid.as_deref(),
            jws.alg,
            jws.signing_input,
            &jws.signature,
        )?;
        // From here on the claims are the issuer's.
        let claims = &jws.claims;
        let expires_at = check_times(spec, claims, now)?;
        check_audience(spec, claims)?;
        // RFC 7519 §4.1.2: `sub` is a StringOrURI. A number or a boolean
        // would print as a workload id (`12345`, `true`) that a string
        // `sub` names too.
        if claims.get("sub").is_some_and(|s| !s.is_string()) {
            return Err(AuthError::InvalidClaim("sub".into()));
        }
        let mut attributes = match spec.profile {
            Some(p) => p.apply(claims, spec.trust_domain.as_deref())?,
            None => BTreeMap::new(),
        };
        for (path, allowed) in &spec.bound_claims {
            let v = claims::lookup(claims, path)
                .ok_or_else(|| AuthError::MissingClaim(path.clone()))?;
            match v {
                Value::String(s) if allowed.contains(s) => {}
                _ => return Err(AuthError::ClaimNotAllowed(path.clone())),
            }
        }
        for (attr, path) in &spec.claim_mappings {
            if let Some(v) = claims::text_claim(claims, path, MAX_ATTRIBUTE_LEN)? {
                attributes.insert(attr.clone(), v);
            }
        }
        let id = spec.workload_id.render(claims)?;
        // INVARIANT: the issuer is what the configuration vouches for. An
        // `iss` was matched exactly when `issuer` is configured; a SPIFFE
        // issuer without one checks no `iss`, and what a trust domain's
        // authority wrote there (another domain's name) is not its issuer.
        let issuer_claim = match (&spec.issuer, &spec.trust_domain) {
            (Some(iss), _) => iss.clone(),
            (None, Some(td)) => format!("spiffe://{td}"),
            (None, None) => return Err(AuthError::UnknownIssuer),
        };
        Ok(Workload {
            id,
            method: if spec.profile == Some(Profile::Spiffe) {
                Method::Spiffe
            } else {
                Method::Jwt
            },
            issuer: issuer_claim,
            issuer_name: spec.name.clone(),
            attributes,
            expires_at,
        })
    }

    /// The issuer a token claims to come from: its `iss`, or for a SPIFFE
    /// JWT-SVID (whose `iss` is optional) the trust domain of its `sub`.
    fn route(&self, claims: &serde_json::Map<String, Value>) -> Result<&Issuer, AuthError> {
        let iss = match claims.get("iss") {
            None => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(_) => return Err(AuthError::InvalidClaim("iss".into())),
        };
        if let Some(&i) = iss.and_then(|s| self.by_iss.get(s)) {
            return self.issuers.get(i).ok_or(AuthError::UnknownIssuer);
        }
        if let Some(&i) =
            profile::spiffe_trust_domain(claims).and_then(|td| self.by_trust_domain.get(td))
        {
            let issuer = self.issuers.get(i).ok_or(AuthError::UnknownIssuer)?;
            // A SPIFFE issuer with a configured `iss` wants exactly that one.
            if let Some(want) = &issuer.spec.issuer
                && iss != Some(want.as_str())
            {
                return Err(AuthError::UnknownIssuer);
            }
            return Ok(issuer);
        }
        Err(AuthError::UnknownIssuer)
    }
}

fn check_times(
    spec: &IssuerSpec,
    claims: &serde_json::Map<String, Value>,
    now: Timestamp,
) -> Result<Timestamp, AuthError> {
    let leeway_ms = spec.leeway_secs.saturating_mul(1000);
    let exp = claims::numeric_date(claims, "exp")?
        .ok_or_else(|| AuthError::MissingClaim("exp".into()))?;
    let nbf = claims::numeric_date(claims, "nbf")?;
    let iat = claims::numeric_date(claims, "iat")?;
    let ms = |s: i64| s.saturating_mul(1000);
    let now_ms = now.millis();
    // RFC 7519 §4.1.4: the token must not be accepted on or after `exp`.
    if now_ms >= ms(exp).saturating_add(leeway_ms) {
        return Err(AuthError::Expired);
    }
    for t in [nbf, iat].into_iter().flatten() {
        if ms(t) > now_ms.saturating_add(leeway_ms) {
            return Err(AuthError::NotYetValid);
        }
    }
    let lifetime_ms = match iat {
        Some(iat) => ms(exp).saturating_sub(ms(iat)),
        None => ms(exp).saturating_sub(now_ms),
    };
    if lifetime_ms > ms(spec.max_lifetime_secs) {
        return Err(AuthError::LifetimeTooLong);
    }
    Ok(Timestamp::from_millis(ms(exp)))
}

fn check_audience(
    spec: &IssuerSpec,
    claims: &serde_json::Map<String, Value>,
) -> Result<(), AuthError> {
    let ok = match claims.get("aud") {
        None => return Err(AuthError::MissingAudience),
        Some(Value::String(a)) => spec.audiences.contains(a),
        Some(Value::Array(list)) => {
            if list.is_empty() {
                return Err(AuthError::MissingAudience);
            }
            let mut ok = false;
            for a in list {
                match a {
                    Value::String(a) => ok |= spec.audiences.contains(a),
                    _ => return Err(AuthError::InvalidClaim("aud".into())),
                }
            }
            ok
        }
        Some(_) => return Err(AuthError::InvalidClaim("aud".into())),
    };
    if ok {
        Ok(())
    } else {
        Err(AuthError::WrongAudience)
    }
}
