//! The matching engine: a literal prefilter (Aho-Corasick over every rule's
//! keywords, and a second one over the usual case variants of context
//! words) over raw bytes, then each rule's regex only in a window around a
//! keyword hit, then offline filters (placeholders, entropy, character
//! classes, checksums) and the inline allow comment.
//!
//! The engine is immutable and `Sync`: one is shared by all worker threads.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use regex::bytes::Regex;

use crate::rules::{Confidence, RuleError, RuleSpec, Validator, compile_pattern};

/// The marker that, on the same line as a finding, suppresses it.
pub const ALLOW_MARKER: &[u8] = b"keymint:allow";

/// A rule ready to run.
#[derive(Debug)]
pub struct CompiledRule {
    pub spec: RuleSpec,
    regex: Regex,
    secret_group: Option<usize>,
    /// Index of the rule named by `pairs_with`.
    pub pair: Option<usize>,
}

/// One accepted match: the secret's byte span in the haystack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawMatch {
    pub rule: usize,
    pub start: usize,
    pub end: usize,
}

/// Most literals one prefilter automaton holds (SIMD Teddy's limit).
const MAX_LITERALS: usize = 64;

/// The case variants a context word is written in: as given, lowercase,
/// uppercase, capitalised (`AccessKey`, `accesskey`, `ACCESSKEY`, `Accesskey`).
fn case_variants(k: &str) -> Vec<String> {
    let lower = k.to_ascii_lowercase();
    let mut cap = lower.clone();
    if let Some(first) = cap.get_mut(..1) {
        first.make_ascii_uppercase();
    }
    let mut v = vec![k.to_owned(), lower, k.to_ascii_uppercase(), cap];
    v.sort();
    v.dedup();
    v
}

/// One literal automaton and, for each of its patterns, the rules it
/// triggers.
#[derive(Debug)]
struct Prefilter {
    ac: Option<AhoCorasick>,
    keyword_rules: Vec<Vec<usize>>,
}

impl Prefilter {
    fn new(
        keywords: &[String],
        keyword_rules: Vec<Vec<usize>>,
        overlapping: bool,
    ) -> Result<Self, RuleError> {
        if keywords.is_empty() {
            return Ok(Self {
                ac: None,
                keyword_rules,
            });
        }
        let ac = AhoCorasickBuilder::new()
            .match_kind(if overlapping {
                MatchKind::Standard
            } else {
                MatchKind::LeftmostFirst
            })
            .build(keywords)
            .map_err(|e| RuleError::Invalid {
                file: "(rules)".into(),
                id: "(keywords)".into(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            ac: Some(ac),
            keyword_rules,
        })
    }
}

/// The compiled rule set.
#[derive(Debug)]
pub struct Engine {
    rules: Vec<CompiledRule>,
    /// Token keywords, and the usual case variants of context words: small
    /// automata of at most [`MAX_LITERALS`] each (each runs as SIMD Teddy)
    /// are faster than one large or one ASCII-case-insensitive automaton.
    prefilters: Vec<Prefilter>,
    max_window: usize,
    mode: Mode,
}

/// How an engine searches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mode {
    /// Whether `keymint:allow` on a line suppresses its findings (the
    /// scanner: yes; the outbound screen: no, a sender must not be able to
    /// wave its own secret through).
    pub allow_marker: bool,
    /// Whether every keyword occurrence triggers its rules, also where
    /// keywords overlap (`sk-` and `-or-v1-` in `sk-or-v1-`). The scanner's
    /// keywords are chosen not to overlap and it keeps the faster
    /// leftmost-first search; the screen, whose broad rules add short
    /// keywords, searches overlapping.
    pub every_keyword: bool,
}

impl Mode {
    pub const SCANNER: Self = Self {
        allow_marker: true,
        every_keyword: false,
    };
    pub const SCREEN: Self = Self {
        allow_marker: false,
        every_keyword: true,
    };
}

impl Engine {
    /// Compiles checked rule specs (see [`crate::rules::load_rules`]).
    pub fn new(specs: Vec<RuleSpec>) -> Result<Self, RuleError> {
        Self::build(specs, Mode::SCANNER)
    }

