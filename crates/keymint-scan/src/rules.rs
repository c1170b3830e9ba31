//! Rules as data: one TOML file per provider family under `rules/`, compiled
//! into the binary, and an optional user file with the same shape.
//!
//! A rule is parsed into a [`RuleSpec`] (what the file says) and checked here
//! (ids unique, pattern compiles, keywords non-empty); the engine compiles the
//! checked rules into its prefilter and regexes.

use regex_automata::meta;
use regex_automata::util::syntax;
use serde::{Deserialize, Serialize};

/// The built-in rule files, in the order their rules take precedence when two
/// rules report the same bytes.
pub const BUILTIN_RULE_FILES: &[(&str, &str)] = &[
    ("keymint.toml", include_str!("../rules/keymint.toml")),
    ("openai.toml", include_str!("../rules/openai.toml")),
    ("anthropic.toml", include_str!("../rules/anthropic.toml")),
    ("google.toml", include_str!("../rules/google.toml")),
    ("azure.toml", include_str!("../rules/azure.toml")),
    (
        "huggingface.toml",
        include_str!("../rules/huggingface.toml"),
    ),
    ("cohere.toml", include_str!("../rules/cohere.toml")),
    ("mistral.toml", include_str!("../rules/mistral.toml")),
    ("groq.toml", include_str!("../rules/groq.toml")),
    ("replicate.toml", include_str!("../rules/replicate.toml")),
    ("together.toml", include_str!("../rules/together.toml")),
    ("perplexity.toml", include_str!("../rules/perplexity.toml")),
    ("xai.toml", include_str!("../rules/xai.toml")),
    ("deepseek.toml", include_str!("../rules/deepseek.toml")),
    ("openrouter.toml", include_str!("../rules/openrouter.toml")),
    ("fireworks.toml", include_str!("../rules/fireworks.toml")),
    ("langsmith.toml", include_str!("../rules/langsmith.toml")),
    ("pinecone.toml", include_str!("../rules/pinecone.toml")),
    ("cartesia.toml", include_str!("../rules/cartesia.toml")),
    ("devin.toml", include_str!("../rules/devin.toml")),
    ("langfuse.toml", include_str!("../rules/langfuse.toml")),
    ("llamacloud.toml", include_str!("../rules/llamacloud.toml")),
    ("minimax.toml", include_str!("../rules/minimax.toml")),
    ("brave.toml", include_str!("../rules/brave.toml")),
    ("elevenlabs.toml", include_str!("../rules/elevenlabs.toml")),
    ("deepgram.toml", include_str!("../rules/deepgram.toml")),
    ("assemblyai.toml", include_str!("../rules/assemblyai.toml")),
    ("moonshot.toml", include_str!("../rules/moonshot.toml")),
    ("zhipu.toml", include_str!("../rules/zhipu.toml")),
    ("stability.toml", include_str!("../rules/stability.toml")),
    ("voyage.toml", include_str!("../rules/voyage.toml")),
    ("mem0.toml", include_str!("../rules/mem0.toml")),
    ("fal.toml", include_str!("../rules/fal.toml")),
    ("aws.toml", include_str!("../rules/aws.toml")),
    ("github.toml", include_str!("../rules/github.toml")),
    ("gitlab.toml", include_str!("../rules/gitlab.toml")),
    ("slack.toml", include_str!("../rules/slack.toml")),
    ("stripe.toml", include_str!("../rules/stripe.toml")),
    ("npm.toml", include_str!("../rules/npm.toml")),
    (
        "private-key.toml",
        include_str!("../rules/private-key.toml"),
    ),
    ("cerebras.toml", include_str!("../rules/cerebras.toml")),
    ("nvidia.toml", include_str!("../rules/nvidia.toml")),
    ("wandb.toml", include_str!("../rules/wandb.toml")),
    ("vercel.toml", include_str!("../rules/vercel.toml")),
    (
        "digitalocean.toml",
        include_str!("../rules/digitalocean.toml"),
    ),
    ("heroku.toml", include_str!("../rules/heroku.toml")),
    ("supabase.toml", include_str!("../rules/supabase.toml")),
    ("databricks.toml", include_str!("../rules/databricks.toml")),
    ("doppler.toml", include_str!("../rules/doppler.toml")),
    ("hashicorp.toml", include_str!("../rules/hashicorp.toml")),
    ("alibaba.toml", include_str!("../rules/alibaba.toml")),
    ("runpod.toml", include_str!("../rules/runpod.toml")),
    ("flyio.toml", include_str!("../rules/flyio.toml")),
    ("pypi.toml", include_str!("../rules/pypi.toml")),
    ("dockerhub.toml", include_str!("../rules/dockerhub.toml")),
    ("sendgrid.toml", include_str!("../rules/sendgrid.toml")),
    ("postman.toml", include_str!("../rules/postman.toml")),
    ("cloudflare.toml", include_str!("../rules/cloudflare.toml")),
    ("exoscale.toml", include_str!("../rules/exoscale.toml")),
    ("yandex.toml", include_str!("../rules/yandex.toml")),
    ("upcloud.toml", include_str!("../rules/upcloud.toml")),
    ("render.toml", include_str!("../rules/render.toml")),
    ("netlify.toml", include_str!("../rules/netlify.toml")),
    ("clickhouse.toml", include_str!("../rules/clickhouse.toml")),
    (
        "cockroachlabs.toml",
        include_str!("../rules/cockroachlabs.toml"),
    ),
    ("datastax.toml", include_str!("../rules/datastax.toml")),
    ("elastic.toml", include_str!("../rules/elastic.toml")),
    ("mongodb.toml", include_str!("../rules/mongodb.toml")),
    ("neon.toml", include_str!("../rules/neon.toml")),
    (
        "planetscale.toml",
        include_str!("../rules/planetscale.toml"),
    ),
    ("tailscale.toml", include_str!("../rules/tailscale.toml")),
    ("temporal.toml", include_str!("../rules/temporal.toml")),
    ("grafana.toml", include_str!("../rules/grafana.toml")),
    ("deno.toml", include_str!("../rules/deno.toml")),
    ("openshift.toml", include_str!("../rules/openshift.toml")),
    ("pulumi.toml", include_str!("../rules/pulumi.toml")),
    ("terraform.toml", include_str!("../rules/terraform.toml")),
    // Last: structure-only rules yield to every provider's own rule.
    ("generic.toml", include_str!("../rules/generic.toml")),
    // Searches nothing: attributes the generic rules' findings by name.
    ("named.toml", include_str!("../rules/named.toml")),
];

