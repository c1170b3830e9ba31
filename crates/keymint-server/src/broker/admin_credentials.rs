//! keymint's own admin credentials on the databases it manages: sealed in
//! the store and rotated through the API, so that after a rotation only
//! keymint knows them (docs/design/0005-mysql-users.md).
//!
//! A rotation is made crash-safe by writing the new password, sealed, under
//! a *pending* name before the database is told, and under the current name
//! only after. At start, a pending password that differs from the current
//! one is tried: if the database accepts it (the rotation took effect but
//! keymint stopped before recording it), it becomes current.
//!
//! Replicas sharing a store rotate a database's password one at a time: a
//! rotation holds an entry in the store ([`ROTATION_HOLD_MS`] at most, taken
//! by compare-and-swap), and another replica's rotation of the same
//! database meanwhile is refused with a 503 (two interleaved ones could
//! leave the database with one password and the store with the other).
//! Every replica follows the password the store holds
//! ([`Broker::refresh_admin_credentials`], from the key refresh loop), so
//! its next connections to the database log in after another replica
//! rotated.
//!
//! INVARIANT (DESIGN.md 4): the passwords exist in plain text only in
//! memory; the store holds them sealed, audit events hold fingerprints.

use std::sync::Arc;

use keymint_core::audit::{AuditDraft, Outcome};
use keymint_core::model::valid_name;
use keymint_core::role::EngineKind;
use keymint_core::token::random_base62;
use keymint_engines::Engine;
use keymint_proto::DatabaseRotated;
use sha2::Digest;
use zeroize::Zeroizing;

use super::{Broker, BrokerError, Principal, Result};

/// Where the sealed admin password of a database is kept.
pub fn secret_name(database: &str) -> String {
    format!("database/{database}/admin-password")
}

/// One rotation at a time in this process: two interleaved ones could
/// leave the database with one password and the store with the other.
static ROTATION: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a rotation's entry in the store holds other replicas off at
/// most: a replica that stopped during a rotation holds it no longer.
pub const ROTATION_HOLD_MS: i64 = 120_000;

fn pending_name(database: &str) -> String {
    format!("database/{database}/admin-password.pending")
}

/// The store's entry of a rotation under way: sealed, the time (ms since
/// the epoch) until which it holds.
pub fn rotation_name(database: &str) -> String {
    format!("database/{database}/admin-rotation")
}

impl Broker {
    fn admin_engine(&self, database: &str) -> Option<Arc<dyn Engine>> {
        let mut kinds: Vec<&EngineKind> = self.engines.keys().collect();
        kinds.sort();
        kinds
            .into_iter()
            .filter_map(|k| self.engines.get(k))
            .find(|e| e.admin_connections().iter().any(|c| c == database))
            .cloned()
    }

    async fn open_secret(&self, name: &str) -> Result<Option<Zeroizing<String>>> {
        match self.store.get_secret(name).await? {
            Some(sealed) => self.open_sealed(name, &sealed).map(Some),
            None => Ok(None),
        }
    }

    fn open_sealed(&self, name: &str, sealed: &[u8]) -> Result<Zeroizing<String>> {
        let plain = self.keyring.open(name, sealed).map_err(|_| {
            BrokerError::Engine(keymint_engines::EngineError::Internal(format!(
                "the sealed `{name}` cannot be opened with this root key"
            )))
        })?;
        let text = String::from_utf8(plain.to_vec()).map_err(|_| {
            BrokerError::Engine(keymint_engines::EngineError::Internal(format!(
                "the sealed `{name}` is not text"
            )))
        })?;
        Ok(Zeroizing::new(text))
    }

    fn seal(&self, name: &str, value: &[u8]) -> Result<Vec<u8>> {
        self.keyring.seal(name, value).map_err(|_| {
            BrokerError::Engine(keymint_engines::EngineError::Internal(format!(
                "cannot seal `{name}`"
            )))
        })
    }

    async fn seal_secret(&self, name: &str, value: &str) -> Result<()> {
        let sealed = self.seal(name, value.as_bytes())?;
        self.saw(name, &sealed);
        self.store.put_secret(name, sealed, self.now()).await?;
        Ok(())
    }

