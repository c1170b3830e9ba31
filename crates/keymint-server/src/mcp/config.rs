//! `[[mcp.servers]]`: the MCP servers keymint fronts, parsed and checked
//! at start (docs/design/0031-mcp-route.md).
//!
//! ```toml
//! [[mcp.servers]]
//! name = "tools"                          # served at /mcp/tools
//! upstream = "https://tools.internal/mcp" # the MCP server's endpoint
//! # resource = "https://keymint.example/mcp/tools"  # default: {issuer}/mcp/{name}
//! required_scopes = ["tools:call"]        # every request needs them
//! dpop = "required"                       # or "optional" (the default)
//! credential = "bearer"                   # or "exchanged", or "none" (the default)
//! # upstream_audience = "https://tools.internal/mcp"  # "exchanged" only; default: upstream
//! timeout = "60s"                         # until the upstream's response headers
//! max_body = 1048576                      # largest request body, bytes
//! ```

use keymint_core::duration::parse_secs;
use keymint_core::model::{Role, valid_name};
use keymint_core::role::RoleKind;
use serde::Deserialize;

use crate::config::ConfigError;

/// Largest request body by default (JSON-RPC messages are small; a tool's
/// arguments rarely pass a few KiB).
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// The most a configuration may allow.
const MAX_MAX_BODY: usize = 16 * 1024 * 1024;
const DEFAULT_TIMEOUT_SECS: u64 = 60;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMcp {
    #[serde(default)]
    servers: Vec<RawMcpServer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMcpServer {
    name: String,
    upstream: String,
    resource: Option<String>,
    #[serde(default)]
    required_scopes: Vec<String>,
    #[serde(default)]
    dpop: DpopMode,
    #[serde(default)]
    credential: CredentialKind,
    upstream_audience: Option<String>,
    timeout: Option<String>,
    max_body: Option<usize>,
}

/// Whether the route takes bearer tokens or only DPoP-bound ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpopMode {
    /// Bearer tokens and DPoP-bound tokens (with their proof).
    #[default]
    Optional,
    /// Only DPoP-bound tokens (RFC 9728 `dpop_bound_access_tokens_required`).
    Required,
}

/// What keymint presents to the MCP server. Never the agent's token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// Nothing: the MCP server trusts its network (keymint is its only
    /// client).
    #[default]
    None,
    /// A static bearer token, sealed in keymint's store, set by the admin
    /// (`POST /v1/mcp/{name}/credential`).
    Bearer,
    /// A fresh keymint-signed access token per request (RFC 9068): `aud`
    /// the MCP server's own audience, `sub` the agent, `act` the chain
    /// with the route as the current actor, `exp` within the agent's token.
    Exchanged,
}

/// A validated `[[mcp.servers]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpServer {
    pub name: String,
    /// The MCP server's endpoint (`http://` only to a loopback host).
    pub upstream: http::Uri,
    /// The resource identifier: the audience of its tokens, the URL the
    /// client reaches (`…/mcp/{name}`).
    pub resource: String,
    /// The `jwt` role whose audience is the resource: its scopes are the
    /// route's `scopes_supported`; policy decides tool calls against it.
    pub role: String,
    pub scopes_supported: Vec<String>,
    pub required_scopes: Vec<String>,
    pub dpop: DpopMode,
    pub credential: CredentialKind,
    /// The `aud` of the tokens keymint mints for the MCP server
    /// (`credential = "exchanged"`; else `None`).
    pub upstream_audience: Option<String>,
    pub timeout_secs: u64,
    pub max_body: usize,
}

impl McpServer {
    /// The route's path: `/mcp/{name}`.
    pub fn path(&self) -> String {
        format!("/mcp/{}", self.name)
    }

    /// RFC 9728 §3.1: the metadata's URL, `/.well-known/oauth-protected-resource`
    /// inserted between the resource's host and its path.
    pub fn metadata_url(&self) -> String {
        let (origin, path) = split_origin(&self.resource);
        format!("{origin}/.well-known/oauth-protected-resource{path}")
    }
}

/// `https://host:port/path` → (`https://host:port`, `/path`).
fn split_origin(url: &str) -> (&str, &str) {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => url.split_at(after_scheme + i),
        None => (url, ""),
    }
}

