//! The keymint bearer-token format.
//!
//! ```text
//! kmt_ 3Q8x…(43 base62 characters of randomness)… AbC12z
//! └┬─┘ └──────────────── body ────────────────┘ └─┬──┘
//! prefix                                  CRC32 checksum, 6 base62 chars
//! ```
//!
//! - 43 characters drawn uniformly from the 62-character alphabet carry
//!   log2(62^43) ≈ 256.03 bits of randomness.
//! - The checksum is the CRC32 (IEEE) of the ASCII prefix and body, written as
//!   six base62 digits, most significant first, left-padded with `0`. A scanner
//!   can therefore tell a real keymint token from a look-alike offline, the
//!   way GitHub's tokens work; the checksum is not a secret and proves nothing
//!   about validity, only about shape.
//! - Only an HMAC fingerprint of the whole token is stored (see
//!   [`crate::keyring::Keyring::fingerprint`]).
//!
//! Two prefixes exist: `kmt_` for task-scoped access tokens and `kma_` for
//! admin tokens. The full specification is in `docs/design/0001-token-format.md`.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

pub const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
pub const BODY_LEN: usize = 43;
pub const CHECKSUM_LEN: usize = 6;
pub const PREFIX_LEN: usize = 4;
pub const TOKEN_LEN: usize = PREFIX_LEN + BODY_LEN + CHECKSUM_LEN;

/// Which kind of token a prefix names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// `kmt_`: a task-scoped access token (a lease of the token engine).
    Access,
    /// `kma_`: an admin token.
    Admin,
}

impl TokenKind {
    pub const fn prefix(self) -> &'static str {
        match self {
            Self::Access => "kmt_",
            Self::Admin => "kma_",
        }
    }
}

/// Why a string is not a well-formed keymint token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenFormatError {
    #[error("not a keymint token (unknown prefix)")]
    Prefix,
    #[error("malformed token (wrong length)")]
    Length,
    #[error("malformed token (character outside the base62 alphabet)")]
    Alphabet,
    #[error("malformed token (checksum mismatch)")]
    Checksum,
}

/// A token in memory. Wiped on drop; `Debug` never prints it.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Token(String);

impl Token {
    /// Mints a fresh token of `kind` from the operating system's CSPRNG.
    pub fn generate(kind: TokenKind) -> Result<Self, getrandom::Error> {
        let mut s = String::with_capacity(TOKEN_LEN);
        s.push_str(kind.prefix());
        s.push_str(&random_base62(BODY_LEN)?);
        let sum = checksum(s.as_bytes());
        s.push_str(&sum);
        Ok(Self(s))
    }

    /// Parses and checks the shape and checksum of `s`.
    pub fn parse(s: &str) -> Result<(TokenKind, Self), TokenFormatError> {
        let kind = check(s)?;
        Ok((kind, Self(s.to_owned())))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// `n` characters drawn uniformly from the base62 alphabet (passwords,
/// token bodies).
pub fn random_base62(n: usize) -> Result<zeroize::Zeroizing<String>, getrandom::Error> {
    let mut s = zeroize::Zeroizing::new(String::with_capacity(n));
    let mut buf = [0u8; 64];
    while s.len() < n {
        getrandom::fill(&mut buf)?;
        for &b in &buf {
            // Rejection sampling: 248 = 4 * 62, so `b % 62` is uniform below it.
            if b < 248 && s.len() < n {
                s.push(char::from(ALPHABET[usize::from(b % 62)]));
            }
        }
    }
    buf.zeroize();
    Ok(s)
}

/// Checks that `s` is a well-formed keymint token without copying it.
pub fn check(s: &str) -> Result<TokenKind, TokenFormatError> {
    let kind = if s.starts_with("kmt_") {
        TokenKind::Access
    } else if s.starts_with("kma_") {
        TokenKind::Admin
    } else {
        return Err(TokenFormatError::Prefix);
    };
    if s.len() != TOKEN_LEN {
        return Err(TokenFormatError::Length);
    }
    let bytes = s.as_bytes();
    if !bytes[PREFIX_LEN..].iter().all(u8::is_ascii_alphanumeric) {
        return Err(TokenFormatError::Alphabet);
    }
    let (head, sum) = bytes.split_at(PREFIX_LEN + BODY_LEN);
    if checksum(head).as_bytes() != sum {
        return Err(TokenFormatError::Checksum);
    }
    Ok(kind)
}

/// The six-character base62 CRC32 of `data`.
pub fn checksum(data: &[u8]) -> String {
    let mut v = crc32fast::hash(data);
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(v % 62) as usize];
        v /= 62;
    }
    out.iter().map(|&b| char::from(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_and_differ() {
        let a = Token::generate(TokenKind::Access).unwrap();
        let b = Token::generate(TokenKind::Access).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), TOKEN_LEN);
        assert!(a.expose().starts_with("kmt_"));
        assert_eq!(check(a.expose()), Ok(TokenKind::Access));
        let admin = Token::generate(TokenKind::Admin).unwrap();
        assert_eq!(check(admin.expose()), Ok(TokenKind::Admin));
    }

    #[test]
    fn checksum_catches_every_single_character_change() {
        let t = Token::generate(TokenKind::Access).unwrap();
        let s = t.expose().to_owned();
        for i in PREFIX_LEN..TOKEN_LEN {
            let mut b = s.clone().into_bytes();
            b[i] = if b[i] == b'a' { b'b' } else { b'a' };
            let forged = String::from_utf8(b).unwrap();
            assert_eq!(
                check(&forged),
                Err(TokenFormatError::Checksum),
                "position {i}"
            );
        }
    }

    #[test]
    fn malformed_tokens_are_named() {
        let t = Token::generate(TokenKind::Access).unwrap();
        let s = t.expose();
        assert_eq!(check(&s[..TOKEN_LEN - 1]), Err(TokenFormatError::Length));
        assert_eq!(check("sk-proj-abc"), Err(TokenFormatError::Prefix));
        let with_dash = format!("{}-{}", &s[..10], &s[11..]);
        assert_eq!(check(&with_dash), Err(TokenFormatError::Alphabet));
        // The same body under the other prefix fails the checksum.
        let swapped = format!("kma_{}", &s[4..]);
        assert_eq!(check(&swapped), Err(TokenFormatError::Checksum));
        assert_eq!(check("kmt_"), Err(TokenFormatError::Length));
        assert_eq!(check("kmt_é"), Err(TokenFormatError::Length));
    }

    #[test]
    fn checksum_matches_known_vectors() {
        // Computed independently with Python's zlib.crc32 and the same base62
        // encoding; documented in docs/design/0001-token-format.md.
        for known in [
            "kmt_000000000000000000000000000000000000000000023nMur",
            "kmt_aBcDaBcDaBcDaBcDaBcDaBcDaBcDaBcDaBcDaBcDxyz0ZslmB",
        ] {
            assert_eq!(check(known), Ok(TokenKind::Access), "{known}");
        }
    }

    #[test]
    fn debug_never_shows_the_token() {
        let t = Token::generate(TokenKind::Access).unwrap();
        assert!(!format!("{t:?}").contains(&t.expose()[4..]));
    }
}
