//! The matching engine: a literal prefilter (SIMD Teddy searchers over every
//! rule's keywords and the usual case variants of context words) over raw
//! bytes, then each rule's regex only in a window around a keyword hit, then
//! offline filters (placeholders, entropy, character classes, checksums) and
//! the inline allow comment.
//!
//! The engine is `Sync`: one is shared by all worker threads, each of which
//! keeps its own regex caches and what its scans turned down (`Scratch`).

use std::borrow::Cow;
use std::cell::RefCell;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind, MatchKind, packed};
use regex::bytes::Regex;
use regex_automata::{Anchored, Input, PatternID, meta};
use thread_local::ThreadLocal;

use crate::rules::{Confidence, RuleError, RuleSpec, Validator, compile_rule};

/// The marker that, on the same line as a finding, suppresses it.
pub const ALLOW_MARKER: &[u8] = b"keymint:allow";

/// A rule ready to run.
#[derive(Debug)]
pub struct CompiledRule {
    pub spec: RuleSpec,
    /// The rule's regex, compiled when the engine is built (the scanner
    /// reads files with most of its rules) or at its first use (the
    /// screen of a long-lived server, where most rules never run: design
    /// 0041); none if the pattern, parsed when the engine was built, then
    /// failed to compile (see [`Engine::run_rule`]).
    compiled: OnceLock<Option<Compiled>>,
    /// Index of the rule named by `pairs_with`.
    pub pair: Option<usize>,
    /// The rule's `requires` literals: one must be in a window for the
    /// pattern to run there.
    requires: Vec<memchr::memmem::Finder<'static>>,
    /// The rule's `after`: what must follow a keyword for it to open a
    /// window.
    after: Option<Regex>,
    /// The rule's `until`: the literal that ends a window after a keyword.
    until: Option<memchr::memmem::Finder<'static>>,
    /// With `yields_to`: those markers and the other rules' case-sensitive
    /// keywords (see [`Engine::yields`]); one automaton for every rule
    /// with the same markers.
    markers: Option<Arc<Markers>>,
}

/// A rule's compiled regex and the groups the engine reads from it.
#[derive(Debug)]
struct Compiled {
    regex: meta::Regex,
    secret_group: Option<usize>,
    /// The `name` group: the variable name a structure rule read next to
    /// the value (`{"name": "…", "value": …}`), checked by
    /// [`names_no_secret`].
    name_group: Option<usize>,
    /// The `host` group: the host a connection URI's password is for,
    /// checked by [`is_demo_password`].
    host_group: Option<usize>,
}

impl Compiled {
    fn new(regex: meta::Regex) -> Self {
        let group = |name| {
            regex
                .group_info()
                .pattern_names(PatternID::ZERO)
                .position(|n| n == Some(name))
        };
        Self {
            secret_group: group("secret"),
            name_group: group("name"),
            host_group: group("host"),
            regex,
        }
    }
}

/// A rule's pattern as the engine compiles it: a rule named by words
/// matches a value whole.
fn rule_pattern(spec: &RuleSpec) -> Cow<'_, str> {
    if spec.named_by.is_empty() {
        Cow::Borrowed(&spec.pattern)
    } else {
        Cow::Owned(format!(r"\A(?:{})\z", spec.pattern))
    }
}

impl CompiledRule {
    /// The rule's regex, compiled now if this is its first use.
    fn compiled(&self) -> Option<&Compiled> {
        self.compiled
            .get_or_init(|| {
                crate::rules::compile_rule_with(&rule_pattern(&self.spec), false)
                    .ok()
                    .map(Compiled::new)
            })
            .as_ref()
    }
}

/// What a rule with `yields_to` leaves to other rules: its own markers and
/// every other rule's case-sensitive keyword, in one automaton (a search
/// per marker cost more than the rest of the rule).
#[derive(Debug)]
struct Markers {
    search: AhoCorasick,
    /// For each of `search`'s patterns, the rule whose keyword it is; none
    /// for the rule's own `yields_to` markers.
    rules: Vec<Option<usize>>,
}

/// One accepted match: the secret's byte span in the haystack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawMatch {
    pub rule: usize,
    pub start: usize,
    pub end: usize,
}

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

/// A literal searcher: Teddy (SIMD) where the CPU has it, else an
/// Aho-Corasick automaton (the screen's overlapping search always is one).
#[derive(Debug)]
enum Search {
    Packed(packed::Searcher),
    Automaton(AhoCorasick),
}

/// One literal searcher and, for each of its patterns, the literal and the
/// rules it triggers.
#[derive(Debug)]
struct Prefilter {
    search: Search,
    literals: Vec<String>,
    keyword_rules: Vec<Vec<usize>>,
    /// For each pattern, whether it is one of the words that say a text
    /// holds encoded values ([`crate::decode::HINTS`]).
    hints: Vec<bool>,
    /// For each pattern, the other patterns of this searcher that it is a
    /// prefix of or that are a prefix of it: a leftmost-first search reports
    /// one of them where both start, the others are checked by hand.
    prefix_related: Vec<Vec<usize>>,
    /// An overlapping automaton (the screen's DFA for short texts), which
    /// reports every occurrence itself.
    overlapping: bool,
}

impl Prefilter {
    fn new(
        literals: Vec<String>,
        keyword_rules: Vec<Vec<usize>>,
        hints: Vec<bool>,
        overlapping: bool,
    ) -> Result<Self, RuleError> {
        let invalid = |reason: String| RuleError::Invalid {
            file: "(rules)".into(),
            id: "(keywords)".into(),
            reason,
        };
        let packed = if overlapping {
            None
        } else {
            // Past 32 literals aho-corasick would not build a Teddy
            // searcher on its own (it judges them too many): the layout's
            // buckets make them worth it (crate::layout).
            let mut b = packed::Config::new()
                .match_kind(packed::MatchKind::LeftmostFirst)
                .heuristic_pattern_limits(literals.len() <= crate::layout::SLIM_CAP)
                .builder();
            b.extend(&literals);
            b.build()
        };
        let search = match packed {
            Some(p) => Search::Packed(p),
            None => Search::Automaton(
                AhoCorasickBuilder::new()
                    .match_kind(if overlapping {
                        MatchKind::Standard
                    } else {
                        MatchKind::LeftmostFirst
                    })
                    // The screen's one automaton reads short texts (a
                    // request's path, headers and body) on every request:
                    // a DFA costs a table lookup per byte, the NFA that the
                    // builder would pick for this many literals a walk.
                    .kind(overlapping.then_some(AhoCorasickKind::DFA))
                    .build(&literals)
                    .map_err(|e| invalid(e.to_string()))?,
            ),
        };
        let prefix_related = literals
            .iter()
            .enumerate()
            .map(|(i, a)| {
                literals
                    .iter()
                    .enumerate()
                    .filter(|&(j, b)| {
                        j != i && (a.starts_with(b.as_str()) || b.starts_with(a.as_str()))
                    })
                    .map(|(j, _)| j)
                    .collect()
            })
            .collect();
        Ok(Self {
            search,
            literals,
            keyword_rules,
            hints,
            prefix_related,
            overlapping,
        })
    }
}

/// Texts shorter than this are searched by the screen's DFA
/// ([`Engine::short`]), longer ones by the Teddy searchers. Each Teddy
/// searcher is a pass of its own with a fixed cost per search, and one of
/// a text shorter than its SIMD block falls back to Rabin-Karp over every
/// literal; a DFA costs a table lookup per byte whatever the text. On a
/// quiet machine the DFA was ahead up to about 200 bytes (a 185-byte chat
/// body: 400 against 455 ns; under callgrind a 104-byte one cost 1,700
/// instructions more with Teddy) and three times behind on a 2 KiB body.
/// Measured with `examples/screen_speed.rs` (docs/design/0019, "The
/// screen's searches").
pub(crate) const SHORT_TEXT: usize = 256;

/// The compiled rule set.
#[derive(Debug)]
pub struct Engine {
    rules: Vec<CompiledRule>,
    /// Token keywords and the usual case variants of context words in Teddy
    /// searchers laid out by [`crate::layout`], faster than one large or one
    /// ASCII-case-insensitive automaton; for the scanner with the encoding
    /// hints among them.
    prefilters: Vec<Prefilter>,
    /// The screen only: one overlapping DFA of every keyword, which reads a
    /// text shorter than [`SHORT_TEXT`] (a path, a header value, a query)
    /// in one pass. Both find every occurrence of every keyword.
    short: Option<Prefilter>,
    max_window: usize,
    mode: Mode,
    /// The rules `named_by` words: each word (lowercase) and its rule, in
    /// rule order.
    named: Vec<(Vec<u8>, usize)>,
    /// Each thread's own regex caches and what its scans turned down.
    scratch: ThreadLocal<RefCell<Scratch>>,
}

/// What one thread keeps between the scans it runs with one engine.
#[derive(Debug, Default)]
struct Scratch {
    /// Each rule's regex cache, made at the rule's first search on this
    /// thread (the regex's own pool of caches serves the first thread
    /// that used it without a lock, and every other through one).
    caches: Vec<Option<meta::Cache>>,
    rejected: Rejected,
}

/// How an engine searches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mode {
    /// Whether `keymint:allow` on a line suppresses its findings (the
    /// scanner: yes; the outbound screen: no, a sender must not be able to
    /// wave its own secret through).
    pub allow_marker: bool,
    /// The screen's search: short texts (a path, a header value) read by
    /// one overlapping DFA of every keyword, longer ones by the Teddy
    /// searchers, and no encoding hints. Both modes find every occurrence
    /// of every keyword, also where keywords overlap (`sk-` and `-or-v1-`
    /// in `sk-or-v1-`).
    pub every_keyword: bool,
    /// Whether each thread remembers the matches a rule turned down for
    /// their own bytes ([`Rejected`]): the scanner, which reads the same
    /// placeholders in file after file and every line again in each
    /// version of a file in git history. Not the screen: it would keep
    /// pieces of the requests it read.
    pub remember_rejections: bool,
    /// Whether the engine lives as long as its process and is kept small
    /// rather than built fast: the screen, which a server builds once.
    /// Each pattern is compiled at its rule's first use (most never run;
    /// design 0041, "session 36"), on the thread that needs it, and
    /// without one-pass DFAs (about 2 MB for all; the screen's texts are
    /// short and rarely hold a match whose groups are read). The scanner
    /// compiles every pattern when it is built, on several threads, since
    /// a scan waits for it, with one-pass DFAs ("session 35").
    pub long_lived: bool,
}

impl Mode {
    pub const SCANNER: Self = Self {
        allow_marker: true,
        every_keyword: false,
        remember_rejections: true,
        long_lived: false,
    };
    pub const SCREEN: Self = Self {
        allow_marker: false,
        every_keyword: true,
        remember_rejections: false,
        long_lived: true,
    };
}

/// The matches a thread's scans with one engine turned down for what their
/// own bytes hold (a placeholder, a demo password to a local server, a
/// name that is not a secret's, a marker in the value), by rule: the same
/// bytes are turned down again without reading the rule's groups, the most
/// costly step of a rule (a backtracking search on each match). A match is keyed by its
/// rule, its bytes and one byte of context on each side (what the
/// pattern's look-arounds can see at its edges), so that the same key
/// always reads the same groups and gets the same verdict; a match turned
/// down for the line it is on (`keymint:allow`) is not remembered. Kept
/// exact (the bytes themselves, no digest that two texts could share), for
/// matches of at most [`Rejected::MAX_MATCH`] bytes, and emptied when it
/// holds [`Rejected::MAX_BYTES`].
#[derive(Debug, Default)]
struct Rejected {
    /// Key (see [`Rejected::key`]) to where the search goes on, from the
    /// match's start. SipHash with a random key (std's default): scanned
    /// text cannot aim its keys at one slot.
    seen: std::collections::HashMap<Box<[u8]>, usize>,
    bytes: usize,
    /// The key being looked up, reused.
    key: Vec<u8>,
}