fn invalid(name: &str, m: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid(format!("mcp server `{name}`: {m}"))
}

/// Checks `[mcp]` against the issuer and the roles.
pub(crate) fn validate(
    raw: Option<RawMcp>,
    issuer: &str,
    roles: &[Role],
) -> Result<Vec<McpServer>, ConfigError> {
    let mut out: Vec<McpServer> = Vec::new();
    for s in raw.unwrap_or_default().servers {
        if !valid_name(&s.name) {
            return Err(ConfigError::Invalid(format!(
                "mcp server name `{}` must be 1-64 of a-z, 0-9, `.`, `_`, `-`",
                s.name
            )));
        }
        let name = s.name.clone();
        if out.iter().any(|x| x.name == name) {
            return Err(invalid(&name, "is defined twice"));
        }
        let upstream = upstream_uri(&s.upstream).map_err(|m| invalid(&name, m))?;
        let resource = s
            .resource
            .unwrap_or_else(|| format!("{}/mcp/{name}", issuer.trim_end_matches('/')));
        check_resource(&resource, &name).map_err(|m| invalid(&name, m))?;
        if out.iter().any(|x| x.resource == resource) {
            return Err(invalid(&name, "its `resource` is another server's"));
        }
        let mut serving = roles.iter().filter(|r| match &r.kind {
            RoleKind::Jwt(j) => !j.spiffe && j.audience.iter().any(|a| a == &resource),
            _ => false,
        });
        let role = match (serving.next(), serving.next()) {
            (Some(r), None) => r,
            (None, _) => {
                return Err(invalid(
                    &name,
                    format!(
                        "no `jwt` role has `{resource}` in its `audience`: no token could reach it"
                    ),
                ));
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    &name,
                    format!("two `jwt` roles have `{resource}` in their `audience`"),
                ));
            }
        };
        if let Some(s) = s.required_scopes.iter().find(|x| !role.scopes.contains(x)) {
            return Err(invalid(
                &name,
                format!(
                    "required scope `{s}` is not among role `{}`'s scopes",
                    role.name
                ),
            ));
        }
        let timeout_secs = match s.timeout.as_deref() {
            None => DEFAULT_TIMEOUT_SECS,
            Some(t) => parse_secs(t).map_err(|e| invalid(&name, format!("`timeout`: {e}")))?,
        };
        if timeout_secs == 0 || timeout_secs > 3600 {
            return Err(invalid(&name, "`timeout` must be between 1s and 1h"));
        }
        let max_body = s.max_body.unwrap_or(DEFAULT_MAX_BODY);
        if max_body == 0 || max_body > MAX_MAX_BODY {
            return Err(invalid(
                &name,
                format!("`max_body` must be between 1 and {MAX_MAX_BODY} bytes"),
            ));
        }
        let upstream_audience = match (s.credential, s.upstream_audience) {
            (CredentialKind::Exchanged, a) => {
                let a = a.unwrap_or_else(|| s.upstream.clone());
                check_upstream_audience(&a, roles).map_err(|m| invalid(&name, m))?;
                Some(a)
            }
            (_, Some(_)) => {
                return Err(invalid(
                    &name,
                    "`upstream_audience` needs `credential = \"exchanged\"`",
                ));
            }
            (_, None) => None,
        };
        out.push(McpServer {
            name,
            upstream,
            resource,
            role: role.name.clone(),
            scopes_supported: role.scopes.clone(),
            required_scopes: s.required_scopes,
            dpop: s.dpop,
            credential: s.credential,
            upstream_audience,
            timeout_secs,
            max_body,
        });
    }
    // An audience keymint mints for an MCP server is none of keymint's own
    // resources: the MCP server cannot replay it at another route.
    if let Some(s) = out.iter().find(|s| {
        s.upstream_audience
            .as_ref()
            .is_some_and(|a| out.iter().any(|o| &o.resource == a))
    }) {
        return Err(invalid(
            &s.name,
            "`upstream_audience` is the resource of an MCP route",
        ));
    }
    Ok(out)
}

