//! Credential engines: what mints and revokes one kind of credential.
//!
//! Issuing is split in two so that DESIGN.md invariant 2 (durable before
//! returned) holds for every engine:
//!
//! 1. [`Engine::prepare`] makes the secret locally (a token, a password, a
//!    certificate) without touching anything outside keymint. The broker then
//!    records the lease, with the secret's fingerprint, as `pending`, or as
//!    `active` straight away when [`Engine::is_local`] says nothing outside
//!    keymint is involved.
//! 2. [`Engine::apply`] makes it real at the provider (creates the database
//!    user, …). Only after it succeeds is the lease marked `active` and the
//!    secret returned. A crash in between leaves a `pending` lease that
//!    reconciliation revokes.
//!
//! Where the provider makes the secret itself (an OpenAI or OpenRouter API
//! key), [`Engine::prepare`] makes no secret, and [`Engine::mint`] (in
//! place of `apply`) returns the credential the provider made; the broker
//! records its fingerprint when it activates the lease.
//!
//! [`Engine::revoke`] must be idempotent: it may be retried after a crash or
//! a lost answer.

pub mod aws;
pub mod federation;
pub mod jwt;
pub mod mysql;
pub mod openai;
pub mod openrouter;
pub mod postgres;
pub mod provider;
pub mod ssh;
pub mod token;

use async_trait::async_trait;
use keymint_core::Timestamp;
use keymint_core::model::{Lease, Revocability, Role, Task};
use keymint_core::role::{DatabaseRole, EngineKind, RoleKind, SshRole};
use keymint_proto::Credential;
use zeroize::Zeroizing;

/// Whether a host name or address is this machine's loopback (`localhost`,
/// `127.0.0.0/8`, `::1`).
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// TLS on a database's admin connections (`[[databases]]` `tls` and
/// `ca_file`; docs/design/0025-database-tls-and-trust-domains.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DbTls {
    /// Plain text: loopback only, unless the configuration's dangerous
    /// switch says otherwise (checked at load).
    #[default]
    Disable,
    /// TLS or nothing: the server's certificate must chain to `ca_file`
    /// (PEM), or to the Mozilla roots without one, and name the host the
    /// connection goes to. A server that does not offer TLS is refused,
    /// never spoken to in clear text.
    Require { ca_file: Option<std::path::PathBuf> },
}

/// Why a connection failed, when it was the TLS handshake: the rustls
/// error found along the error's sources (`invalid peer certificate:
/// UnknownIssuer`). Its words come from rustls, never from the peer.
pub(crate) fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r.to_string());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(r.to_string());
        }
        cur = err.source();
    }
    None
}

/// Why an engine failed. The message must already be free of secrets: it is
/// stored with the lease and shown to operators.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// Worth retrying (the provider is unreachable or busy).
    #[error("provider unavailable: {0}")]
    Unavailable(String),
    /// Not worth retrying as is (the provider refused).
    #[error("provider refused: {0}")]
    Rejected(String),
    #[error("engine failure: {0}")]
    Internal(String),
    /// The caller's request cannot be served as it is (a malformed public
    /// key, …): a 4xx, and nothing was changed.
    #[error("{0}")]
    BadRequest(String),
}

/// What an engine is asked to mint.
#[derive(Debug)]
pub struct IssueContext<'a> {
    pub lease_id: &'a str,
    pub task: &'a Task,
    pub role: &'a Role,
    pub expires_at: Timestamp,
    /// What the caller submitted to be certified (SSH: its public key).
    pub public_key: Option<&'a str>,
    /// SSH: the principals asked for (a subset of the role's); `None`: all.
    pub principals: Option<&'a [String]>,
    /// SSH: the certificate's serial, from the store (unique across
    /// replicas); `None`: the engine's own counter (one process).
    pub serial: Option<u64>,
}

/// A prepared credential: the secret to hand out, the bytes to fingerprint,
/// and the non-secret facts needed later to revoke it.
#[derive(Debug)]
pub struct Prepared {
    pub credential: Credential,
    pub fingerprint_material: Zeroizing<Vec<u8>>,
    pub engine_data: serde_json::Value,
}

impl IssueContext<'_> {
    /// The settings of a database role, for the database engines.
    pub(crate) fn database_role(&self, engine: EngineKind) -> Result<&DatabaseRole, EngineError> {
        match (&self.role.kind, engine) {
            (RoleKind::Postgres(d), EngineKind::Postgres)
            | (RoleKind::Mysql(d), EngineKind::Mysql) => Ok(d),
            _ => Err(self.not_for(engine)),
        }
    }

    /// The settings of an SSH role.
    pub(crate) fn ssh_role(&self) -> Result<&SshRole, EngineError> {
        match &self.role.kind {
            RoleKind::Ssh(s) => Ok(s),
            _ => Err(self.not_for(EngineKind::Ssh)),
        }
    }

    fn not_for(&self, engine: EngineKind) -> EngineError {
        EngineError::Internal(format!(
            "role `{}` is a {} role, not a {engine} role",
            self.role.name,
            self.role.engine()
        ))
    }
}

