//! Reading only what the proxy looks at in a JSON body, without building
//! the whole document (docs/design/0029-proxy-hot-path.md).
//!
//! A pass-through request needs a handful of top-level fields (the model,
//! the output limits, the stream flags) and a response only its `usage`.
//! Parsing the whole body into a [`Value`] allocates every string, array
//! and object of it; here everything else is read and dropped as it comes
//! ([`Skip`]), checked as the whole parse checks it (syntax, numbers,
//! strings, the nesting limit). The fields found are handed to the same
//! functions ([`provider::inspect`], [`provider::usage_of`]) as a small
//! object, so the decisions are exactly those made on the full document.
//!
//! Whenever the shortcut could disagree with the full parse (a top level
//! that is not an object, a field given twice, of which a [`Value`] keeps
//! the last), `None` sends the caller to the full parse. The shortcut
//! reads nothing from a body the full parse refuses.

use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::provider::{self, Endpoint};

/// The top-level fields of a request that [`provider::inspect`] and the
/// output cap read.
const REQUEST_FIELDS: [&str; 7] = [
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
];

/// A visitor's methods for every JSON scalar (`null` among them), each
/// read as `$value`.
macro_rules! scalars_read_as {
    ($ty:ty, $value:expr) => {
        fn visit_bool<E>(self, _: bool) -> Result<$ty, E> {
            Ok($value)
        }
        fn visit_i64<E>(self, _: i64) -> Result<$ty, E> {
            Ok($value)
        }
        fn visit_u64<E>(self, _: u64) -> Result<$ty, E> {
            Ok($value)
        }
        fn visit_f64<E>(self, _: f64) -> Result<$ty, E> {
            Ok($value)
        }
        fn visit_str<E>(self, _: &str) -> Result<$ty, E> {
            Ok($value)
        }
        fn visit_unit<E>(self) -> Result<$ty, E> {
            Ok($value)
        }
    };
}

/// Any JSON value, checked and dropped the way a [`Value`] reads it:
/// through serde_json's `deserialize_any`, so that its nesting limit (128)
/// and its checks of numbers and strings apply as they do to the whole
/// document. (serde's `IgnoredAny`, which a derived `Deserialize` skips
/// unknown members with, skips without a nesting limit: a body nested
/// past it was read by the shortcut and refused by the full parse.)
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SkipVisitor)
    }
}

struct SkipVisitor;

impl<'de> Visitor<'de> for SkipVisitor {
    type Value = Skip;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    scalars_read_as!(Skip, Skip);
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
        while map.next_key::<Skip>()?.is_some() {
            map.next_value::<Skip>()?;
        }
        Ok(Skip)
    }
}

/// The members of a JSON object named in `names`, each read as a `T`,
/// every other member checked and skipped ([`Skip`]). A name given twice
/// is an error: a [`Value`] keeps the last, and the caller goes to the
/// full parse to read exactly that. Anything but an object is an error.
struct Pick<'n, T, const N: usize> {
    names: &'n [&'n str; N],
    member: PhantomData<T>,
}

impl<'n, T, const N: usize> Pick<'n, T, N> {
    const fn of(names: &'n [&'n str; N]) -> Self {
        Self {
            names,
            member: PhantomData,
        }
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> DeserializeSeed<'de> for Pick<'_, T, N> {
    type Value = [Option<T>; N];

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for Pick<'_, T, N> {
    type Value = [Option<T>; N];

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found: [Option<T>; N] = std::array::from_fn(|_| None);
        while let Some(i) = map.next_key_seed(MemberName(self.names))? {
            match i.and_then(|i| found.get_mut(i)) {
                Some(Some(_)) => return Err(serde::de::Error::custom("a member twice")),
                Some(slot) => *slot = Some(map.next_value::<T>()?),
                None => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(found)
    }
}

/// A member's name: its place in the names asked for, `None` for any
/// other. serde_json unescapes names before they get here, as it does for
/// a [`Value`]'s keys.
struct MemberName<'n, const N: usize>(&'n [&'n str; N]);

impl<'de, const N: usize> DeserializeSeed<'de> for MemberName<'_, N> {
    type Value = Option<usize>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl<const N: usize> Visitor<'_> for MemberName<'_, N> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E>(self, k: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|m| *m == k))
    }
}

