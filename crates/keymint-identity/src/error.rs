//! Why a token was refused, and why a configuration was.
//!
//! INVARIANT (DESIGN.md 4): an [`AuthError`] never carries anything taken
//! from the token (no claim values, no `kid`, no header fields): its message
//! and [`AuthError::code`] say *why* the token was refused, and the only
//! strings it holds come from the operator's own configuration (a claim path
//! that a mapping names). Details that help an operator (an issuer that did
//! not answer, a JWKS that did not parse) go to the log, never to the caller.

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The token is longer than the configured limit; it was not parsed.
    #[error("token is too large")]
    TooLarge,
    /// The token is not a compact JWS with base64url JSON parts.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// No configured issuer (or SPIFFE trust domain) matches the token.
    #[error("unknown issuer")]
    UnknownIssuer,
    /// The header's `alg` is not allowed (`none`, HMAC, or not in the
    /// issuer's allow-list).
    #[error("algorithm not allowed")]
    AlgorithmNotAllowed,
    /// No key of the issuer's key set has the token's `kid`, even after a
    /// refresh (or a refresh was not allowed yet).
    #[error("unknown signing key")]
    UnknownKey,
    /// The key named by `kid` does not fit the token's algorithm (its `kty`,
    /// `crv`, `alg`, `use` or `key_ops` disagree).
    #[error("signing key does not fit the token's algorithm")]
    KeyMismatch,
    /// The issuer's keys could not be loaded (the issuer is unreachable or
    /// served something unusable); the reason is in the log.
    #[error("issuer keys are unavailable")]
    KeysUnavailable,
    /// The issuer's keys were last fetched longer ago than its
    /// `jwks_max_stale` and every fetch since has failed: they are no longer
    /// trusted (a key the issuer revoked meanwhile would still verify), and
    /// its tokens are refused until a fetch succeeds. The reason is in the
    /// log.
    #[error("issuer keys are too old to trust and could not be fetched again")]
    KeysStale,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token has expired")]
    Expired,
    /// `nbf` or `iat` is in the future (beyond the leeway).
    #[error("token is not yet valid")]
    NotYetValid,
    /// `exp - iat` (or `exp - now` without `iat`) exceeds the issuer's
    /// maximum lifetime.
    #[error("token lifetime is too long")]
    LifetimeTooLong,
    /// The token has no `aud` claim.
    #[error("token has no audience")]
    MissingAudience,
    /// None of the token's audiences is one this issuer accepts.
    #[error("wrong audience")]
    WrongAudience,
    /// A claim that the checks, the profile or the configuration need is
    /// absent. The name is a claim path from the code or the configuration.
    #[error("missing claim `{0}`")]
    MissingClaim(String),
    /// A claim has the wrong type or an unacceptable value. The name is a
    /// claim path from the code or the configuration, never the value.
    #[error("invalid claim `{0}`")]
    InvalidClaim(String),
    /// A claim is not one of the values that `bound_claims` allows.
    #[error("claim `{0}` is not allowed")]
    ClaimNotAllowed(String),
}

impl AuthError {
    /// A stable, machine-readable code for API error bodies and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge => "token_too_large",
            Self::Malformed(_) => "token_malformed",
            Self::UnknownIssuer => "unknown_issuer",
            Self::AlgorithmNotAllowed => "algorithm_not_allowed",
            Self::UnknownKey => "unknown_key",
            Self::KeyMismatch => "key_mismatch",
            Self::KeysUnavailable => "keys_unavailable",
            Self::KeysStale => "keys_stale",
            Self::BadSignature => "bad_signature",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::LifetimeTooLong => "token_lifetime_too_long",
            Self::MissingAudience => "missing_audience",
            Self::WrongAudience => "wrong_audience",
            Self::MissingClaim(_) => "missing_claim",
            Self::InvalidClaim(_) => "invalid_claim",
            Self::ClaimNotAllowed(_) => "claim_not_allowed",
        }
    }

    /// Whether the fault is on keymint's side (an issuer it could not
    /// reach) rather than the token's: a server maps this to 503, the rest
    /// to 401.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::KeysUnavailable | Self::KeysStale)
    }
}

/// A configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// One issuer's configuration is invalid.
    #[error("identity issuer `{name}`: {reason}")]
    Issuer { name: String, reason: String },
    /// The set of issuers is invalid as a whole (duplicates).
    #[error("identity configuration: {0}")]
    Invalid(String),
}
