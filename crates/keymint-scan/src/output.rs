//! Report formats: human (grouped by secret), JSON, JSON lines and SARIF
//! 2.1.0 for GitHub code scanning. Secrets are redacted unless the caller
//! asks for them; SARIF never carries them (it is uploaded to a third party).
//!
//! Text meant for a terminal (the human report, the summary and issues on
//! stderr) shows every control and bidirectional formatting character of
//! what the scanned input named (file names, commit authors, labels) as an
//! escape (`\u{1b}`, `\n`): a file name cannot draw on the terminal, clear
//! it, or forge a line of the report. JSON and SARIF escape them already.

use std::borrow::Cow;
use std::io::{self, Write};

use serde_json::{Map, Value, json};

use crate::engine::Engine;
use crate::finding::{Finding, Location, Source};
use crate::pipeline::{Severity, human_bytes};
use crate::report::Report;
use crate::rules::Confidence;

/// An output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Human,
    Json,
    Jsonl,
    Sarif,
}

/// The SARIF `$schema` written in reports.
pub const SARIF_SCHEMA: &str = "https://json.schemastore.org/sarif-2.1.0.json";

fn finding_value(f: &Finding, show_secrets: bool) -> io::Result<Value> {
    let mut v = serde_json::to_value(f).map_err(io::Error::other)?;
    if show_secrets && let Value::Object(m) = &mut v {
        m.insert("secret".into(), Value::String(f.secret.expose().to_owned()));
    }
    Ok(v)
}

/// Writes `report` in `format`.
pub fn write(
    format: Format,
    engine: &Engine,
    report: &Report,
    show_secrets: bool,
    w: &mut dyn Write,
) -> io::Result<()> {
    match format {
        Format::Human => human(report, show_secrets, w),
        Format::Json => {
            let findings = report
                .findings
                .iter()
                .map(|f| finding_value(f, show_secrets))
                .collect::<io::Result<Vec<_>>>()?;
            let doc = json!({
                "version": 1,
                "findings": findings,
                "issues": report.issues,
                "summary": report.summary,
            });
            serde_json::to_writer_pretty(&mut *w, &doc).map_err(io::Error::other)?;
            writeln!(w)
        }
        Format::Jsonl => {
            for f in &report.findings {
                serde_json::to_writer(&mut *w, &finding_value(f, show_secrets)?)
                    .map_err(io::Error::other)?;
                writeln!(w)?;
            }
            Ok(())
        }
        Format::Sarif => {
            serde_json::to_writer_pretty(&mut *w, &sarif(engine, report))
                .map_err(io::Error::other)?;
            writeln!(w)
        }
    }
}

/// `s` as a terminal shows it literally: each control or bidirectional
/// formatting character (`keymint_core::model::is_unsafe_char`) written as
/// its escape (`\n`, `\u{1b}`, `\u{202e}`); `keep` lists control
/// characters passed through (the line breaks of a key block the user asked
/// to see).
pub fn terminal_safe<'a>(s: &'a str, keep: &[char]) -> Cow<'a, str> {
    let unsafe_char = |c: char| keymint_core::model::is_unsafe_char(c) && !keep.contains(&c);
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// For names and locations: nothing passes.
fn safe(s: &str) -> Cow<'_, str> {
    terminal_safe(s, &[])
}

fn human(report: &Report, show_secrets: bool, w: &mut dyn Write) -> io::Result<()> {
    for f in &report.findings {
        let conf = match f.confidence {
            Confidence::High => "verified offline",
            Confidence::Medium => "medium confidence",
            Confidence::Low => "found by context",
        };
        writeln!(w, "{} [{}, {conf}]", safe(&f.rule_name), safe(&f.rule_id))?;
        let shown = if show_secrets {
            terminal_safe(f.secret.expose(), &['\n', '\r', '\t'])
        } else {
            safe(&f.redacted)
        };
        writeln!(w, "  secret       {shown}")?;
        writeln!(
            w,
            "  fingerprint  {}",
            f.fingerprint.get(..16).unwrap_or(&f.fingerprint)
        )?;
        match f.live {
            Some(true) => writeln!(w, "  live         yes: the provider accepted it")?,
            Some(false) => writeln!(w, "  live         no: the provider refused it")?,
            None => {}
        }
        if let Some(p) = &f.paired_with {
            writeln!(
                w,
                "  paired with  {} ({})",
                safe(&p.redacted),
                safe(&p.rule_id)
            )?;
        }
        for (i, loc) in f.locations.iter().enumerate() {
            let label = if i == 0 {
                "  found at    "
            } else {
                "              "
            };
            writeln!(w, "{label} {}", safe(&loc.to_string()))?;
        }
        writeln!(w)?;
    }
    Ok(())
}