impl Rejected {
    const MAX_MATCH: usize = 1024;
    const MAX_BYTES: usize = 4 << 20;

    /// Sets `self.key` to rule `r`'s match `span` of `window`; false for a
    /// match too long to remember.
    fn key(&mut self, r: usize, window: &[u8], span: Range<usize>) -> bool {
        if span.len() > Self::MAX_MATCH {
            return false;
        }
        let edge = |b: Option<&u8>| b.map_or([0, 0], |&b| [1, b]);
        self.key.clear();
        self.key.extend_from_slice(&(r as u64).to_le_bytes());
        self.key
            .extend_from_slice(&edge(span.start.checked_sub(1).and_then(|i| window.get(i))));
        self.key.extend_from_slice(&edge(window.get(span.end)));
        self.key.extend_from_slice(&window[span]);
        true
    }

    fn get(&self) -> Option<usize> {
        self.seen.get(self.key.as_slice()).copied()
    }

    fn insert(&mut self, advance: usize) {
        if self.bytes + self.key.len() > Self::MAX_BYTES {
            self.seen.clear();
            self.bytes = 0;
        }
        self.bytes += self.key.len();
        self.seen.insert(self.key.as_slice().into(), advance);
    }
}

/// Every pattern compiled ([`compile_rule`]), in order: on up to four
/// threads where there are enough patterns, each taking every n-th (the
/// built-in rules' patterns take most of an engine's build, which a scan
/// waits for before it reads anything). A `long_lived` engine compiles
/// none of them here ([`Mode::long_lived`]).
fn compile_all(patterns: &[&str]) -> Vec<Result<meta::Regex, String>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    if threads < 2 || patterns.len() < 32 {
        return patterns.iter().map(|p| compile_rule(p)).collect();
    }
    let share = |t: usize| -> Vec<_> {
        patterns
            .iter()
            .skip(t)
            .step_by(threads)
            .map(|p| compile_rule(p))
            .collect()
    };
    let shares: Vec<Vec<_>> = std::thread::scope(|s| {
        let others: Vec<_> = (1..threads).map(|t| s.spawn(move || share(t))).collect();
        std::iter::once(share(0))
            .chain(others.into_iter().map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            }))
            .collect()
    });
    let mut shares: Vec<_> = shares.into_iter().map(Vec::into_iter).collect();
    (0..patterns.len())
        .filter_map(|i| shares[i % threads].next())
        .collect()
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
        let patterns: Vec<Cow<'_, str>> = specs.iter().map(rule_pattern).collect();
        let patterns: Vec<&str> = patterns.iter().map(|p| &**p).collect();
        let mut named = Vec::new();
        // The screen compiles each rule at its first use (its syntax is
        // checked now); the scanner all of them now, on several threads,
        // but for the rules named by words, which only a generic finding
        // under a provider's name asks for (few scans have one).
        let eager = |s: &RuleSpec| !mode.long_lived && s.named_by.is_empty();
        let wanted: Vec<&str> = specs
            .iter()
            .zip(&patterns)
            .filter_map(|(s, p)| eager(s).then_some(*p))
            .collect();
        let mut done = compile_all(&wanted).into_iter();
        let compiled: Vec<Option<Result<meta::Regex, String>>> = specs
            .iter()
            .map(|s| if eager(s) { done.next() } else { None })
            .collect();
        for ((idx, spec), (pattern, compiled)) in
            specs.iter().enumerate().zip(patterns.iter().zip(compiled))
        {
            named.extend(spec.named_by.iter().map(|w| (w.as_bytes().to_vec(), idx)));
            let invalid = |e: String| RuleError::Invalid {
                file: "(rules)".into(),
                id: spec.id.clone(),
                reason: format!("pattern does not compile: {e}"),
            };
            let compiled = match compiled {
                Some(regex) => OnceLock::from(Some(Compiled::new(regex.map_err(invalid)?))),
                None => {
                    crate::rules::check_syntax(pattern).map_err(invalid)?;
                    OnceLock::new()
                }
            };
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
                compiled,
                pair,
                requires: spec
                    .requires
                    .iter()
                    .map(|r| memchr::memmem::Finder::new(r.as_bytes()).into_owned())
                    .collect(),
                after: spec
                    .after
                    .as_deref()
                    .map(crate::rules::compile_after)
                    .transpose()
                    .map_err(|e| RuleError::Invalid {
                        file: "(rules)".into(),
                        id: spec.id.clone(),
                        reason: format!("`after` does not compile: {e}"),
                    })?,
                until: spec
                    .until
                    .as_ref()
                    .map(|u| memchr::memmem::Finder::new(u.as_bytes()).into_owned()),
                markers: None,
            });
        }
        let keywords: Vec<(&str, Option<usize>)> = specs
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.keywords_ignore_case && s.yields_to.is_empty())
            .flat_map(|(r, s)| s.keywords.iter().map(move |k| (k.as_str(), Some(r))))
            .collect();
        // Rules that yield to the same markers (the generic rules: `sk-`,
        // `sk_`, `rk_`) share one automaton: each is the same every
        // keyword plus those markers, and a DFA of them takes about 10 M
        // instructions to build, a twentieth of a scanner's start.
        let mut built: Vec<(Vec<String>, Arc<Markers>)> = Vec::new();
        for rule in rules.iter_mut().filter(|r| !r.spec.yields_to.is_empty()) {
            if let Some((_, shared)) = built.iter().find(|(m, _)| *m == rule.spec.yields_to) {
                rule.markers = Some(Arc::clone(shared));
                continue;
            }
            let (markers, marker_rules): (Vec<&str>, Vec<Option<usize>>) = keywords
                .iter()
                .copied()
                .chain(rule.spec.yields_to.iter().map(|m| (m.as_str(), None)))
                .unzip();
            // The scanner asks at every keyword hit of a generic rule: a
            // DFA. The screen keeps a contiguous NFA (a tenth of the
            // memory for the same answers; its texts are short).
            let kind = if mode.long_lived {
                AhoCorasickKind::ContiguousNFA
            } else {
                AhoCorasickKind::DFA
            };
            let shared = Arc::new(Markers {
                search: AhoCorasickBuilder::new()
                    .kind(Some(kind))
                    .build(markers)
                    .map_err(|e| RuleError::Invalid {
                        file: "(rules)".into(),
                        id: rule.spec.id.clone(),
                        reason: format!("markers do not compile: {e}"),
                    })?,
                rules: marker_rules,
            });
            built.push((rule.spec.yields_to.clone(), Arc::clone(&shared)));
            rule.markers = Some(shared);
        }
        let mut short = None;
        if mode.every_keyword {
            // The screen's short texts: one overlapping Aho-Corasick
            // automaton of every keyword, so that a text is read once. An
            // overlapping search reports every occurrence of every literal
            // however the literals are grouped (a literal in both sets is
            // two patterns, each with its rules).
            let (mut literals, mut literal_rules) = (Vec::new(), Vec::new());
            for (keywords, keyword_rules) in &sets {
                literals.extend(keywords.iter().cloned());
                literal_rules.extend(keyword_rules.iter().cloned());
            }
            if !literals.is_empty() {
                let hints = vec![false; literals.len()];
                short = Some(Prefilter::new(literals, literal_rules, hints, true)?);
            }
        }
        // Every literal once, whatever set it came from, and for the
        // scanner the words that say a text holds encoded values, so that
        // the same passes tell whether to look for base64 runs (the screen
        // never decodes a text for them).
        let mut literals: Vec<(String, (Vec<usize>, bool))> = Vec::new();
        let words = sets
            .into_iter()
            .flat_map(|(keywords, keyword_rules)| keywords.into_iter().zip(keyword_rules))
            .map(|(k, r)| (k, r, false));
        let hints = crate::decode::HINTS
            .iter()
            .filter(|_| !mode.every_keyword)
            .map(|h| (h.to_string(), Vec::new(), true));
        for (kw, kw_rules, hint) in words.chain(hints) {
            match literals.iter_mut().find(|(k, _)| *k == kw) {
                Some((_, (r, h))) => {
                    r.extend(kw_rules);
                    *h |= hint;
                }
                None => literals.push((kw, (kw_rules, hint))),
            }
        }
        let mut prefilters = Vec::new();
        for group in crate::layout::layout(literals, crate::layout::Shape::detect()) {
            let (lits, tags): (Vec<String>, Vec<(Vec<usize>, bool)>) = group.into_iter().unzip();
            let (lit_rules, hints) = tags.into_iter().unzip();
            prefilters.push(Prefilter::new(lits, lit_rules, hints, false)?);
        }
        Ok(Self {
            rules,
            prefilters,
            short,
            max_window,
            mode,
            named,
            scratch: ThreadLocal::new(),
        })
    }

    /// The built-in rules plus the given user rule files `(name, text)`.
    pub fn with_rules(user_files: &[(String, String)]) -> Result<Self, RuleError> {
        Self::new(crate::rules::load_rules(user_files)?)
    }

    /// How many literals each prefilter searcher holds.
    pub fn prefilter_sizes(&self) -> Vec<usize> {
        self.prefilters
            .iter()
            .map(|p| p.keyword_rules.len())
            .collect()
    }

    /// Every literal of the prefilter, searcher by searcher.
    #[cfg(test)]
    pub(crate) fn prefilter_literals(&self) -> Vec<String> {
        self.prefilters
            .iter()
            .flat_map(|p| p.literals.iter().cloned())
            .collect()
    }

    pub fn rules(&self) -> &[CompiledRule] {
        &self.rules
    }

    pub fn rule(&self, idx: usize) -> &CompiledRule {
        &self.rules[idx]
    }

    /// The heap its compiled rules and searchers hold (not the caches
    /// searches make as they run).
    pub fn memory_usage(&self) -> usize {
        let search = |p: &Prefilter| match &p.search {
            Search::Packed(s) => s.memory_usage(),
            Search::Automaton(a) => a.memory_usage(),
        };
        // Markers shared by several rules count once.
        let mut markers: Vec<&Arc<Markers>> = Vec::new();
        for m in self.rules.iter().filter_map(|r| r.markers.as_ref()) {
            if !markers.iter().any(|seen| Arc::ptr_eq(seen, m)) {
                markers.push(m);
            }
        }
        self.rules
            .iter()
            .map(|r| {
                r.compiled
                    .get()
                    .and_then(Option::as_ref)
                    .map_or(0, |c| c.regex.memory_usage())
            })
            .sum::<usize>()
            + markers
                .iter()
                .map(|m| m.search.memory_usage())
                .sum::<usize>()
            + self.prefilters.iter().map(search).sum::<usize>()
            + self.short.as_ref().map_or(0, search)
    }

    /// The overlap that chunked scanning must keep so that no match that fits
    /// in a rule's window is cut in two.
    pub fn overlap(&self) -> usize {
        self.max_window.max(4096)
    }

    /// Every accepted match in `hay`, ordered by position, with matches
    /// contained in an earlier (or longer) match of another rule removed.
    pub fn scan(&self, hay: &[u8]) -> Vec<RawMatch> {
        self.scan_hinted(hay).0
    }

    /// [`Engine::scan`], and whether `hay` holds one of the words that say
    /// a text holds encoded values ([`crate::decode::HINTS`]; the scanner's
    /// engine searches them in the same passes, the screen's never finds
    /// one).
    pub fn scan_hinted(&self, hay: &[u8]) -> (Vec<RawMatch>, bool) {
        let (mut windows, hinted) = self.windows(hay);
        (self.matches(hay, &mut windows), hinted)
    }

    fn matches(&self, hay: &[u8], windows: &mut [(usize, usize, usize)]) -> Vec<RawMatch> {
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

    /// The regions each rule's regex runs in, `(rule, start, end)`: one
    /// around every occurrence of each of its keywords, unsorted; and
    /// whether a hint occurs.
    fn windows(&self, hay: &[u8]) -> (Vec<(usize, usize, usize)>, bool) {
        match &self.short {
            Some(dfa) if hay.len() < SHORT_TEXT => self.windows_in(std::slice::from_ref(dfa), hay),
            _ => self.windows_in(&self.prefilters, hay),
        }
    }

    /// [`Engine::windows`] with the given searchers.
    fn windows_in(
        &self,
        searchers: &[Prefilter],
        hay: &[u8],
    ) -> (Vec<(usize, usize, usize)>, bool) {
        let mut windows: Vec<(usize, usize, usize)> = Vec::new();
        let mut hinted = false;
        for pf in searchers {
            let mut hit = |pattern: usize, start: usize, end: usize| {
                hinted |= pf.hints[pattern];
                for &r in &pf.keyword_rules[pattern] {
                    let rule = &self.rules[r];
                    if let Some(markers) = &rule.markers
                        && assigned_value(hay, name_end(rule, hay, end))
                            .is_none_or(|v| self.yields(markers, hay, v))
                    {
                        continue;
                    }
                    if let Some((s, e)) = self.window(r, hay, start, end) {
                        windows.push((r, s, e));
                    }
                }
            };
            // The screen's DFA: every keyword occurrence, also where
            // keywords overlap. This fails only on an automaton built
            // leftmost-first, which the DFA is not (the search below would
            // then run instead).
            if pf.overlapping
                && let Search::Automaton(ac) = &pf.search
                && let Ok(all) = ac.try_find_overlapping_iter(hay)
            {
                all.for_each(|m| hit(m.pattern().as_usize(), m.start(), m.end()));
                continue;
            }
            // Every occurrence of every literal: the search goes on from the
            // byte after each match's start, and the literals that start
            // with the one found (or that it starts with) are checked there.
            let mut at = 0;
            while at < hay.len() {
                let span = aho_corasick::Span::from(at..hay.len());
                let found = match &pf.search {
                    Search::Packed(searcher) => searcher.find_in(hay, span),
                    Search::Automaton(ac) => ac.find(aho_corasick::Input::new(hay).span(span)),
                };
                let Some(m) = found else { break };
                let p = m.pattern().as_usize();
                hit(p, m.start(), m.end());
                for &other in &pf.prefix_related[p] {
                    let lit = pf.literals[other].as_bytes();
                    if hay[m.start()..].starts_with(lit) {
                        hit(other, m.start(), m.start() + lit.len());
                    }
                }
                at = m.start() + 1;
            }
        }
        (windows, hinted)
    }

    /// The window rule `r`'s regex runs in for its keyword at
    /// `hay[start..end]`, if the rule's `after` lets the keyword open one.
    fn window(&self, r: usize, hay: &[u8], start: usize, end: usize) -> Option<(usize, usize)> {
        let rule = &self.rules[r];
        let spec = &rule.spec;
        if let Some(after) = &rule.after
            && !after.is_match(&hay[end..end.saturating_add(spec.window).min(hay.len())])
        {
            return None;
        }
        let s = start.saturating_sub(spec.window_before);
        let mut e = end.saturating_add(spec.window).min(hay.len());
        if let Some(until) = &rule.until
            && let Some(p) = until.find(&hay[end..e])
        {
            e = end + p + until.needle().len();
        }
        Some((s, e))
    }

    /// Whether rule `r`'s `requires` let its regex run in `window`: every
    /// match lies in the window and holds one of the literals.
    fn required_in(&self, r: usize, window: &[u8]) -> bool {
        let requires = &self.rules[r].requires;
        requires.is_empty() || requires.iter().any(|f| f.find(window).is_some())
    }

    /// Whether the value at `value` in `hay`, read by a rule that yields
    /// with `markers`, is another rule's to judge: it holds one of the
    /// rule's own markers (`sk-`), or another rule's keyword where it
    /// starts the value or a part of it (after a byte that is not a letter
    /// or digit: a value written in that rule's format, which it reads as
    /// a key or lets go as one of the wrong length) or where that rule's
    /// pattern matches across it in the window the keyword opens (a key
    /// that rule lets go, for a checksum that does not hold or a test key,
    /// is reported by neither). A keyword inside a run of letters and
    /// digits that its rule does not read there, as `4b1d` by chance in a
    /// hex digest, leaves the value to this rule.
    fn yields(&self, markers: &Markers, hay: &[u8], value: Range<usize>) -> bool {
        let text = &hay[value.clone()];
        let Ok(mut found) = markers.search.try_find_overlapping_iter(text) else {
            return true;
        };
        found.any(|m| {
            let Some(other) = markers.rules[m.pattern().as_usize()] else {
                return true;
            };
            if m.start() == 0 || !text[m.start() - 1].is_ascii_alphanumeric() {
                return true;
            }
            let (start, end) = (value.start + m.start(), value.start + m.end());
            let Some((lo, hi)) = self.window(other, hay, start, end) else {
                return false;
            };
            if !self.required_in(other, &hay[lo..hi]) {
                return false;
            }
            let Some(Compiled { regex, .. }) = self.rules[other].compiled() else {
                return true;
            };
            let mut at = lo;
            while let Some(found) = regex.search(&Input::new(&hay[..hi]).range(at..)) {
                if found.start() >= end {
                    break;
                }
                if found.end() > start {
                    return true;
                }
                at = found.end().max(found.start() + 1);
            }
            false
        })
    }

    fn run_rule(&self, r: usize, hay: &[u8], start: usize, end: usize, out: &mut Vec<RawMatch>) {
        let rule = &self.rules[r];
        if !self.required_in(r, &hay[start..end]) {
            return;
        }
        let mut window = &hay[..end];
        // A pattern the engine parsed and the compiler then refused (a
        // user rule past the size limit): what the keyword opened is
        // reported whole, not let through unread.
        let Some(compiled) = rule.compiled() else {
            out.push(RawMatch {
                rule: r,
                start,
                end,
            });
            return;
        };
        let regex = &compiled.regex;
        let mut scratch = self.scratch.get_or_default().borrow_mut();
        let Scratch { caches, rejected } = &mut *scratch;
        if caches.len() != self.rules.len() {
            caches.resize_with(self.rules.len(), || None);
        }
        let cache = caches[r].get_or_insert_with(|| regex.create_cache());
        let mut pos = start;
        while pos < end {
            // Most windows hold no match: a plain search is cheaper than
            // captures, which run only on the match found.
            let Some(mut found) = regex.search_with(cache, &Input::new(window).range(pos..)) else {
                break;
            };
            // A window ends where its keyword's reach ends, not where a
            // match must: one that runs to the end may go on past it (a
            // value the window cut, which `$` or a value's last byte would
            // take for the whole). It is read again from where it starts,
            // anchored, over the text up to one more window's reach; the
            // rest of the window's search goes on in that longer text. A
            // window that its rule's `until` ended is the block it reads.
            if found.end() == window.len() && window.len() < hay.len() && rule.until.is_none() {
                window = &hay[..end.saturating_add(rule.spec.window).min(hay.len())];
                let whole = Input::new(window)
                    .range(found.start()..)
                    .anchored(Anchored::Yes);
                match regex.search_with(cache, &whole) {
                    Some(longer) => found = longer,
                    None => {
                        pos = found.start() + 1;
                        continue;
                    }
                }
            }
            // A rule that yields to markers reads `NAME = value`: a marker
            // after the first `=` or `:` (past the match's first byte, which
            // may be the byte before the name) is in the value, and the
            // captures need not run (most such matches in a repository are
            // provider keys under their usual names, `GITHUB_TOKEN=ghp_…`).
            if let Some(markers) = &rule.markers {
                let text = &window[found.start()..found.end()];
                let value = text
                    .iter()
                    .skip(1)
                    .position(|&b| b == b'=' || b == b':')
                    .map_or(found.start(), |p| found.start() + p + 2);
                if self.yields(markers, hay, value..found.end()) {
                    pos = found.end();
                    continue;
                }
            }
            let remember = self.mode.remember_rejections && rejected.key(r, window, found.range());
            if remember && let Some(advance) = rejected.get() {
                pos = found.start() + advance;
                continue;
            }
            // The groups, read on the match just found: anchored at its
            // start, the search neither looks for the start again nor runs
            // backwards to it, and a pattern that is one-pass reads its
            // groups in one forward pass.
            let mut caps = regex.create_captures();
            regex.search_captures_with(
                cache,
                &Input::new(window)
                    .range(found.range())
                    .anchored(Anchored::Yes),
                &mut caps,
            );
            let Some(whole) = caps.get_match() else { break };
            let group = |g: Option<usize>| g.and_then(|g| caps.get_group(g));
            let secret = group(compiled.secret_group).unwrap_or(whole.span());
            let bytes = &window[secret.range()];
            let name = group(compiled.name_group).map(|n| &window[n.range()]);
            let host = group(compiled.host_group).map(|h| &window[h.range()]);
            // What the structure around the value says: a name that is
            // not a secret's, a demo password to a local server.
            let not_secret = name.is_some_and(|n| names_no_secret_of(n, &rule.spec.key_kinds))
                || (name.is_some() && is_variable_name(bytes))
                || host.is_some_and(|h| is_demo_password(bytes, h));
            let yielded = || {
                rule.markers
                    .as_ref()
                    .is_some_and(|m| self.yields(m, hay, secret.range()))
            };
            let next = secret.end.max(whole.start() + 1);
            // What the match's own bytes say, cheapest first; then the line.
            if not_secret || !accept(&rule.spec, bytes) || yielded() {
                if remember {
                    rejected.insert(next - found.start());
                }
            } else if !(self.mode.allow_marker && allowed_inline(hay, secret.start, secret.end)) {
                let named = name.and_then(|n| self.named_rule(r, n, bytes));
                out.push(RawMatch {
                    rule: named.unwrap_or(r),
                    start: secret.start,
                    end: secret.end,
                });
            }
            pos = next;
        }
    }
}

