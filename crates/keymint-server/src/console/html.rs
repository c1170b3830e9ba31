//! HTML by hand: one escaping helper, [`esc`], through which every value
//! that is not a literal of this module passes, and the page frame.

use std::fmt;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keymint_core::Timestamp;

use super::session::Session;

/// Text made safe for HTML element content and quoted attribute values.
pub struct Esc<'a>(&'a str);

/// Escapes `s` for HTML: `&`, `<`, `>`, `"` and `'`.
pub fn esc(s: &str) -> Esc<'_> {
    Esc(s)
}

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = 0;
        for (i, b) in self.0.bytes().enumerate() {
            let rep = match b {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                b'\'' => "&#39;",
                _ => continue,
            };
            f.write_str(&self.0[last..i])?;
            f.write_str(rep)?;
            last = i + 1;
        }
        f.write_str(&self.0[last..])
    }
}

/// A query string from pairs (empty values left out), `?`-prefixed.
pub fn query(pairs: &[(&str, &str)]) -> String {
    let kept: Vec<(&str, &str)> = pairs
        .iter()
        .copied()
        .filter(|(_, v)| !v.is_empty())
        .collect();
    if kept.is_empty() {
        return String::new();
    }
    format!("?{}", serde_urlencoded::to_string(kept).unwrap_or_default())
}

/// A time as `2026-12-03 14:20:05Z`.
pub fn ts(t: Timestamp) -> String {
    let s = t.rfc3339();
    match (s.get(..10), s.get(11..19)) {
        (Some(d), Some(h)) => format!("{d} {h}Z"),
        _ => s,
    }
}

/// The navigation: (path, label, admin only). Later pages add a line.
pub const NAV: &[(&str, &str, bool)] = &[
    ("/ui", "Overview", false),
    ("/ui/tasks", "Tasks", true),
    ("/ui/leases", "Leases", true),
    ("/ui/approvals", "Approvals", false),
    ("/ui/audit", "Audit", true),
    ("/ui/upstreams", "Upstreams and spend", true),
    ("/ui/entries", "Entries", true),
];

/// The hidden CSRF field of a form.
pub fn csrf_field(s: &Session) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(&s.csrf)
    )
}

/// A whole page: `body` is already HTML; `current` is the navigation path
/// to mark.
pub fn page(
    s: Option<&Session>,
    status: StatusCode,
    title: &str,
    current: &str,
    body: &str,
) -> Response {
    let mut out = String::with_capacity(body.len() + 2048);
    out.push_str("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">");
    out.push_str(&format!("<title>{} · keymint</title>", esc(title)));
    out.push_str("<link rel=\"stylesheet\" href=\"/ui/static/console.css\">");
    out.push_str("<script src=\"/ui/static/console.js\" defer></script></head><body>");
    out.push_str("<a class=\"skip\" href=\"#main\">Skip to content</a>");
    out.push_str("<header><span class=\"brand\">keymint console</span>");
    if let Some(s) = s {
        out.push_str("<nav aria-label=\"Main\"><ul>");
        for (path, label, admin_only) in NAV {
            if *admin_only && !s.is_admin() {
                continue;
            }
            let cur = if *path == current {
                " aria-current=\"page\""
            } else {
                ""
            };
            out.push_str(&format!("<li><a href=\"{path}\"{cur}>{label}</a></li>"));
        }
        out.push_str("</ul></nav>");
        out.push_str(&format!(
            "<form method=\"post\" action=\"/ui/logout\" class=\"signout\">{}\
             <span class=\"who\">{}</span> <button type=\"submit\">Sign out</button></form>",
            csrf_field(s),
            esc(&s.actor())
        ));
    }
    out.push_str("</header><main id=\"main\" tabindex=\"-1\">");
    out.push_str(body);
    out.push_str("</main></body></html>");
    let mut res = (status, out).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    res
}

/// A page that says what went wrong (`detail` is escaped).
pub fn error_page(s: Option<&Session>, status: StatusCode, title: &str, detail: &str) -> Response {
    let body = format!(
        "<h1>{}</h1><p class=\"error\" role=\"alert\">{}</p><p><a href=\"/ui\">Back to the overview</a></p>",
        esc(title),
        esc(detail)
    );
    retry_later(page(s, status, title, "", &body))
}

/// A 503 page says when to try again, as the API's 503 does
/// (`Retry-After: 5`).
pub fn retry_later(mut res: Response) -> Response {
    if res.status() == StatusCode::SERVICE_UNAVAILABLE {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(5u32));
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_html_cares_about_is_escaped() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\"").to_string(),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(esc("plain ünïcode").to_string(), "plain ünïcode");
        assert_eq!(esc("").to_string(), "");
    }

    #[test]
    fn query_strings_are_encoded_and_skip_empty_values() {
        assert_eq!(query(&[("a", ""), ("b", "")]), "");
        assert_eq!(
            query(&[("workload", "a b&c=d"), ("x", "")]),
            "?workload=a+b%26c%3Dd"
        );
    }
}