    /// Compiles checked rule specs for the given mode.
    pub(crate) fn build(specs: Vec<RuleSpec>, mode: Mode) -> Result<Self, RuleError> {
        let mut sets: [(Vec<String>, Vec<Vec<usize>>); 2] = Default::default();
        let mut rules = Vec::with_capacity(specs.len());
        let mut max_window = 0;
        for (idx, spec) in specs.iter().enumerate() {
            let regex = compile_pattern(&spec.pattern).map_err(|e| RuleError::Invalid {
                file: "(rules)".into(),
                id: spec.id.clone(),
                reason: format!("pattern does not compile: {e}"),
            })?;
            let secret_group = regex.capture_names().position(|n| n == Some("secret"));
            let (keywords, keyword_rules) = &mut sets[usize::from(spec.keywords_ignore_case)];
            let expanded: Vec<String> = if spec.keywords_ignore_case {
                spec.keywords
                    .iter()
                    .flat_map(|k| case_variants(k))
                    .collect()
            } else {
                spec.keywords.clone()
            };
            for kw in expanded {
                match keywords.iter().position(|k| *k == kw) {
                    Some(p) => keyword_rules[p].push(idx),
                    None => {
                        keywords.push(kw);
                        keyword_rules.push(vec![idx]);
                    }
                }
            }
            max_window = max_window.max(spec.window + spec.window_before);
            let pair = spec
                .pairs_with
                .as_ref()
                .and_then(|p| specs.iter().position(|s| &s.id == p));
            rules.push(CompiledRule {
                spec: spec.clone(),
                regex,
                secret_group,
                pair,
            });
        }
        let mut prefilters = Vec::new();
        for (keywords, keyword_rules) in sets {
            // One automaton per `MAX_LITERALS` keywords: past that Teddy
            // gives way to a far slower search.
            let mut rules_left = keyword_rules.into_iter();
            for chunk in keywords.chunks(MAX_LITERALS) {
                let chunk_rules = rules_left.by_ref().take(chunk.len()).collect();
                prefilters.push(Prefilter::new(chunk, chunk_rules, mode.every_keyword)?);
            }
        }
        Ok(Self {
            rules,
            prefilters,
            max_window,
            mode,
        })
    }

    /// The built-in rules plus the given user rule files `(name, text)`.
    pub fn with_rules(user_files: &[(String, String)]) -> Result<Self, RuleError> {
        Self::new(crate::rules::load_rules(user_files)?)
    }

    /// How many literals each prefilter automaton holds (token keywords
    /// first, then the case variants of context words).
    pub fn prefilter_sizes(&self) -> Vec<usize> {
        self.prefilters
            .iter()
            .map(|p| p.keyword_rules.len())
            .collect()
    }

    pub fn rules(&self) -> &[CompiledRule] {
        &self.rules
    }

    pub fn rule(&self, idx: usize) -> &CompiledRule {
        &self.rules[idx]
    }

    /// The overlap that chunked scanning must keep so that no match that fits
    /// in a rule's window is cut in two.
    pub fn overlap(&self) -> usize {
        self.max_window.max(4096)
    }

    /// Every accepted match in `hay`, ordered by position, with matches
    /// contained in an earlier (or longer) match of another rule removed.
    pub fn scan(&self, hay: &[u8]) -> Vec<RawMatch> {
        let mut windows: Vec<(usize, usize, usize)> = Vec::new();
        for pf in &self.prefilters {
            let Some(ac) = &pf.ac else { continue };
            let mut hit = |m: aho_corasick::Match| {
                for &r in &pf.keyword_rules[m.pattern().as_usize()] {
                    let spec = &self.rules[r].spec;
                    let s = m.start().saturating_sub(spec.window_before);
                    let e = m.end().saturating_add(spec.window).min(hay.len());
                    windows.push((r, s, e));
                }
            };
            // An overlapping search fails only on an automaton built
            // leftmost-first, which `every_keyword` does not build.
            let every = if self.mode.every_keyword {
                ac.try_find_overlapping_iter(hay).ok()
            } else {
                None
            };
            match every {
                Some(all) => all.for_each(&mut hit),
                None => ac.find_iter(hay).for_each(&mut hit),
            }
        }
        if windows.is_empty() {
            return Vec::new();
        }
        windows.sort_unstable();
        let mut out = Vec::new();
        let mut i = 0;
        while i < windows.len() {
            let (r, s, mut e) = windows[i];
            i += 1;
            while i < windows.len() && windows[i].0 == r && windows[i].1 <= e {
                e = e.max(windows[i].2);
                i += 1;
            }
            self.run_rule(r, hay, s, e, &mut out);
        }
        out.sort_unstable_by(|a, b| {
            a.start
                .cmp(&b.start)
                .then(b.end.cmp(&a.end))
                .then(a.rule.cmp(&b.rule))
        });
        let mut kept: Vec<RawMatch> = Vec::with_capacity(out.len());
        let mut cover_end = 0;
        for m in out {
            if !kept.is_empty() && m.end <= cover_end {
                continue;
            }
            cover_end = cover_end.max(m.end);
            kept.push(m);
        }
        kept
    }

