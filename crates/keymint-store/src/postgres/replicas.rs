//! Several replicas on one database (docs/design/0022-duties-and-replicas.md):
//! each process's heartbeat, the lease on the background duties with its
//! fencing epoch, work of dead replicas, and SSH serials from a sequence.
//!
//! Liveness and the duty lease are judged on the database's clock
//! (`clock_timestamp()`), one clock for every replica, never a replica's
//! own: a replica with a skewed clock can neither keep a lease it lost nor
//! declare a live peer dead.
//!
//! Rows carry their owner: a lease's `owner` is the replica that last
//! moved its state or its next attempt (a trigger sets it from the
//! transaction's `keymint.replica` setting, which the writer sets first in
//! every transaction), a reservation's is the replica that made it. A
//! replica whose heartbeat is older than [`DEAD_AFTER_MS`] is dead: only its
//! pending leases, revocation claims and open reservations are taken over.

use deadpool_postgres::ClientWrapper;
use keymint_core::Timestamp;

use super::pg_err;
use super::row::{execute, query_opt};
use super::writer::PgWriter;
use crate::Result;

/// How often a replica writes its heartbeat.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);
/// A replica whose last heartbeat is older than this is dead: its pending
/// work is taken over. Five heartbeats: a busy writer does not look dead.
pub const DEAD_AFTER_MS: i64 = 5_000;
/// Replica rows silent for this long are deleted (their rows then count as
/// a dead owner's, which they are).
const FORGET_AFTER_MS: i64 = 86_400_000;

/// The database's wall clock in milliseconds, for liveness and the duty
/// lease.
pub(super) const DB_NOW: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

/// SQL that is true when the owner column `col` names no live replica
/// other than `$me` (`me` is the parameter's placeholder).
pub(super) fn owner_dead(col: &str, me: &str) -> String {
    format!(
        "({col} IS NULL OR ({col} <> {me} AND NOT EXISTS (SELECT 1 FROM replicas r \
         WHERE r.id = {col} AND r.heartbeat_ms > {DB_NOW} - {DEAD_AFTER_MS})))"
    )
}

/// A store's hold on the duty lease, as it last learnt it: `None` until it
/// first asks (then no write is fenced: a store used without the lease, as
/// in the conformance suite), else the epoch it holds, or `-1` for none.
pub(super) type Fence = Option<(String, i64)>;

/// Records this replica's heartbeat (in the writer: a failing database
/// shows as a write failure within one heartbeat).
pub(super) async fn heartbeat(w: &mut PgWriter, me: &str) -> Result<()> {
    execute(
        w.c(),
        &format!(
            "INSERT INTO replicas (id, heartbeat_ms) VALUES ($1, {DB_NOW}) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_ms = EXCLUDED.heartbeat_ms"
        ),
        &[&me],
    )
    .await?;
    Ok(())
}

/// Forgets replicas silent for a day.
pub(super) async fn forget_old(w: &mut PgWriter) -> Result<()> {
    execute(
        w.c(),
        &format!("DELETE FROM replicas WHERE heartbeat_ms < {DB_NOW} - {FORGET_AFTER_MS}"),
        &[],
    )
    .await?;
    Ok(())
}

/// Takes or renews the duty lease for `me` for `ttl_ms`; the epoch if `me`
/// holds it afterwards. A new holder gets a new epoch.
pub(super) async fn hold(w: &mut PgWriter, me: &str, ttl_ms: i64) -> Result<Option<i64>> {
    heartbeat(w, me).await?;
    let row = query_opt(
        w.c(),
        &format!(
            "UPDATE duty_lease SET \
               epoch = CASE WHEN holder = $1 THEN epoch ELSE epoch + 1 END, \
               holder = $1, expires_ms = {DB_NOW} + $2 \
             WHERE id = 1 AND (holder = $1 OR holder IS NULL OR expires_ms <= {DB_NOW}) \
             RETURNING epoch"
        ),
        &[&me, &ttl_ms],
    )
    .await?;
    match row {
        Some(r) => Ok(Some(
            r.try_get::<_, i64>(0)
                .map_err(|e| pg_err("duty lease", &e))?,
        )),
        None => Ok(None),
    }
}

/// Gives the duty lease up if `me` holds it, and marks `me` gone (its
/// leftovers are taken over at once).
pub(super) async fn release(w: &mut PgWriter, me: &str) -> Result<()> {
    execute(
        w.c(),
        "UPDATE duty_lease SET holder = NULL, expires_ms = 0 WHERE id = 1 AND holder = $1",
        &[&me],
    )
    .await?;
    execute(w.c(), "DELETE FROM replicas WHERE id = $1", &[&me]).await?;
    Ok(())
}

/// Whether a duty's write may go on, checked in its own transaction: the
/// store never asked for the lease, or it still holds the epoch it was
/// given and the lease has not run out.
pub(super) async fn fenced(w: &mut PgWriter, fence: &Fence) -> Result<bool> {
    let Some((me, epoch)) = fence else {
        return Ok(true);
    };
    if *epoch < 0 {
        return Ok(false);
    }
    Ok(query_opt(
        w.c(),
        &format!(
            "SELECT 1 FROM duty_lease WHERE id = 1 AND holder = $1 AND epoch = $2 \
             AND expires_ms > {DB_NOW}"
        ),
        &[me, epoch],
    )
    .await?
    .is_some())
}

/// Revocations claimed by dead replicas fall due at `now`, so the next
/// sweep drives them instead of waiting out the claim.
pub(super) async fn take_over_claims(w: &mut PgWriter, me: &str, now: Timestamp) -> Result<u64> {
    execute(
        w.c(),
        &format!(
            "UPDATE leases SET next_attempt_ms = $2 WHERE id IN (SELECT id FROM leases \
             WHERE state = 'revoking' AND next_attempt_ms > $2 AND {} \
             FOR UPDATE SKIP LOCKED)",
            owner_dead("owner", "$1")
        ),
        &[&me, &now.millis()],
    )
    .await
}

/// The next SSH certificate serial: a sequence, unique across replicas
/// (above 2⁶², so it never meets a serial of the old per-process scheme).
pub(super) async fn next_serial(c: &ClientWrapper) -> Result<u64> {
    let row = c
        .query_one("SELECT nextval('ssh_serials')", &[])
        .await
        .map_err(|e| pg_err("ssh serial", &e))?;
    let v: i64 = row.try_get(0).map_err(|e| pg_err("ssh serial", &e))?;
    Ok(u64::try_from(v).unwrap_or(0))
}