/// The audience of the tokens keymint mints for an MCP server: an absolute
/// `http(s)` URI without fragment, and no `jwt` role's audience (the
/// tokens keymint hands agents and those it hands MCP servers never share
/// an audience).
fn check_upstream_audience(a: &str, roles: &[Role]) -> Result<(), String> {
    let uri: http::Uri = a
        .parse()
        .map_err(|_| format!("`upstream_audience` `{a}` is not a URI"))?;
    if !matches!(uri.scheme_str(), Some("https" | "http"))
        || uri.authority().is_none()
        || a.contains('#')
    {
        return Err(format!(
            "`upstream_audience` `{a}` must be an absolute http(s) URI without fragment"
        ));
    }
    let taken = roles.iter().any(|r| match &r.kind {
        RoleKind::Jwt(j) => j.audience.iter().any(|x| x == a),
        _ => false,
    });
    if taken {
        return Err(format!(
            "`upstream_audience` `{a}` is a `jwt` role's audience: keymint's tokens for agents and for MCP servers must not share one"
        ));
    }
    Ok(())
}

/// An `http(s)` URL with a host and no user info; plain HTTP only to a
/// loopback host (the agent's calls and keymint's credential cross it).
fn upstream_uri(u: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = u
        .parse()
        .map_err(|_| format!("`upstream` `{u}` is not a URL"))?;
    let host = uri
        .authority()
        .filter(|a| !a.as_str().contains('@'))
        .map(|a| a.host().trim_start_matches('[').trim_end_matches(']'))
        .ok_or_else(|| format!("`upstream` `{u}` needs a host and no user info"))?;
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") => {
            let loopback = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(uri)
            } else {
                Err(format!(
                    "`upstream` `{u}`: plain HTTP only to a loopback host; use https"
                ))
            }
        }
        _ => Err(format!("`upstream` `{u}` must be an http(s) URL")),
    }
}

