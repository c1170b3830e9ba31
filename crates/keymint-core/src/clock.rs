//! Time as a parameter.
//!
//! INVARIANT (DESIGN.md 7): nothing below the binary reads the wall clock
//! directly; it asks the [`Clock`] it was given. Tests use [`ManualClock`] and
//! move time by hand, so expiry is deterministic.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Milliseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub const fn from_millis(ms: i64) -> Self {
        Self(ms)
    }

    pub const fn millis(self) -> i64 {
        self.0
    }

    /// Whole seconds since the epoch (for RFC 7662 `exp`/`iat`).
    pub const fn unix_seconds(self) -> i64 {
        self.0.div_euclid(1000)
    }

    #[must_use]
    pub const fn plus_millis(self, ms: i64) -> Self {
        Self(self.0.saturating_add(ms))
    }

    #[must_use]
    pub const fn plus_secs(self, secs: u64) -> Self {
        let ms = if secs > (i64::MAX / 1000) as u64 {
            i64::MAX
        } else {
            secs as i64 * 1000
        };
        self.plus_millis(ms)
    }

    /// Milliseconds from `self` until `later` (negative if `later` is earlier).
    pub const fn until(self, later: Timestamp) -> i64 {
        later.0.saturating_sub(self.0)
    }

    /// RFC 3339 with millisecond precision, always UTC (`2026-11-23T06:18:00.000Z`).
    pub fn rfc3339(self) -> String {
        self.with_rfc3339(str::to_owned)
    }

    /// Hands [`Self::rfc3339`]'s text to `f` without a `String` when the
    /// year fits the bytes on the stack (the text is ASCII, so the lossy
    /// conversion borrows).
    fn with_rfc3339<R>(self, f: impl FnOnce(&str) -> R) -> R {
        match self.rfc3339_bytes() {
            Some(b) => f(&String::from_utf8_lossy(&b)),
            None => f(&self.rfc3339_general()),
        }
    }

    /// [`Self::rfc3339`] of a time in the years 0000 to 9999, written
    /// into 24 bytes on the stack: every event, lease and response carries
    /// timestamps, and `time`'s date conversion with `format!`'s padding
    /// cost thousands of instructions each. The civil date is Howard
    /// Hinnant's `civil_from_days` (proleptic Gregorian, as `time`'s).
    /// Other years (and times `time` cannot represent) take
    /// [`Self::rfc3339_general`].
    fn rfc3339_bytes(self) -> Option<[u8; 24]> {
        const DAY_MS: i64 = 86_400_000;
        let days = self.0.div_euclid(DAY_MS);
        let ms_of_day = self.0.rem_euclid(DAY_MS);
        // 0000-03-01 is day 0 of the eras below; days since 1970-01-01 + 719,468.
        let z = days.checked_add(719_468)?;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        if !(0..=9_999).contains(&year) {
            return None;
        }
        let (h, rest) = (ms_of_day / 3_600_000, ms_of_day % 3_600_000);
        let (mi, rest) = (rest / 60_000, rest % 60_000);
        let (sec, milli) = (rest / 1_000, rest % 1_000);
        let mut b = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, width: usize, mut v: i64| {
            for i in (at..at + width).rev() {
                // A digit: `v % 10` is 0..=9 for the non-negative `v` here.
                b[i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, month);
        put(8, 2, day);
        put(11, 2, h);
        put(14, 2, mi);
        put(17, 2, sec);
        put(20, 3, milli);
        Some(b)
    }

    /// [`Self::rfc3339`] for any time, through `time`'s calendar.
    fn rfc3339_general(self) -> String {
        let nanos = i128::from(self.0) * 1_000_000;
        match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
            Ok(t) => {
                let (y, mo, d) = (t.year(), u8::from(t.month()), t.day());
                let (h, mi, s) = (t.hour(), t.minute(), t.second());
                format!(
                    "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z",
                    t.millisecond()
                )
            }
            Err(_) => format!("@{}ms", self.0),
        }
    }

    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        let t =
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
        i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
            .ok()
            .map(Self)
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with_rfc3339(|t| f.write_str(t))
    }
}

/// On the wire a timestamp is an RFC 3339 string in UTC.
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Timestamp {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
            .description(Some("RFC 3339, UTC"))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Timestamp {}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.with_rfc3339(|t| s.serialize_str(t))
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse_rfc3339(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid RFC 3339 timestamp `{s}`")))
    }
}

/// Where time comes from.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> Timestamp;
}

/// The wall clock. Constructed at the edge (the binary) and passed in.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[expect(
        clippy::disallowed_methods,
        reason = "the one place the wall clock is read"
    )]
    fn now(&self) -> Timestamp {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// A clock that moves only when told to. Cheap to clone; clones share time.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        Self(Arc::new(AtomicI64::new(start.0)))
    }

    pub fn advance_millis(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn advance_secs(&self, secs: i64) {
        self.advance_millis(secs * 1000);
    }

    pub fn set(&self, t: Timestamp) {
        self.0.store(t.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_with_millis() {
        let t = Timestamp(1_795_415_880_123);
        let s = t.rfc3339();
        assert_eq!(s, "2026-11-23T06:38:00.123Z");
        assert_eq!(Timestamp::parse_rfc3339(&s), Some(t));
    }

    #[test]
    fn rfc3339_on_the_stack_is_times_calendar() {
        // Boundaries: the epoch and the instant before it, leap days and
        // the century rules, the first and last instants of years 0000 and
        // 9999, and the times past them that take the general path.
        let year_0 = -62_167_219_200_000;
        let year_10000 = 253_402_300_800_000;
        let mut times = vec![
            0,
            -1,
            1,
            86_399_999,
            86_400_000,
            951_782_400_000, // 2000-02-29
            951_868_799_999,
            -2_203_891_200_000, // 1900-03-01
            4_107_542_400_000,  // 2100-03-01
            4_107_542_399_999,
            1_795_415_880_123,
            year_0,
            year_0 - 1,
            year_10000 - 1,
            year_10000,
            i64::MIN,
            i64::MAX,
        ];
        // And a spread over the whole range, every part of a day.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let span = (year_10000 - year_0 + 2_000) as u64;
            times.push(year_0 - 1_000 + (x % span) as i64);
        }
        for ms in times {
            let t = Timestamp(ms);
            let general = t.rfc3339_general();
            assert_eq!(t.rfc3339(), general, "{ms}");
            assert_eq!(t.to_string(), general, "{ms}");
            assert_eq!(
                serde_json::to_string(&t).unwrap(),
                format!("\"{general}\""),
                "{ms}"
            );
            assert_eq!(
                t.rfc3339_bytes().is_some(),
                (year_0..year_10000).contains(&ms)
            );
        }
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(Timestamp(1000));
        assert_eq!(c.now(), Timestamp(1000));
        c.advance_secs(2);
        assert_eq!(c.now(), Timestamp(3000));
    }

    #[test]
    fn plus_secs_saturates() {
        assert_eq!(Timestamp(5).plus_secs(u64::MAX), Timestamp(i64::MAX));
    }
}