impl Engine {
    /// The rule a generic rule's match (`generic.…`, read with its
    /// variable's name) belongs to by that name: the first rule
    /// `named_by` a word the name holds (any case) whose pattern the value
    /// matches whole and whose floors it passes. A rule's own matches
    /// keep their rule.
    fn named_rule(&self, r: usize, name: &[u8], secret: &[u8]) -> Option<usize> {
        if self.named.is_empty() || !self.rules[r].spec.id.starts_with("generic.") {
            return None;
        }
        let lower = name.to_ascii_lowercase();
        self.named.iter().find_map(|(word, n)| {
            let rule = &self.rules[*n];
            (memchr::memmem::find(&lower, word).is_some()
                && rule.compiled().is_some_and(|c| c.regex.is_match(secret))
                && accept(&rule.spec, secret))
            .then_some(*n)
        })
    }
}

/// For a rule that yields to markers (it reads `NAME = value` with its
/// keyword at the end of `NAME`): the value that follows the keyword that
/// ends at `at` in an assignment (an `S`; the quote that closes a quoted
/// name, escaped or not as in `\"NAME\":\"value\"`, and the bracket that
/// closes a subscript as in `ENV["NAME"] = …`; spaces or tabs; `=` or `:`,
/// or `,` after a quoted name as in `Setenv("NAME", "value")`; spaces,
/// tabs, quotes; the value is the run of the value's characters after
/// them), if it is one. Anything else cannot be this rule's match, and a
/// value the rule yields (see [`Engine::yields`]) would be dropped, so its
/// regex need not run there: a keyword in a longer name (`API_KEY_ID`) or
/// in prose, and a provider's key under its usual name
/// (`GITHUB_TOKEN=ghp_…`), which most such lines in a repository are.
fn assigned_value(hay: &[u8], at: usize) -> Option<Range<usize>> {
    let at = at.min(hay.len());
    let rest = &hay[at..];
    let mut i = usize::from(rest.first() == Some(&b'S'));
    i += usize::from(rest.get(i) == Some(&b'\\') && matches!(rest.get(i + 1), Some(b'"' | b'\'')));
    let quoted = matches!(rest.get(i), Some(b'"' | b'\''));
    if quoted {
        i += 1 + usize::from(rest.get(i + 1) == Some(&b']'));
    }
    while matches!(rest.get(i), Some(b' ' | b'\t')) {
        i += 1;
    }
    match rest.get(i) {
        Some(b'=' | b':') => {}
        // A quoted name and a quoted value as two arguments.
        Some(b',') if quoted => {}
        _ => return None,
    }
    i += 1;
    while matches!(
        rest.get(i),
        Some(b' ' | b'\t' | b'=' | b'"' | b'\'' | b'\\')
    ) {
        i += 1;
    }
    let i = i.min(rest.len());
    let value_len = rest[i..]
        .iter()
        .take(ASSIGNED_VALUE_READ)
        .position(|&b| !(b.is_ascii_alphanumeric() || b"_+/=.~-".contains(&b)))
        .unwrap_or(rest.len().saturating_sub(i).min(ASSIGNED_VALUE_READ));
    Some(at + i..at + (i + value_len).min(rest.len()))
}

