//! Claims: dotted paths into the payload, workload-id templates, NumericDate.

use serde_json::{Map, Value};

use crate::error::AuthError;

/// The longest value a mapped claim may have (bytes).
pub(crate) const MAX_ATTRIBUTE_LEN: usize = 1024;
/// The longest workload id (bytes); keymint-core's task rules accept 256.
pub(crate) const MAX_WORKLOAD_ID_LEN: usize = 256;

/// Finds a claim by a dotted path. Claim names may contain dots themselves
/// (`kubernetes.io`), so at each level the longest name that exists wins:
/// `kubernetes.io.namespace` finds `{"kubernetes.io": {"namespace": ..}}`.
pub(crate) fn lookup<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(path) {
        return Some(v);
    }
    // Split points, longest prefix first.
    let dots: Vec<usize> = path.match_indices('.').map(|(i, _)| i).collect();
    for &i in dots.iter().rev() {
        let (head, rest) = (&path[..i], &path[i + 1..]);
        if let Some(Value::Object(inner)) = claims.get(head)
            && let Some(v) = lookup(inner, rest)
        {
            return Some(v);
        }
    }
    None
}

/// A claim as a string: strings as they are, integers and booleans printed.
/// Objects, arrays, null and fractions are not scalar values.
pub(crate) fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// A claim as a string fit for an attribute or a workload id: scalar, not
/// empty, at most `max` bytes, no control characters.
pub(crate) fn text_claim(
    claims: &Map<String, Value>,
    path: &str,
    max: usize,
) -> Result<Option<String>, AuthError> {
    let Some(v) = lookup(claims, path) else {
        return Ok(None);
    };
    let s = scalar(v).ok_or_else(|| AuthError::InvalidClaim(path.to_owned()))?;
    if s.is_empty() || !keymint_core::model::valid_text(&s, max) {
        return Err(AuthError::InvalidClaim(path.to_owned()));
    }
    Ok(Some(s))
}

pub(crate) fn required_text(
    claims: &Map<String, Value>,
    path: &str,
    max: usize,
) -> Result<String, AuthError> {
    text_claim(claims, path, max)?.ok_or_else(|| AuthError::MissingClaim(path.to_owned()))
}

/// A NumericDate claim (RFC 7519 §2) in whole seconds. Fractions are
/// floored; values outside years 0..=9999 are invalid.
pub(crate) fn numeric_date(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<i64>, AuthError> {
    const MAX: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let Some(v) = claims.get(name) else {
        return Ok(None);
    };
    let invalid = || AuthError::InvalidClaim(name.to_owned());
    let Value::Number(n) = v else {
        return Err(invalid());
    };
    let secs = if let Some(i) = n.as_i64() {
        i
    } else {
        let f = n.as_f64().ok_or_else(invalid)?;
        if !f.is_finite() || f.abs() > MAX as f64 {
            return Err(invalid());
        }
        #[expect(
            clippy::cast_possible_truncation,
            reason = "bounded to ±MAX just above"
        )]
        let i = f.floor() as i64;
        i
    };
    if !(0..=MAX).contains(&secs) {
        return Err(invalid());
    }
    Ok(Some(secs))
}

/// A workload-id template: literal text and `{claim.path}` placeholders;
/// `{{` and `}}` stand for literal braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Claim(String),
}

impl Template {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut path = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some('{') | None => {
                                return Err(format!("unclosed `{{` in template `{s}`"));
                            }
                            Some(c) => path.push(c),
                        }
                    }
                    let path = path.trim().to_owned();
                    if path.is_empty() {
                        return Err(format!("empty `{{}}` in template `{s}`"));
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Claim(path));
                }
                '}' => return Err(format!("unmatched `}}` in template `{s}` (write `}}}}`)")),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        if !parts.iter().any(|p| matches!(p, Part::Claim(_))) {
            return Err(format!("template `{s}` names no claim"));
        }
        Ok(Self { parts })
    }

    /// Whether a placeholder names exactly this claim path.
    pub(crate) fn names_claim(&self, path: &str) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Claim(c) if c == path))
    }

    pub(crate) fn render(&self, claims: &Map<String, Value>) -> Result<String, AuthError> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Claim(path) => {
                    out.push_str(&required_text(claims, path, MAX_WORKLOAD_ID_LEN)?);
                }
            }
        }
        // A name: besides the claims' own checks, no invisible character
        // (two ids that look the same are the same id), checked here where
        // the id is made rather than first when a task starts.
        if !keymint_core::model::valid_workload(&out, MAX_WORKLOAD_ID_LEN) {
            return Err(AuthError::InvalidClaim("workload id".to_owned()));
        }
        Ok(out)
    }
}

