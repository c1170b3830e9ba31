//! Workload identity from JWTs: verifies a workload's token against the
//! issuers keymint trusts and turns it into one [`Workload`].
//!
//! - [`config`]: [`JwtIssuerConfig`] per issuer (OIDC discovery, a JWKS URL,
//!   a file or inline keys; required audiences; an algorithm allow-list of
//!   RS256, ES256 and EdDSA only; bounded leeway and lifetime; claim
//!   mappings; a [`Profile`]), deserialised with `deny_unknown_fields`.
//! - [`Verifier`]: built once from the configuration; [`Verifier::verify`]
//!   takes the token and the time (never the wall clock: DESIGN.md
//!   invariant 7) and returns a [`Workload`] or an [`AuthError`] that says
//!   why without repeating anything from the token.
//! - Keys are cached per issuer and refreshed when a token names an unknown
//!   `kid`, at most once per issuer per `jwks_min_refresh_interval`, one
//!   fetch shared by every request waiting on it; keys past `jwks_max_age`
//!   keep serving known `kid`s while one refresh runs in the background, and
//!   keys no fetch has confirmed for `jwks_max_stale` are not used at all.
//! - Profiles: Kubernetes projected service-account tokens, GitHub Actions
//!   OIDC tokens, SPIFFE JWT-SVIDs (a trust bundle per trust domain).
//!
//! Signatures are verified with the pure-Rust RustCrypto crates (`rsa`,
//! `p256`, `ed25519-dalek`) over a JOSE header parsed here; key fetches use
//! keymint's one outbound HTTP client, `keymint_client::http` (rustls on
//! `ring`, `webpki-roots`). See
//! `docs/design/0008-workload-identity-jwt.md`.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use keymint_identity::{JwksSource, JwtIssuerConfig, Verifier};
//! let verifier = Verifier::new(vec![JwtIssuerConfig::new(
//!     "ci",
//!     "https://token.actions.githubusercontent.com",
//!     vec!["https://keymint.example.com".into()],
//!     JwksSource::Discovery,
//! )])?;
//! # let token = ""; let now = keymint_core::Timestamp::from_millis(0);
//! let workload = verifier.verify(token, now).await?;
//! println!("{} via {}", workload.id, workload.issuer_name);
//! # Ok(()) }
//! ```

mod cache;
mod claims;
pub mod config;
mod error;
mod fetch;
mod jose;
mod jwk;
pub mod jws;
mod profile;
mod verifier;

pub use config::{Alg, IdentityConfig, JwksSource, JwtIssuerConfig};
pub use error::{AuthError, ConfigError};
pub use profile::Profile;
pub use verifier::{Method, Verifier, Workload};
