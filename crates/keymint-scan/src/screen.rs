//! The outbound screen: the scanner's rule engine, set up for text on its
//! way out (the egress proxy screens request bodies with it).
//!
//! A [`Screen`] runs every built-in scanner rule and, on top of them, the
//! broad rules of `rules/screen.toml` (any `sk-…` of 20 characters or more,
//! any AWS key id shape, GitHub tokens without a valid checksum, …): the
//! scanner's rules are tuned for precision on repository content, while a
//! request to a provider must not carry anything shaped like a key. Both sets
//! are data with examples and negative examples, compiled by the same
//! [`Engine`] (Aho-Corasick prefilter, regex in a window around a hit,
//! placeholder filter). The screen's rules never run in `keymint scan`.
//!
//! Each finding carries a kind (`openai_key`, `aws_access_key_id`, …) from
//! the `[kinds]` table of `rules/screen.toml`, by rule id or by family.
//! The inline allow marker is ignored: a sender cannot wave a secret through.
//!
//! Built once per process ([`Screen::builtin`]); [`Screen::find`] does not
//! allocate when the text holds no keyword of any rule and returns nothing
//! when nothing is found.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::OnceLock;

use serde::Deserialize;

use crate::engine::{Engine, Mode};
use crate::rules::{RuleError, RuleSpec, check_fields, check_rule, load_rules};

/// The screen's own rules and the kinds table.
pub const SCREEN_RULE_FILE: (&str, &str) = ("screen.toml", include_str!("../rules/screen.toml"));

/// A secret found by the screen: what it is and where. Never its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match<'s> {
    pub kind: &'s str,
    pub range: Range<usize>,
}

/// The compiled screen.
#[derive(Debug)]
pub struct Screen {
    engine: Engine,
    /// The kind of each of the engine's rules, by rule index.
    kinds: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScreenFile {
    kinds: BTreeMap<String, String>,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleSpec>,
}

static BUILTIN: OnceLock<Result<Screen, RuleError>> = OnceLock::new();

impl Screen {
    /// The built-in scanner rules and the built-in screen rules, compiled
    /// on first use and shared by the whole process.
    pub fn builtin() -> Result<&'static Screen, &'static RuleError> {
        BUILTIN
            .get_or_init(|| {
                let (file, text) = SCREEN_RULE_FILE;
                // Built in, as the scanner's rules: their patterns are
                // compiled once, by the engine (see `check_fields`).
                Self::checked(load_rules(&[])?, file, text, check_fields)
            })
            .as_ref()
    }

    /// `scanner_rules` (checked, see [`load_rules`]) plus the screen file
    /// `text` (named `file` in errors).
    pub fn new(scanner_rules: Vec<RuleSpec>, file: &str, text: &str) -> Result<Self, RuleError> {
        Self::checked(scanner_rules, file, text, check_rule)
    }

    /// [`Screen::new`], each rule of `text` checked with `check`.
    fn checked(
        scanner_rules: Vec<RuleSpec>,
        file: &str,
        text: &str,
        check: fn(&str, &RuleSpec) -> Result<(), RuleError>,
    ) -> Result<Self, RuleError> {
        let parsed: ScreenFile = toml::from_str(text).map_err(|e| RuleError::Parse {
            file: file.to_owned(),
            source: Box::new(e),
        })?;
        let invalid = |id: &str, reason: String| RuleError::Invalid {
            file: file.to_owned(),
            id: id.to_owned(),
            reason,
        };
        for (key, kind) in &parsed.kinds {
            if kind.is_empty()
                || !kind
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(invalid(
                    key,
                    "kinds are lowercase ASCII, digits and `_`".into(),
                ));
            }
        }
        let mut specs = scanner_rules;
        for rule in parsed.rules {
            check(file, &rule)?;
            if specs.iter().any(|r| r.id == rule.id) {
                return Err(invalid(&rule.id, "duplicate rule id".into()));
            }
            specs.push(rule);
        }
        let mut kinds = Vec::with_capacity(specs.len());
        for spec in &specs {
            let family = spec.id.split('.').next().unwrap_or(&spec.id);
            let Some(kind) = parsed
                .kinds
                .get(&spec.id)
                .or_else(|| parsed.kinds.get(family))
            else {
                return Err(invalid(
                    &spec.id,
                    "no kind for this rule or its family in `[kinds]`".into(),
                ));
            };
            kinds.push(kind.clone());
        }
        Ok(Self {
            engine: Engine::build(specs, Mode::SCREEN)?,
            kinds,
        })
    }

