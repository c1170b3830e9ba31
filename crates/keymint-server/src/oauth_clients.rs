//! `[[oauth.clients]]`: the OAuth clients registered for the
//! `client_credentials` grant, each authenticated by `private_key_jwt`
//! (RFC 7523 §2.2, OpenID Connect Core §9) with the keys of its JWK Set
//! (docs/design/0026-oauth-token-service.md, "client_credentials").
//!
//! ```toml
//! [[oauth.clients]]
//! client_id = "reports-bot"
//! workload = "reports"        # the workload it acts as (default: client_id)
//! jwks = { inline = '{"keys":[{"kty":"EC","crv":"P-256","x":"…","y":"…"}]}' }
//! # or: jwks = { file = "/etc/keymint/clients/reports-bot.jwks" }
//! resources = ["https://mcp.example/tools"]   # what it may get tokens for
//! scopes = ["tools:read"]                    # the most a token carries
//! ```

use keymint_core::model::{Role, RoleKind, valid_scope};
use serde::Deserialize;

use crate::config::ConfigError;

/// Most clients in one configuration, and most keys per client.
const MAX_CLIENTS: usize = 1024;
const MAX_KEYS: usize = 16;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOAuth {
    #[serde(default)]
    clients: Vec<RawClient>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    client_id: String,
    workload: Option<String>,
    jwks: keymint_identity::JwksSource,
    resources: Vec<String>,
    #[serde(default)]
    scopes: Vec<String>,
}

/// A registered client.
#[derive(Debug, Clone, PartialEq)]
pub struct OAuthClient {
    pub client_id: String,
    /// The workload its tasks are for (principal of the policy decisions).
    pub workload: String,
    /// Its public keys (a JWK Set), read at start.
    pub jwks: serde_json::Value,
    /// The resources it may ask tokens for (each served by a `jwt` role).
    pub resources: Vec<String>,
    /// The most scopes a token carries (within the resource's role).
    pub scopes: Vec<String>,
}

/// RFC 6749 Appendix A: `client-id = *VSCHAR`; keymint also wants 1-128.
fn valid_client_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

pub(crate) fn oauth_clients(
    raw: Option<RawOAuth>,
    roles: &[Role],
) -> Result<Vec<OAuthClient>, ConfigError> {
    let raw = raw.unwrap_or_default();
    if raw.clients.len() > MAX_CLIENTS {
        return Err(ConfigError::Invalid(format!(
            "`oauth.clients`: at most {MAX_CLIENTS} clients"
        )));
    }
    let mut out: Vec<OAuthClient> = Vec::new();
    for c in raw.clients {
        if !valid_client_id(&c.client_id) {
            return Err(ConfigError::Invalid(
                "`oauth.clients`: a `client_id` must be 1-128 printable ASCII characters".into(),
            ));
        }
        let invalid =
            |m: String| ConfigError::Invalid(format!("oauth client `{}`: {m}", c.client_id));
        if out.iter().any(|x| x.client_id == c.client_id) {
            return Err(invalid("is defined twice".into()));
        }
        let workload = c.workload.clone().unwrap_or_else(|| c.client_id.clone());
        if let Err(e) = keymint_core::rules::check_workload_name("workload", &workload) {
            return Err(invalid(e.to_string()));
        }
        let text = match &c.jwks {
            keymint_identity::JwksSource::Inline(s) => s.clone(),
            keymint_identity::JwksSource::File(p) => std::fs::read_to_string(p)
                .map_err(|e| invalid(format!("cannot read `jwks` file `{}`: {e}", p.display())))?,
            _ => {
                return Err(invalid(
                    "`jwks` is `{ inline = … }` or `{ file = … }`".into(),
                ));
            }
        };
        let jwks = client_jwks(&text).map_err(|m| invalid(m.into()))?;
        if c.resources.is_empty() {
            return Err(invalid("`resources` names no resource".into()));
        }
        for r in &c.resources {
            let served = roles.iter().filter(|role| match &role.kind {
                RoleKind::Jwt(j) => !j.spiffe && j.audience.iter().any(|a| a == r),
                _ => false,
            });
            if served.count() != 1 {
                return Err(invalid(format!(
                    "resource `{r}` is not the audience of exactly one `jwt` role"
                )));
            }
        }
        if let Some(s) = c.scopes.iter().find(|s| !valid_scope(s)) {
            return Err(invalid(format!("`{s}` is not a valid scope")));
        }
        out.push(OAuthClient {
            client_id: c.client_id,
            workload,
            jwks,
            resources: c.resources,
            scopes: c.scopes,
        });
    }
    Ok(out)
}