/// Parses a JSON object and refuses duplicate member names at any depth
/// (`keymint_core::json`: serde_json keeps the last duplicate silently;
/// another parser might keep the first, and a token that means two things
/// to two parsers is a known way around checks).
pub(crate) fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ()> {
    match keymint_core::json::from_slice(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn dotted_paths_prefer_the_longest_existing_name() {
        let c = obj(json!({
            "kubernetes.io": {"namespace": "ns", "serviceaccount": {"name": "sa"}},
            "a": {"b": 1}, "a.b": 2, "run_id": "7"
        }));
        assert_eq!(lookup(&c, "kubernetes.io.namespace"), Some(&json!("ns")));
        assert_eq!(
            lookup(&c, "kubernetes.io.serviceaccount.name"),
            Some(&json!("sa"))
        );
        assert_eq!(lookup(&c, "a.b"), Some(&json!(2)));
        assert_eq!(lookup(&c, "run_id"), Some(&json!("7")));
        assert_eq!(lookup(&c, "kubernetes.io.pod.name"), None);
    }

    #[test]
    fn templates_render_claims_and_escape_braces() {
        let t = Template::parse("k8s:{ns}/{sa}{{x}}").unwrap();
        let c = obj(json!({"ns": "a", "sa": "b"}));
        assert_eq!(t.render(&c).unwrap(), "k8s:a/b{x}");
        assert_eq!(
            Template::parse("{missing}").unwrap().render(&c),
            Err(AuthError::MissingClaim("missing".into()))
        );
        assert!(Template::parse("no claims").is_err());
        assert!(Template::parse("{open").is_err());
        assert!(Template::parse("close}").is_err());
        let c = obj(json!({"sub": "a\nb"}));
        assert_eq!(
            Template::parse("{sub}").unwrap().render(&c),
            Err(AuthError::InvalidClaim("sub".into()))
        );
        // A bidirectional override is refused in any claim; an invisible
        // character (zero-width space, soft hyphen, byte order mark) in the
        // workload id made of them.
        let c = obj(json!({"sub": "agent\u{202e}gpj.exe"}));
        assert_eq!(
            Template::parse("{sub}").unwrap().render(&c),
            Err(AuthError::InvalidClaim("sub".into()))
        );
        for sub in ["ag\u{200b}ent", "ag\u{ad}ent", "\u{feff}agent"] {
            let c = obj(json!({ "sub": sub }));
            assert_eq!(
                Template::parse("k8s:{sub}").unwrap().render(&c),
                Err(AuthError::InvalidClaim("workload id".into())),
                "{sub:?}"
            );
        }
        let c = obj(json!({"sub": "агент-שלום"}));
        assert_eq!(
            Template::parse("k8s:{sub}").unwrap().render(&c).unwrap(),
            "k8s:агент-שלום"
        );
    }

    #[test]
    fn duplicate_members_are_refused_at_any_depth() {
        assert!(parse_object(br#"{"a":1,"a":2}"#).is_err());
        assert!(parse_object(br#"{"a":{"b":1,"b":1}}"#).is_err());
        assert!(parse_object(br#"[1]"#).is_err());
        assert!(parse_object(br#"{"a":[{"b":1}],"c":1.5}"#).is_ok());
    }

    #[test]
    fn numeric_dates() {
        let c = obj(json!({"exp": 10, "f": 10.9, "s": "10", "neg": -1}));
        assert_eq!(numeric_date(&c, "exp"), Ok(Some(10)));
        assert_eq!(numeric_date(&c, "f"), Ok(Some(10)));
        assert!(numeric_date(&c, "s").is_err());
        assert!(numeric_date(&c, "neg").is_err());
        assert_eq!(numeric_date(&c, "nbf"), Ok(None));
    }
}