    /// Notes `sealed` as what this replica handed its engine under `name`;
    /// `Some(first)` if that differs from what it noted before (`first`:
    /// nothing was), `None` if it is the same.
    fn saw(&self, name: &str, sealed: &[u8]) -> Option<bool> {
        let digest: [u8; 32] = sha2::Sha256::digest(sealed).into();
        let before = self
            .engine_keys_seen
            .lock()
            .ok()?
            .insert(name.to_owned(), digest);
        (before != Some(digest)).then_some(before.is_none())
    }

    /// Whether `sealed` is what this replica last handed over as `name`.
    fn seen(&self, name: &str, sealed: &[u8]) -> bool {
        let digest: [u8; 32] = sha2::Sha256::digest(sealed).into();
        self.engine_keys_seen
            .lock()
            .is_ok_and(|seen| seen.get(name) == Some(&digest))
    }

    /// Takes the store's rotation entry of `database` for this replica:
    /// the sealed entry it wrote, to give back with [`Self::end_rotation`].
    /// Refused while another replica's rotation holds it.
    async fn hold_rotation(&self, database: &str) -> Result<Vec<u8>> {
        let name = rotation_name(database);
        let now = self.now();
        let current = self.store.get_secret(&name).await?;
        // An entry this root key cannot read was not written by a replica
        // rotating now (they share the key): it holds nothing.
        let until = current
            .as_ref()
            .and_then(|sealed| self.keyring.open(&name, sealed).ok())
            .and_then(|plain| std::str::from_utf8(&plain).ok()?.parse::<i64>().ok());
        let busy = || {
            BrokerError::Unavailable(format!(
                "the admin password of `{database}` is being rotated by another replica; retry shortly"
            ))
        };
        if until.is_some_and(|u| u > now.0) {
            return Err(busy());
        }
        let mine = self.seal(&name, (now.0 + ROTATION_HOLD_MS).to_string().as_bytes())?;
        if self
            .store
            .swap_secret(&name, current, mine.clone(), now)
            .await?
        {
            Ok(mine)
        } else {
            Err(busy())
        }
    }

    /// Gives the rotation entry back (if it is still this replica's).
    async fn end_rotation(&self, database: &str, mine: Vec<u8>) {
        let name = rotation_name(database);
        let ended = match self.seal(&name, b"0") {
            Ok(free) => self
                .store
                .swap_secret(&name, Some(mine), free, self.now())
                .await
                .map_err(BrokerError::from),
            Err(e) => Err(e),
        };
        if let Err(e) = ended {
            // It holds other replicas off until it runs out.
            tracing::warn!(database, error = %e, "cannot end the admin password rotation's hold");
        }
    }

    /// At start: hands every engine the sealed keys it needs (SSH CA keys),
    /// generating and sealing each one the first time.
    pub async fn load_engine_keys(&self) -> Result<()> {
        let mut kinds: Vec<&EngineKind> = self.engines.keys().collect();
        kinds.sort();
        for kind in kinds {
            let Some(engine) = self.engines.get(kind) else {
                continue;
            };
            for name in engine.sealed_keys() {
                let key = match self.store.get_secret(&name).await? {
                    Some(sealed) => self.keyring.open(&name, &sealed).map_err(|_| {
                        BrokerError::Engine(keymint_engines::EngineError::Internal(format!(
                            "the sealed `{name}` cannot be opened with this root key"
                        )))
                    })?,
                    None => {
                        let mut seed = Zeroizing::new(vec![0u8; 32]);
                        getrandom::fill(seed.as_mut_slice()).map_err(|_| {
                            BrokerError::Engine(keymint_engines::EngineError::Internal(
                                "the random number generator failed".into(),
                            ))
                        })?;
                        let sealed = self.keyring.seal(&name, &seed).map_err(|_| {
                            BrokerError::Engine(keymint_engines::EngineError::Internal(format!(
                                "cannot seal `{name}`"
                            )))
                        })?;
                        // Replicas starting at once: one key wins, and a
                        // replica whose key lost uses the winner's.
                        if self
                            .store
                            .swap_secret(&name, None, sealed, self.now())
                            .await?
                        {
                            tracing::info!(key = %name, "generated a key");
                            seed
                        } else {
                            let sealed = self.store.get_secret(&name).await?.ok_or_else(|| {
                                BrokerError::Engine(keymint_engines::EngineError::Internal(
                                    format!("`{name}` vanished while this replica started"),
                                ))
                            })?;
                            self.keyring.open(&name, &sealed).map_err(|_| {
                                BrokerError::Engine(keymint_engines::EngineError::Internal(
                                    format!(
                                        "the sealed `{name}` cannot be opened with this root key"
                                    ),
                                ))
                            })?
                        }
                    }
                };
                engine.use_sealed_key(&name, &key)?;
            }
        }
        Ok(())
    }

