//! JSON read strictly: a document in which a member name appears twice in
//! one object, at any depth, is refused.
//!
//! serde_json keeps the last of two members with the same name and says
//! nothing; another parser (the upstream's, the MCP server's, a verifier's)
//! may keep the first. A document that means one thing to keymint's checks
//! and another to what it is passed to is a known way around the checks,
//! so wherever keymint decides on a document that goes on as it came (a
//! workload identity token's claims, a proxied request, an MCP call), the
//! document is read with [`from_slice`].

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// The message of the error for a repeated member (the name is not in it:
/// it is the caller's text).
pub const DUPLICATE_MEMBER: &str = "a member name appears twice in one object";

/// Why [`from_slice`] refused a document.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Valid JSON but for a member named twice in one object
    /// ([`DUPLICATE_MEMBER`]).
    Duplicate,
    /// Not JSON at all (or past the nesting limit).
    NotJson,
}

/// `bytes` as a JSON value, as `serde_json::from_slice::<Value>` reads it
/// (the same numbers, strings and nesting limit), except that an object
/// with a member name twice is refused ([`Refused::Duplicate`]).
pub fn from_slice(bytes: &[u8]) -> Result<Value, Refused> {
    serde_json::from_slice::<Strict>(bytes)
        .map(|s| s.0)
        .map_err(|e| {
            // The visitor's own error: serde_json writes it first, then where.
            if e.is_data() && e.to_string().starts_with(DUPLICATE_MEMBER) {
                Refused::Duplicate
            } else {
                Refused::NotJson
            }
        })
}

struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let Strict(v) = map.next_value()?;
            if out.insert(k, v).is_some() {
                return Err(de::Error::custom(DUPLICATE_MEMBER));
            }
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_twice_is_refused_at_any_depth() {
        for doc in [
            r#"{"a":1,"a":2}"#,
            r#"{"a":{"b":1,"b":1}}"#,
            r#"[{"x":[{"k":1,"k":null}]}]"#,
            r#"{"model":"a","model":"b"}"#,
            // The same name spelled with an escape is the same name.
            r#"{"name":"a","n\u0061me":"b"}"#,
        ] {
            assert_eq!(from_slice(doc.as_bytes()), Err(Refused::Duplicate), "{doc}");
        }
    }

    /// Without a repeated member, what serde_json reads.
    #[test]
    fn otherwise_it_reads_as_serde_json_does() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for doc in [
            r#"{"a":1,"b":[1,2.5,-3,"x\u00e9",null,true],"c":{"a":1}}"#,
            r#"[1, 18446744073709551615, -9223372036854775808, 1e300]"#,
            r#""text""#,
            "  {}  ",
            r#"{"a":1} x"#,
            r#"{"a":"\ud800"}"#,
            "{\"a\":\"\u{1F600}\"}",
            &deep,
        ] {
            let strict = from_slice(doc.as_bytes());
            let loose = serde_json::from_slice::<Value>(doc.as_bytes());
            match (strict, loose) {
                (Ok(s), Ok(l)) => assert_eq!(s, l, "{doc}"),
                (Err(s), Err(_)) => assert_eq!(s, Refused::NotJson, "{doc}"),
                (s, l) => panic!("{doc}: strict {s:?}, serde_json {l:?}"),
            }
        }
    }
}