/// A credential an engine found at its provider, tagged by keymint with the
/// lease it was issued under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Managed {
    pub lease_id: String,
    /// What [`Engine::revoke`] needs to remove it.
    pub engine_data: serde_json::Value,
}

#[async_trait]
pub trait Engine: Send + Sync + std::fmt::Debug {
    /// The engine roles refer to (`token`, `postgres`, …).
    fn kind(&self) -> EngineKind;
    fn revocability(&self) -> Revocability;
    /// `true` when issuing involves nothing outside keymint, so the lease can
    /// be recorded active in one step.
    fn is_local(&self) -> bool;
    fn prepare(&self, ctx: &IssueContext<'_>) -> Result<Prepared, EngineError>;
    async fn apply(&self, ctx: &IssueContext<'_>, prepared: &Prepared) -> Result<(), EngineError>;
    /// Makes the credential real at the provider. For engines whose
    /// provider makes the secret (an API key it generates), the credential
    /// it made, with its fingerprint material and what revoking it needs;
    /// `None` when the prepared credential is the one to hand out (the
    /// default: [`Engine::apply`]).
    async fn mint(
        &self,
        ctx: &IssueContext<'_>,
        prepared: &Prepared,
    ) -> Result<Option<Prepared>, EngineError> {
        self.apply(ctx, prepared).await.map(|()| None)
    }
    async fn revoke(&self, lease: &Lease) -> Result<(), EngineError>;
    /// Moves the provider's own expiry of a renewed credential to
    /// `expires_at`. Engines whose provider keeps no expiry of its own do
    /// nothing.
    async fn renew(&self, _lease: &Lease, _expires_at: Timestamp) -> Result<(), EngineError> {
        Ok(())
    }
    /// Every credential at the provider that carries keymint's tag, for
    /// reconciliation. Only credentials keymint created may be listed.
    /// Engines with nothing outside keymint list none.
    async fn managed(&self) -> Result<Vec<Managed>, EngineError> {
        Ok(Vec::new())
    }

    /// Names of the 32-byte secrets (CA keys, …) this engine needs, which
    /// keymint generates once, keeps sealed in its store, and hands over
    /// with [`Engine::use_sealed_key`] at start.
    fn sealed_keys(&self) -> Vec<String> {
        Vec::new()
    }
    fn use_sealed_key(&self, name: &str, _secret: &[u8]) -> Result<(), EngineError> {
        Err(EngineError::Internal(format!(
            "this engine uses no key `{name}`"
        )))
    }

    /// The public key of the signing authority `name` (SSH: a CA, in
    /// OpenSSH format), for engines that sign.
    fn authority_public_key(&self, _name: &str) -> Option<String> {
        None
    }

    /// The databases (or other admin connections) this engine holds
    /// credentials for. Engines without any list none.
    fn admin_connections(&self) -> Vec<String> {
        Vec::new()
    }
    /// Whether keymint's admin on `connection` holds the privileges the
    /// engine needs (checked at start): `Rejected` saying what is missing,
    /// `Unavailable` when the provider cannot be asked now.
    async fn check_admin(&self, _connection: &str) -> Result<(), EngineError> {
        Ok(())
    }
    /// Sets `password` for keymint's own admin user on `connection`, over
    /// the current admin connection, and connects with it from then on.
    async fn rotate_admin_password(
        &self,
        connection: &str,
        _password: &str,
    ) -> Result<(), EngineError> {
        Err(EngineError::Rejected(format!(
            "`{connection}` has no admin credentials to rotate"
        )))
    }
    /// Connects to `connection` with `password` from now on (the sealed
    /// password keymint stored, instead of the configuration's).
    fn use_admin_password(&self, _connection: &str, _password: &str) -> Result<(), EngineError> {
        Ok(())
    }
    /// Whether a new admin connection with `password` is accepted (to tell,
    /// after a crash or a lost answer, whether a rotation took effect).
    async fn admin_password_works(
        &self,
        _connection: &str,
        _password: &str,
    ) -> Result<bool, EngineError> {
        Ok(false)
    }
}

/// What a database engine records about the user it made for a lease (its
/// `engine_data`): the configured database and the user's name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub(crate) struct DatabaseUser {
    pub database: String,
    pub username: String,
}

impl DatabaseUser {
    /// Reads it back from a lease.
    pub(crate) fn of(lease: &Lease) -> Result<Self, EngineError> {
        serde_json::from_value(lease.engine_data.clone()).map_err(|_| {
            EngineError::Internal(format!("lease `{}` has no database user", lease.id))
        })
    }
}
