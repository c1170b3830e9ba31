//! The scanner's content engine: `ContentScanner::scan_bytes` with the
//! built-in rules (prefilter, regexes around hits, gzip, binary skip,
//! structured documents, pairing) and the proxy's `Screen::find` on the
//! same bytes.
//!
//! Checked: locations are inside the content (1-based line and column,
//! offset within the bytes when nothing was decompressed); the same bytes
//! scan the same twice; the screen's matches are in bounds, ordered and
//! do not overlap, as documented.
#![no_main]

use std::sync::OnceLock;

use keymint_scan::content::{ContentScanner, Outcome, is_gzip};
use keymint_scan::engine::Engine;
use keymint_scan::finding::{Fingerprinter, Source};
use keymint_scan::screen::Screen;
use libfuzzer_sys::fuzz_target;

fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| Engine::with_rules(&[]).expect("built-in rules"))
}

fn scan(data: &[u8], name: &str) -> (Outcome, Vec<(usize, String, u64, u64, u64)>) {
    let fp = Fingerprinter::default();
    let mut scanner = ContentScanner::new(engine(), &fp);
    let mut hits = Vec::new();
    let source = Source::File {
        path: name.to_owned(),
    };
    let outcome = scanner
        .scan_bytes(data, &source, name, &mut hits)
        .unwrap_or(Outcome::Binary);
    let hits = hits
        .into_iter()
        .map(|h| {
            (
                h.rule,
                h.secret.expose().to_owned(),
                h.location.line,
                h.location.column,
                h.location.offset,
            )
        })
        .collect();
    (outcome, hits)
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, content)) = data.split_first() else {
        return;
    };
    // The name picks the structured readers (notebooks, exports, env files).
    let name = ["a.txt", "a.ipynb", "slack.json", ".env", "a.json"][usize::from(sel % 5)];
    let (outcome, hits) = scan(content, name);
    for (_, secret, line, column, offset) in &hits {
        assert!(*line >= 1 && *column >= 1);
        assert!(!secret.is_empty());
        if !is_gzip(content) {
            assert!(*offset as usize <= content.len(), "offset past the end");
        }
    }
    if let Outcome::Scanned { bytes } = outcome
        && !is_gzip(content)
    {
        assert_eq!(bytes as usize, content.len());
    }
    assert_eq!(scan(content, name).1, hits, "scanning is not deterministic");

    let screen = Screen::builtin().expect("built-in screen");
    let found = screen.find(content);
    let mut end = 0;
    for m in &found {
        assert!(m.range.start >= end, "screen matches overlap or are unordered");
        assert!(m.range.start < m.range.end && m.range.end <= content.len());
        end = m.range.end;
    }
});