/// How sure a rule is when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Confidence {
    /// A fixed marker or a checksum was verified offline.
    High,
    /// A distinctive prefix and shape.
    Medium,
    /// Found by the surrounding context (a variable name).
    Low,
}

/// An offline check of a candidate secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Validator {
    /// GitHub (and npm) tokens: the last six base62 digits are the CRC32 of
    /// the 30 characters after the four-character prefix.
    GithubCrc32,
    /// keymint's own `kmt_`/`kma_` tokens ([`keymint_core::token::check`]).
    Keymint,
    /// `user:password` in base64 (HTTP Basic, a Docker `config.json`'s
    /// `auth`): it decodes to text with a user and a password that is
    /// neither a placeholder nor a typed word.
    BasicAuth,
    /// A key a program generated, not words a person typed
    /// (`chatkit_token_123`, `my-api-key-2024`): for rules that read a value
    /// by its name alone, where documentation and tests put such stand-ins.
    Generated,
}

/// One rule as written in a rule file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Literals, matched case-sensitively by the prefilter; the
    /// pattern runs only near one of them. Empty only for a rule
    /// `named_by` words.
    #[serde(default)]
    pub keywords: Vec<String>,
    /// A rule that searches nothing itself: a match of a `generic.` rule
    /// (one that reads the variable's name beside the value) whose name
    /// holds one of these words, in any case, is this rule's finding when
    /// the value matches this rule's `pattern` whole and passes its floors
    /// (`IBMCLOUD_API_KEY=…` is IBM Cloud's key, not an unnamed secret).
    /// Such a rule costs the prefilter nothing (docs/design/0050).
    #[serde(default)]
    pub named_by: Vec<String>,
    /// Context words (`azure`): matched as written, lowercase, uppercase and
    /// capitalised (four literals for the prefilter).
    #[serde(default)]
    pub keywords_ignore_case: bool,
    /// A bytes regex in ASCII mode; the secret is the `secret` group.
    pub pattern: String,
    pub confidence: Confidence,
    /// The rule's values come from a document whose values are resolved
    /// (Terraform state): `$`, `{`, `<` and the like in one are the
    /// secret's own characters, not template syntax; only a value that is
    /// a template as a whole (`${…}`, `<…>`) is a placeholder.
    #[serde(default)]
    pub resolved_values: bool,
    /// Literals of which one must occur, as written, in a window for the
    /// pattern to run there: every match of the pattern contains one of
    /// them. A `memmem` search over the window costs less than the regex
    /// where a keyword is common and a match rare (`"value"` in JSON).
    #[serde(default)]
    pub requires: Vec<String>,
    /// A regex that the text right after a keyword must match (anchored
    /// there) for the keyword to open a window: what every match holds
    /// after its keyword (`"value"` followed by `: "` and 16 characters of
    /// a secret). Checked at the hit, it costs a few bytes' reading where
    /// the pattern would read the whole window; a keyword that is common
    /// where matches are rare (`"value"`, `Bearer`, `://`) opens far fewer
    /// windows.
    #[serde(default)]
    pub after: Option<String>,
    /// A literal that ends the window after a keyword (the window stops
    /// after its first occurrence): where a match cannot run past it, as a
    /// GitHub Actions log's `##[group]` block past its `##[endgroup]`.
    #[serde(default)]
    pub until: Option<String>,
    /// For a rule that finds values by their name alone: markers of
    /// formats other rules judge (`sk-`, `sk_`). A value holding one of
    /// these, or any other rule's case-sensitive keyword (`kmt_`, `ghp_`,
    /// `T3BlbkFJ`, `AIza`, the screen's `sk-ant-`…) where it starts the
    /// value or a part of it (after a byte that is not a letter or digit)
    /// or where that rule's pattern matches across it, is that rule's to
    /// judge, and not reported by this one when that rule let it go (a
    /// checksum that does not hold, a test key, a key cut short). Empty:
    /// the rule yields to nothing. Such a rule's matches are read as `NAME`,
    /// `=` or `:`, value: what follows the first `=` or `:` is searched for
    /// the markers before the captures run.
    #[serde(default)]
    pub yields_to: Vec<String>,
    /// With `yields_to`: the keywords sit inside the variable's name (`pi_`
    /// of `api_key`), not at its end, so at a keyword's hit the rest of the
    /// name (letters, digits, `_`, `-`) is passed over before the value is
    /// read for the markers.
    #[serde(default)]
    pub keyword_in_name: bool,
    /// For a rule with a `name` group: the words that, before a last word
    /// `KEY`, make the name a credential's (`API`, `ACCESS`); a name ending
    /// in `KEY` after any other word (`CACHE_KEY`, `SORT_KEY`) is dropped.
    /// Empty: any `…KEY` the pattern takes.
    #[serde(default)]
    pub key_kinds: Vec<String>,
    #[serde(default)]
    pub validator: Option<Validator>,
    #[serde(default)]
    pub min_entropy: Option<f64>,
    #[serde(default)]
    pub min_char_classes: Option<u8>,
    /// The longest secret the rule reports, checked after the match: a
    /// pattern writes an open repetition (`{16,}`) instead of a bounded
    /// one (`{16,512}`), which compiles to one NFA state per repetition
    /// and makes every capture search clear a visited set that large.
    #[serde(default)]
    pub max_length: Option<usize>,
    /// Bytes searched before a keyword hit.
    #[serde(default = "default_window_before")]
    pub window_before: usize,
    /// Bytes searched after a keyword hit.
    #[serde(default = "default_window")]
    pub window: usize,
    #[serde(default)]
    pub pairs_with: Option<String>,
    #[serde(default)]
    pub references: Vec<String>,
    pub examples: Vec<String>,
    #[serde(default)]
    pub negative_examples: Vec<String>,
}

