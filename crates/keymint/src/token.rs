//! `keymint token`: the OAuth 2 token service from the command line
//! (docs/design/0026-oauth-token-service.md).
//!
//! - `exchange` (RFC 8693): the caller's token (`KEYMINT_TOKEN`, a `kmt_`
//!   task token, a keymint access token or a workload JWT), or its mTLS
//!   X.509-SVID (`--svid`), for an access token to one resource. Prints
//!   the access token alone (for `$(…)`), or the whole response with `-o
//!   json`.
//! - `introspect` (RFC 7662, admin token): what a token is.
//! - `revoke` (RFC 7009): ends a token (holding it is the authority).
//!
//! The token to introspect or revoke is read from a file or standard
//! input, never from an argument (where `ps` and the shell history would
//! show it); nothing but `exchange`'s result is ever printed as a token.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;
use keymint_client::Client;
use keymint_core::duration::parse_secs;
use serde_json::Value;

use crate::cli::{ClientOpts, api_err, read_key};
use crate::output::{self, Format};

const TE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const TT_ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";
const TT_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const TT_SVID: &str = "urn:keymint:params:oauth:token-type:x509-svid";

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Exchange your token (or mTLS X.509-SVID) for an access token to one
    /// resource (RFC 8693); prints the access token.
    Exchange {
        /// The resource (RFC 8707) the token is for, e.g. https://mcp.example/tools.
        #[arg(long)]
        resource: String,
        /// Scopes to ask for (default: all the subject may have).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// How long the token should live, e.g. 5m (default: the resource's).
        #[arg(long, value_parser = parse_secs)]
        lifetime: Option<u64>,
        /// The subject is this connection's X.509-SVID with this SPIFFE ID
        /// (with `--client-cert`), not the bearer token.
        #[arg(long, conflicts_with_all = ["token", "token_file"])]
        svid: Option<String>,
        /// A token of the workload acting for the subject (`act` chain),
        /// read from this file (`-`: standard input).
        #[arg(long)]
        actor_token_file: Option<PathBuf>,
        /// An approval a human gave this request after it was held.
        #[arg(long)]
        approval: Option<String>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// What a token is (RFC 7662; admin token): reads it from FILE, or
    /// standard input when FILE is absent or `-`.
    Introspect {
        file: Option<PathBuf>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// End a token (RFC 7009): reads it from FILE, or standard input when
    /// FILE is absent or `-`.
    Revoke {
        file: Option<PathBuf>,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

pub async fn run(cmd: TokenCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCmd::Exchange {
            resource,
            scopes,
            lifetime,
            svid,
            actor_token_file,
            approval,
            opts,
        } => {
            let (subject, subject_type) = match (&svid, opts.bearer()?) {
                (Some(id), _) => (id.clone(), TT_SVID),
                (None, Some(t)) => {
                    let ty = subject_type(&t);
                    (t, ty)
                }
                (None, None) => bail!(
                    "no subject: give your token (`KEYMINT_TOKEN`, `--token-file`) or, \
                     over mTLS, `--svid SPIFFE_ID`"
                ),
            };
            let actor = match &actor_token_file {
                Some(f) => Some(read_key(Some(f))?.trim().to_owned()),
                None => None,
            };
            let req = ExchangeRequest {
                resource,
                scopes,
                lifetime,
                subject,
                subject_type,
                actor,
                approval,
            };
            let v = match exchange(&opts.anonymous_client()?, &req).await? {
                Ok(v) => v,
                Err(approval) => {
                    eprintln!(
                        "held for human approval as {approval}: an operator runs \
                         `keymint approval approve {approval}`, then ask again with \
                         `--approval {approval}`"
                    );
                    return Ok(ExitCode::from(3));
                }
            };
            if opts.format() == Format::Json {
                output::json(&v);
            } else {
                println!("{}", v["access_token"].as_str().unwrap_or_default());
            }
        }
        TokenCmd::Introspect { file, opts } => {
            let token = read_key(file.as_deref())?;
            let body = form(&[("token", token.trim())]);
            let r = opts
                .client()?
                .raw(
                    http::Method::POST,
                    "/v1/introspect",
                    Some("application/x-www-form-urlencoded"),
                    body.into_bytes(),
                )
                .await
                .map_err(api_err)?;
            if !r.status.is_success() {
                let p: Result<keymint_proto::Problem, _> = r.json();
                match p {
                    Ok(p) => bail!("introspection refused ({}): {}", p.code, p.detail),
                    Err(_) => bail!("introspection refused (HTTP {})", r.status.as_u16()),
                }
            }
            let i: keymint_proto::Introspection = r.json().map_err(api_err)?;
            if opts.format() == Format::Json {
                output::json(&i);
            } else if !i.active {
                println!("active: false");
            } else {
                let o = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                let n = |v: Option<i64>| v.map_or_else(|| "-".into(), |v| v.to_string());
                for (k, v) in [
                    ("active", "true".to_owned()),
                    ("token_type", o(&i.token_type)),
                    ("sub", o(&i.sub)),
                    ("aud", o(&i.aud)),
                    ("scope", o(&i.scope)),
                    ("client_id", o(&i.client_id)),
                    ("task_id", o(&i.task_id)),
                    ("role", o(&i.role)),
                    ("jti", o(&i.jti)),
                    ("exp", n(i.exp)),
                    (
                        "cnf.jkt",
                        i.cnf.as_ref().map_or("-".into(), |c| c.jkt.clone()),
                    ),
                ] {
                    println!("{k:<11} {v}");
                }
            }
        }
        TokenCmd::Revoke { file, opts } => {
            let token = read_key(file.as_deref())?;
            let (status, v) = post_form(
                &opts.anonymous_client()?,
                "/oauth/revoke",
                &[("token", token.trim())],
            )
            .await?;
            if status != 200 {
                bail!("revocation refused: {}", oauth_error(&v));
            }
            // RFC 7009: the same answer whether the token was live or not.
            if opts.format() == Format::Json {
                output::json(&serde_json::json!({"revoked": true}));
            } else {
                println!("revoked (if it was live, it is not any more)");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The type of a subject token: `access_token` for a `kmt_` token, `jwt`
/// for a JWT (keymint takes its own access tokens and workload JWTs as
/// that type).
fn subject_type(t: &str) -> &'static str {
    if t.starts_with("kmt_") {
        TT_ACCESS
    } else {
        TT_JWT
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", keymint_client::encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// One RFC 8693 exchange.
#[derive(Debug, Clone)]
pub struct ExchangeRequest {
    pub resource: String,
    pub scopes: Vec<String>,
    pub lifetime: Option<u64>,
    pub subject: String,
    pub subject_type: &'static str,
    pub actor: Option<String>,
    pub approval: Option<String>,
}

impl ExchangeRequest {
    /// A `kmt_` task token for an access token to `resource`.
    pub fn from_task_token(token: &str, resource: &str, scopes: Vec<String>) -> Self {
        Self {
            resource: resource.to_owned(),
            scopes,
            lifetime: None,
            subject: token.to_owned(),
            subject_type: TT_ACCESS,
            actor: None,
            approval: None,
        }
    }
}

/// Performs the exchange at `/oauth/token`: the token response, or
/// `Err(approval)` when policy held it for a human; an error says what the
/// server refused (never a token).
pub async fn exchange(c: &Client, r: &ExchangeRequest) -> anyhow::Result<Result<Value, String>> {
    let scope = r.scopes.join(" ");
    let lifetime = r.lifetime.map(|l| l.to_string());
    let mut p: Vec<(&str, &str)> = vec![
        ("grant_type", TE),
        ("subject_token", &r.subject),
        ("subject_token_type", r.subject_type),
        ("resource", &r.resource),
    ];
    if !scope.is_empty() {
        p.push(("scope", &scope));
    }
    if let Some(l) = &lifetime {
        p.push(("requested_lifetime", l));
    }
    if let Some(a) = &r.actor {
        p.push(("actor_token", a));
        p.push(("actor_token_type", subject_type(a)));
    }
    if let Some(a) = &r.approval {
        p.push(("approval", a));
    }
    let (status, v) = post_form(c, "/oauth/token", &p).await?;
    if status == 200 && v["access_token"].is_string() {
        return Ok(Ok(v));
    }
    if v["error"] == "authorization_pending" {
        return Ok(Err(v["approval"].as_str().unwrap_or_default().to_owned()));
    }
    bail!(
        "the token service refused the exchange: {}",
        oauth_error(&v)
    )
}

async fn post_form(c: &Client, path: &str, pairs: &[(&str, &str)]) -> anyhow::Result<(u16, Value)> {
    let body = form(pairs);
    let r = c
        .raw(
            http::Method::POST,
            path,
            Some("application/x-www-form-urlencoded"),
            body.into_bytes(),
        )
        .await
        .map_err(api_err)?;
    let v = if r.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&r.body).unwrap_or(Value::Null)
    };
    Ok((r.status.as_u16(), v))
}

/// `error: description` of an RFC 6749 §5.2 answer (the server's fixed
/// strings, which never carry the caller's values).
fn oauth_error(v: &Value) -> String {
    match (v["error"].as_str(), v["error_description"].as_str()) {
        (Some(e), Some(d)) => format!("{e}: {d}"),
        (Some(e), None) => e.to_owned(),
        _ => "an unexpected answer".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_types_follow_the_token() {
        assert_eq!(subject_type("kmt_abc"), TT_ACCESS);
        assert_eq!(subject_type("eyJ.e30.x"), TT_JWT);
        assert_eq!(
            form(&[("a", "x y&z=+"), ("b", "c")]),
            "a=x%20y%26z%3D%2B&b=c"
        );
        assert_eq!(
            oauth_error(&serde_json::json!({"error": "invalid_scope", "error_description": "d"})),
            "invalid_scope: d"
        );
    }
}
