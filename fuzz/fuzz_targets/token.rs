//! The offline `kmt_`/`kma_` token check: any string in, a verdict out,
//! and a token it accepts has the documented shape.
#![no_main]

use keymint_core::token::{TOKEN_LEN, TokenKind, check, checksum};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(kind) = check(s) {
        let prefix = match kind {
            TokenKind::Access => "kmt_",
            TokenKind::Admin => "kma_",
        };
        assert!(s.starts_with(prefix));
        assert_eq!(s.len(), TOKEN_LEN);
        assert!(s[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
        let (head, sum) = s.split_at(TOKEN_LEN - 6);
        assert_eq!(checksum(head.as_bytes()), sum);
    }
    // A well-formed body with its checksum appended always passes: the
    // check and the checksum agree on every input.
    if s.len() == TOKEN_LEN - 6 && (s.starts_with("kmt_") || s.starts_with("kma_")) {
        let whole = format!("{s}{}", checksum(s.as_bytes()));
        let shaped = s[4..].bytes().all(|b| b.is_ascii_alphanumeric());
        assert_eq!(check(&whole).is_ok(), shaped);
    }
});