    /// Hands every engine the sealed keys as the store holds them now (a
    /// CA key another replica imported). Returns how many changed.
    pub async fn refresh_engine_keys(&self) -> Result<usize> {
        let mut changed = 0;
        for engine in self.engines.values() {
            for name in engine.sealed_keys() {
                let Some(sealed) = self.store.get_secret(&name).await? else {
                    continue;
                };
                if self.seen(&name, &sealed) {
                    continue;
                }
                let key = self.keyring.open(&name, &sealed).map_err(|_| {
                    BrokerError::Engine(keymint_engines::EngineError::Internal(format!(
                        "the sealed `{name}` cannot be opened with this root key"
                    )))
                })?;
                engine.use_sealed_key(&name, &key)?;
                let first = self.saw(&name, &sealed).unwrap_or(false);
                // A KRL names its CA's key: build it again (once after
                // start too, which costs one build and misses nothing).
                self.krl
                    .generation
                    .fetch_add(1, std::sync::atomic::Ordering::Release);
                if !first {
                    tracing::warn!(key = %name, "a key changed on another replica; using the new one");
                    changed += 1;
                }
            }
        }
        Ok(changed)
    }

    /// At start: makes every engine connect with the admin password keymint
    /// stored for it (if any), finishing a rotation a crash interrupted.
    /// Databases never rotated keep the configuration's connection.
    pub async fn load_admin_credentials(&self) -> Result<()> {
        let mut kinds: Vec<&EngineKind> = self.engines.keys().collect();
        kinds.sort();
        for kind in kinds {
            let Some(engine) = self.engines.get(kind) else {
                continue;
            };
            for db in engine.admin_connections() {
                let name = secret_name(&db);
                let sealed = self.store.get_secret(&name).await?;
                let current = match &sealed {
                    Some(s) => Some(self.open_sealed(&name, s)?),
                    None => None,
                };
                let pending = self.open_secret(&pending_name(&db)).await?;
                if let Some(p) = pending.as_ref().filter(|p| Some(*p) != current.as_ref())
                    && engine.admin_password_works(&db, p).await.unwrap_or(false)
                {
                    tracing::warn!(database = %db, "finishing an admin password rotation a restart interrupted");
                    self.seal_secret(&name, p).await?;
                    engine.use_admin_password(&db, p)?;
                } else if let (Some(sealed), Some(c)) = (sealed, current) {
                    engine.use_admin_password(&db, &c)?;
                    self.saw(&name, &sealed);
                }
            }
        }
        Ok(())
    }

    /// Makes every engine use the admin password the store holds now, where
    /// it changed since this replica last handed one over (another replica
    /// rotated it). Returns how many changed.
    pub async fn refresh_admin_credentials(&self) -> Result<usize> {
        let mut changed = 0;
        for engine in self.engines.values() {
            for db in engine.admin_connections() {
                if self.follow_admin_password(&**engine, &db).await? == Some(false) {
                    tracing::warn!(database = %db, "the admin password was rotated on another replica; using the new one");
                    changed += 1;
                }
            }
        }
        Ok(changed)
    }

