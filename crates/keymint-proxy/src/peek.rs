//! Reading only what the proxy looks at in a JSON body, without building
//! the whole document (docs/design/0029-proxy-hot-path.md).
//!
//! A pass-through request needs a handful of top-level fields (the model,
//! the output limits, the stream flags) and a response only its `usage`.
//! Parsing the whole body into a [`Value`] allocates every string, array
//! and object of it; here serde skips everything else while still checking
//! the syntax of the whole body. The fields found are handed to the same
//! functions ([`provider::inspect`], [`provider::usage_of`]) as a small
//! object, so the decisions are exactly those made on the full document.
//!
//! Whenever the shortcut could disagree with the full parse (a top level
//! that is not an object, a field given twice, which serde refuses but a
//! [`Value`] keeps the last of), `None` sends the caller to the full parse.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::provider::{self, Endpoint};

/// The top-level fields of a request that [`provider::inspect`] and the
/// output cap read.
#[derive(Deserialize)]
struct RequestFields {
    model: Option<Value>,
    stream: Option<Value>,
    stream_options: Option<Value>,
    max_tokens: Option<Value>,
    max_completion_tokens: Option<Value>,
    max_output_tokens: Option<Value>,
}

/// The part of a response that carries usage.
#[derive(Deserialize)]
struct ResponseFields {
    usage: Option<Value>,
}

/// Whether `body` is a JSON object at the top (leading whitespace aside).
fn is_object(body: &[u8]) -> bool {
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// The request fields the proxy reads, as an object holding only those
/// present; `None` when the body is not a well-formed JSON object with
/// each of them at most once.
pub(crate) fn request_fields(body: &[u8]) -> Option<Value> {
    if !is_object(body) {
        return None;
    }
    let f: RequestFields = serde_json::from_slice(body).ok()?;
    let mut m = Map::new();
    for (k, v) in [
        ("model", f.model),
        ("stream", f.stream),
        ("stream_options", f.stream_options),
        ("max_tokens", f.max_tokens),
        ("max_completion_tokens", f.max_completion_tokens),
        ("max_output_tokens", f.max_output_tokens),
    ] {
        if let Some(v) = v {
            m.insert(k.to_owned(), v);
        }
    }
    Some(Value::Object(m))
}

/// `(input, output)` tokens of a complete response body, as
/// [`provider::usage_of`] reads them from the whole document.
pub(crate) fn response_usage(ep: Endpoint, body: &[u8]) -> Option<(u64, u64)> {
    if is_object(body)
        && let Ok(f) = serde_json::from_slice::<ResponseFields>(body)
    {
        let mut m = Map::new();
        if let Some(u) = f.usage {
            m.insert("usage".to_owned(), u);
        }
        return provider::usage_of(ep, &Value::Object(m));
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
        // A repeated `usage`: the full parse decides (the last one).
        let twice =
            r#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":9,"completion_tokens":1}}"#;
        assert_eq!(
            response_usage(Endpoint::ChatCompletions, twice.as_bytes()),
            Some((9, 1))
        );
    }
}