/// The resource: an absolute `http(s)` URI without query or fragment
/// (RFC 8707 §2, RFC 9728 §1.2) whose path is the route's, `/mcp/{name}`,
/// so the URL the client reaches is the resource it names.
fn check_resource(r: &str, name: &str) -> Result<(), String> {
    let uri: http::Uri = r
        .parse()
        .map_err(|_| format!("`resource` `{r}` is not a URI"))?;
    if !matches!(uri.scheme_str(), Some("https" | "http"))
        || uri.authority().is_none()
        || r.contains(['?', '#'])
    {
        return Err(format!(
            "`resource` `{r}` must be an absolute http(s) URI without query or fragment"
        ));
    }
    if uri.path() != format!("/mcp/{name}") {
        return Err(format!(
            "`resource` `{r}` must end in the route's path `/mcp/{name}`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn the_metadata_url_inserts_the_well_known_path_before_the_resource_path() {
        let s = |r: &str| McpServer {
            name: "tools".into(),
            upstream: "http://127.0.0.1:1/mcp".parse().unwrap(),
            resource: r.into(),
            role: "tools".into(),
            scopes_supported: vec![],
            required_scopes: vec![],
            dpop: DpopMode::Optional,
            credential: CredentialKind::None,
            upstream_audience: None,
            timeout_secs: 60,
            max_body: DEFAULT_MAX_BODY,
        };
        assert_eq!(
            s("https://km.example:8443/mcp/tools").metadata_url(),
            "https://km.example:8443/.well-known/oauth-protected-resource/mcp/tools"
        );
    }

    fn parse(mcp: &str) -> Result<crate::config::Config, ConfigError> {
        crate::config::Config::parse(&format!(
            r#"version = 1
[server]
listen = "127.0.0.1:8200"
dangerous_plaintext = true
[storage]
data_dir = "/nonexistent"
[[roles]]
name = "tools"
engine = "jwt"
scopes = ["tools:call"]
default_ttl = "5m"
max_ttl = "30m"
[roles.jwt]
audience = "http://127.0.0.1:8200/mcp/tools"
{mcp}"#
        ))
    }

    #[test]
    fn servers_are_checked_at_start_with_errors_naming_them() {
        let c = parse(
            "[[mcp.servers]]\nname = \"tools\"\nupstream = \"http://127.0.0.1:9/mcp\"\nrequired_scopes = [\"tools:call\"]\ndpop = \"required\"",
        )
        .unwrap();
        let s = &c.mcp[0];
        // The resource defaults to the issuer's URL and the route.
        assert_eq!(s.resource, "http://127.0.0.1:8200/mcp/tools");
        assert_eq!(s.role, "tools");
        assert_eq!(s.dpop, DpopMode::Required);
        assert_eq!(s.credential, CredentialKind::None);
        for (toml, says) in [
            (
                "name = \"files\"\nupstream = \"http://127.0.0.1:9/mcp\"",
                "no `jwt` role",
            ),
            (
                "name = \"tools\"\nupstream = \"http://tools.internal/mcp\"",
                "plain HTTP only to a loopback host",
            ),
            (
                "name = \"tools\"\nupstream = \"http://127.0.0.1:9/mcp\"\nrequired_scopes = [\"admin\"]",
                "required scope `admin`",
            ),
            (
                "name = \"tools\"\nupstream = \"http://127.0.0.1:9/mcp\"\nresource = \"http://127.0.0.1:8200/other\"",
                "must end in the route's path",
            ),
            (
                "name = \"tools\"\nupstream = \"http://127.0.0.1:9/mcp\"\ncredential = \"exchange\"",
                "unknown variant",
            ),
            (
                "name = \"tools\"\nupstream = \"http://127.0.0.1:9/mcp\"\nupstream_audience = \"https://x.example\"",
                "needs `credential = \"exchanged\"`",
            ),
            (
                "name = \"tools\"\nupstream = \"http://127.0.0.1:9/mcp\"\ncredential = \"exchanged\"\nupstream_audience = \"http://127.0.0.1:8200/mcp/tools\"",
                "is a `jwt` role's audience",
            ),
            (
                "name = \"tools\"\nupstream = \"http://127.0.0.1:9/mcp\"\ncredential = \"exchanged\"\nupstream_audience = \"tools\"",
                "absolute http(s) URI",
            ),
            (
                "name = \"tools\"\nupstream = \"http://127.0.0.1:9/mcp\"\nmax_body = 0",
                "`max_body`",
            ),
            (
                "name = \"tools\"\nupstream = \"http://127.0.0.1:9/mcp\"\ntimeout = \"2h\"",
                "`timeout`",
            ),
            (
                "name = \"Tools!\"\nupstream = \"http://127.0.0.1:9/mcp\"",
                "must be 1-64",
            ),
            (
                "name = \"tools\"\nupstream = \"http://127.0.0.1:9/mcp\"\ncolour = \"red\"",
                "unknown field",
            ),
        ] {
            let e = parse(&format!("[[mcp.servers]]\n{toml}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{toml}: {e}");
        }
        let c = parse(
            "[[mcp.servers]]\nname = \"tools\"\nupstream = \"http://127.0.0.1:9/mcp\"\ncredential = \"exchanged\"",
        )
        .unwrap();
        // The minted tokens' audience defaults to the upstream's URL.
        assert_eq!(
            c.mcp[0].upstream_audience.as_deref(),
            Some("http://127.0.0.1:9/mcp")
        );
        let twice = "[[mcp.servers]]\nname = \"tools\"\nupstream = \"http://127.0.0.1:9/mcp\"\n";
        let e = parse(&format!("{twice}{twice}")).unwrap_err().to_string();
        assert!(e.contains("defined twice"), "{e}");
    }

    #[test]
    fn upstreams_need_tls_unless_on_loopback() {
        assert!(upstream_uri("https://tools.internal/mcp").is_ok());
        assert!(upstream_uri("http://127.0.0.1:9000/mcp").is_ok());
        assert!(upstream_uri("http://[::1]:9000/mcp").is_ok());
        assert!(upstream_uri("http://localhost/mcp").is_ok());
        for bad in [
            "http://tools.internal/mcp",
            "http://10.0.0.1/mcp",
            "ftp://127.0.0.1/mcp",
            "https://user:pw@tools.internal/mcp",
            "/mcp",
            "not a url",
        ] {
            assert!(upstream_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resources_are_absolute_and_end_in_the_route() {
        assert!(check_resource("https://km.example/mcp/tools", "tools").is_ok());
        for bad in [
            "https://km.example/mcp/files",
            "https://km.example/mcp/tools#f",
            "https://km.example/mcp/tools?x=1",
            "https://km.example/mcp/tools/",
            "urn:x:tools",
            "km.example/mcp/tools",
        ] {
            assert!(check_resource(bad, "tools").is_err(), "{bad}");
        }
    }
}
