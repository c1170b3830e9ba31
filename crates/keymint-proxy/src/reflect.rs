//! The upstream's key on its way back (docs/design/0044): a response that
//! carries the key the proxy sent (an error page that prints the request,
//! an echo endpoint, a redirect that keeps the query, a stream that quotes
//! its request) has it replaced before the agent sees it, in every spelling
//! an encoder may give it. Pure (no I/O): whole bodies and header values go
//! through [`redact_key`], a stream's chunks through [`StreamRedactor`].

use std::sync::Arc;

use bytes::Bytes;
use percent_encoding::percent_encode;
use zeroize::Zeroizing;

use crate::request::QUERY_VALUE;

/// The upstream's key as this request sent it (a provider's static key, or
/// the short-lived token of a federated one), kept to the end of the
/// request so that a response that carries it back cannot hand it to the
/// agent: the agent must never hold it.
#[derive(Clone)]
pub(crate) struct SentKey {
    pub(crate) key: Arc<Zeroizing<String>>,
    /// Sent as a query parameter (percent-encoded there).
    pub(crate) in_query: bool,
}

/// The spellings of the key a response may carry it back in.
pub(crate) struct KeyForms {
    key: Arc<Zeroizing<String>>,
    /// The others, where the key has characters an encoder changes (none
    /// for a key of letters, digits, `-` and `_`: nothing is allocated).
    others: Vec<Zeroizing<String>>,
}

impl SentKey {
    /// The key as sent, and as it reads once encoded: percent-encoded as
    /// in the query (upper- and lower-case hex digits) when it went there;
    /// in JSON with `/` written `\/` (PHP's default) or `+` written
    /// `\u002B` (.NET's default encoder, which escapes `+`, `<`, `>`, `&`
    /// and `'`).
    pub(crate) fn forms(&self) -> KeyForms {
        let key = self.key.as_str();
        let mut others: Vec<Zeroizing<String>> = Vec::new();
        let mut add = |form: String| {
            if form != key && !others.iter().any(|o| **o == form) {
                others.push(Zeroizing::new(form));
            }
        };
        if self.in_query {
            let upper = Zeroizing::new(percent_encode(key.as_bytes(), QUERY_VALUE).to_string());
            add(lower_escapes(&upper));
            add(upper.to_string());
        }
        if key.contains('/') {
            add(key.replace('/', "\\/"));
        }
        if key.contains('+') {
            add(key.replace('+', "\\u002B"));
            add(key.replace('+', "\\u002b"));
        }
        KeyForms {
            key: Arc::clone(&self.key),
            others,
        }
    }
}

/// `%2F` as `%2f`: every escape's hex digits in lower case. The input is
/// percent-encoded, so each `%` starts an escape.
fn lower_escapes(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut digits = 0;
    for c in encoded.chars() {
        if digits > 0 {
            out.push(c.to_ascii_lowercase());
            digits -= 1;
        } else {
            digits = if c == '%' { 2 } else { 0 };
            out.push(c);
        }
    }
    out
}

impl KeyForms {
    fn iter(&self) -> impl Iterator<Item = &[u8]> + Clone {
        std::iter::once(self.key.as_bytes()).chain(self.others.iter().map(|o| o.as_bytes()))
    }

    /// A key this short could not be told from noise: not searched for.
    /// Every other form is at least as long as the key.
    fn searchable(&self) -> bool {
        self.key.len() >= 8
    }

    fn longest(&self) -> usize {
        self.iter().map(<[u8]>::len).max().unwrap_or(0)
    }

    #[cfg(test)]
    pub(crate) fn count(&self) -> usize {
        1 + self.others.len()
    }
}

/// What goes in place of the key.
pub(crate) const KEY_REDACTED: &[u8] = b"[key redacted by keymint]";

/// `hay` with every occurrence of the key, in any of its forms, replaced
/// by [`KEY_REDACTED`]; `None` when it holds none (nearly always: one
/// scan per form, no copy).
pub(crate) fn redact_key(hay: &[u8], key: &KeyForms) -> Option<Bytes> {
    if !key.searchable() || hay.len() < key.key.len() {
        return None;
    }
    let forms = key.iter();
    if !forms.clone().any(|f| find(hay, f).is_some()) {
        return None;
    }
    let mut out = hay.to_vec();
    for f in forms {
        let mut clean = Vec::with_capacity(out.len());
        let mut rest = &out[..];
        while let Some(i) = find(rest, f) {
            clean.extend_from_slice(&rest[..i]);
            clean.extend_from_slice(KEY_REDACTED);
            rest = &rest[i + f.len()..];
        }
        clean.extend_from_slice(rest);
        out = clean;
    }
    Some(Bytes::from(out))
}