/// How much of a value [`assigned_value`] reads for the check at a
/// keyword's hit. That check only spares the rule's regex a window: every
/// match the regex finds is checked again, whole, in `run_rule`, so a
/// marker past these bytes is still yielded to. Bounding it keeps a run of
/// `NAME=NAME=…` from costing each hit a read of the whole run (a 10 MB
/// file of `api_key=` took 1.7 s with 512).
const ASSIGNED_VALUE_READ: usize = 128;

/// Where the name holding a keyword that ends at `at` ends: there, unless
/// the rule's keywords sit inside names (`keyword_in_name`), when the rest
/// of the name (at most 16 letters, digits, `_`, `-` or `.`: `api.key` in a
/// `.properties` file) is passed over.
fn name_end(rule: &CompiledRule, hay: &[u8], at: usize) -> usize {
    if !rule.spec.keyword_in_name {
        return at;
    }
    let rest = hay.get(at..).unwrap_or_default();
    at + rest
        .iter()
        .take(16)
        .take_while(|&&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        .count()
}

/// A value that is itself an environment variable's name (upper-case
/// words joined by `_`: `ANTHROPIC_API_KEY`), as the second of a list of
/// names is: under a name-reading rule, not a secret.
fn is_variable_name(value: &[u8]) -> bool {
    value.first().is_some_and(u8::is_ascii_uppercase)
        && value.contains(&b'_')
        && value.split(|&b| b == b'_').all(|w| {
            !w.is_empty()
                && w.iter()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        })
}

/// The entropy floor of rules that set none: every random token of 16
/// characters or more is above it; patterns such as `aBcDaBcD…` are not.
pub const DEFAULT_MIN_ENTROPY: f64 = 3.0;

/// The offline filters of one candidate secret.
pub fn accept(spec: &RuleSpec, secret: &[u8]) -> bool {
    let placeholder = if spec.resolved_values {
        is_whole_template(secret) || is_filler(secret)
    } else {
        is_placeholder(secret)
    };
    if placeholder || spec.max_length.is_some_and(|max| secret.len() > max) {
        return false;
    }
    if shannon_entropy(secret) < spec.min_entropy.unwrap_or(DEFAULT_MIN_ENTROPY) {
        return false;
    }
    if !meets_class_floor(spec, secret) {
        return false;
    }
    match spec.validator {
        None => true,
        Some(Validator::GithubCrc32) => github_checksum_ok(secret),
        Some(Validator::Keymint) => std::str::from_utf8(secret)
            .map(|s| keymint_core::token::check(s).is_ok())
            .unwrap_or(false),
        Some(Validator::BasicAuth) => basic_auth_ok(secret),
        Some(Validator::Generated) => !is_typed_words(secret),
    }
}

/// Whether `secret`, base64, is the `user:password` of HTTP Basic or of a
/// Docker `config.json`'s `auth`: it decodes to printable text with a user
/// before the first `:` and after it a password of 8 bytes or more that is
/// no placeholder and has [`DEFAULT_MIN_ENTROPY`] (`user:password`,
/// `Aladdin:open sesame`, an RFC's example client and the binary a random
/// base64 run decodes to are not).
fn basic_auth_ok(secret: &[u8]) -> bool {
    let run = secret
        .iter()
        .position(|&b| b == b'=')
        .map_or(secret, |end| &secret[..end]);
    let Some(text) = crate::decode::decode_text(run) else {
        return false;
    };
    let Some(colon) = text.iter().position(|&b| b == b':') else {
        return false;
    };
    let (user, password) = (&text[..colon], &text[colon + 1..]);
    // The placeholder check knows RFC 6749's example client secrets
    // (`is_filler`).
    !user.is_empty()
        && password.len() >= 8
        && text.iter().all(|b| (b' '..=b'~').contains(b))
        && !is_placeholder(password)
        && shannon_entropy(password) >= DEFAULT_MIN_ENTROPY
}

/// Whether a variable name that holds a secret word (`token`, `key`,
/// `secret`…) says by its last word that its value is something else: an
/// identifier (`REQUEST_TOKEN_ID`, `apiKeyUuid`), a digest of the secret
/// (`MODEL_TOKEN_CHECKSUM`, `API_KEY_SHA256`, `tokenHash`) or where the
/// secret is kept (`DB_PASSWORD_FILE`, `SECRET_PATH`); or by any word that
/// its value is meant to be public (`NEXT_PUBLIC_API_KEY`, the convention
/// of front-end build tools for values shipped to every browser;
/// `STRIPE_PUBLISHABLE_KEY`). Words are cut at `_`, `-`, `.` and where a
/// lowercase letter meets an uppercase one.
pub fn names_no_secret(name: &[u8]) -> bool {
    names_no_secret_of(name, &[])
}

/// [`names_no_secret`], and with `key_kinds` (a rule's `key_kinds`), a name
/// ending in the word `KEY` whose word before is none of them
/// (`CACHE_KEY`, `SORT_KEY`, `S3_OBJECT_KEY` against `API_KEY`,
/// `ACCESS_KEY`) is not a secret's either.
pub fn names_no_secret_of(name: &[u8], key_kinds: &[String]) -> bool {
    const NOT_SECRET: &[&[u8]] = &[
        b"id",
        b"ids",
        b"uuid",
        b"guid",
        b"checksum",
        b"sum",
        b"hash",
        b"digest",
        b"fingerprint",
        b"md5",
        b"sha",
        b"sha1",
        b"sha256",
        b"sha384",
        b"sha512",
        b"file",
        b"path",
    ];
    const PUBLIC: &[&[u8]] = &[b"public", b"publishable"];
    let name = name.trim_ascii();
    let mut start = 0;
    let mut public = false;
    let mut previous: &[u8] = &[];
    for (i, w) in name.windows(2).enumerate() {
        if matches!(w[0], b'_' | b'-' | b'.')
            || (w[0].is_ascii_lowercase() && w[1].is_ascii_uppercase())
        {
            let cut = if w[0].is_ascii_alphanumeric() {
                i + 1
            } else {
                i
            };
            let word = name.get(start..cut).unwrap_or_default();
            public |= PUBLIC.iter().any(|p| word.eq_ignore_ascii_case(p));
            if !word.is_empty() {
                previous = word;
            }
            start = i + 1;
        }
    }
    let last = name.get(start..).unwrap_or_default().to_ascii_lowercase();
    let other_key = !key_kinds.is_empty()
        && last == b"key"
        && !key_kinds
            .iter()
            .any(|k| previous.eq_ignore_ascii_case(k.as_bytes()));
    public || other_key || NOT_SECRET.contains(&last.as_slice())
}

/// Passwords of connection URIs that protect nothing: one published as
/// the default or the example of a database image or tutorial (Docker's
/// `postgres` image documents `mysecretpassword`; GitHub's fixed
/// `x-oauth-basic` beside a token given as the user), anywhere; and, for a
/// server on the loopback interface (`localhost`, `127.x.x.x`, `[::1]`,
/// `0.0.0.0`) or under a domain reserved for documentation (`example.com`,
/// `.net`, `.org` and their subdomains, `.example`, `.test`, `.invalid`:
/// RFC 2606), a password shaped like words a person typed for a local
/// set-up or a manual: lowercase letters, at most 24, with no run of four
/// consonants (which a random lowercase string of that length almost
/// always holds), then digits if any (`admin123`, `supersecret`,
/// `devpass2024`). A random password, one with an uppercase letter or a
/// symbol, or one for any other host stays a finding, documentation domain
/// or not: a real key pasted into an example is still a leak.
pub fn is_demo_password(password: &[u8], host: &[u8]) -> bool {
    const PUBLISHED: &[&[u8]] = &[
        b"mysecretpassword",
        b"my-secret-pw",
        b"example",
        b"admin123",
        b"password1",
        b"password123",
        b"passw0rd",
        b"p@ssw0rd",
        b"p@ssword",
        b"secret123",
        b"letmein",
        b"topsecret",
        b"supersecret",
        b"s3cr3t",
        b"guest",
        b"rootpassword",
        b"root123",
        b"yourstrong(!)password",
        b"yourstrongpassw0rd",
        b"sa_password",
        b"x-oauth-basic",
    ];
    let lower = password.to_ascii_lowercase();
    if PUBLISHED.contains(&lower.as_slice()) {
        return true;
    }
    let host = host.to_ascii_lowercase();
    let loopback = host == b"localhost"
        || host.ends_with(b".localhost")
        || host.starts_with(b"127.")
        || host == b"[::1]"
        || host == b"0.0.0.0";
    let documentation = [b"example.com".as_slice(), b"example.net", b"example.org"]
        .iter()
        .any(|d| {
            host.strip_suffix(*d)
                .is_some_and(|rest| rest.is_empty() || rest.ends_with(b"."))
        })
        || [b".example".as_slice(), b".test", b".invalid"]
            .iter()
            .any(|t| host.ends_with(t));
    (loopback || documentation) && is_typed_word(password)
}

/// Whether `word` is shaped like a word a person typed: lowercase letters,
/// at most 24, with no run of four consonants (`y` counts as a vowel; a
/// random lowercase string of that length almost always holds such a run),
/// then digits if any (`admin123`, `devpass2024`).
fn is_typed_word(word: &[u8]) -> bool {
    let letters = word
        .iter()
        .position(|b| !b.is_ascii_lowercase())
        .unwrap_or(word.len());
    if letters == 0 || letters > 24 || !word[letters..].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let mut consonants = 0;
    for b in &word[..letters] {
        if matches!(b, b'a' | b'e' | b'i' | b'o' | b'u' | b'y') {
            consonants = 0;
        } else {
            consonants += 1;
            if consonants >= 4 {
                return false;
            }
        }
    }
    true
}

/// Whether a value is words a person typed, not a generated key: every part
/// between `_`, `-` and `.` is a typed word ([`is_typed_word`]) or digits,
/// and one is a word (`chatkit_token_123`, `my-api-key-2024`). A generated
/// key mixes cases, or letters and digits within a part (`a3f9…`, a UUID),
/// or holds a run of four consonants. Rules with `validator = "generated"`
/// drop such values (documentation's and tests' stand-ins).
fn is_typed_words(value: &[u8]) -> bool {
    let mut word = false;
    for part in value.split(|b| matches!(b, b'_' | b'-' | b'.')) {
        if part.iter().all(u8::is_ascii_digit) {
            continue;
        }
        if !is_typed_word(part) {
            return false;
        }
        word = true;
    }
    word
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
    let template = secret.iter().enumerate().any(|(i, b)| match b {
        b'<' | b'>' | b'{' | b'}' | b'$' | b'*' => true,
        // `%s`, `%(password)s` and `%DB_PASSWORD%` are templates; a
        // percent-encoded byte (`%40` for `@` in a URI's password) is not.
        b'%' => !secret
            .get(i + 1..i + 3)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)),
        _ => false,
    });
    template || is_filler(secret)
}