/// The summary and the issues, for stderr.
pub fn write_summary(report: &Report, w: &mut dyn Write) -> io::Result<()> {
    for i in &report.issues {
        let sev = match i.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        writeln!(w, "{sev}: {}: {}", safe(&i.input), safe(&i.message))?;
    }
    let s = &report.summary;
    let secrets = if s.findings == 1 { "secret" } else { "secrets" };
    let locations = if s.locations == 1 {
        "location"
    } else {
        "locations"
    };
    write!(
        w,
        "{} {secrets} found ({} {locations}) in {}: {} files, {} blobs, {} binary skipped, {:.2} s, {}/s",
        s.findings,
        s.locations,
        human_bytes(s.bytes),
        s.files,
        s.blobs,
        s.binary_skipped,
        s.elapsed_seconds,
        human_bytes((s.throughput_mib_per_second * 1024.0 * 1024.0) as u64),
    )?;
    if s.suppressed_by_baseline > 0 {
        write!(
            w,
            ", {} suppressed by the baseline",
            s.suppressed_by_baseline
        )?;
    }
    if s.errors > 0 {
        write!(w, ", {} error(s)", s.errors)?;
    }
    writeln!(w)
}

/// The bytes a SARIF path URI escapes: all but ASCII letters, digits,
/// `-._~` and `/` (RFC 3986 unreserved characters and the separator).
const PATH: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// A relative URI reference for a path (percent-encoded, forward slashes),
/// or a `file://` URI for an absolute path.
pub fn path_to_uri(path: &str) -> String {
    let norm = path.replace('\\', "/");
    let norm = norm.trim_start_matches("./");
    let encoded = percent_encoding::utf8_percent_encode(norm, PATH);
    if norm.starts_with('/') {
        format!("file://{encoded}")
    } else {
        encoded.to_string()
    }
}

fn sarif_location(loc: &Location, secret_len: Option<usize>) -> Value {
    let uri = match &loc.source {
        Source::File { path } => path_to_uri(path),
        Source::Stdin => "stdin".into(),
        Source::Git { path, .. } => path_to_uri(path),
        Source::Image { path, .. } => path_to_uri(path),
        Source::Process { pid, .. } => format!("proc/{pid}/environ"),
    };
    let mut region = Map::new();
    region.insert("startLine".into(), json!(loc.line.max(1)));
    region.insert("startColumn".into(), json!(loc.column.max(1)));
    // A decoded secret's length is not the encoded value's.
    if let Some(n) = secret_len.filter(|_| loc.encoding.is_none()) {
        region.insert("endColumn".into(), json!(loc.column.max(1) + n as u64));
    }
    let mut physical = json!({
        "artifactLocation": { "uri": uri },
        "region": Value::Object(region),
    });
    if let Some(c) = &loc.context {
        physical["contextRegion"] =
            json!({ "startLine": loc.line.max(1), "message": { "text": c } });
    }
    match loc.encoding {
        Some(e) => json!({
            "physicalLocation": physical,
            "message": { "text": format!("the secret is {} encoded here", e.as_str()) },
        }),
        None => json!({ "physicalLocation": physical }),
    }
}

