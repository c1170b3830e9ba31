//! Rate-limit buckets (docs/design/0040): read, decided by
//! [`crate::rates::decide`] and written in one write job.

use keymint_core::Timestamp;
use rusqlite::{OptionalExtension, params};

use super::writer::Writer;
use crate::Result;
use crate::rates::{Bucket, FORGET_AFTER_MS, RateAsk, RateGive, RateTake, decide};

fn read(w: &mut Writer<'_>, key: &str) -> Result<Option<Bucket>> {
    Ok(w.conn
        .prepare_cached("SELECT level_milli, at_ms FROM rate_buckets WHERE key = ?1")?
        .query_row(params![key], |r| {
            Ok(Bucket {
                level_milli: r.get(0)?,
                at_ms: r.get(1)?,
            })
        })
        .optional()?)
}

fn write(w: &mut Writer<'_>, key: &str, b: Bucket) -> Result<()> {
    w.conn
        .prepare_cached(
            "INSERT INTO rate_buckets (key, level_milli, at_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (key) DO UPDATE SET level_milli = excluded.level_milli, \
             at_ms = excluded.at_ms",
        )?
        .execute(params![key, b.level_milli, b.at_ms])?;
    Ok(())
}

pub(super) fn take(w: &mut Writer<'_>, asks: &[RateAsk], now: Timestamp) -> Result<RateTake> {
    let mut stored = Vec::with_capacity(asks.len());
    for a in asks {
        stored.push(read(w, &a.key)?);
    }
    let (next, answer) = decide(asks, &stored, now.millis());
    for (a, b) in asks.iter().zip(next) {
        write(w, &a.key, b)?;
    }
    // Buckets untouched for a minute are full again: a few go each time.
    w.conn
        .prepare_cached(
            "DELETE FROM rate_buckets WHERE key IN (SELECT key FROM rate_buckets \
             WHERE at_ms <= ?1 LIMIT 16)",
        )?
        .execute(params![now.millis().saturating_sub(FORGET_AFTER_MS)])?;
    Ok(answer)
}

pub(super) fn give(w: &mut Writer<'_>, gives: &[RateGive], now: Timestamp) -> Result<()> {
    for g in gives {
        // No row: the bucket is full already, nothing to give back to.
        if let Some(b) = read(w, &g.key)? {
            let b = b
                .refilled(g.per_minute, now.millis())
                .given(g.per_minute, g.units);
            write(w, &g.key, b)?;
        }
    }
    Ok(())
}
