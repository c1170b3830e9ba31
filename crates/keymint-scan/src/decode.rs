//! Secrets written in base64: a Kubernetes `Secret`'s `data`, a value a CI
//! system or a config tool encoded, a `.env` file stored as one string.
//!
//! In content whose words say it holds encoded values ([`HINTS`]: a
//! Kubernetes `Secret`, `base64`, `_B64`, `encoded`…), runs of the base64
//! alphabet (standard or URL-safe) long enough to hold a key are decoded;
//! a run whose decoding is printable text is scanned again with the text
//! around it (so a name beside the value still gives a context rule its
//! context), and a match that lies wholly inside the decoded part is a
//! finding at the run's place. Runs that decode to binary (digests, random
//! keys, images) are dropped after their first few bytes: they cost a
//! decode of 12 characters.
//!
//! Finding the runs reads each window of [`MIN_RUN`] bytes from its end and
//! jumps past the last byte outside the alphabet, so ordinary text costs a
//! few table reads per [`MIN_RUN`] bytes; a stretch of the alphabet (a
//! digest, a key) is read byte by byte to its end.

/// Words that say a document holds encoded values: a Kubernetes `Secret`
/// (`kind: Secret`), an AWS `SecretString`, `base64`/`b64enc`/`_B64`
/// names, `encoded` ones, HTTP Basic credentials. Only content holding one
/// of them is searched for runs: finding runs reads most bytes one at a
/// time (about a cycle per byte, as much as the whole prefilter), and plain
/// source, logs and lockfiles are full of digests and keys that are runs
/// but decode to nothing. The scanner's engine searches them with the
/// rules' keywords, in the same passes ([`crate::engine::Engine::scan_hinted`]).
pub const HINTS: &[&str] = &[
    "Secret", "base64", "Base64", "BASE64", "b64enc", "b64dec", "_b64", "_B64", "ncoded", "NCODED",
    "Basic ",
];

/// The shortest run decoded: 28 characters hold 21 bytes, the shortest key
/// worth reporting with some margin (a rule's own floor applies after).
pub const MIN_RUN: usize = 28;

/// The most characters of one run decoded (a longer run, an embedded file,
/// is decoded up to here).
const MAX_RUN: usize = 64 << 10;

/// Bytes of the text before and after a run given to the rules with its
/// decoding: a name such as `COHERE_API_KEY:` before the value.
pub const CONTEXT: usize = 256;

/// The characters decoded before deciding whether a run is text.
const PROBE: usize = 12;

/// The value of each base64 character (`+`/`-` 62, `/`/`_` 63), or
/// `INVALID`.
const INVALID: u8 = 0xff;

const VALUES: [u8; 256] = {
    let mut t = [INVALID; 256];
    let mut i = 0;
    while i < 26 {
        t[b'A' as usize + i] = i as u8;
        t[b'a' as usize + i] = 26 + i as u8;
        i += 1;
    }
    let mut d = 0;
    while d < 10 {
        t[b'0' as usize + d] = 52 + d as u8;
        d += 1;
    }
    t[b'+' as usize] = 62;
    t[b'-' as usize] = 62;
    t[b'/' as usize] = 63;
    t[b'_' as usize] = 63;
    t
};

fn in_alphabet(b: u8) -> bool {
    VALUES[b as usize] != INVALID
}

/// Every run of [`MIN_RUN`] or more base64 characters in `hay`, as
/// `(start, end)`, in order. A run's padding (`=`) is not part of it.
pub fn runs(hay: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + MIN_RUN <= hay.len() {
        // The last byte outside the alphabet in the window, if any: no run
        // of MIN_RUN can start at or before it.
        let window = &hay[i..i + MIN_RUN];
        if let Some(bad) = window.iter().rposition(|&b| !in_alphabet(b)) {
            i += bad + 1;
            continue;
        }
        let end = hay[i + MIN_RUN..]
            .iter()
            .position(|&b| !in_alphabet(b))
            .map_or(hay.len(), |p| i + MIN_RUN + p);
        out.push((i, end));
        i = end + 1;
    }
    out
}

/// Whether a decoded byte may be part of text holding a secret: printable
/// ASCII, tab, line feed, carriage return.
fn textual(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | b'\r' | b' '..=b'~')
}

