//! Locations inside structured documents: Jupyter notebooks (cell, source or
//! output), Slack exports (channel, message), Jira and Confluence exports
//! (issue, page), container image configs (environment variable), and a
//! JSON pointer for any other JSON.
//!
//! The raw text is scanned like any other file (so lines and columns stay
//! right); this pass only runs for files that had hits, parses the JSON and
//! names the string value that holds each secret.

use serde_json::{Map, Value};

use crate::content::Hit;

/// Largest document that is parsed for labels (a parsed document takes
/// several times its size in memory; larger files keep line and column).
const MAX_JSON: usize = crate::content::CHUNK;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Notebook,
    Slack,
    Jira,
    Confluence,
    Other,
}

struct Leaf<'a> {
    text: &'a str,
    label: String,
}

/// Adds a `context` to hits in a JSON document named `name`.
pub fn label(data: &[u8], name: &str, hits: &mut [Hit]) {
    if name == "environ" {
        for hit in hits {
            hit.location.context = crate::process::variable_at(data, hit.location.line)
                .map(|v| format!("environment variable {v}"));
        }
        return;
    }
    if name == "cmdline" {
        for hit in hits {
            hit.location.context = Some(format!(
                "command line, argument {}",
                hit.location.line.saturating_sub(1)
            ));
        }
        return;
    }
    let lower = name.to_ascii_lowercase();
    let json_like = lower.ends_with(".ipynb") || lower.ends_with(".json") || lower == "config";
    if !json_like || data.len() > MAX_JSON || hits.is_empty() {
        return;
    }
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let kind = detect(&value, &lower);
    let channel = if kind == Kind::Slack {
        slack_channel(name)
    } else {
        None
    };
    let mut leaves = Vec::new();
    let root_label = match &channel {
        Some(c) => format!("slack #{c}"),
        None => String::new(),
    };
    walk(&value, "", &root_label, kind, &mut leaves);
    for hit in hits {
        let secret = hit.secret.expose();
        let unescaped = secret.replace("\\n", "\n");
        if let Some(leaf) = leaves
            .iter()
            .find(|l| l.text.contains(secret) || l.text.contains(unescaped.as_str()))
        {
            hit.location.context = Some(leaf.label.clone());
        }
    }
}

fn detect(v: &Value, name: &str) -> Kind {
    match v {
        Value::Object(m)
            if m.contains_key("cells")
                && (name.ends_with(".ipynb") || m.contains_key("nbformat")) =>
        {
            Kind::Notebook
        }
        Value::Object(m) if m.get("issues").is_some_and(Value::is_array) => Kind::Jira,
        Value::Object(m)
            if m.get("results").is_some_and(Value::is_array)
                || (m.contains_key("title") && m.contains_key("body")) =>
        {
            Kind::Confluence
        }
        Value::Array(a)
            if a.first().and_then(Value::as_object).is_some_and(|o| {
                o.contains_key("ts") && (o.contains_key("text") || o.contains_key("type"))
            }) =>
        {
            Kind::Slack
        }
        _ => Kind::Other,
    }
}

/// The channel of a Slack export file: its folder (`general/2024-01-02.json`).
fn slack_channel(name: &str) -> Option<String> {
    let norm = name.replace('\\', "/");
    let mut parts = norm.rsplit('/');
    parts.next()?;
    parts.next().filter(|p| !p.is_empty()).map(str::to_owned)
}

fn is_issue_key(s: &str) -> bool {
    let Some((proj, num)) = s.split_once('-') else {
        return false;
    };
    !proj.is_empty()
        && proj
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && !num.is_empty()
        && num.bytes().all(|b| b.is_ascii_digit())
}

fn object_label(m: &Map<String, Value>, kind: Kind, parent: &str) -> Option<String> {
    match kind {
        Kind::Jira => m
            .get("key")
            .and_then(Value::as_str)
            .filter(|k| is_issue_key(k))
            .map(|k| format!("jira issue {k}")),
        Kind::Confluence => {
            let title = m.get("title").and_then(Value::as_str)?;
            let id = m.get("id").and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            });
            Some(match id {
                Some(id) => format!("confluence page \"{title}\" (id {id})"),
                None => format!("confluence page \"{title}\""),
            })
        }
        Kind::Slack => {
            let ts = m.get("ts").and_then(Value::as_str)?;
            let user = m.get("user").and_then(Value::as_str);
            Some(match user {
                Some(u) => format!("{parent}, message ts={ts} by {u}"),
                None => format!("{parent}, message ts={ts}"),
            })
        }
        Kind::Notebook | Kind::Other => None,
    }
}

fn walk<'a>(v: &'a Value, ptr: &str, label: &str, kind: Kind, out: &mut Vec<Leaf<'a>>) {
    match v {
        Value::String(s) => {
            let label = if let Some(rest) = ptr
                .strip_prefix("/config/Env/")
                .or_else(|| ptr.strip_prefix("/container_config/Env/"))
                && rest.bytes().all(|b| b.is_ascii_digit())
            {
                let var = s.split_once('=').map_or(s.as_str(), |(k, _)| k);
                format!("image config, environment variable {var}")
            } else if ptr.starts_with("/history/") {
                format!("image config, build history ({ptr})")
            } else if label.is_empty() {
                format!("json {ptr}")
            } else if kind == Kind::Other {
                format!("{label} ({ptr})")
            } else {
                label.to_owned()
            };
            out.push(Leaf { text: s, label });
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let child = format!("{ptr}/{i}");
                let mut l = label.to_owned();
                if kind == Kind::Notebook && ptr == "/cells" {
                    let ty = x.get("cell_type").and_then(Value::as_str).unwrap_or("cell");
                    l = format!("notebook cell {} ({ty})", i + 1);
                } else if kind == Kind::Notebook && ptr.ends_with("/outputs") {
                    l = format!("{label} output {}", i + 1);
                }
                walk(x, &child, &l, kind, out);
            }
        }
        Value::Object(m) => {
            let own = object_label(m, kind, label);
            let base = own.as_deref().unwrap_or(label);
            for (k, x) in m {
                let child = format!("{ptr}/{}", k.replace('~', "~0").replace('/', "~1"));
                let mut l = base.to_owned();
                if kind == Kind::Notebook && k == "source" && ptr.starts_with("/cells/") {
                    l = format!("{base} source");
                } else if kind == Kind::Jira && ptr.ends_with("/fields") {
                    l = format!("{base}, field {k}");
                }
                walk(x, &child, &l, kind, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slack_channels_come_from_the_folder() {
        assert_eq!(
            slack_channel("export/general/2024-01-02.json").as_deref(),
            Some("general")
        );
        assert_eq!(slack_channel("2024-01-02.json"), None);
    }

    #[test]
    fn issue_keys() {
        assert!(is_issue_key("OPS-12"));
        assert!(!is_issue_key("ops-12"));
        assert!(!is_issue_key("OPS-"));
    }
}