    /// Hands `engine` the admin password of `db` the store holds, if it is
    /// not the one this replica last handed over: `Some(first)` when it
    /// did (`first`: none was before).
    async fn follow_admin_password(&self, engine: &dyn Engine, db: &str) -> Result<Option<bool>> {
        let name = secret_name(db);
        let Some(sealed) = self.store.get_secret(&name).await? else {
            return Ok(None);
        };
        if self.seen(&name, &sealed) {
            return Ok(None);
        }
        let password = self.open_sealed(&name, &sealed)?;
        engine.use_admin_password(db, &password)?;
        Ok(Some(self.saw(&name, &sealed).unwrap_or(false)))
    }

    /// Checks at start that keymint's admin on every database holds what
    /// its engine needs (PostgreSQL: CREATEROLE or superuser). A database
    /// that lacks it is an error naming what to grant; one that cannot be
    /// reached now is only logged, so an outage never keeps keymint down.
    pub async fn check_admin_privileges(&self) -> Result<()> {
        let mut kinds: Vec<&EngineKind> = self.engines.keys().collect();
        kinds.sort();
        for kind in kinds {
            let Some(engine) = self.engines.get(kind) else {
                continue;
            };
            for db in engine.admin_connections() {
                match self
                    .within_deadline("checking the admin's privileges", engine.check_admin(&db))
                    .await
                {
                    Ok(()) => {}
                    Err(e @ keymint_engines::EngineError::Rejected(_)) => return Err(e.into()),
                    Err(e) => {
                        tracing::warn!(database = %db, error = %e, "cannot check the admin's privileges now");
                    }
                }
            }
        }
        Ok(())
    }

    /// Sets a new random password for keymint's admin user on `database`,
    /// keeps it sealed, and uses it from then on (admin only).
    pub async fn rotate_database_admin(
        &self,
        p: &Principal,
        database: &str,
    ) -> Result<DatabaseRotated> {
        Self::require_admin(p)?;
        if !valid_name(database) {
            return Err(BrokerError::NotFound("database"));
        }
        let engine = self
            .admin_engine(database)
            .ok_or(BrokerError::NotFound("database"))?;
        let _one_at_a_time = ROTATION.lock().await;
        let held = self.hold_rotation(database).await?;
        let rotated = self.rotate_held(p, database, &*engine).await;
        self.end_rotation(database, held).await;
        rotated
    }

    /// The rotation itself, while this replica holds the store's entry.
    async fn rotate_held(
        &self,
        p: &Principal,
        database: &str,
        engine: &dyn Engine,
    ) -> Result<DatabaseRotated> {
        // From the password the store holds now: another replica may have
        // rotated it since this one last looked.
        self.follow_admin_password(engine, database).await?;
        let password = random_base62(32).map_err(|_| {
            BrokerError::Engine(keymint_engines::EngineError::Internal(
                "the random number generator failed".into(),
            ))
        })?;
        let fingerprint = self.keyring.fingerprint(password.as_bytes());
        // Durable before the database is told: a crash after the ALTER
        // cannot lose the only copy of the new password.
        self.seal_secret(&pending_name(database), &password).await?;
        if let Err(e) = engine.rotate_admin_password(database, &password).await {
            // The answer may have been lost after the change took effect.
            if engine
                .admin_password_works(database, &password)
                .await
                .unwrap_or(false)
            {
                engine.use_admin_password(database, &password)?;
            } else {
                let ev = AuditDraft::new(self.now(), "database.admin_rotate_failed", p.actor())
                    .outcome(Outcome::Failure)
                    .reason(e.to_string())
                    .data("database", database)
                    .data("engine", engine.kind().as_str());
                self.store.append_audit(ev).await?;
                self.notify_audit();
                return Err(e.into());
            }
        }
        self.seal_secret(&secret_name(database), &password).await?;
        let now = self.now();
        let ev = AuditDraft::new(now, "database.admin_rotated", p.actor())
            .fingerprint(&fingerprint)
            .data("database", database)
            .data("engine", engine.kind().as_str());
        self.store.append_audit(ev).await?;
        self.notify_audit();
        Ok(DatabaseRotated {
            database: database.to_owned(),
            engine: engine.kind(),
            rotated_at: now,
            fingerprint,
        })
    }
}
