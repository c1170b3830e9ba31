//! What the agent runs with: built by the binary from its arguments, passed
//! in whole (nothing below reads the environment).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keymint_proto::SecretString;

use crate::AgentError;

/// How the agent proves to the server which node it is.
#[derive(Clone)]
pub enum NodeCredential {
    /// A `kma_` node token, read once at start.
    Token(SecretString),
    /// A JWT in this file, read again for every call (a projected
    /// Kubernetes token rotates under it).
    JwtFile(PathBuf),
    /// The client certificate of [`AgentConfig::tls`] (an X.509-SVID):
    /// no bearer token at all.
    Svid,
}

impl fmt::Debug for NodeCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Token(_) => f.write_str("Token(<redacted>)"),
            Self::JwtFile(p) => f.debug_tuple("JwtFile").field(p).finish(),
            Self::Svid => f.write_str("Svid"),
        }
    }
}

impl NodeCredential {
    /// Reads a `kma_` node token from a file.
    pub fn token_file(path: &Path) -> Result<Self, AgentError> {
        let token = read_secret(path)?;
        if !token.expose().starts_with("kma_") {
            return Err(AgentError::Config(format!(
                "`{}` does not hold a `kma_` node token",
                path.display()
            )));
        }
        Ok(Self::Token(token))
    }

    /// The bearer token for the next call (`None`: the client certificate
    /// speaks for the node).
    pub(crate) fn bearer(&self) -> Result<Option<SecretString>, AgentError> {
        match self {
            Self::Token(t) => Ok(Some(t.clone())),
            Self::JwtFile(p) => read_secret(p).map(Some),
            Self::Svid => Ok(None),
        }
    }
}

fn read_secret(path: &Path) -> Result<SecretString, AgentError> {
    let raw = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| AgentError::Config(format!("cannot read `{}`: {e}", path.display())))?,
    );
    let t = raw.trim();
    if t.is_empty() {
        return Err(AgentError::Config(format!("`{}` is empty", path.display())));
    }
    Ok(SecretString::new(t.to_owned()))
}

/// Bounds on what one workload connection may cost.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The longest request line, in bytes.
    pub max_line: usize,
    /// A line whose first byte arrived must end within this.
    pub line_timeout: Duration,
    /// A response or event the workload does not read within this closes
    /// the connection.
    pub write_timeout: Duration,
    /// Connections served at once; the next one gets `busy` and is closed.
    pub max_connections: usize,
    /// Connections one uid may hold at once (its next one gets `busy`), so
    /// that one user allowed on the socket cannot lock the others out.
    pub max_connections_per_uid: usize,
    /// A connection that sends nothing for this long, and has no task of
    /// its own and no watch running, is closed.
    pub idle_timeout: Duration,
    /// `watch`es one connection may have running at once; the next one is
    /// refused (`busy`), so that one workload cannot fill the agent's
    /// memory with watchers.
    pub max_watches: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_line: 64 * 1024,
            line_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_connections: 256,
            max_connections_per_uid: 32,
            idle_timeout: Duration::from_secs(30),
            max_watches: 64,
        }
    }
}

/// When things happen.
#[derive(Debug, Clone)]
pub struct Timing {
    /// How often the entries are synced from the server.
    pub sync_interval: Duration,
    /// A managed credential is replaced after this fraction of its life
    /// (numerator, denominator): two thirds by default.
    pub refresh_at: (u32, u32),
    /// The first retry after a failed refresh; doubled up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            sync_interval: Duration::from_secs(10),
            refresh_at: (2, 3),
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
        }
    }
}

/// The whole configuration of a running agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The server's base URL (`https://host:port`, or `http://` on loopback).
    pub server: String,
    pub credential: NodeCredential,
    /// For an https:// server: the CA to trust, and the client certificate
    /// (the node's X.509-SVID) to present.
    pub tls: keymint_client::TlsOptions,
    /// How long one call to the server may take before it counts as
    /// unreachable.
    pub server_timeout: Duration,
    /// The workload socket.
    pub socket: PathBuf,
    /// Give this group access to the socket (`0660`).
    pub group: Option<u32>,
    /// Where delivered files go (`DIR/TASK/NAME`).
    pub deliver_dir: PathBuf,
    /// Serve `/health` and `/ready` here.
    pub health: Option<SocketAddr>,
    pub limits: Limits,
    pub timing: Timing,
}

impl AgentConfig {
    /// The defaults of `docs/design/0012-node-agent.md` for everything but
    /// the server and the credential.
    pub fn new(server: impl Into<String>, credential: NodeCredential) -> Self {
        Self {
            server: server.into(),
            credential,
            tls: keymint_client::TlsOptions::default(),
            server_timeout: Duration::from_secs(10),
            socket: PathBuf::from(DEFAULT_SOCKET),
            group: None,
            deliver_dir: PathBuf::from(DEFAULT_DELIVER_DIR),
            health: None,
            limits: Limits::default(),
            timing: Timing::default(),
        }
    }
}

/// Where the agent listens unless told otherwise, and where `keymint run`
/// looks for it.
pub const DEFAULT_SOCKET: &str = "/run/keymint/agent.sock";
/// Where delivered files go unless told otherwise (a tmpfs).
pub const DEFAULT_DELIVER_DIR: &str = "/run/keymint/agent";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jwt_file_is_read_again_for_every_call_and_a_token_file_must_hold_a_node_token() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("jwt");
        std::fs::write(&f, "eyJ.one\n").unwrap();
        let c = NodeCredential::JwtFile(f.clone());
        assert_eq!(c.bearer().unwrap().unwrap().expose(), "eyJ.one");
        std::fs::write(&f, "eyJ.two").unwrap();
        assert_eq!(
            c.bearer().unwrap().unwrap().expose(),
            "eyJ.two",
            "rotated under us"
        );
        assert!(!format!("{c:?}").contains("eyJ"));

        let t = dir.path().join("token");
        std::fs::write(&t, "kmt_not_a_node_token\n").unwrap();
        assert!(NodeCredential::token_file(&t).is_err());
        std::fs::write(&t, "kma_secret\n").unwrap();
        let c = NodeCredential::token_file(&t).unwrap();
        assert_eq!(format!("{c:?}"), "Token(<redacted>)");
        assert!(NodeCredential::token_file(&dir.path().join("missing")).is_err());
    }
}
