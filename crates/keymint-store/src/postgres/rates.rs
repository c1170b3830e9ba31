//! Rate-limit buckets (docs/design/0040), PostgreSQL twin of the SQLite
//! module: every write job runs under the chain head's lock, so the read,
//! the decision and the write of a take are serialised across replicas.

use keymint_core::Timestamp;

use super::row::{bad, execute, query_opt};
use super::writer::PgWriter;
use crate::Result;
use crate::rates::{Bucket, FORGET_AFTER_MS, RateAsk, RateGive, RateTake, decide};

async fn read(w: &PgWriter, key: &str) -> Result<Option<Bucket>> {
    query_opt(
        w.c(),
        "SELECT level_milli, at_ms FROM rate_buckets WHERE key = $1 FOR UPDATE",
        &[&key],
    )
    .await?
    .map(|r| {
        Ok(Bucket {
            level_milli: r.try_get(0).map_err(bad)?,
            at_ms: r.try_get(1).map_err(bad)?,
        })
    })
    .transpose()
}

async fn write(w: &PgWriter, key: &str, b: Bucket) -> Result<()> {
    execute(
        w.c(),
        "INSERT INTO rate_buckets (key, level_milli, at_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (key) DO UPDATE SET level_milli = excluded.level_milli, \
         at_ms = excluded.at_ms",
        &[&key, &b.level_milli, &b.at_ms],
    )
    .await?;
    Ok(())
}

pub(super) async fn take(w: &mut PgWriter, asks: Vec<RateAsk>, now: Timestamp) -> Result<RateTake> {
    let mut stored = Vec::with_capacity(asks.len());
    for a in &asks {
        stored.push(read(w, &a.key).await?);
    }
    let (next, answer) = decide(&asks, &stored, now.millis());
    for (a, b) in asks.iter().zip(next) {
        write(w, &a.key, b).await?;
    }
    execute(
        w.c(),
        "DELETE FROM rate_buckets WHERE key IN (SELECT key FROM rate_buckets \
         WHERE at_ms <= $1 LIMIT 16)",
        &[&now.millis().saturating_sub(FORGET_AFTER_MS)],
    )
    .await?;
    Ok(answer)
}

pub(super) async fn give(w: &mut PgWriter, gives: Vec<RateGive>, now: Timestamp) -> Result<()> {
    for g in gives {
        if let Some(b) = read(w, &g.key).await? {
            let b = b
                .refilled(g.per_minute, now.millis())
                .given(g.per_minute, g.units);
            write(w, &g.key, b).await?;
        }
    }
    Ok(())
}