    fn run_rule(&self, r: usize, hay: &[u8], start: usize, end: usize, out: &mut Vec<RawMatch>) {
        let rule = &self.rules[r];
        let window = &hay[..end];
        let mut pos = start;
        while pos < end {
            // Most windows hold no match: a plain search is cheaper than
            // captures, which run only on the match found.
            let Some(found) = rule.regex.find_at(window, pos) else {
                break;
            };
            let Some(caps) = rule
                .regex
                .captures_at(&window[..found.end()], found.start())
            else {
                break;
            };
            let Some(whole) = caps.get(0) else { break };
            let secret = rule.secret_group.and_then(|g| caps.get(g)).unwrap_or(whole);
            if accept(&rule.spec, secret.as_bytes())
                && !(self.mode.allow_marker && allowed_inline(hay, secret.start(), secret.end()))
            {
                out.push(RawMatch {
                    rule: r,
                    start: secret.start(),
                    end: secret.end(),
                });
            }
            pos = secret.end().max(whole.start() + 1);
        }
    }
}

/// The entropy floor of rules that set none: every random token of 16
/// characters or more is above it; patterns such as `aBcDaBcD…` are not.
pub const DEFAULT_MIN_ENTROPY: f64 = 3.0;

/// The offline filters of one candidate secret.
pub fn accept(spec: &RuleSpec, secret: &[u8]) -> bool {
    if is_placeholder(secret) {
        return false;
    }
    if shannon_entropy(secret) < spec.min_entropy.unwrap_or(DEFAULT_MIN_ENTROPY) {
        return false;
    }
    if let Some(min) = spec.min_char_classes
        && char_classes(secret) < min
    {
        return false;
    }
    match spec.validator {
        None => true,
        Some(Validator::GithubCrc32) => github_checksum_ok(secret),
        Some(Validator::Keymint) => std::str::from_utf8(secret)
            .map(|s| keymint_core::token::check(s).is_ok())
            .unwrap_or(false),
    }
}

/// Whether the line holding `start..end` carries the allow marker.
fn allowed_inline(hay: &[u8], start: usize, end: usize) -> bool {
    const MAX: usize = 4096;
    let lo = start.saturating_sub(MAX);
    let line_start = memchr::memrchr(b'\n', &hay[lo..start]).map_or(lo, |p| lo + p + 1);
    let hi = end.saturating_add(MAX).min(hay.len());
    let line_end = memchr::memchr(b'\n', &hay[end..hi]).map_or(hi, |p| end + p);
    memchr::memmem::find(&hay[line_start..line_end], ALLOW_MARKER).is_some()
}

/// Documentation examples and template placeholders: long runs of one
/// character, `x`/`X` fillers, template syntax, well-known filler words and
/// `EXAMPLE` in upper case anywhere, which AWS's documentation puts in every
/// example key (`AKIAIOSFODNN7EXAMPLE`, `AKIAEXAMPLE…`, `…EXAMPLEKEY`, PEM
/// bodies): seven fixed letters never occur in a random key by chance.
pub fn is_placeholder(secret: &[u8]) -> bool {
    if secret
        .iter()
        .any(|b| matches!(b, b'<' | b'>' | b'{' | b'}' | b'$' | b'*' | b'%'))
        || memchr::memmem::find(secret, b"EXAMPLE").is_some()
    {
        return true;
    }
    // Key blocks legitimately hold runs such as `AAAAAAAA`.
    if secret.len() > 256 || secret.starts_with(b"-----BEGIN") {
        return false;
    }
    let mut run = 1;
    for w in secret.windows(2) {
        if w[0] == w[1] && w[0] != b'\n' && w[0] != b'-' {
            run += 1;
            if run >= 6 {
                return true;
            }
        } else {
            run = 1;
        }
    }
    let lower = secret.to_ascii_lowercase();
    const WORDS: &[&[u8]] = &[
        b"xxxx",
        b"your",
        b"placeholder",
        b"redacted",
        b"changeme",
        b"replace",
        b"insert",
        b"dummy",
        b"12345678",
        b"abcdefgh",
        b"...",
    ];
    WORDS
        .iter()
        .any(|w| memchr::memmem::find(&lower, w).is_some())
}