    /// Every secret in `text`, ordered by position, without overlaps
    /// (overlapping findings are merged, named by the first).
    pub fn find(&self, text: &[u8]) -> Vec<Match<'_>> {
        let raw = self.engine.scan(text);
        let mut out: Vec<Match<'_>> = Vec::with_capacity(raw.len());
        for m in raw {
            match out.last_mut() {
                Some(last) if m.start < last.range.end => {
                    last.range.end = last.range.end.max(m.end);
                }
                _ => out.push(Match {
                    kind: &self.kinds[m.rule],
                    range: m.start..m.end,
                }),
            }
        }
        out
    }

    /// The engine, for its rules (ids, examples).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The kind reported for the engine's rule `idx`.
    pub fn kind(&self, idx: usize) -> &str {
        &self.kinds[idx]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn screen() -> &'static Screen {
        Screen::builtin().unwrap()
    }

    fn screen_ids() -> Vec<String> {
        let (file, text) = SCREEN_RULE_FILE;
        let parsed: ScreenFile = toml::from_str(text).unwrap();
        assert!(!parsed.rules.is_empty(), "{file}");
        parsed.rules.into_iter().map(|r| r.id).collect()
    }

    /// Every built-in pattern (the scanner's and the screen's; each server
    /// holds all of them compiled) stays small: a counted repetition such as
    /// `{64,16000}` compiles to one automaton state per count, and three such
    /// rules once held 6.7 MB of a server's idle memory. A window bounds a
    /// match's length; a pattern need not.
    #[test]
    fn every_builtin_pattern_compiles_to_a_small_automaton() {
        const LIMIT: usize = 256 * 1024;
        let mut too_big = Vec::new();
        for rule in screen().engine().rules() {
            if crate::rules::compile_pattern_within(&rule.spec.pattern, LIMIT).is_err() {
                too_big.push(rule.spec.id.clone());
            }
        }
        assert!(
            too_big.is_empty(),
            "patterns over {LIMIT} bytes compiled: {too_big:?}"
        );
        // The limit catches the class: the old private-key rule's body.
        let counted =
            crate::rules::compile_pattern_within("[A-Za-z0-9+/=]{64,16000}?-----END", LIMIT);
        assert!(counted.is_err());
    }

    fn kinds(text: &str) -> Vec<&'static str> {
        screen()
            .find(text.as_bytes())
            .iter()
            .map(|m| m.kind)
            .collect()
    }

    /// A server keeps its screen for its life, and its idle memory has a
    /// target (40 MB in all): a new screen holds its searchers and no
    /// rule's regex (each is compiled at its first use, and most never
    /// run; design 0041 "session 36"); with every rule run it stays under
    /// 4 MB (no one-pass DFAs, markers in a contiguous NFA; "session
    /// 35"), where the scanner's engine, built for speed, holds more.
    #[test]
    fn the_screen_holds_its_rules_in_little_memory() {
        let (file, text) = SCREEN_RULE_FILE;
        let fresh = Screen::new(load_rules(&[]).unwrap(), file, text).unwrap();
        let idle = fresh.engine().memory_usage();
        assert!(idle < 1 << 20, "{idle}");
        // One rule run: its regex compiled, and it finds what it finds.
        let rules = fresh.engine().rules();
        let github = rules.iter().find(|r| r.spec.id == "github.token").unwrap();
        assert_eq!(fresh.find(github.spec.examples[0].as_bytes()).len(), 1);
        let one = fresh.engine().memory_usage();
        assert!(one > idle && one < idle + (512 << 10), "{idle} {one}");
        // Every rule run.
        for t in rules.iter().flat_map(|r| r.spec.samples()) {
            fresh.find(t.as_bytes());
        }
        let all = fresh.engine().memory_usage();
        assert!(all > one && all < 4 << 20, "{all}");
        let scanner = crate::Engine::with_rules(&[]).unwrap().memory_usage();
        assert!(scanner > all, "{scanner} {all}");
    }

    #[test]
    fn every_rule_has_a_kind_and_the_screen_holds_every_scanner_rule() {
        let s = screen();
        let scanner = load_rules(&[]).unwrap();
        let ids = screen_ids();
        assert_eq!(s.engine().rules().len(), scanner.len() + ids.len());
        for (i, r) in s.engine().rules().iter().enumerate() {
            assert!(!s.kind(i).is_empty(), "{}", r.spec.id);
        }
        assert_eq!(
            Screen::new(scanner, "t.toml", "[kinds]\nopenai = \"openai_key\"\n")
                .unwrap_err()
                .to_string(),
            "rule `keymint.token` in `t.toml`: no kind for this rule or its family in `[kinds]`"
        );
    }

    #[test]
    fn every_screen_rule_finds_its_examples_and_nothing_in_its_negatives() {
        let s = screen();
        let ids = screen_ids();
        let mut failures = Vec::new();
        for (i, rule) in s.engine().rules().iter().enumerate() {
            if !ids.contains(&rule.spec.id) {
                continue;
            }
            for ex in &rule.spec.examples {
                let found = s.find(ex.as_bytes());
                if !found.iter().any(|m| m.kind == s.kind(i)) {
                    failures.push(format!(
                        "{}: example not found ({found:?}): {ex}",
                        rule.spec.id
                    ));
                }
            }
            for ex in &rule.spec.negative_examples {
                let found = s.find(ex.as_bytes());
                if !found.is_empty() {
                    failures.push(format!(
                        "{}: negative example found {found:?}: {ex}",
                        rule.spec.id
                    ));
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn the_screen_finds_every_scanner_example_under_its_kind() {
        let s = screen();
        let ids = screen_ids();
        let mut failures = Vec::new();
        for (i, rule) in s.engine().rules().iter().enumerate() {
            if ids.contains(&rule.spec.id) {
                continue;
            }
            for ex in &rule.spec.examples {
                let found = s.find(ex.as_bytes());
                if !found.iter().any(|m| m.kind == s.kind(i)) {
                    failures.push(format!(
                        "{}: example not found ({found:?}): {ex}",
                        rule.spec.id
                    ));
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn the_scanner_never_runs_the_screen_rules() {
        let scanner = Engine::with_rules(&[]).unwrap();
        let ids = screen_ids();
        assert!(
            scanner.rules().iter().all(|r| !ids.contains(&r.spec.id)),
            "a screen rule is in the scanner"
        );
        // A key without OpenAI's marker: the screen blocks it, a repository
        // scan does not report it.
        let text = format!("key = sk-{}", "Zx9Qw8Er7Ty6".repeat(4));
        assert!(scanner.scan(text.as_bytes()).is_empty());
        assert_eq!(kinds(&text), ["openai_key"]);
    }

    #[test]
    fn the_allow_marker_does_not_hide_a_secret_from_the_screen() {
        let text = format!("sk-proj-{}  # keymint:allow", "Zx9Qw8Er7Ty6".repeat(4));
        assert_eq!(kinds(&text), ["openai_key"]);
    }

    #[test]
    fn anthropic_keys_are_not_named_openai_keys() {
        assert_eq!(
            kinds(&format!("a sk-ant-api03-{} b", "Qw9_".repeat(10))),
            ["anthropic_key"]
        );
        assert_eq!(kinds(&format!("sk-{}", "Qw9_".repeat(10))), ["openai_key"]);
    }

    #[test]
    fn findings_do_not_overlap_and_span_the_secret_only() {
        let key = format!("sk-proj-{}", "Zx9Qw8Er7Ty6".repeat(4));
        let aws = "AKIA0QZKWJVB1890ABCD";
        let text = format!("first {key}\nthen {aws}, done");
        let found = screen().find(text.as_bytes());
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(&text[found[0].range.clone()], key);
        assert_eq!(&text[found[1].range.clone()], aws);
        assert!(found[0].range.end <= found[1].range.start);
        assert_eq!(found[1].kind, "aws_access_key_id");
        assert!(
            screen()
                .find(b"nothing to see: task-1234 and ASIA")
                .is_empty()
        );
    }
}
