//! JSON and serde errors told without the caller's value.
//!
//! serde's messages start with what the caller sent (`unknown field `X`,
//! expected one of …`, `invalid type: string "X"`), and in a credential
//! broker that value can be a secret. These functions keep only what kind
//! of mistake it was, where, and what was expected (which comes from
//! keymint's own types). They live here, free of the server, so the fuzz
//! target `json_error` can drive them (docs/fuzzing.md).

/// What kind of JSON error: the document is not JSON, or it is but does not
/// fit the type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonErrorKind {
    Syntax,
    Data,
}

/// Describes a `serde_json` error: its kind and a message that names the
/// position and the expectation, never the caller's value.
pub fn describe_json_error(e: &serde_json::Error) -> (JsonErrorKind, String) {
    use serde_json::error::Category;
    let at = format!("at line {} column {}", e.line(), e.column());
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            (JsonErrorKind::Syntax, format!("malformed JSON {at}"))
        }
        Category::Data => {
            let msg = e.to_string();
            let head = msg
                .rsplit_once(" at line ")
                .map_or(msg.as_str(), |(h, _)| h);
            let (what, expected) = describe_serde_message(head);
            let expected = expected.map_or(String::new(), |x| format!(", {x}"));
            (JsonErrorKind::Data, format!("{what} {at}{expected}"))
        }
    }
}

/// A serde data error, told without the caller's value: what kind of
/// mistake, and what was expected (the expectation comes from keymint's
/// own types: field names, variant names, types). serde writes the
/// caller's value first (`unknown field `X`, expected …`), so the
/// expectation is what follows the last `, expected `.
pub fn describe_serde_message(m: &str) -> (String, Option<&str>) {
    let expected = ["there are no fields", "there are no variants"]
        .into_iter()
        .find(|x| m.ends_with(&format!(", {x}")))
        .or_else(|| m.rfind(", expected ").and_then(|i| m.get(i + 2..)));
    let what = [
        ("unknown field", "unknown field"),
        ("unknown variant", "unknown variant"),
        ("invalid type", "invalid type"),
        ("invalid value", "invalid value"),
        ("invalid length", "invalid length"),
    ]
    .iter()
    .find(|(p, _)| m.starts_with(p))
    .map(|(_, w)| *w);
    match (what, expected) {
        (Some(w), Some(x)) if plain_expectation(x) => (w.to_owned(), Some(x)),
        (Some(w), _) => (w.to_owned(), None),
        // `missing field `ttl_secs``, `duplicate field `role``: the name is
        // keymint's own.
        (None, _) if m.starts_with("missing field `") || m.starts_with("duplicate field `") => {
            (m.to_owned(), None)
        }
        (None, _) => ("invalid value".to_owned(), None),
    }
}

/// An expectation from keymint's types is short and plain; anything else
/// (a custom message that might hold a value) is not repeated.
fn plain_expectation(x: &str) -> bool {
    x.len() <= 400
        && x.chars()
            .all(|c| c.is_ascii_alphanumeric() || " _-`,.:/()[]".contains(c))
}