/// A value that is a template as a whole: `${VAR}`, `{{ var }}`, `<key>`,
/// `%VAR%` (JSON may spell `<` and `>` as `\u003c` and `\u003e`).
fn is_whole_template(secret: &[u8]) -> bool {
    let s = secret;
    (s.starts_with(b"${") || s.starts_with(b"{{")) && s.ends_with(b"}")
        || (s.starts_with(b"<") && s.ends_with(b">"))
        || (s.starts_with(b"\\u003c") && s.ends_with(b"\\u003e"))
        || (s.len() > 2 && s.starts_with(b"%") && s.ends_with(b"%"))
}

/// Fillers: `EXAMPLE`, long runs of one character, filler words.
fn is_filler(secret: &[u8]) -> bool {
    if memchr::memmem::find(secret, b"EXAMPLE").is_some() {
        return true;
    }
    // The examples of the OAuth RFCs (6749's access, refresh and client
    // credentials, 6750's bearer token, 5849's temporary credentials),
    // copied into OAuth libraries' documentation and tests.
    const PUBLISHED: &[&[u8]] = &[
        b"2YotnFZFEjr1zCsicMWpAA",
        b"tGzv3JOkF0XG5Qx2TlKWIA",
        b"mF_9.B5f-4.1JqM",
        b"hh5s93j4hdidpola",
        b"nnch734d00sl2jdk",
        b"7Fjfp0ZBr1KtDRbnfVdmIw",
        b"gX1fBat3bV",
    ];
    if PUBLISHED.contains(&secret) {
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
    // Words of six letters or more, which a random key of 62 symbols holds
    // in some case once in 31^6 (about 900 million) positions or fewer:
    // anywhere.
    const WORDS: &[&[u8]] = &[
        b"placeholder",
        b"redacted",
        b"changeme",
        // A value that says it is a password or an example
        // (`MyPassword2024!`, `generatedwebdavpassword1`,
        // `idpexamplesecret456`) is a manual's or a test's.
        b"password",
        b"example",
        b"replace",
        b"insert",
        b"12345678",
        b"abcdefgh",
        b"...",
    ];
    // Shorter ones a random key does hold (`your` or `xxxx` in any case:
    // about one 148-character OpenAI key in 3,000, which would go
    // unreported): only where a word starts, at the secret's start or after
    // a byte that is neither letter nor digit (`sk-your-key`, `ghp_xxxx…`,
    // `YOUR_TOKEN`).
    const WORD_STARTS: &[&[u8]] = &[b"xxxx", b"your", b"dummy"];
    WORDS
        .iter()
        .any(|w| memchr::memmem::find(&lower, w).is_some())
        || WORD_STARTS.iter().any(|w| {
            memchr::memmem::find_iter(&lower, w)
                .any(|at| at == 0 || !lower[at - 1].is_ascii_alphanumeric())
        })
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

/// Whether a value with letters of both cases and no digit still reads as
/// generated, not as words: in its last 24 bytes (past a rule's prefix)
/// two capitals meet three times or more (`gPrhpTqmyIjGKYsuQFDhlNsgdNh`).
/// About one random 27-character token in a hundred holds no digit, so a
/// floor of three classes alone would miss that share of a provider's
/// keys; camel-case words (`YourPersonalAccessTokenHere`) meet that test
/// rarely, and only through an acronym. Asked of fixed-shape rules only
/// (not `low` ones, which find values by a name).
fn letters_read_as_generated(secret: &[u8]) -> bool {
    let tail = &secret[secret.len().saturating_sub(24)..];
    let capitals_meet = tail
        .windows(2)
        .filter(|w| w[0].is_ascii_uppercase() && w[1].is_ascii_uppercase())
        .count();
    secret.len() >= 20
        && !secret.iter().any(u8::is_ascii_digit)
        && tail.iter().any(u8::is_ascii_lowercase)
        && capitals_meet >= 3
}

/// Whether `secret` holds the rule's `min_char_classes` of lower case,
/// upper case and digits. A fixed-shape rule's value that lacks only the
/// digit counts the digit when its letters read as generated
/// ([`letters_read_as_generated`]); a `low` rule's value, found by a name,
/// is counted as written.
fn meets_class_floor(spec: &RuleSpec, secret: &[u8]) -> bool {
    let Some(min) = spec.min_char_classes else {
        return true;
    };
    let classes = char_classes(secret);
    classes >= min
        || (classes + 1 == min
            && spec.confidence != Confidence::Low
            && letters_read_as_generated(secret))
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

    /// How many rejections this thread's scans with `engine` remember.
    fn remembered(engine: &Engine) -> usize {
        engine
            .scratch
            .get()
            .map_or(0, |s| s.borrow().rejected.seen.len())
    }

    /// Every built-in rule's example and negative example, alone and
    /// between the others, with a copy on a `keymint:allow` line: the
    /// scanner that remembers what it turned down finds, in every text and
    /// in every order, what one that remembers nothing finds.
    #[test]
    fn remembered_rejections_change_no_finding() {
        let specs = crate::rules::load_rules(&[]).unwrap();
        let forgetful = Mode {
            remember_rejections: false,
            ..Mode::SCANNER
        };
        let fresh = Engine::build(specs.clone(), forgetful).unwrap();
        let remembering = Engine::build(specs.clone(), Mode::SCANNER).unwrap();
        let mut texts: Vec<String> = Vec::new();
        for spec in &specs {
            for t in spec.samples() {
                texts.push(format!("{t}\n  {t}\n{t} # keymint:allow\n"));
            }
        }
        let joined: Vec<String> = texts.chunks(5).map(|c| c.join("")).collect();
        texts.extend(joined);
        let mut found = 0;
        for round in 0..2 {
            for text in texts.iter().rev().skip(round) {
                let want = fresh.scan(text.as_bytes());
                assert_eq!(remembering.scan(text.as_bytes()), want, "{text:?}");
                found += want.len();
            }
        }
        assert!(remembered(&remembering) > 100);
        assert_eq!(remembered(&fresh), 0);
        assert!(found > 500, "{found}");
    }

    /// A match turned down for its line (`keymint:allow`) is not turned
    /// down for its bytes: the same bytes on another line are found.
    #[test]
    fn a_match_allowed_on_its_line_is_found_on_the_next() {
        let engine = engine();
        for id in ["github.token", "uri.password"] {
            let rule = engine.rules().iter().find(|r| r.spec.id == id).unwrap();
            let key = &rule.spec.examples[0];
            let text = format!("x {key} y # keymint:allow\nx {key} y\n");
            let found = engine.scan(text.as_bytes());
            assert_eq!(found.len(), 1, "{text}");
            assert!(found[0].start > text.find('\n').unwrap(), "{text}");
        }
    }

    /// The screen keeps no piece of what it read; the scanner keeps what
    /// it turned down, within its bound.
    #[test]
    fn only_the_scanner_remembers_and_within_its_bound() {
        let text = "DATABASE_URL=postgres://postgres:postgres@localhost:5432/test\n";
        let screen = crate::screen::Screen::builtin().unwrap();
        assert!(screen.engine().scan(text.as_bytes()).is_empty());
        assert_eq!(remembered(screen.engine()), 0);
        let scanner = engine();
        assert!(scanner.scan(text.as_bytes()).is_empty());
        // Turned down by `uri.password` (`uri.credentials` opens no window:
        // its `after` asks for 12 bytes of a password), remembered once.
        assert_eq!(remembered(&scanner), 1);
        assert!(scanner.scan(text.as_bytes()).is_empty());
        assert_eq!(remembered(&scanner), 1);

        let mut memo = Rejected::default();
        let window = vec![b'a'; Rejected::MAX_MATCH + 1];
        assert!(!memo.key(0, &window, 0..window.len()));
        let mut inserted = 0;
        for i in 0..=Rejected::MAX_BYTES / Rejected::MAX_MATCH {
            assert!(memo.key(i, &window, 0..Rejected::MAX_MATCH));
            memo.insert(1);
            inserted += 1;
            assert!(memo.bytes <= Rejected::MAX_BYTES);
        }
        assert!(memo.seen.len() < inserted);
        assert!(memo.key(inserted - 1, &window, 0..Rejected::MAX_MATCH));
        assert_eq!(memo.get(), Some(1));
    }

    /// Patterns compiled on several threads come back in their order, an
    /// error in its place.
    #[test]
    fn patterns_compiled_together_keep_their_order() {
        let patterns: Vec<String> = (0..101)
            .map(|i| {
                if i == 57 {
                    "(".into()
                } else {
                    format!("k{i}v")
                }
            })
            .collect();
        let refs: Vec<&str> = patterns.iter().map(String::as_str).collect();
        let compiled = compile_all(&refs);
        assert_eq!(compiled.len(), patterns.len());
        for (i, regex) in compiled.iter().enumerate() {
            if i == 57 {
                assert!(regex.is_err());
                continue;
            }
            let regex = regex.as_ref().unwrap();
            assert!(regex.is_match(format!("k{i}v").as_bytes()), "{i}");
            assert!(!regex.is_match(format!("k{}v", i + 1).as_bytes()), "{i}");
        }
    }

    /// The groups read anchored on a match found (the engine's way) are
    /// those `regex` reads for the same match, for every built-in pattern
    /// (the scanner's and the screen's) on its examples, its negative
    /// examples, their neighbours' texts around them and cut short, and
    /// with quotes and line ends around them. Both engines: the scanner's
    /// reads a one-pass pattern's groups with its one-pass DFA, the
    /// screen's (built without them) by other means.
    #[test]
    fn groups_read_on_the_match_are_those_regex_reads() {
        let screen = crate::screen::Screen::builtin().unwrap();
        let scanner = engine();
        let rules = screen.engine().rules();
        let mut texts: Vec<String> = Vec::new();
        for rule in rules {
            for t in rule.spec.samples() {
                texts.push(t.clone());
                texts.push(format!("x\"{t}\"\n{t} ;{t}"));
                let cut = (0..=t.len() * 3 / 4).rev().find(|&i| t.is_char_boundary(i));
                texts.push(t[..cut.unwrap_or(0)].to_owned());
            }
        }
        let joined: Vec<String> = texts.chunks(7).map(|c| c.join("\n")).collect();
        texts.extend(joined);
        let mut checked = 0;
        // A rule named by words matches a value whole and is never
        // searched for in a text (`Engine::named_rule`).
        let searched = scanner.rules().iter().chain(rules);
        for rule in searched.filter(|r| r.spec.named_by.is_empty()) {
            let plain = crate::rules::compile_pattern(&rule.spec.pattern).unwrap();
            let regex = &rule.compiled().unwrap().regex;
            let mut caps = regex.create_captures();
            for text in &texts {
                let hay = text.as_bytes();
                let mut pos = 0;
                while let Some(m) = plain.find_at(hay, pos) {
                    let want = plain.captures_at(hay, m.start()).unwrap();
                    regex.search_captures(
                        &Input::new(hay).range(m.range()).anchored(Anchored::Yes),
                        &mut caps,
                    );
                    for g in 0..plain.captures_len() {
                        assert_eq!(
                            caps.get_group(g).map(|s| s.range()),
                            want.get(g).map(|m| m.range()),
                            "{} group {g} in {text:?}",
                            rule.spec.id
                        );
                    }
                    checked += 1;
                    pos = m.start() + 1;
                }
            }
        }
        assert!(checked > 1000, "{checked}");
    }

    fn ids(engine: &Engine, text: &str) -> Vec<String> {
        engine
            .scan(text.as_bytes())
            .iter()
            .map(|m| engine.rule(m.rule).spec.id.clone())
            .collect()
    }

    /// An engine of the rules in one rule file's text.
    fn engine_of(file: &str) -> Engine {
        Engine::new(crate::rules::parse_rule_file("t.toml", file).unwrap()).unwrap()
    }

    /// The secrets `engine` finds in `text`, in order.
    fn secrets<'t>(engine: &Engine, text: &'t str) -> Vec<&'t str> {
        engine
            .scan(text.as_bytes())
            .iter()
            .map(|m| &text[m.start..m.end])
            .collect()
    }

    /// The screen compiles a rule at its first use; a pattern that parses
    /// but then does not compile (past the size limit) cannot be searched,
    /// and the window its keyword opens is reported whole rather than let
    /// through unread. A pattern that does not parse is refused when the
    /// engine is built, as before.
    #[test]
    fn a_screen_rule_that_cannot_compile_fails_closed() {
        let specs = crate::rules::load_rules(&[]).unwrap();
        let mut spec = specs
            .iter()
            .find(|s| s.id == "github.token")
            .unwrap()
            .clone();
        spec.pattern = "ghp_(?:[a-z]{1000}){1000}".into();
        spec.validator = None;
        let engine = Engine::build(vec![spec.clone()], Mode::SCREEN).unwrap();
        let text = "config: ghp_abc and more";
        let found = engine.scan(text.as_bytes());
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].start <= text.find("ghp_").unwrap());
        assert!(found[0].end > text.find("ghp_").unwrap() + 4);
        assert!(engine.scan(b"nothing here").is_empty());
        // The scanner compiles it at once, and says why it cannot.
        let err = Engine::build(vec![spec.clone()], Mode::SCANNER).unwrap_err();
        assert!(err.to_string().contains("github.token"), "{err}");
        spec.pattern = "ghp_(?P<secret>[a-z]+".into();
        let err = Engine::build(vec![spec], Mode::SCREEN).unwrap_err();
        assert!(
            err.to_string().contains("pattern does not compile"),
            "{err}"
        );
    }

    /// A generic rule leaves a value to the rule whose keyword it holds
    /// only where that rule's pattern reads the keyword's place: a
    /// provider's key whose checksum fails is reported by neither, while
    /// a random value that holds a short keyword by chance (ClickHouse's
    /// `4b1d`, one 32-digit hex value in about 2,300) is still reported.
    #[test]
    fn a_generic_value_yields_only_to_a_rule_that_reads_it() {
        use std::hash::{BuildHasher, Hasher};
        let engine = engine();
        let screen = crate::screen::Screen::builtin().unwrap().engine();
        let mut seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
            | 1;
        let mut hex = |n: usize| -> String {
            (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    char::from(b"0123456789abcdef"[(seed % 16) as usize])
                })
                .collect()
        };
        for _ in 0..20 {
            let value = format!("{}4b1d{}", hex(14), hex(14));
            for text in [
                format!("SERVICE_API_KEY={value}"),
                format!("export PARTNER_TOKEN=\"{value}\"\n"),
                format!("  CRM_API_KEY: '{value}'"),
            ] {
                assert_eq!(ids(&engine, &text), ["generic.env-assignment"], "{text}");
                assert_eq!(screen.scan(text.as_bytes()).len(), 1, "{text}");
            }
        }
        // ClickHouse's keyword at the value's start is ClickHouse's to
        // judge: its key when it passes the rule, nobody's when it does
        // not (two character classes, as a hex digest; too short).
        let clickhouse = "4b1dOpzdlNRFUlH1RD8QZKWJVBLo5ghNMLtuqTCZE7";
        assert_eq!(
            ids(&engine, &format!("SERVICE_API_KEY={clickhouse}")),
            ["clickhouse.cloud-api-secret"]
        );
        for value in [format!("4b1d{}", hex(38)), format!("4b1d{}", hex(20))] {
            assert_eq!(
                ids(&engine, &format!("SERVICE_API_KEY={value}")),
                Vec::<String>::new()
            );
        }
        // A GitHub token whose checksum does not hold: GitHub's rule reads
        // it and lets it go; the generic rule does not take it up.
        let body = hex(36);
        assert_eq!(
            ids(&engine, &format!("SERVICE_API_KEY=ghp_{body}")),
            Vec::<String>::new()
        );
        assert_eq!(
            ids(&engine, &format!("SERVICE_API_KEY=ghx_{body}")),
            ["generic.env-assignment"]
        );
        // The rule's own markers are yielded to wherever they are.
        assert_eq!(
            ids(
                &engine,
                &format!("SERVICE_API_KEY={}sk_{}", hex(10), hex(20))
            ),
            Vec::<String>::new()
        );
    }

    /// A generic rule's finding belongs to the provider its variable's
    /// name says when the value has that provider's shape (design 0050);
    /// otherwise, and for a provider's own rule, it keeps its rule.
    #[test]
    fn a_generic_finding_is_named_by_its_variable() {
        let engine = engine();
        let vultr = "UQZKWJVBYP0ZZ954CKCHWJEHLOURKRJCGXBG";
        assert_eq!(
            ids(&engine, &format!("VULTR_API_KEY={vultr}")),
            ["vultr.api-key"]
        );
        // Lower-case names are `generic.api-key`'s, named the same way.
        assert_eq!(
            ids(&engine, &format!("vultr_api_key: {vultr}")),
            ["vultr.api-key"]
        );
        // The same value under a name that says nothing of Vultr, and a
        // value of another shape under Vultr's name.
        assert_eq!(
            ids(&engine, &format!("SERVICE_API_KEY={vultr}")),
            ["generic.env-assignment"]
        );
        assert_eq!(
            ids(&engine, &format!("VULTR_API_KEY={vultr}Q9")),
            ["generic.env-assignment"]
        );
        // Any of the generic rules, any case of the name.
        let uuid = "c5e365dc-6667-469f-b723-2c9d4caf6de7";
        assert_eq!(
            ids(
                &engine,
                &format!(r#"{{"name": "scaleway_secret_key", "value": "{uuid}"}}"#)
            ),
            ["scaleway.secret-key"]
        );
        assert_eq!(
            ids(&engine, &format!("- name: ScwSecretKey\n  value: {uuid}\n")),
            ["generic.named-secret-yaml"],
            "the word is `scw_`, which `ScwSecretKey` does not hold"
        );
        assert_eq!(
            ids(
                &engine,
                &format!("- name: SCW_SECRET_KEY\n  value: {uuid}\n")
            ),
            ["scaleway.secret-key"]
        );
        // A provider's own rule that reads a name keeps its finding.
        assert_eq!(
            ids(
                &engine,
                "SCW_AWS_SECRET_ACCESS_KEY=SHJ9bC4hGmJKNLu5QZKWJVBqkUuavTUdyOluxamr"
            ),
            ["aws.secret-access-key"]
        );
        // The named rule's floors hold: a value the generic rule takes
        // but IBM's rule does not (two character classes of the three it
        // asks) is left to the generic one.
        assert_eq!(
            ids(
                &engine,
                "IBMCLOUD_API_KEY=s9nkixe2t269ophcpvy2jn6shtesir6ixxiyaon3mp82"
            ),
            ["generic.env-assignment"]
        );
    }

    /// The scanner compiles its rules when it is built, but not those
    /// named by words: only a generic finding under a provider's name asks
    /// for one, and a scan without any should not wait for their patterns.
    #[test]
    fn the_scanner_compiles_a_named_rule_when_it_first_names() {
        let engine = engine();
        let (named, searched): (Vec<_>, Vec<_>) = engine
            .rules()
            .iter()
            .partition(|r| !r.spec.named_by.is_empty());
        assert!(named.len() > 20);
        assert!(named.iter().all(|r| r.compiled.get().is_none()));
        assert!(searched.iter().all(|r| r.compiled.get().is_some()));
        assert_eq!(
            ids(
                &engine,
                "VULTR_API_KEY=UQZKWJVBYP0ZZ954CKCHWJEHLOURKRJCGXBG"
            ),
            ["vultr.api-key"]
        );
        let vultr = engine.rules().iter().find(|r| r.spec.id == "vultr.api-key");
        assert!(vultr.is_some_and(|r| r.compiled.get().is_some()));
    }

    /// Where one provider has two keys under alike names, the value's shape
    /// tells them apart; a word shared with ordinary names is not a
    /// provider's (design 0050, session 41).
    #[test]
    fn one_providers_keys_are_told_apart_by_their_shape() {
        let engine = engine();
        let api = "3542f3decc3a7d7188bcd8d30a8f179a";
        let app = "babc0b5ad6f59722f87013b6cceb366e05f6795c";
        assert_eq!(
            ids(&engine, &format!("DATADOG_API_KEY={api}")),
            ["datadog.api-key"]
        );
        assert_eq!(
            ids(&engine, &format!("DATADOG_APP_KEY={app}")),
            ["datadog.application-key"]
        );
        // Two more hex digits are neither of Datadog's shapes.
        assert_eq!(
            ids(&engine, &format!("DD_API_KEY={api}9f")),
            ["generic.env-assignment"]
        );
        // Azure DevOps: the base32 PAT and the 84-character one, whose
        // signature must stand at 76.
        let old = "tyvvx5kp75vuxhxpgxeabu7zu644gynxhz6fkarp33or22gobtve";
        assert_eq!(
            ids(&engine, &format!("AZURE_DEVOPS_TOKEN={old}")),
            ["azure.devops-pat"]
        );
        let new =
            "zYcdotchOa3iZMtkYZst0SbaKHlLhLUyKR9SrtAqXlCpuPneLmeIqLImcGufBQZKWJVBY96gzdjzAZDOX5W7";
        assert_eq!(
            ids(&engine, &format!("AZDO_TOKEN={new}")),
            ["azure.devops-pat"]
        );
        let moved = format!("{}{}AZDO", &new[..72], &new[80..]);
        assert_eq!(
            ids(&engine, &format!("AZDO_TOKEN={moved}")),
            ["generic.env-assignment"]
        );
        // `moderation` alone names OpenAI's endpoint as well: only the
        // service's own word names Moderation API.
        let key = "pAHiu2Jjp3gSN6OQ6jeQB9HXCe03WC8OScbh.MgGLUhJMZ7HzviTtcQDpDOBDPqqcbgFUDsxYTdKRQbx3dKRphoc4aopo6BqvOePzOZi0tJ6nmYil9kweYhL24T6rdE9KAtQZKWJVB9EOSFRILqoC7p8.QWNUtLbiUrAseCL9Is6_KF9gUrXHN0c_gvVsuH0USiR";
        assert_eq!(
            ids(&engine, &format!("MODERATION_API_KEY={key}")),
            ["moderationapi.api-key"]
        );
        assert_eq!(
            ids(&engine, &format!("MODERATION_SECRET={key}")),
            ["generic.env-assignment"]
        );
    }

    /// Patterns bound a secret's length by the rule's window, not by a
    /// counted repetition (design 0004, "Rules that fit in memory"): a long
    /// Fly.io macaroon and a large PEM body are found whole, and the private
    /// key still needs its END line inside the window.
    #[test]
    fn long_secrets_are_found_whole_up_to_the_window() {
        let engine = engine();
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let body = |n: usize, seed: usize| -> String {
            (0..n)
                .map(|i| char::from(alphabet[(i * 7 + seed + i / 5) % alphabet.len()]))
                .collect()
        };
        for len in [150, 1_500, 3_900] {
            let token = format!("FlyV1 fm2_{}", body(len, len));
            let text = format!("FLY_API_TOKEN=\"{token}\"\n");
            let found = engine.scan(text.as_bytes());
            assert_eq!(found.len(), 1, "{len}");
            assert_eq!(
                &text.as_bytes()[found[0].start..found[0].end],
                token.as_bytes()
            );
        }
        let lines = |n: usize| -> String {
            let b = body(n, 3);
            b.as_bytes()
                .chunks(64)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect::<Vec<_>>()
                .join("\n")
        };
        let pem = |n: usize| {
            format!(
                "-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----\n",
                lines(n)
            )
        };
        // A body the old count (16,000) refused, inside the 16 KiB window.
        let big = pem(16_100);
        assert_eq!(ids(&engine, &big), ["private-key.pem"]);
        // A body past the window: no END line in reach, no match.
        assert!(ids(&engine, &pem(20_000)).is_empty());
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
    fn the_builtin_prefilters_take_as_few_passes_as_the_cpu_allows() {
        // Each searcher is a pass over the text; a literal shorter than four
        // bytes shortens the mask of its whole searcher (docs/design/0004):
        // the short ones are apart, the rest in as few searchers as the
        // CPU's widest Teddy takes.
        let engine = engine();
        let cap = crate::layout::Shape::detect().cap;
        let (mut short, mut long) = (0, 0);
        for pf in &engine.prefilters {
            let n = pf.literals.iter().filter(|k| k.len() < 4).count();
            assert!(n == 0 || n == pf.literals.len(), "{:?}", pf.literals);
            if n == 0 {
                long += pf.literals.len();
            } else {
                short += n;
            }
        }
        let sizes = engine.prefilter_sizes();
        assert_eq!(
            sizes.len(),
            short.div_ceil(cap) + long.div_ceil(cap),
            "{sizes:?}"
        );
        // Near-equal sizes; a unit of case variants may tip one over.
        assert!(sizes.iter().all(|&n| n <= cap + 4), "{sizes:?}");
        assert!(long > 200, "{long}");
    }

    #[test]
    fn the_screen_reads_a_short_text_once_with_one_dfa_of_every_keyword() {
        // The proxy screens every request's path and header values: one
        // pass of one DFA, not one Rabin-Karp search per Teddy searcher.
        let scanner = engine();
        let screen = Engine::build(crate::rules::load_rules(&[]).unwrap(), Mode::SCREEN).unwrap();
        let dfa = screen.short.as_ref().expect("the screen has a DFA");
        let Search::Automaton(ac) = &dfa.search else {
            panic!("the screen searches short texts with an automaton");
        };
        assert_eq!(ac.kind(), AhoCorasickKind::DFA);
        assert!(dfa.overlapping);
        // Every keyword is in it, each with the rules it triggers (the
        // scanner's searchers also hold the encoding hints, with none).
        let literals: usize = scanner
            .prefilters
            .iter()
            .flat_map(|p| &p.keyword_rules)
            .filter(|r| !r.is_empty())
            .count();
        assert!(dfa.literals.len() >= literals);
        assert!(dfa.literals.len() > 64);
        // Longer texts: the screen's Teddy searchers hold every keyword of
        // the DFA once, and no encoding hint.
        let mut laid_out: Vec<&String> =
            screen.prefilters.iter().flat_map(|p| &p.literals).collect();
        laid_out.sort();
        let mut every: Vec<&String> = dfa.literals.iter().collect();
        every.sort();
        every.dedup();
        assert_eq!(laid_out, every);
        assert!(
            screen
                .prefilters
                .iter()
                .all(|p| !p.overlapping && p.hints.iter().all(|h| !h))
        );
        assert!(scanner.short.is_none());
    }

    #[test]
    fn the_screens_two_searches_open_the_same_windows() {
        // Short texts go to the DFA, longer ones to the Teddy searchers:
        // whichever reads a text, the same windows open (and so the same
        // findings). Every keyword of the DFA, at every offset in a text
        // of other keywords' pieces, overlapping each other.
        let screen = Engine::build(crate::rules::load_rules(&[]).unwrap(), Mode::SCREEN).unwrap();
        let dfa = screen.short.as_ref().unwrap();
        let by = |pfs: &[Prefilter], hay: &[u8]| {
            let mut w = screen.windows_in(pfs, hay).0;
            w.sort_unstable();
            w.dedup();
            w
        };
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let mut checked = 0;
        for round in 0..400 {
            let mut hay = Vec::new();
            while hay.len() < 40 + round % 300 {
                let lit = dfa.literals[next(dfa.literals.len())].as_bytes();
                // Whole keywords, their halves (overlaps), and filler.
                match next(4) {
                    0 => hay.extend_from_slice(&lit[next(lit.len())..]),
                    1 => hay.extend_from_slice(b" = \"Q7ZKWJVBx9fLm2Rt0123456789abcdefgh\"\n"),
                    _ => hay.extend_from_slice(lit),
                }
            }
            let teddy = by(&screen.prefilters, &hay);
            let short = by(std::slice::from_ref(dfa), &hay);
            assert_eq!(teddy, short, "{:?}", String::from_utf8_lossy(&hay));
            checked += teddy.len();
            // And what the screen finds is what either finds.
            assert_eq!(
                screen.scan(&hay),
                screen.matches(
                    &hay,
                    &mut screen.windows_in(std::slice::from_ref(dfa), &hay).0
                )
            );
        }
        assert!(checked > 2_000, "{checked}");
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
        let engine = engine_of(&file);
        let cap = crate::layout::Shape::detect().cap;
        let sizes = engine.prefilter_sizes();
        // With the encoding hints, all four bytes or more.
        let literals = 150 + crate::decode::HINTS.len();
        assert_eq!(sizes.len(), literals.div_ceil(cap), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), literals);
        for i in [0, 31, 63, 64, 127, 128, 149] {
            let text = format!("x = qz{i:03}_Kd8QZKWJVBp2LmN7xR4t\n");
            assert_eq!(ids(&engine, &text), [format!("t.r{i}")], "rule {i}");
        }
    }

    /// The generic rules yield to the same markers: one automaton serves
    /// them all, built once.
    #[test]
    fn rules_that_yield_to_the_same_markers_share_one_automaton() {
        let engine = engine();
        let with: Vec<&CompiledRule> = engine
            .rules
            .iter()
            .filter(|r| r.markers.is_some())
            .collect();
        assert!(with.len() >= 2, "{} rules yield to markers", with.len());
        let first = with[0].markers.as_ref().unwrap();
        for rule in &with {
            assert_eq!(rule.spec.yields_to, with[0].spec.yields_to);
            assert!(
                Arc::ptr_eq(rule.markers.as_ref().unwrap(), first),
                "{}",
                rule.spec.id
            );
        }
    }

    #[test]
    fn a_keyword_opens_a_window_only_where_its_after_holds() {
        // `tok:` then four digits, or no window: the regex does not run
        // around the keyword's other occurrences, and what it finds is
        // unchanged.
        let file = "[[rule]]\nid = \"t.a\"\nname = \"a\"\nkeywords = [\"tok:\"]\n\
                    after = '[0-9]{4}'\npattern = 'tok:(?P<secret>[0-9]{4}[a-z]{12})'\n\
                    confidence = \"high\"\nexamples = [\"tok:1234qzkwjvbabcde\"]\n";
        let engine = engine_of(file);
        let (windows, _) = engine.windows(b"tok:abcd tok:12 tok:1234qzkwjvbabcde");
        assert_eq!(windows.len(), 1, "{windows:?}");
        assert_eq!(ids(&engine, "x tok:1234qzkwjvbabcde y"), ["t.a"]);
        assert!(ids(&engine, "x tok:qzkwjvbabcdefghi y").is_empty());
    }

    #[test]
    fn a_match_that_runs_to_its_windows_end_is_read_whole() {
        // The keyword's window (30 bytes) ends inside the value: the value
        // is read to its end, not cut where the window is (`$` would take
        // the cut for the end of the text).
        let file = "[[rule]]\nid = \"t.w\"\nname = \"w\"\nkeywords = [\"qzmark\"]\nwindow = 30\n\
                    pattern = 'val=(?P<secret>[A-Za-z0-9]{8,})(?:;|$)'\nconfidence = \"low\"\n\
                    examples = [\"qzmark val=Kd8QZKWJVBp2LmN7xR4t;\"]\n";
        let rule = engine_of(file);
        let value = "Kd8QZKWJVBp2LmN7xR4tPq7QZKWJVBz4RtY8wE2u";
        let text = format!("qzmark ............ val={value}; tail");
        assert_eq!(secrets(&rule, &text), [value]);
        // A window its rule's `until` ended is not read past.
        let file = "[[rule]]\nid = \"t.b\"\nname = \"b\"\nkeywords = [\"qzblock\"]\nuntil = ';;'\n\
                    pattern = 'val=(?P<secret>[A-Za-z0-9;]{8,})'\nconfidence = \"low\"\n\
                    examples = [\"qzblock val=Kd8QZKWJVBp2\"]\n";
        let block = engine_of(file);
        let text = "qzblock val=Kd8QZKWJVB;;Pq7QZKWJVBz4RtY8wE2u";
        assert_eq!(secrets(&block, text), ["Kd8QZKWJVB;;"]);
        // A value whose whole is turned down (a documentation example) is
        // not reported by the part the window held: the AWS example key
        // under `aws_secret_access_key` is AWS's rule's (which drops it),
        // and the window `oauth_token`'s `h_t` opens for the generic rule
        // ends inside it, before `EXAMPLE`.
        let builtin = engine();
        let text = format!(
            "oauth_token=\"ad180jjd733klru7\"\n{}\naws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n",
            "The index sends the buffer to the server; see the index guide. ".repeat(2)
        );
        let cut = text.find("h_t").unwrap() + 3 + 200;
        let value = text.find("wJalr").unwrap();
        assert!(
            value < cut && cut < text.find("EXAMPLE").unwrap(),
            "the window ends inside the value"
        );
        assert!(
            ids(&builtin, &text).is_empty(),
            "{:?}",
            ids(&builtin, &text)
        );
    }

    #[test]
    fn a_window_ends_at_its_rules_until() {
        // `##[group]` … `##[endgroup]`: a value after the block's end is not
        // the block's, and the window does not reach it.
        let file = "[[rule]]\nid = \"t.u\"\nname = \"u\"\nkeywords = [\"<<g\"]\n\
                    until = '<<e'\nwindow = 400\npattern = '(?m)^  TOKEN: (?P<secret>[A-Za-z0-9]{20})$'\n\
                    confidence = \"low\"\nexamples = [\"<<g\\n  TOKEN: Kd8QZKWJVBp2LmN7xR4t\\n<<e\\n\"]\n";
        let engine = engine_of(file);
        let text = "<<g\n  TOKEN: Kd8QZKWJVBp2LmN7xR4t\n<<e\n  TOKEN: Pq7QZKWJVBz4RtY8wE2u\n";
        let (windows, _) = engine.windows(text.as_bytes());
        assert_eq!(windows, [(0, 0, 37)]);
        assert_eq!(secrets(&engine, text), ["Kd8QZKWJVBp2LmN7xR4t"]);
        // No `until` in reach: the window is the rule's.
        let (windows, _) = engine.windows(b"<<g\n  TOKEN: Kd8QZKWJVBp2LmN7xR4t\n");
        assert_eq!(windows, [(0, 0, 34)]);
    }

    #[test]
    fn every_occurrence_of_every_keyword_is_searched() {
        // `ab_c` is a prefix of `ab_cd_`, `cd_x` overlaps the end of
        // `ab_cd_`, `xy` (short) is in another searcher: a leftmost-first
        // search alone reports one keyword where several start or overlap.
        let rule = |id: &str, kw: &str| {
            format!(
                "[[rule]]\nid = \"t.{id}\"\nname = \"{id}\"\nkeywords = [\"{kw}\"]\n\
                 window = 0\nwindow_before = 0\npattern = '{kw}'\nconfidence = \"high\"\n\
                 examples = [\"{kw}\"]\n"
            )
        };
        let file = [
            rule("a", "ab_c"),
            rule("b", "ab_cd_"),
            rule("c", "cd_x"),
            rule("d", "xy"),
        ]
        .concat();
        let engine = engine_of(&file);
        let (mut windows, hinted) = engine.windows(b"..ab_cd_xy..");
        assert!(!hinted);
        windows.sort_unstable();
        assert_eq!(windows, [(0, 2, 6), (1, 2, 8), (2, 5, 9), (3, 8, 10)]);
    }

    #[test]
    fn a_rule_runs_only_in_windows_holding_a_required_literal() {
        // The pattern alone matches any `val=…`; `requires` lets it run
        // only where `nm=` or `NM=` is within the window.
        let file = "[[rule]]\nid = \"t.req\"\nname = \"req\"\nkeywords = [\"val=\"]\n\
                    window = 40\nwindow_before = 0\nrequires = [\"nm=\", \"NM=\"]\n\
                    pattern = 'val=(?P<secret>[A-Za-z0-9]{16,})'\n\
                    confidence = \"low\"\n\
                    examples = [\"val=Q7ZKWJVBx9fLm2Rt nm=KEY\"]\n";
        let engine = engine_of(file);
        let found = |hay: &[u8]| engine.scan(hay).len();
        assert_eq!(found(b"val=Q7ZKWJVBx9fLm2Rt nm=KEY"), 1);
        assert_eq!(found(b"val=Q7ZKWJVBx9fLm2Rt, NM=other"), 1);
        assert_eq!(found(b"val=Q7ZKWJVBx9fLm2Rt"), 0);
        // A literal out of the window's reach does not open it.
        let far = format!("val=Q7ZKWJVBx9fLm2Rt {} nm=KEY", "x".repeat(64));
        assert_eq!(found(far.as_bytes()), 0);

        let bad = file.replace("\"NM=\"", "\"\"");
        assert!(crate::rules::parse_rule_file("t.toml", &bad).is_err());
    }

    #[test]
    fn a_secret_longer_than_its_rules_max_length_is_dropped() {
        // The built-in bearer rule reads `{24,}` and drops more than 512.
        let engine = engine();
        let token = |n: usize| {
            (0..n)
                .map(|i| b"Q7ZKWJVBx9fLm2Rt"[(i * 7 + i / 16) % 16] as char)
                .collect::<String>()
        };
        for (n, found) in [(512, true), (513, false), (4096, false)] {
            let line = format!("Authorization: Bearer {}\n", token(n));
            assert_eq!(ids(&engine, &line) == ["generic.bearer"], found, "{n}");
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

    /// A random key holds a short filler word by chance (`your` or `xxxx`
    /// in any case at one position in about 460,000): inside the key it is
    /// part of the key and the key is reported; where a word starts it is
    /// a placeholder.
    #[test]
    fn a_short_filler_word_inside_a_key_is_part_of_the_key() {
        let engine = engine();
        let alnum = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut body = |n: usize| -> String {
            (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1);
                    char::from(alnum[(state >> 33) as usize % alnum.len()])
                })
                .collect()
        };
        for word in ["YoUr", "xXxX", "DUMMY", "your"] {
            let half = format!("{}{word}{}", body(20), body(54 - word.len()));
            let key = format!("sk-proj-{half}T3BlbkFJ{}", body(74));
            assert_eq!(
                ids(&engine, &format!("OPENAI_API_KEY={key}\n")),
                ["openai.project-key"],
                "{key}"
            );
        }
        for placeholder in [
            "sk-your-key-here",
            "YOUR_API_KEY",
            "ghp_xxxxTOKEN",
            "key_Dummy1234abcd",
        ] {
            assert!(is_placeholder(placeholder.as_bytes()), "{placeholder}");
        }
        assert!(!is_placeholder(b"k2LmZ9pYoUrT4vXw8q"));
        for template in ["%s", "pw%(password)s", "%DB_PASSWORD%", "ab%4", "ab%4g12"] {
            assert!(is_placeholder(template.as_bytes()), "{template}");
        }
        assert!(!is_placeholder(b"k2Lm%40Z9pY%2FoUrT4"));
    }

    #[test]
    fn names_that_say_identifier_digest_or_file_hold_no_secret() {
        for name in [
            "REQUEST_TOKEN_ID",
            "MODEL_TOKEN_CHECKSUM",
            "API_KEY_SHA256",
            "apiKeyUuid",
            "tokenHash",
            "db-password-file",
            "secret.path",
        ] {
            assert!(names_no_secret(name.as_bytes()), "{name}");
        }
        for name in [
            "COHERE_API_KEY",
            "ID_TOKEN",
            "SERVICE_TOKEN",
            "apiKey",
            "DB_PASSWORD",
            "SHA_SECRET",
            "PAYMENTS_SECRETS",
        ] {
            assert!(!names_no_secret(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn demo_passwords_are_published_ones_or_words_for_loopback_and_documentation_hosts() {
        for (pw, host) in [
            ("mysecretpassword", "db.internal"),
            ("admin123", "mongo.prod.internal"),
            ("supersecretpass", "localhost"),
            ("devpassword2024", "127.0.0.1"),
            ("localdev", "[::1]"),
            ("hunter", "app.localhost"),
            ("demopass2024", "api.example.com"),
            ("guest123", "example.org"),
            ("changeme", "db.staging.test"),
            ("x-oauth-basic", "github.com"),
        ] {
            assert!(
                is_demo_password(pw.as_bytes(), host.as_bytes()),
                "{pw}@{host}"
            );
        }
        for (pw, host) in [
            ("supersecretpass", "db.internal"),
            ("tkxqvbnmwrplzs42", "localhost"),
            ("Devpassword2024", "localhost"),
            ("dev-password", "localhost"),
            ("k2LmZ9pYoUrT4vXw8q", "127.0.0.1"),
            ("pass2024word", "localhost"),
            ("k2LmZ9pYoUrT4vXw8q", "example.com"),
            ("demopass2024", "notexample.com"),
            ("demopass2024", "example.com.evil.io"),
        ] {
            assert!(
                !is_demo_password(pw.as_bytes(), host.as_bytes()),
                "{pw}@{host}"
            );
        }
    }

    /// The check at a keyword's hit reads a value's first
    /// [`ASSIGNED_VALUE_READ`] bytes; a marker past them is still yielded
    /// to, by the check of the whole match.
    #[test]
    fn a_marker_deep_in_a_long_value_is_yielded_to() {
        let builtin = engine();
        let run = "Kd8QZKWJVBp2LmN7xR4tPq7QZKWJVBz4RtY8wE2u".repeat(4);
        assert!(run.len() > ASSIGNED_VALUE_READ);
        let text = format!("PAYMENTS_API_KEY={run}.sk-Zq7vKpQZKWJVB\n");
        assert!(
            !ids(&builtin, &text).contains(&"generic.env-assignment".to_owned()),
            "{:?}",
            ids(&builtin, &text)
        );
        // Without the marker the same value is the generic rule's.
        let text = format!("PAYMENTS_API_KEY={run}\n");
        assert_eq!(ids(&builtin, &text), ["generic.env-assignment"]);
    }

    #[test]
    fn values_typed_as_words_are_not_generated_keys() {
        for v in [
            "chatkit_token_123",
            "my-api-key-2024",
            "sandbox.key.42",
            "deadbeef1234",
            "secretvalue",
        ] {
            assert!(is_typed_words(v.as_bytes()), "{v}");
        }
        for v in [
            "Bd0Kh8QZKWJVBLzd0cJ2isAj",
            "3f2a9c1e-7b4d-4e8a-9c2f-1a2b3c4d5e6f",
            "a3f9c2e1b4d5a6f7c8e9d0b1a2c3d4e5",
            "tkxqvbnmwrplzs42",
            "2024-10-21",
            "django-insecure-k2lmz9pyourt4vxw8q",
            "",
        ] {
            assert!(!is_typed_words(v.as_bytes()), "{v}");
        }
    }

    /// A fixed-shape key whose random part holds no digit (one in about a
    /// hundred of 27 characters) is found; camel-case words in the same
    /// shape, and a value found by its name only, still need the digit.
    #[test]
    fn a_generated_key_without_a_digit_passes_the_floor_of_three_classes() {
        let engine = engine();
        let body = "gPrhpQZKWJVBsuQFDhlNsgdNhTa";
        assert_eq!(
            ids(&engine, &format!("DOCKERHUB_TOKEN=dckr_pat_{body}\n")),
            ["dockerhub.token"]
        );
        for words in ["YourPersonalAccessTokenHere", "InsertYourDockerHubTokenNow"] {
            let text = format!("DOCKERHUB_TOKEN=dckr_pat_{words}\n");
            assert!(ids(&engine, &text).is_empty(), "{words}");
        }
        assert!(letters_read_as_generated(b"gPrhpTqmyIjGKYsuQFDhlNsgdNh"));
        for v in [
            &b"YourPersonalAccessTokenHere"[..],
            b"gPrhpTqmyIjGKYsuQFDhlNsgd7h",
            b"QFDHLNSGDNHQFDHLNSGDNHQFDH",
            b"QFDhl",
        ] {
            assert!(!letters_read_as_generated(v), "{v:?}");
        }
        // A low rule (a value found by its name) keeps the floor as written.
        let rule = |confidence: &str| {
            let file = format!(
                "[[rule]]\nid = \"t.r\"\nname = \"t\"\nkeywords = [\"tok_\"]\n\
                 pattern = '(?P<secret>tok_[A-Za-z0-9]{{27}})'\nconfidence = \"{confidence}\"\n\
                 min_char_classes = 3\nexamples = [\"tok_Kd8QZKWJVBp2LmN7xR4tAbCdEfG\"]\n"
            );
            engine_of(&file)
        };
        let text = format!("x = tok_{body}\n");
        assert_eq!(ids(&rule("medium"), &text), ["t.r"]);
        assert!(ids(&rule("low"), &text).is_empty());
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