/// A client's JWK Set: public keys of the types keymint verifies with (a
/// private key, a symmetric key or a set without a usable key is refused
/// at load, not at the first request).
fn client_jwks(text: &str) -> Result<serde_json::Value, &'static str> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|_| "`jwks` is not JSON")?;
    let keys = v
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("`jwks` is not a JWK Set (no `keys` array)")?;
    if keys.is_empty() || keys.len() > MAX_KEYS {
        return Err("`jwks` must hold 1-16 keys");
    }
    for k in keys {
        if k.get("d").is_some() || k.get("k").is_some() {
            return Err("`jwks` holds a private or symmetric key; give only public keys");
        }
        if keymint_identity::jws::thumbprint(k).is_none() {
            return Err("`jwks` holds a key of a type keymint cannot verify with (EC, OKP, RSA)");
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_symmetric_and_empty_sets_are_refused() {
        let ok = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;
        assert!(client_jwks(ok).is_ok());
        for bad in [
            r#"{"keys":[]}"#,
            r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#,
            r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","d":"x"}]}"#,
            r#"[1]"#,
            "nope",
        ] {
            assert!(client_jwks(bad).is_err(), "{bad}");
        }
        assert!(valid_client_id("reports-bot"));
        assert!(!valid_client_id(""));
        assert!(!valid_client_id("a\nb"));
    }

    const BASE: &str = "version = 1\n[server]\nlisten = \"127.0.0.1:8200\"\n\
        dangerous_plaintext = true\n[storage]\ndata_dir = \"/nonexistent\"\n\
        [[roles]]\nname = \"tools\"\nengine = \"jwt\"\nscopes = [\"tools:read\"]\ndefault_ttl = \"5m\"\nmax_ttl = \"30m\"\n\
        [roles.jwt]\naudience = \"https://mcp.example/tools\"\n";
    const KEYS: &str = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;

    fn client(jwks: &str, extra: &str) -> String {
        format!(
            "{BASE}[[oauth.clients]]\nclient_id = \"bot\"\njwks = {jwks}\n\
             resources = [\"https://mcp.example/tools\"]\nscopes = [\"tools:read\"]\n{extra}"
        )
    }

    #[test]
    fn clients_load_inline_or_from_a_file_and_name_served_resources() {
        let c =
            crate::config::Config::parse(&client(&format!("{{ inline = '{KEYS}' }}"), "")).unwrap();
        assert_eq!(c.oauth_clients.len(), 1);
        assert_eq!(c.oauth_clients[0].workload, "bot");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bot.jwks");
        std::fs::write(&f, KEYS).unwrap();
        let c = crate::config::Config::parse(&client(
            &format!("{{ file = {:?} }}", f.display().to_string()),
            "workload = \"reports\"",
        ))
        .unwrap();
        assert_eq!(c.oauth_clients[0].workload, "reports");
        assert_eq!(c.oauth_clients[0].jwks["keys"][0]["crv"], "Ed25519");
        // A resource no role serves, a missing file, a URL source, twice.
        for bad in [
            client(&format!("{{ inline = '{KEYS}' }}"), "").replace(
                "resources = [\"https://mcp.example/tools\"]",
                "resources = [\"https://elsewhere.example\"]",
            ),
            client("{ file = \"/nonexistent/bot.jwks\" }", ""),
            client("{ url = \"https://keys.example/jwks\" }", ""),
            format!(
                "{}{}",
                client(&format!("{{ inline = '{KEYS}' }}"), ""),
                client(&format!("{{ inline = '{KEYS}' }}"), "").replace(BASE, "")
            ),
        ] {
            assert!(crate::config::Config::parse(&bad).is_err(), "{bad}");
        }
    }
}