/// Where `needle` first starts in `hay`. Candidates are the places of the
/// needle's last byte (a key ends in random characters), each checked
/// whole: on a response of a few hundred bytes this costs a tenth of
/// building a general substring searcher (`memmem`) for every response.
pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&last, _) = needle.split_last()?;
    let first = needle[0];
    memchr::memchr_iter(last, hay).find_map(|i| {
        let start = (i + 1).checked_sub(needle.len())?;
        (hay[start] == first && hay[start..=i] == *needle).then_some(start)
    })
}

/// A streamed body's chunks on their way to the agent, with the key
/// redacted even where a chunk boundary cuts it.
///
/// No form of the key holds a line break, so an occurrence cut by the end
/// of a chunk lies in that chunk's last line, and in its last `longest - 1`
/// bytes. Those bytes (at most that many, and only after the last line
/// break) are held back and searched again with the next chunk; every
/// other byte is passed on at once. An event stream's chunks nearly always
/// end with an event's blank line, so nothing is held and nothing waits.
pub(crate) struct StreamRedactor {
    forms: KeyForms,
    hold_at_most: usize,
    held: Vec<u8>,
    /// Called once, at the first occurrence (counted and logged there).
    report: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl std::fmt::Debug for StreamRedactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key, nor the bytes held (a part of it, maybe).
        f.debug_struct("StreamRedactor")
            .field("held", &self.held.len())
            .finish_non_exhaustive()
    }
}

impl StreamRedactor {
    /// `None` when the key is too short to be searched for. `report` is
    /// called at the first occurrence found.
    pub(crate) fn new(
        forms: KeyForms,
        report: Option<Box<dyn FnOnce() + Send + Sync>>,
    ) -> Option<Self> {
        forms.searchable().then(|| Self {
            hold_at_most: forms.longest().saturating_sub(1),
            forms,
            held: Vec::new(),
            report,
        })
    }

    /// One chunk in; what may be passed on now (maybe nothing yet).
    pub(crate) fn pass(&mut self, chunk: Bytes) -> Bytes {
        let whole = if self.held.is_empty() {
            chunk
        } else {
            let mut joined = std::mem::take(&mut self.held);
            joined.extend_from_slice(&chunk);
            Bytes::from(joined)
        };
        let whole = match redact_key(&whole, &self.forms) {
            Some(clean) => {
                if let Some(report) = self.report.take() {
                    report();
                }
                clean
            }
            None => whole,
        };
        let keep = self.tail(&whole);
        let cut = whole.len() - keep;
        self.held.extend_from_slice(&whole[cut..]);
        whole.slice(..cut)
    }