/// Shannon entropy in bits per byte.
pub fn shannon_entropy(data: &[u8]) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &b in data {
        counts[usize::from(b)] += 1;
    }
    let n = data.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

/// How many of lowercase, uppercase and digits occur.
pub fn char_classes(data: &[u8]) -> u8 {
    let lower = data.iter().any(u8::is_ascii_lowercase);
    let upper = data.iter().any(u8::is_ascii_uppercase);
    let digit = data.iter().any(u8::is_ascii_digit);
    u8::from(lower) + u8::from(upper) + u8::from(digit)
}

/// GitHub's token checksum: the last six characters are the base62 CRC32 of
/// the 30 characters after the 4-character prefix (`ghp_`, `npm_`, ...).
pub fn github_checksum_ok(token: &[u8]) -> bool {
    if token.len() != 40 {
        return false;
    }
    let (body, sum) = token[4..].split_at(30);
    keymint_core::token::checksum(body).as_bytes() == sum
}

impl Confidence {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Medium => "medium",
            Self::Low => "low",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        Engine::with_rules(&[]).unwrap()
    }

    fn ids(engine: &Engine, text: &str) -> Vec<String> {
        engine
            .scan(text.as_bytes())
            .iter()
            .map(|m| engine.rule(m.rule).spec.id.clone())
            .collect()
    }

    #[test]
    fn every_rule_finds_its_examples_and_nothing_in_its_negatives() {
        let engine = engine();
        let mut failures = Vec::new();
        for rule in engine.rules() {
            for ex in &rule.spec.examples {
                let found = ids(&engine, ex);
                if !found.contains(&rule.spec.id) {
                    failures.push(format!(
                        "{}: example not found (got {found:?}): {ex}",
                        rule.spec.id
                    ));
                }
            }
            for ex in &rule.spec.negative_examples {
                let found = ids(&engine, ex);
                if !found.is_empty() {
                    failures.push(format!(
                        "{}: negative example found as {found:?}: {ex}",
                        rule.spec.id
                    ));
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn the_builtin_prefilters_stay_small_enough_for_teddy() {
        // Over 64 literals an automaton leaves SIMD Teddy, over 32 it uses
        // the slower "fat" variant (docs/design/0004): the keywords are split
        // so that no automaton is past the limit, and the context words,
        // each in four cases, still fit one slim automaton.
        let sizes = engine().prefilter_sizes();
        assert!(sizes.iter().all(|&n| n <= MAX_LITERALS), "{sizes:?}");
        assert!(
            sizes.len() <= 3,
            "{sizes:?}: every automaton is one more pass"
        );
    }

    #[test]
    fn keywords_past_one_automaton_still_find_their_rules() {
        let file: String = (0..150)
            .map(|i| {
                format!(
                    "[[rule]]\nid = \"t.r{i}\"\nname = \"rule {i}\"\nkeywords = [\"qz{i:03}_\"]\n\
                     pattern = '(?P<secret>qz{i:03}_[A-Za-z0-9]{{20}})'\nconfidence = \"high\"\n\
                     examples = [\"qz{i:03}_Kd8QZKWJVBp2LmN7xR4t\"]\n"
                )
            })
            .collect();
        let specs = crate::rules::parse_rule_file("many.toml", &file).unwrap();
        let engine = Engine::new(specs).unwrap();
        assert_eq!(engine.prefilter_sizes(), [64, 64, 22]);
        for i in [0, 63, 64, 127, 128, 149] {
            let text = format!("x = qz{i:03}_Kd8QZKWJVBp2LmN7xR4t\n");
            assert_eq!(ids(&engine, &text), [format!("t.r{i}")], "rule {i}");
        }
    }

    #[test]
    fn context_words_match_in_their_usual_cases() {
        assert_eq!(
            case_variants("AccessKey"),
            ["ACCESSKEY", "AccessKey", "Accesskey", "accesskey"]
        );
        assert_eq!(case_variants("azure"), ["AZURE", "Azure", "azure"]);
    }

    #[test]
    fn the_secret_span_excludes_context() {
        let engine = engine();
        let text = "x = 1\nMISTRAL_API_KEY=sLshsYOzKejuQZKWJVBmVtY2d4FehwIE # prod\n";
        let m = engine.scan(text.as_bytes());
        assert_eq!(m.len(), 1);
        assert_eq!(
            &text[m[0].start..m[0].end],
            "sLshsYOzKejuQZKWJVBmVtY2d4FehwIE"
        );
    }

    #[test]
    fn context_keywords_come_in_their_usual_cases_but_secrets_do_not() {
        let engine = engine();
        assert_eq!(
            ids(
                &engine,
                "Azure_OpenAI_Key = 4af8494ce7dc7f41e39dcb8751fcd77c"
            ),
            ["azure.openai-key"]
        );
        assert_eq!(
            ids(
                &engine,
                "AZURE_OPENAI_KEY = 4af8494ce7dc7f41e39dcb8751fcd77c"
            ),
            ["azure.openai-key"]
        );
        assert!(
            ids(
                &engine,
                "azure_openai_key = 1DA80270815FE85DF2FBDAA35ADF9C1E"
            )
            .is_empty()
        );
    }

    #[test]
    fn the_allow_comment_suppresses_one_line_only() {
        let engine = engine();
        let body = "PqYUG2mfCIMQZKWJVBtn3tfLH7pNRu";
        let key = format!(
            "ghp_{body}{}",
            keymint_core::token::checksum(body.as_bytes())
        );
        let text = format!("a = \"{key}\"  # keymint:allow\nb = \"{key}\"\n");
        let m = engine.scan(text.as_bytes());
        assert_eq!(m.len(), 1);
        assert!(m[0].start > text.find('\n').unwrap());
    }

    #[test]
    fn github_checksums_are_checked() {
        let body = "PqYUG2mfCIMQZKWJVBtn3tfLH7pNRu";
        let good = format!(
            "ghp_{body}{}",
            keymint_core::token::checksum(body.as_bytes())
        );
        assert!(github_checksum_ok(good.as_bytes()));
        let mut bad = good.clone().into_bytes();
        bad[10] = if bad[10] == b'a' { b'b' } else { b'a' };
        assert!(!github_checksum_ok(&bad));
        assert!(!github_checksum_ok(b"ghp_short"));
    }

    #[test]
    fn keymint_tokens_are_validated_by_checksum() {
        let engine = engine();
        let token =
            keymint_core::token::Token::generate(keymint_core::token::TokenKind::Access).unwrap();
        assert_eq!(
            ids(&engine, &format!("KEY={}", token.expose())),
            ["keymint.token"]
        );
        let mut forged = token.expose().to_owned();
        forged.replace_range(10..11, if &forged[10..11] == "A" { "B" } else { "A" });
        assert!(ids(&engine, &format!("KEY={forged}")).is_empty());
    }

    #[test]
    fn placeholders_hashes_and_uuids_are_not_findings() {
        let engine = engine();
        for text in [
            "OPENAI_API_KEY=sk-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            "OPENAI_API_KEY=<YOUR_KEY>",
            "api_key = \"${OPENAI_API_KEY}\"",
            "id: 123e4567-e89b-12d3-a456-426614174000",
            "sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "commit 4b825dc642cb6eb9a060e54bf8d69288fbee4904",
            "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
            // AWS CLI documentation, inside a presigned URL
            "X-Amz-Credential=AKIAEXAMPLEPBUMBC3GA%2F20180101",
            "-----BEGIN RSA PRIVATE KEY-----EXAMPLETCCAfICCQD6m7oRw0uXOjANBgkqhkiG9w0BAQUFADCBiDELMAkGA1UEBhMCVVMxCzAJBgNVBAgTAldBMRAwDgYDVQQHEwdTZWF0dGxl-----END RSA PRIVATE KEY-----",
        ] {
            assert!(ids(&engine, text).is_empty(), "{text}");
        }
    }

    #[test]
    fn entropy_and_classes() {
        assert!(shannon_entropy(b"aaaaaaaa") < 0.01);
        assert!((shannon_entropy(b"abcd") - 2.0).abs() < 1e-9);
        assert_eq!(char_classes(b"abc"), 1);
        assert_eq!(char_classes(b"aB3"), 3);
    }

    #[test]
    fn a_more_specific_rule_hides_the_match_it_contains() {
        let engine = engine();
        let text = r#"{"type": "service_account", "project_id": "p", "private_key": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7QZKWJVBFAKEq3Lx9\nT8xq2Wk8Rz0vQp4Ys1Lm5Nb6Vc7Xd8Ze9Af0Bg1Ch2Di3Ej4Fk5Gl6Hm7In8Jo9Kp0Lq\n-----END PRIVATE KEY-----\n", "client_email": "a@b"}"#;
        assert_eq!(ids(&engine, text), ["google.service-account"]);
    }
}