#[cfg(test)]
impl RuleSpec {
    /// The rule's examples, then its negative examples.
    pub(crate) fn samples(&self) -> impl Iterator<Item = &String> {
        self.examples.iter().chain(&self.negative_examples)
    }
}

const fn default_window_before() -> usize {
    8
}

const fn default_window() -> usize {
    256
}

/// The largest window a rule may ask for (and so the overlap of chunks).
pub const MAX_WINDOW: usize = 32 * 1024;

/// The shape of a rule file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleSpec>,
}

/// Why a rule file was refused.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("cannot parse rule file `{file}`: {source}")]
    Parse {
        file: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("rule `{id}` in `{file}`: {reason}")]
    Invalid {
        file: String,
        id: String,
        reason: String,
    },
}

/// Parses one rule file and checks each rule on its own.
pub fn parse_rule_file(file: &str, text: &str) -> Result<Vec<RuleSpec>, RuleError> {
    parse_checked(file, text, check_rule)
}

/// Parses one rule file and checks each rule with `check`.
fn parse_checked(
    file: &str,
    text: &str,
    check: fn(&str, &RuleSpec) -> Result<(), RuleError>,
) -> Result<Vec<RuleSpec>, RuleError> {
    let parsed: RuleFile = toml::from_str(text).map_err(|e| RuleError::Parse {
        file: file.to_owned(),
        source: Box::new(e),
    })?;
    for rule in &parsed.rules {
        check(file, rule)?;
    }
    Ok(parsed.rules)
}