/// A response's `usage` as [`provider::counts_of`] reads it: the counts
/// of an object, or anything else (which reports no usage). Read without
/// building a [`Value`]: the members named in
/// [`provider::USAGE_MEMBERS`] become counts, the others are skipped
/// (still checked).
enum UsageField {
    Counts([Option<Count>; provider::USAGE_MEMBERS.len()]),
    NotObject,
}

impl UsageField {
    /// A member's count as `Value::as_u64` on the whole document gives it,
    /// `0` when absent or not a `u64`.
    fn count(counts: &[Option<Count>], name: &str) -> u64 {
        provider::USAGE_MEMBERS
            .iter()
            .position(|m| *m == name)
            .and_then(|i| counts.get(i).copied().flatten())
            .and_then(|c| c.0)
            .unwrap_or(0)
    }
}

impl<'de> Deserialize<'de> for UsageField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UsageVisitor)
    }
}

struct UsageVisitor;

impl<'de> Visitor<'de> for UsageVisitor {
    type Value = UsageField;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<UsageField, A::Error> {
        Pick::of(&provider::USAGE_MEMBERS)
            .visit_map(map)
            .map(UsageField::Counts)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<UsageField, A::Error> {
        SkipVisitor.visit_seq(seq)?;
        Ok(UsageField::NotObject)
    }

    scalars_read_as!(UsageField, UsageField::NotObject);
}

/// A usage count: `Value::as_u64` of the member's value, so that it is
/// exactly what the whole document gives (a count is a small scalar: its
/// `Value` allocates nothing).
#[derive(Clone, Copy)]
struct Count(Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self(Value::deserialize(d)?.as_u64()))
    }
}

/// Reads `text` (a whole document: only whitespace may follow) with
/// `seed`.
fn read<'de, S: DeserializeSeed<'de>>(text: &'de str, seed: S) -> Option<S::Value> {
    let mut d = serde_json::Deserializer::from_str(text);
    let v = seed.deserialize(&mut d).ok()?;
    d.end().ok()?;
    Some(v)
}

/// `body` as text the shortcut may read: a JSON object at the top
/// (leading whitespace aside), valid UTF-8 throughout, and no `\u` escape
/// of a surrogate. serde skips the members it does not read without
/// checking their strings, where the whole parse into a [`Value`] refuses
/// invalid UTF-8 and an unpaired surrogate; so a body with either (or one
/// that merely might have one: `\\ud8` in a string counts too) goes to the
/// full parse, which decides as it always did.
fn readable(body: &[u8]) -> Option<&str> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let text = std::str::from_utf8(body).ok()?;
    // Backslashes found with memchr (a body without one, the usual case,
    // is a few vector compares); `str::match_indices` counted over a
    // thousand instructions per body here.
    let surrogate = memchr::memchr_iter(b'\\', body)
        .any(|i| body.get(i + 1) == Some(&b'u') && matches!(body.get(i + 2), Some(b'd' | b'D')));
    (!surrogate).then_some(text)
}

/// The request fields the proxy reads, as an object holding only those
/// present; `None` when the body is not a well-formed JSON object with
/// each of them at most once.
pub(crate) fn request_fields(body: &[u8]) -> Option<Value> {
    let found = read(readable(body)?, Pick::<Value, 7>::of(&REQUEST_FIELDS))?;
    let mut m = Map::new();
    for (k, v) in REQUEST_FIELDS.iter().zip(found) {
        // `null` is left out, as it reads the same as no field.
        if let Some(v) = v.filter(|v| !v.is_null()) {
            m.insert((*k).to_owned(), v);
        }
    }
    Some(Value::Object(m))
}