    /// The end of the stream: what was held back.
    pub(crate) fn finish(&mut self) -> Option<Bytes> {
        (!self.held.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.held)))
    }

    /// How many of the last bytes may begin an occurrence that the next
    /// chunk completes.
    fn tail(&self, b: &[u8]) -> usize {
        let last = &b[b.len().saturating_sub(self.hold_at_most)..];
        last.iter()
            .rposition(|&c| c == b'\n')
            .map_or(last.len(), |i| last.len() - i - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(key: &str, in_query: bool) -> SentKey {
        SentKey {
            key: Arc::new(Zeroizing::new(key.to_owned())),
            in_query,
        }
    }

    fn mark() -> &'static str {
        std::str::from_utf8(KEY_REDACTED).unwrap()
    }

    #[test]
    fn the_upstreams_key_is_redacted_in_every_form_it_comes_back_in() {
        let k = sent("uk_fake/Zx9+Qw8Er7", true);
        let forms = k.forms();
        let mark = mark();
        for (hay, want) in [
            (
                "key uk_fake/Zx9+Qw8Er7 twice uk_fake/Zx9+Qw8Er7".to_owned(),
                format!("key {mark} twice {mark}"),
            ),
            (
                "?api_key=uk_fake%2FZx9%2BQw8Er7&q=1".to_owned(),
                format!("?api_key={mark}&q=1"),
            ),
            (
                "?api_key=uk_fake%2fZx9%2bQw8Er7&q=1".to_owned(),
                format!("?api_key={mark}&q=1"),
            ),
            (
                r#"{"k":"uk_fake\/Zx9+Qw8Er7"}"#.to_owned(),
                format!(r#"{{"k":"{mark}"}}"#),
            ),
            (
                r#"{"k":"uk_fake/Zx9\u002BQw8Er7","l":"uk_fake/Zx9\u002bQw8Er7"}"#.to_owned(),
                format!(r#"{{"k":"{mark}","l":"{mark}"}}"#),
            ),
        ] {
            let got = redact_key(hay.as_bytes(), &forms).expect("found");
            assert_eq!(std::str::from_utf8(&got).unwrap(), want);
        }
        assert!(
            redact_key(b"uk_fake/Zx9+Qw8E", &forms).is_none(),
            "a part is not the key"
        );
        assert!(redact_key(b"", &forms).is_none());
        // Sent in a header: its percent-encoded forms are not looked for.
        assert_eq!(sent("uk_fake/Zx9+Qw8Er7", false).forms().count(), 4);
        assert_eq!(forms.count(), 6);
        // A key of letters, digits, `-` and `_` has one form.
        assert_eq!(sent("sk-fake_0123456789", true).forms().count(), 1);
        // A key too short to tell from noise is not searched for.
        assert!(redact_key(b"abc", &sent("abc", false).forms()).is_none());
        assert!(StreamRedactor::new(sent("abc", false).forms(), None).is_none());
    }

    #[test]
    fn lower_escapes_changes_only_the_hex_digits() {
        assert_eq!(lower_escapes("A%2FB%2BC%25D"), "A%2fB%2bC%25D");
        assert_eq!(lower_escapes("ABC"), "ABC");
    }

    #[test]
    fn find_is_a_substring_search() {
        let naive = |h: &[u8], n: &[u8]| h.windows(n.len()).position(|w| w == n);
        // Every haystack and needle over a two-letter alphabet up to 7 and
        // 4 bytes: overlaps, repeats, needles at either end.
        for hl in 0..=7u32 {
            for hb in 0..(1u32 << hl) {
                let h: Vec<u8> = (0..hl).map(|i| b'a' + ((hb >> i) & 1) as u8).collect();
                for nl in 1..=4u32 {
                    for nb in 0..(1u32 << nl) {
                        let n: Vec<u8> = (0..nl).map(|i| b'a' + ((nb >> i) & 1) as u8).collect();
                        assert_eq!(find(&h, &n), naive(&h, &n), "{h:?} {n:?}");
                    }
                }
            }
        }
        assert_eq!(find(b"abc", b""), None);
    }

    /// Whatever the chunks' sizes, what comes out is the whole stream
    /// redacted, the key in none of its forms, and the report made once.
    #[test]
    fn a_key_cut_by_chunk_boundaries_is_redacted_all_the_same() {
        let key = "uk_fake/Zx9+Qw8Er7";
        let stream = format!(
            "data: {{\"echo\":\"{key}\"}}\n\ndata: {{\"q\":\"?k=uk_fake%2FZx9%2BQw8Er7\"}}\n\n\
             data: {{\"php\":\"uk_fake\\/Zx9+Qw8Er7\"}}\n\ndata: [DONE]\n\nlast {key}"
        );
        let want = redact_key(stream.as_bytes(), &sent(key, true).forms()).unwrap();
        assert_eq!(
            std::str::from_utf8(&want).unwrap().matches(mark()).count(),
            4
        );
        for size in 1..=stream.len() {
            let reports = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let r = Arc::clone(&reports);
            let mut red = StreamRedactor::new(
                sent(key, true).forms(),
                Some(Box::new(move || {
                    r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                })),
            )
            .unwrap();
            let mut out = Vec::new();
            for chunk in stream.as_bytes().chunks(size) {
                let passed = red.pass(Bytes::copy_from_slice(chunk));
                assert!(
                    red.held.len() <= red.hold_at_most,
                    "{size}: held {}",
                    red.held.len()
                );
                out.extend_from_slice(&passed);
            }
            out.extend_from_slice(&red.finish().unwrap_or_default());
            assert_eq!(out, want, "chunks of {size}");
            assert_eq!(reports.load(std::sync::atomic::Ordering::Relaxed), 1);
        }
    }

    /// A chunk that ends a line is passed on whole at once: an event
    /// stream's tokens are not held back waiting for the next chunk.
    #[test]
    fn a_chunk_that_ends_its_line_waits_for_nothing() {
        let mut red = StreamRedactor::new(sent("sk-fake_0123456789", false).forms(), None).unwrap();
        let event =
            Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n");
        assert_eq!(red.pass(event.clone()), event);
        assert!(red.finish().is_none());
        // Cut mid-line: the key's length less one is held (18 - 1), then
        // passed on with the next chunk.
        let line = b"data: {\"content\":\"a long partial line\"";
        let passed = red.pass(Bytes::from_static(line));
        assert_eq!(&passed[..], &line[..line.len() - 17]);
        let mut rest = line[line.len() - 17..].to_vec();
        rest.extend_from_slice(b"}\n\n");
        assert_eq!(&red.pass(Bytes::from_static(b"}\n\n"))[..], &rest[..]);
        assert!(red.finish().is_none());
    }
}