/// Checks a rule on its own: its fields, then that its patterns compile.
pub(crate) fn check_rule(file: &str, rule: &RuleSpec) -> Result<(), RuleError> {
    check_fields(file, rule)?;
    let invalid = |reason: String| RuleError::Invalid {
        file: file.to_owned(),
        id: rule.id.clone(),
        reason,
    };
    if let Err(e) = compile_pattern(&rule.pattern) {
        return Err(invalid(format!("pattern does not compile: {e}")));
    }
    if let Some(after) = &rule.after
        && let Err(e) = compile_after(after)
    {
        return Err(invalid(format!("`after` does not compile: {e}")));
    }
    Ok(())
}

/// Every check of [`check_rule`] but the compiles. The built-in rules are
/// checked so: their patterns are compiled once, by the engine (which
/// refuses one that does not compile, naming the rule), and each of them
/// by the tests; compiling them here too doubled a scan's start-up. The
/// screen's built-in file is checked so too.
pub(crate) fn check_fields(file: &str, rule: &RuleSpec) -> Result<(), RuleError> {
    let invalid = |reason: String| RuleError::Invalid {
        file: file.to_owned(),
        id: rule.id.clone(),
        reason,
    };
    let id_ok = !rule.id.is_empty()
        && rule
            .id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if !id_ok {
        return Err(invalid(
            "ids are lowercase ASCII, digits, `.`, `_` and `-`".into(),
        ));
    }
    if rule.named_by.is_empty() && rule.keywords.is_empty() {
        return Err(invalid(
            "at least one keyword (or `named_by` word) is required".into(),
        ));
    }
    if !rule.named_by.is_empty() && !rule.keywords.is_empty() {
        return Err(invalid(
            "a rule named by words (`named_by`) has no keywords: the generic rules find its values"
                .into(),
        ));
    }
    if let Some(w) = rule.named_by.iter().find(|w| {
        w.len() < 3
            || !w
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }) {
        return Err(invalid(format!(
            "`named_by` word `{w}` must be at least 3 bytes of lowercase ASCII, digits and `_`"
        )));
    }
    if let Some(k) = rule.keywords.iter().find(|k| k.len() < 2 || !k.is_ascii()) {
        return Err(invalid(format!(
            "keyword `{k}` must be ASCII and at least 2 bytes"
        )));
    }
    if rule.window > MAX_WINDOW || rule.window_before > MAX_WINDOW {
        return Err(invalid(format!(
            "windows are limited to {MAX_WINDOW} bytes"
        )));
    }
    if rule.examples.is_empty() {
        return Err(invalid("every rule needs at least one example".into()));
    }
    if let Some(r) = rule.requires.iter().find(|r| r.len() < 2 || !r.is_ascii()) {
        return Err(invalid(format!(
            "required literal `{r}` must be ASCII and at least 2 bytes"
        )));
    }
    if let Some(u) = rule.until.as_ref().filter(|u| u.len() < 2 || !u.is_ascii()) {
        return Err(invalid(format!(
            "`until` literal `{u}` must be ASCII and at least 2 bytes"
        )));
    }
    Ok(())
}