/// `(input, output)` tokens of a complete response body, as
/// [`provider::usage_of`] reads them from the whole document.
pub(crate) fn response_usage(ep: Endpoint, body: &[u8]) -> Option<(u64, u64)> {
    if let Some(text) = readable(body)
        && let Some([usage]) = read(text, Pick::<UsageField, 1>::of(&["usage"]))
    {
        return match usage {
            Some(UsageField::Counts(c)) => {
                Some(provider::counts_of(ep, |name| UsageField::count(&c, name)))
            }
            // Absent, `null` or not an object: no usage.
            Some(UsageField::NotObject) | None => None,
        };
    }
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| provider::usage_of(ep, &v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the full document gives, for comparison.
    fn full(body: &str) -> Option<Value> {
        serde_json::from_str(body).ok()
    }

    #[test]
    fn request_fields_decide_as_the_whole_document_does() {
        for body in [
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":16}"#,
            r#"  {"model":"o3","max_completion_tokens":5,"max_tokens":9,"stream":true}"#,
            r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"model":"gpt-4o","stream":"yes","max_tokens":"many"}"#,
            r#"{"model":null,"input":[1,2,3],"max_output_tokens":7}"#,
            r#"{"messages":[]}"#,
        ] {
            let peeked = request_fields(body.as_bytes()).unwrap();
            let whole = full(body).unwrap();
            for ep in [
                Endpoint::ChatCompletions,
                Endpoint::Responses,
                Endpoint::Messages,
                Endpoint::Embeddings,
            ] {
                assert_eq!(
                    provider::inspect(ep, &peeked),
                    provider::inspect(ep, &whole),
                    "{body}"
                );
            }
        }
    }

    #[test]
    fn anything_the_shortcut_could_read_differently_goes_to_the_full_parse() {
        // A repeated field: a `Value` keeps the last, serde refuses.
        assert!(request_fields(br#"{"model":"a","model":"b"}"#).is_none());
        // Not an object at the top (a struct would accept an array).
        assert!(request_fields(br#"["gpt-4o", true]"#).is_none());
        assert!(request_fields(br#""gpt-4o""#).is_none());
        // Not JSON, or trailing bytes.
        assert!(request_fields(br#"{"model":"a""#).is_none());
        assert!(request_fields(br#"{"model":"a"} x"#).is_none());
        assert!(request_fields(b"model=a").is_none());
    }

    /// Text the whole parse refuses inside a member the shortcut skips:
    /// serde's skipping did not check it (both shortcuts read usage or
    /// fields from such bodies before), so neither shortcut reads it now.
    #[test]
    fn text_the_whole_parse_refuses_is_not_read_by_a_shortcut() {
        let usage = br#""usage":{"prompt_tokens":1,"completion_tokens":2}"#;
        let mut bodies: Vec<Vec<u8>> = Vec::new();
        for skipped in [
            &b"\\ud800"[..],     // a lone high surrogate
            b"\\uDC00",          // a lone low surrogate
            b"\\udc00\\ud800",   // a pair in the wrong order
            b"x\\ud83dy",        // a high surrogate and no low one
            b"\xff",             // not UTF-8
            b"\xc3\x28",         // a broken two-byte sequence
            b"\xed\xa0\x80",     // a surrogate in UTF-8
            b"\xf4\x90\x80\x80", // past U+10FFFF
            // Accepted by both: a pair, a non-surrogate escape, an
            // escaped backslash before `ud800`, UTF-8 text.
            b"\\ud83d\\ude00",
            b"\\uD7FF",
            b"\\\\ud800",
            "caf\u{e9} \u{1f600}".as_bytes(),
        ] {
            for at in ["x", "model"] {
                let mut b = format!(r#"{{"{at}":""#).into_bytes();
                b.extend_from_slice(skipped);
                b.extend_from_slice(br#"","max_tokens":3,"#);
                b.extend_from_slice(usage);
                b.push(b'}');
                bodies.push(b);
            }
            // In a key, and inside `usage`.
            let mut b = b"{\"".to_vec();
            b.extend_from_slice(skipped);
            b.extend_from_slice(b"\":1,");
            b.extend_from_slice(usage);
            b.push(b'}');
            bodies.push(b);
            let mut b = br#"{"usage":{"other":""#.to_vec();
            b.extend_from_slice(skipped);
            b.extend_from_slice(br#"","prompt_tokens":4,"completion_tokens":5}}"#);
            bodies.push(b);
        }
        let mut refused = 0;
        for body in &bodies {
            let shown = String::from_utf8_lossy(body);
            let whole = serde_json::from_slice::<Value>(body).ok();
            refused += usize::from(whole.is_none());
            assert_eq!(
                response_usage(Endpoint::ChatCompletions, body),
                whole
                    .as_ref()
                    .and_then(|v| provider::usage_of(Endpoint::ChatCompletions, v)),
                "{shown}"
            );
            match (request_fields(body), &whole) {
                (Some(peeked), Some(whole)) => assert_eq!(
                    provider::inspect(Endpoint::ChatCompletions, &peeked),
                    provider::inspect(Endpoint::ChatCompletions, whole),
                    "{shown}"
                ),
                (Some(_), None) => {
                    panic!("fields read from a body the whole parse refuses: {shown}")
                }
                (None, _) => {}
            }
        }
        // Both kinds were there: bodies refused and bodies read.
        assert_eq!(refused, 8 * 4, "bodies the whole parse refuses");
        assert!(response_usage(Endpoint::ChatCompletions, bodies.last().unwrap()).is_some());
    }

    #[test]
    fn response_usage_is_read_as_from_the_whole_document() {
        let chat = r#"{"id":"x","choices":[{"message":{"content":"Hello."}}],"usage":{"prompt_tokens":14,"completion_tokens":2,"total_tokens":16}}"#;
        assert_eq!(
            response_usage(Endpoint::ChatCompletions, chat.as_bytes()),
            Some((14, 2))
        );
        let msg = r#"{"usage":{"input_tokens":3,"cache_read_input_tokens":4,"output_tokens":5}}"#;
        assert_eq!(
            response_usage(Endpoint::Messages, msg.as_bytes()),
            Some((7, 5))
        );
        for body in [
            r#"{"id":"x"}"#,
            r#"{"usage":null}"#,
            r#"{"usage":"lots"}"#,
            "not json",
            r#"[{"usage":{"prompt_tokens":1}}]"#,
        ] {
            assert_eq!(
                response_usage(Endpoint::ChatCompletions, body.as_bytes()),
                None,
                "{body}"
            );
        }
        // A repeated member inside `usage`: the full parse decides too.
        let twice = r#"{"usage":{"prompt_tokens":1,"completion_tokens":2,"prompt_tokens":7}}"#;
        assert_eq!(
            response_usage(Endpoint::ChatCompletions, twice.as_bytes()),
            Some((7, 2))
        );
        // A repeated `usage`: the full parse decides (the last one).
        let twice =
            r#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":9,"completion_tokens":1}}"#;
        assert_eq!(
            response_usage(Endpoint::ChatCompletions, twice.as_bytes()),
            Some((9, 1))
        );
    }

    #[test]
    fn response_usage_never_reads_what_the_whole_document_does_not() {
        let counts = [
            "0",
            "14",
            "-0",
            "-1",
            "1.0",
            "1e2",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775809",
            "\"12\"",
            "true",
            "null",
            "[1]",
            "{\"n\":1}",
        ];
        let mut bodies = vec![
            r#"{}"#.to_owned(),
            r#"{"usage":{}}"#.to_owned(),
            r#"{"usage":[]}"#.to_owned(),
            r#"{"usage":[{"prompt_tokens":1}]}"#.to_owned(),
            r#"{"usage":1}"#.to_owned(),
            r#"{"usage":true}"#.to_owned(),
            r#"{"usage":"x"}"#.to_owned(),
            // Escaped names: both unescape them.
            r#"{"us\u0061ge":{"prompt\u005ftokens":3,"completion_tokens":4}}"#.to_owned(),
            // Nested look-alikes are not the top-level usage.
            r#"{"choices":[{"usage":{"prompt_tokens":99}}],"x":{"usage":{"prompt_tokens":98}}}"#
                .to_owned(),
            r#"{"choices":[{"usage":{"prompt_tokens":99}}],"usage":{"prompt_tokens":2}}"#
                .to_owned(),
            // Broken syntax anywhere: no usage from either.
            r#"{"usage":{"prompt_tokens":1},"choices":[}"#.to_owned(),
            r#"{"usage":{"prompt_tokens":1}} trailing"#.to_owned(),
            r#"{"usage":{"prompt_tokens":01}}"#.to_owned(),
        ];
        for c in counts {
            for name in provider::USAGE_MEMBERS {
                bodies.push(format!(
                    r#"{{"id":"x","usage":{{"{name}":{c},"output_tokens":5,"completion_tokens":6,"other":[{c}]}}}}"#
                ));
            }
        }
        for body in &bodies {
            let whole = serde_json::from_str::<Value>(body).ok();
            for ep in [
                Endpoint::ChatCompletions,
                Endpoint::Responses,
                Endpoint::Messages,
                Endpoint::Embeddings,
                Endpoint::Models,
                Endpoint::CountTokens,
            ] {
                assert_eq!(
                    response_usage(ep, body.as_bytes()),
                    whole.as_ref().and_then(|v| provider::usage_of(ep, v)),
                    "{ep:?} {body}"
                );
            }
        }
    }

    /// Thousands of documents near the valid ones (a byte of JSON's
    /// syntax put in, taken out or changed; nesting; long numbers):
    /// whatever the shortcuts read is what the whole document gives, and
    /// they read nothing from text the whole parse refuses.
    #[test]
    fn the_shortcuts_agree_with_the_whole_parse_on_mutated_documents() {
        let seeds = [
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi\n"}],"max_tokens":16,"temperature":0.7}"#,
            r#"{"model":"o3","stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":5}"#,
            r#"{"id":"x","choices":[{"message":{"content":"Hello.\t\u00e9"}}],"usage":{"prompt_tokens":14,"completion_tokens":2,"total_tokens":16}}"#,
            r#"{"usage":{"input_tokens":3,"cache_read_input_tokens":4,"output_tokens":5,"cache_creation_input_tokens":1e1},"x":[true,false,null,-0.5e-3]}"#,
        ];
        let alphabet = b"{}[]\",:\\/0123456789-+.eEtrufalsnu \t\n\r\x00\x1f\x7f";
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut bodies: Vec<Vec<u8>> = Vec::new();
        for seed in seeds {
            let seed = seed.as_bytes();
            for _ in 0..4000 {
                let mut b = seed.to_vec();
                for _ in 0..=(next() % 3) {
                    let at = (next() as usize) % (b.len() + 1);
                    let c = alphabet[(next() as usize) % alphabet.len()];
                    match next() % 3 {
                        0 => b.insert(at, c),
                        1 if at < b.len() => {
                            b.remove(at);
                        }
                        _ if at < b.len() => b[at] = c,
                        _ => b.push(c),
                    }
                }
                bodies.push(b);
            }
        }
        // Deep nesting around serde_json's limit of 128, and numbers
        // around the range of an f64.
        for depth in [99, 100, 101, 127, 128, 129] {
            let inner = "[".repeat(depth) + &"]".repeat(depth);
            bodies.push(
                format!(r#"{{"x":{inner},"usage":{{"prompt_tokens":1}},"model":"m"}}"#)
                    .into_bytes(),
            );
        }
        for n in [
            "1e308",
            "1e309",
            "1e99",
            "9e99",
            "1e-99",
            "1e999",
            &"9".repeat(199),
            &"9".repeat(400),
            &format!("{}e99", "9".repeat(198)),
        ] {
            bodies.push(
                format!(r#"{{"x":{n},"usage":{{"prompt_tokens":2}},"max_tokens":{n}}}"#)
                    .into_bytes(),
            );
        }
        let (mut read, mut refused) = (0, 0);
        for body in &bodies {
            let shown = String::from_utf8_lossy(body);
            let whole = serde_json::from_slice::<Value>(body).ok();
            refused += usize::from(whole.is_none());
            for ep in [
                Endpoint::ChatCompletions,
                Endpoint::Messages,
                Endpoint::Responses,
            ] {
                assert_eq!(
                    response_usage(ep, body),
                    whole.as_ref().and_then(|v| provider::usage_of(ep, v)),
                    "{ep:?} {shown}"
                );
            }
            match (request_fields(body), &whole) {
                (Some(peeked), Some(whole)) => {
                    read += 1;
                    // A field the shortcut leaves out is absent or `null`
                    // in the whole document, which reads the same.
                    for f in REQUEST_FIELDS {
                        let given = |v: &Value| v.get(f).filter(|v| !v.is_null()).cloned();
                        assert_eq!(given(&peeked), given(whole), "{f} {shown}");
                    }
                    for ep in [
                        Endpoint::ChatCompletions,
                        Endpoint::Messages,
                        Endpoint::Responses,
                    ] {
                        assert_eq!(
                            provider::inspect(ep, &peeked),
                            provider::inspect(ep, whole),
                            "{shown}"
                        );
                    }
                }
                (Some(_), None) => {
                    panic!("fields read from a body the whole parse refuses: {shown}")
                }
                (None, _) => {}
            }
        }
        // Both kinds were there in numbers: bodies read and refused.
        assert!(
            read > 2000 && refused > 2000,
            "read {read}, refused {refused}"
        );
    }
}