fn sarif(engine: &Engine, report: &Report) -> Value {
    let rules: Vec<Value> = engine
        .rules()
        .iter()
        .map(|r| {
            let s = &r.spec;
            let precision = match s.confidence {
                Confidence::High => "very-high",
                Confidence::Medium => "high",
                Confidence::Low => "medium",
            };
            json!({
                "id": s.id,
                "name": sarif_rule_name(&s.id),
                "shortDescription": { "text": s.name },
                "fullDescription": { "text": s.description.clone().unwrap_or_else(|| format!("{} found in plain text", s.name)) },
                "help": {
                    "text": format!("A {} was found. Revoke it at the provider, replace it with a short-lived keymint credential, and remove it from history.", s.name),
                },
                "defaultConfiguration": { "level": "error" },
                "properties": {
                    "tags": ["security", "secret", "external/cwe/cwe-798"],
                    "precision": precision,
                    "security-severity": "9.0",
                },
            })
        })
        .collect();
    let mut results = Vec::new();
    for f in &report.findings {
        let rule_index = engine.rules().iter().position(|r| r.spec.id == f.rule_id);
        let secret = f.secret.expose();
        let single_line = !secret.contains('\n');
        for loc in &f.locations {
            let mut props = Map::new();
            props.insert("confidence".into(), json!(f.confidence));
            if let Some(live) = f.live {
                props.insert("live".into(), json!(live));
            }
            match &loc.source {
                Source::Git {
                    commit,
                    author,
                    date,
                    blob,
                    repository,
                    ..
                } => {
                    props.insert("commit".into(), json!(commit));
                    props.insert("author".into(), json!(author));
                    props.insert("date".into(), json!(date));
                    props.insert("blob".into(), json!(blob));
                    props.insert("repository".into(), json!(repository));
                }
                Source::Image {
                    image,
                    layer,
                    deleted_later,
                    ..
                } => {
                    props.insert("image".into(), json!(image));
                    props.insert("layer".into(), json!(layer));
                    props.insert("deletedLater".into(), json!(deleted_later));
                }
                Source::Process { pid, command } => {
                    props.insert("pid".into(), json!(pid));
                    props.insert("command".into(), json!(command));
                }
                Source::File { .. } | Source::Stdin => {}
            }
            let mut result = json!({
                "ruleId": f.rule_id,
                "level": "error",
                "message": { "text": format!("{} found: {}", f.rule_name, f.redacted) },
                "locations": [sarif_location(loc, single_line.then_some(secret.chars().count()))],
                "partialFingerprints": { "keymintSecret/v1": f.fingerprint },
                "properties": Value::Object(props),
            });
            if let Some(i) = rule_index {
                result["ruleIndex"] = json!(i);
            }
            results.push(result);
        }
    }
    json!({
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": {
                "driver": {
                    "name": "keymint-scan",
                    "semanticVersion": env!("CARGO_PKG_VERSION"),
                    "informationUri": "https://example.invalid/keymint",
                    "rules": rules,
                }
            },
            "columnKind": "unicodeCodePoints",
            "results": results,
        }]
    })
}

/// `openai.project-key` → `OpenaiProjectKey`.
fn sarif_rule_name(id: &str) -> String {
    id.split(['.', '-', '_'])
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_encoded() {
        assert_eq!(path_to_uri("./src/a b.env"), "src/a%20b.env");
        assert_eq!(path_to_uri("/tmp/x#y"), "file:///tmp/x%23y");
        assert_eq!(path_to_uri("dir\\f.txt"), "dir/f.txt");
    }

    #[test]
    fn terminal_text_shows_control_characters_as_escapes() {
        assert_eq!(terminal_safe("src/a.env", &[]), "src/a.env");
        assert_eq!(
            terminal_safe("a\u{1b}]0;x\u{7}b\nc\u{202e}d\u{9b}e", &[]),
            "a\\u{1b}]0;x\\u{7}b\\nc\\u{202e}d\\u{9b}e"
        );
        assert_eq!(terminal_safe("l1\nl2\u{1b}", &['\n']), "l1\nl2\\u{1b}");
    }

    #[test]
    fn rule_names_are_pascal_case() {
        assert_eq!(sarif_rule_name("openai.project-key"), "OpenaiProjectKey");
    }
}