/// Compiles a rule's `after`, anchored at its start. It must be a regex on
/// its own first (parsed, not compiled): `a)|(b` would otherwise leave the
/// group and its second branch unanchored.
pub(crate) fn compile_after(after: &str) -> Result<regex::bytes::Regex, String> {
    check_syntax(after)?;
    compile_pattern(&format!(r"\A(?:{after})")).map_err(|e| e.to_string())
}

/// A pattern's syntax errors as [`compile_rule`] would report them, found
/// by parsing it without compiling it.
pub(crate) fn check_syntax(pattern: &str) -> Result<(), String> {
    syntax::parse_with(pattern, &syntax::Config::new().unicode(false).utf8(false))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A rule's pattern as the engine runs it: the meta regex of
/// `regex-automata` (the engine inside `regex`), configured as
/// [`compile_pattern`]'s `regex::bytes` builder configures it (bytes, ASCII
/// mode, leftmost-first, the same limits), so that both accept the same
/// patterns and find the same matches. The engine needs it for anchored
/// searches, which `regex` does not offer.
pub(crate) fn compile_rule(pattern: &str) -> Result<meta::Regex, String> {
    compile_rule_with(pattern, true)
}

/// [`compile_rule`], with or without the one-pass DFA that reads a one-pass
/// pattern's groups in one pass (a table per pattern: about 2 MB for the
/// built-in rules). The same matches and groups either way.
pub(crate) fn compile_rule_with(pattern: &str, onepass: bool) -> Result<meta::Regex, String> {
    meta::Regex::builder()
        .syntax(syntax::Config::new().unicode(false).utf8(false))
        .configure(
            meta::Config::new()
                .utf8_empty(false)
                .nfa_size_limit(Some(PATTERN_SIZE_LIMIT))
                .hybrid_cache_capacity(2 << 20)
                .onepass(onepass),
        )
        .build(pattern)
        .map_err(|e| e.to_string())
}

/// The limit on a rule pattern's compiled size.
const PATTERN_SIZE_LIMIT: usize = 32 << 20;

/// A rule pattern compiled by `regex::bytes` as [`compile_rule`] compiles
/// it for the engine (bytes, ASCII mode): the checks of user rules, whose
/// errors name what is wrong in the pattern, and of `after`.
pub(crate) fn compile_pattern(pattern: &str) -> Result<regex::bytes::Regex, regex::Error> {
    compile_pattern_within(pattern, PATTERN_SIZE_LIMIT)
}

/// [`compile_pattern`] with another limit on the compiled automaton's size.
pub(crate) fn compile_pattern_within(
    pattern: &str,
    size_limit: usize,
) -> Result<regex::bytes::Regex, regex::Error> {
    regex::bytes::RegexBuilder::new(pattern)
        .unicode(false)
        .size_limit(size_limit)
        .build()
}

/// The built-in rules, then the user's: a user rule with the id of a built-in
/// one replaces it.
pub fn load_rules(user_files: &[(String, String)]) -> Result<Vec<RuleSpec>, RuleError> {
    let mut rules = Vec::new();
    for (file, text) in BUILTIN_RULE_FILES {
        rules.extend(parse_checked(file, text, check_fields)?);
    }
    for (file, text) in user_files {
        for rule in parse_rule_file(file, text)? {
            match rules.iter_mut().find(|r| r.id == rule.id) {
                Some(slot) => *slot = rule,
                None => rules.push(rule),
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    for rule in &rules {
        if !seen.insert(rule.id.as_str()) {
            return Err(RuleError::Invalid {
                file: "(built-in)".into(),
                id: rule.id.clone(),
                reason: "duplicate rule id".into(),
            });
        }
    }
    for rule in &rules {
        if let Some(p) = &rule.pairs_with
            && !rules.iter().any(|r| &r.id == p)
        {
            return Err(RuleError::Invalid {
                file: "(rules)".into(),
                id: rule.id.clone(),
                reason: format!("pairs_with names unknown rule `{p}`"),
            });
        }
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_rules_parse_and_ids_are_unique() {
        let rules = load_rules(&[]).unwrap();
        assert!(rules.len() >= 30, "{}", rules.len());
        for r in &rules {
            assert!(!r.examples.is_empty(), "{}", r.id);
            assert!(
                !r.negative_examples.is_empty(),
                "{} has no negative example",
                r.id
            );
        }
    }

    #[test]
    fn user_rules_replace_by_id_and_add() {
        let user = r#"
[[rule]]
id = "github.token"
name = "replaced"
keywords = ["ghp_"]
pattern = 'ghp_[a-z]{3}'
confidence = "low"
examples = ["ghp_abc"]

[[rule]]
id = "acme.key"
name = "Acme key"
keywords = ["acme_"]
pattern = 'acme_[a-z]{8}'
confidence = "medium"
examples = ["acme_abcdefgh"]
"#;
        let rules = load_rules(&[("user.toml".into(), user.into())]).unwrap();
        let gh = rules.iter().find(|r| r.id == "github.token").unwrap();
        assert_eq!(gh.name, "replaced");
        assert!(rules.iter().any(|r| r.id == "acme.key"));
    }

    #[test]
    fn bad_rules_are_refused_with_the_rule_named() {
        let bad_pattern = "[[rule]]\nid = \"x.y\"\nname = \"n\"\nkeywords = [\"ab\"]\npattern = '(unclosed'\nconfidence = \"low\"\nexamples = [\"ab\"]\n";
        let err = parse_rule_file("u.toml", bad_pattern)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`x.y`") && err.contains("pattern does not compile"),
            "{err}"
        );

        let no_examples = "[[rule]]\nid = \"x.y\"\nname = \"n\"\nkeywords = [\"ab\"]\npattern = 'ab'\nconfidence = \"low\"\nexamples = []\n";
        let err = parse_rule_file("u.toml", no_examples)
            .unwrap_err()
            .to_string();
        assert!(err.contains("example"), "{err}");

        let unknown_field = "[[rule]]\nid = \"x.y\"\nname = \"n\"\nkeywords = [\"ab\"]\npattern = 'ab'\nconfidence = \"low\"\nexamples = [\"ab\"]\nseverity = 3\n";
        assert!(parse_rule_file("u.toml", unknown_field).is_err());

        let bad_pair = "[[rule]]\nid = \"x.y\"\nname = \"n\"\nkeywords = [\"ab\"]\npattern = 'ab'\nconfidence = \"low\"\nexamples = [\"ab\"]\npairs_with = \"nope\"\n";
        assert!(load_rules(&[("u.toml".into(), bad_pair.into())]).is_err());

        let bad_after = "[[rule]]\nid = \"x.y\"\nname = \"n\"\nkeywords = [\"ab\"]\npattern = 'ab'\nconfidence = \"low\"\nexamples = [\"ab\"]\nafter = '[0-9'\n";
        let err = parse_rule_file("u.toml", bad_after)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`x.y`") && err.contains("`after` does not compile"),
            "{err}"
        );
        // One that would close the anchoring group and add a branch.
        let escaping = bad_after.replace("'[0-9'", "'a)|(b'");
        let err = parse_rule_file("u.toml", &escaping)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`after` does not compile"), "{err}");

        // A rule named by words searches nothing: no keywords beside them,
        // and words long enough not to be in every name.
        let named = "[[rule]]\nid = \"x.y\"\nname = \"n\"\nnamed_by = [\"acme\"]\npattern = '[a-z]{16}'\nconfidence = \"low\"\nexamples = [\"ab\"]\n";
        assert!(parse_rule_file("u.toml", named).is_ok());
        let both = named.replace("named_by", "keywords = [\"ab\"]\nnamed_by");
        let err = parse_rule_file("u.toml", &both).unwrap_err().to_string();
        assert!(
            err.contains("`x.y`") && err.contains("no keywords"),
            "{err}"
        );
        let neither = named.replace("named_by = [\"acme\"]\n", "");
        let err = parse_rule_file("u.toml", &neither).unwrap_err().to_string();
        assert!(err.contains("at least one keyword"), "{err}");
        for word in ["ab", "Acme", "ac me"] {
            let err = parse_rule_file("u.toml", &named.replace("acme", word))
                .unwrap_err()
                .to_string();
            assert!(err.contains("`named_by` word"), "{word}: {err}");
        }
        // A pattern that would leave the anchors' group does not compile
        // on its own.
        let escaping = named.replace("'[a-z]{16}'", "'a)|(b'");
        assert!(parse_rule_file("u.toml", &escaping).is_err());
    }
}