/// The decoding of `run` (characters of the alphabet only) when it is text,
/// else `None`. Only the first [`MAX_RUN`] characters are decoded.
pub fn decode_text(run: &[u8]) -> Option<Vec<u8>> {
    let run = &run[..run.len().min(MAX_RUN)];
    // A last group of one character holds no whole byte.
    let run = if run.len() % 4 == 1 {
        &run[..run.len() - 1]
    } else {
        run
    };
    let mut out = Vec::with_capacity(run.len() / 4 * 3 + 2);
    let mut checked = 0;
    for group in run.chunks(4) {
        let mut acc: u32 = 0;
        for &c in group {
            acc = (acc << 6) | u32::from(VALUES[c as usize]);
        }
        let bytes = acc.to_be_bytes();
        match group.len() {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&[(acc >> 10) as u8, (acc >> 2) as u8]),
            2 => out.push((acc >> 4) as u8),
            _ => {}
        }
        // Binary is told from text early: a random byte is printable ASCII
        // with odds of about 3 in 8, so 9 in a row are rare.
        if checked < PROBE * 3 / 4 || group.len() < 4 {
            if !out[checked..].iter().all(|&b| textual(b)) {
                return None;
            }
            checked = out.len();
        }
    }
    if !out[checked..].iter().all(|&b| textual(b)) {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};

    fn encode(data: &[u8], url_safe: bool) -> String {
        if url_safe {
            URL_SAFE.encode(data)
        } else {
            STANDARD.encode(data)
        }
    }

    #[test]
    fn only_content_that_names_an_encoding_is_searched() {
        let engine = crate::engine::Engine::with_rules(&[]).unwrap();
        let hinted = |text: &[u8]| engine.scan_hinted(text).1;
        assert!(hinted(b"apiVersion: v1\nkind: Secret\ndata:\n"));
        assert!(hinted(b"OPENAI_KEY_B64=c2st"));
        assert!(hinted(b"echo $X | base64 -d"));
        assert!(hinted(b"Authorization: Basic dXNlcjpwYXNz"));
        // A hint that is also a rule's keyword, and one at the very end.
        assert!(hinted(b"SECRET Secret"));
        assert!(hinted(b"x_b64"));
        assert!(!hinted(
            b"sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        ));
        assert!(!hinted(b"fn main() { println!(\"data\"); }"));
        // The screen's engine searches no hint.
        let screen = crate::engine::Engine::build(
            crate::rules::load_rules(&[]).unwrap(),
            crate::engine::Mode::SCREEN,
        )
        .unwrap();
        assert!(!screen.scan_hinted(b"kind: Secret base64").1);
    }

    #[test]
    fn runs_are_found_whole_and_short_ones_are_not() {
        let enc = encode(b"a text long enough to be worth decoding", false);
        let text = format!("key: {enc}\nshort: c2hvcnQ=\n{enc}");
        let found = runs(text.as_bytes());
        let unpadded = enc.trim_end_matches('=');
        assert_eq!(found.len(), 2, "{found:?}");
        for (s, e) in found {
            assert_eq!(&text[s..e], unpadded);
        }
        assert!(runs(b"hello world, nothing long here").is_empty());
        // A run exactly MIN_RUN long at the very end.
        let tail = "A".repeat(MIN_RUN);
        let text = format!("x {tail}");
        assert_eq!(runs(text.as_bytes()), vec![(2, 2 + MIN_RUN)]);
    }

    /// Runs as a byte-by-byte reading finds them.
    fn runs_by_bytes(hay: &[u8]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut start = None;
        for (k, &b) in hay.iter().chain(std::iter::once(&b' ')).enumerate() {
            let inside = VALUES[b as usize] != INVALID;
            match (inside, start) {
                (true, None) => start = Some(k),
                (false, Some(s)) => {
                    if k - s >= MIN_RUN {
                        out.push((s, k));
                    }
                    start = None;
                }
                _ => {}
            }
        }
        out
    }

    #[test]
    fn the_block_reading_finds_the_runs_the_byte_reading_does() {
        // Texts of every length up to 300 whose separators are rare or
        // frequent, so runs of every length meet block boundaries.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..300 {
            for sparse in [3u64, 20, 60] {
                let hay: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        match x % sparse {
                            0 => b" =\n\"\x00\xff.:"[(x >> 8) as usize % 8],
                            _ => b"Az09+/-_"[(x >> 16) as usize % 8],
                        }
                    })
                    .collect();
                assert_eq!(runs(&hay), runs_by_bytes(&hay), "{hay:?}");
            }
        }
    }

    #[test]
    fn text_decodes_in_both_alphabets_and_binary_does_not() {
        for len in 21..=40 {
            let text: Vec<u8> = (0..len).map(|i| b"sk-?~>_xyz"[i % 10]).collect();
            for url_safe in [false, true] {
                let enc = encode(&text, url_safe);
                let run = enc.trim_end_matches('=');
                assert_eq!(decode_text(run.as_bytes()).as_deref(), Some(&text[..]));
            }
        }
        // 64 hex digits (a SHA-256) and random bytes decode to binary.
        let hex = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        assert_eq!(decode_text(hex.as_bytes()), None);
        let random: Vec<u8> = (0u32..48)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        assert_eq!(
            decode_text(encode(&random, false).trim_end_matches('=').as_bytes()),
            None
        );
        // Text with a control byte at the end is not text.
        let mut tail = b"a line of printable text, then".to_vec();
        tail.push(0x01);
        assert_eq!(
            decode_text(encode(&tail, false).trim_end_matches('=').as_bytes()),
            None
        );
    }
}
