//! The audit event and its hash chain.
//!
//! Each event carries `seq` (1, 2, 3, … without gaps), `prev` (the hash of the
//! event before it; 64 zeros for the first) and `hash`, the SHA-256 of the
//! event's canonical JSON without the `hash` field. Editing an event breaks
//! its own hash; removing or reordering events breaks `seq` and `prev`.
//! Canonical JSON is serde_json's output for [`AuditEvent`]: fields in
//! declaration order, `data` as a sorted map, no white space.
//!
//! INVARIANT (DESIGN.md 4): events hold fingerprints of secrets, never secrets.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::clock::Timestamp;

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Denied,
    Failure,
}

/// An event before it is placed in the chain.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AuditDraft {
    pub time: Timestamp,
    pub kind: &'static str,
    pub outcome: Option<Outcome>,
    pub actor: String,
    pub task: Option<String>,
    pub lease: Option<String>,
    pub workload: Option<String>,
    pub role: Option<String>,
    pub fingerprint: Option<String>,
    pub reason: Option<String>,
    pub data: BTreeMap<String, serde_json::Value>,
}

impl AuditDraft {
    pub fn new(time: Timestamp, kind: &'static str, actor: impl Into<String>) -> Self {
        Self {
            time,
            kind,
            actor: actor.into(),
            ..Self::default()
        }
    }

    #[must_use]
    pub fn outcome(mut self, o: Outcome) -> Self {
        self.outcome = Some(o);
        self
    }

    #[must_use]
    pub fn task(mut self, t: impl Into<String>) -> Self {
        self.task = Some(t.into());
        self
    }

    #[must_use]
    pub fn lease(mut self, l: impl Into<String>) -> Self {
        self.lease = Some(l.into());
        self
    }

    #[must_use]
    pub fn workload(mut self, w: impl Into<String>) -> Self {
        self.workload = Some(w.into());
        self
    }

    #[must_use]
    pub fn role(mut self, r: impl Into<String>) -> Self {
        self.role = Some(r.into());
        self
    }

    #[must_use]
    pub fn fingerprint(mut self, f: impl Into<String>) -> Self {
        self.fingerprint = Some(f.into());
        self
    }

    #[must_use]
    pub fn reason(mut self, r: impl Into<String>) -> Self {
        self.reason = Some(r.into());
        self
    }

    #[must_use]
    pub fn data(mut self, k: &str, v: impl Into<serde_json::Value>) -> Self {
        self.data.insert(k.to_owned(), v.into());
        self
    }

    /// Places the draft in the chain after `prev` with number `seq`.
    pub fn seal(self, seq: u64, prev: &str) -> AuditEvent {
        self.seal_line(seq, prev).0
    }

    /// [`Self::seal`], and the event's stored line ([`AuditEvent::to_json`])
    /// made from the same serialisation: the canonical JSON without `hash`
    /// is written once, hashed, and the line is those bytes with `hash`
    /// appended as the last field (where serde puts it), instead of
    /// serialising the event a second time for the store and the sinks.
    pub fn seal_line(self, seq: u64, prev: &str) -> (AuditEvent, String) {
        let mut e = AuditEvent {
            seq,
            time: self.time,
            kind: self.kind.to_owned(),
            outcome: self.outcome.unwrap_or(Outcome::Success),
            actor: self.actor,
            task: self.task,
            lease: self.lease,
            workload: self.workload,
            role: self.role,
            fingerprint: self.fingerprint,
            reason: self.reason,
            data: self.data,
            prev: prev.to_owned(),
            hash: String::new(),
        };
        // Plain data (strings, numbers, JSON values with string keys)
        // always serialises.
        let mut line = serde_json::to_string(&e).unwrap_or_default();
        e.hash = crate::lower_hex(&Sha256::digest(line.as_bytes()));
        // `hash` is the last field and a hex string (nothing to escape):
        // the line is `{…,"prev":"…"` + `,"hash":"…"}`.
        line.pop();
        line.reserve(e.hash.len() + 10);
        line.push_str(",\"hash\":\"");
        line.push_str(&e.hash);
        line.push_str("\"}");
        (e, line)
    }
}

/// One event of the chain, as stored and as written to sinks (one JSON line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AuditEvent {
    pub seq: u64,
    pub time: Timestamp,
    pub kind: String,
    pub outcome: Outcome,
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data: BTreeMap<String, serde_json::Value>,
    pub prev: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

impl AuditEvent {
    /// The SHA-256 of the canonical JSON of this event without `hash`.
    pub fn compute_hash(&self) -> String {
        let mut h = Sha256::new();
        let write = |h: &mut Sha256| {
            let mut copy = self.clone();
            copy.hash.clear();
            serde_json::to_writer(HashWriter(h), &copy)
        };
        // Serialising plain data into a hasher does not fail.
        let _ = write(&mut h);
        crate::lower_hex(&h.finalize())
    }

    /// The JSON line written to sinks (without the trailing newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What is wrong at the first bad place of a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case", tag = "problem")]
pub enum ChainProblem {
    /// A line is not an audit event at all.
    Malformed { position: u64, detail: String },
    /// The event's content no longer matches its hash.
    Edited { position: u64, seq: u64 },
    /// Events are missing before this one.
    Removed {
        position: u64,
        missing_from: u64,
        missing_to: u64,
    },
    /// This event stands out of order (it appears after a later one).
    Reordered { position: u64, seq: u64 },
    /// The event's `prev` does not match the hash of the event before it:
    /// the event before it, or this one, was replaced wholesale.
    BrokenLink { position: u64, seq: u64 },
    /// The chain is whole but ends before a head recorded elsewhere: events
    /// were removed from its end (or it was rolled back).
    EndsBeforeHead { last_seq: u64, head_seq: u64 },
    /// The event at a head recorded elsewhere is not the one recorded: the
    /// chain was rewritten from there or before.
    NotTheRecordedHead { seq: u64 },
}

impl std::fmt::Display for ChainProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed { position, detail } => {
                write!(f, "entry {position} is not a valid audit event: {detail}")
            }
            Self::Edited { position, seq } => write!(
                f,
                "entry {position} (seq {seq}) was edited: its content does not match its hash"
            ),
            Self::Removed {
                position,
                missing_from,
                missing_to,
            } => write!(
                f,
                "events were removed before entry {position}: seq {missing_from}..={missing_to} missing"
            ),
            Self::Reordered { position, seq } => write!(
                f,
                "entry {position} (seq {seq}) is out of order: it follows a later event"
            ),
            Self::BrokenLink { position, seq } => write!(
                f,
                "entry {position} (seq {seq}) does not link to the event before it: an event was replaced"
            ),
            Self::EndsBeforeHead { last_seq, head_seq } => write!(
                f,
                "the chain ends at seq {last_seq}, before the recorded head seq {head_seq}: events were removed from its end"
            ),
            Self::NotTheRecordedHead { seq } => write!(
                f,
                "the event at seq {seq} is not the recorded head (its hash differs): the chain was rewritten"
            ),
        }
    }
}

/// The result of checking a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChainReport {
    pub events: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<ChainProblem>,
}

impl ChainReport {
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }

    /// Checks an intact chain against a head recorded elsewhere (a copy of
    /// an earlier report kept apart from the trail): a hash chain alone
    /// cannot tell that events were cut from its end, a recorded head can.
    /// `hash_at_head` is the chain's hash at `head.seq`, if it reaches it.
    pub fn check_head(&mut self, head: &RecordedHead, hash_at_head: Option<&str>) {
        if self.problem.is_some() {
            return;
        }
        let last_seq = self.last_seq.unwrap_or(0);
        if last_seq < head.seq {
            self.problem = Some(ChainProblem::EndsBeforeHead {
                last_seq,
                head_seq: head.seq,
            });
        } else if hash_at_head != Some(head.hash.as_str()) {
            self.problem = Some(ChainProblem::NotTheRecordedHead { seq: head.seq });
        }
    }
}

/// A chain's head recorded apart from it, written `SEQ:HASH` (the head seq
/// and hash a verification prints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedHead {
    pub seq: u64,
    pub hash: String,
}

impl std::str::FromStr for RecordedHead {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            "a recorded head is SEQ:HASH, the head seq and the 64 hex digits of its hash".to_owned()
        };
        let (seq, hash) = s.split_once(':').ok_or_else(bad)?;
        let seq: u64 = seq.parse().map_err(|_| bad())?;
        if seq == 0 || hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        Ok(Self {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

/// Checks a chain that must start at seq 1. Entries are numbered from 1 in
/// the order given (the line number of a JSON-lines file).
///
/// Memory stays constant however long the chain is.
pub fn verify<I>(entries: I) -> ChainReport
where
    I: IntoIterator<Item = Result<AuditEvent, String>>,
{
    verify_from(entries, 1, GENESIS)
}

/// Checks a chain that continues after `(first_seq - 1, prev_hash)`.
pub fn verify_from<I>(entries: I, first_seq: u64, prev_hash: &str) -> ChainReport
where
    I: IntoIterator<Item = Result<AuditEvent, String>>,
{
    let mut v = ChainVerifier::after(first_seq, prev_hash);
    for entry in entries {
        if !v.push(entry) {
            break;
        }
    }
    v.report()
}

/// A chain checked one entry at a time, for a reader that gets it in
/// batches (the store's, read with `await` between them): positions and a
/// gap in `seq` are counted over the whole chain, not per batch.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    expected: u64,
    prev: String,
    position: u64,
    count: u64,
    last: Option<(u64, String)>,
    /// The first gap in `seq`, as (position, from, to): if a missing event
    /// turns up later, the chain was reordered; if none ever does, events
    /// were removed.
    gap: Option<(u64, u64, u64)>,
    problem: Option<ChainProblem>,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self::after(1, GENESIS)
    }
}

impl ChainVerifier {
    /// A chain that starts at seq 1.
    pub fn new() -> Self {
        Self::default()
    }

    /// A chain that continues after `(first_seq - 1, prev_hash)`.
    pub fn after(first_seq: u64, prev_hash: &str) -> Self {
        Self {
            expected: first_seq,
            prev: prev_hash.to_owned(),
            position: 0,
            count: 0,
            last: None,
            gap: None,
            problem: None,
        }
    }

    /// Checks the next entry (an event, or why a line is not one); `false`
    /// once the chain has a problem, after which entries are not looked at.
    pub fn push(&mut self, entry: Result<AuditEvent, String>) -> bool {
        if self.problem.is_some() {
            return false;
        }
        self.position += 1;
        let position = self.position;
        let ev = match entry {
            Ok(ev) => ev,
            Err(detail) => {
                self.problem = Some(ChainProblem::Malformed { position, detail });
                return false;
            }
        };
        if ev.hash != ev.compute_hash() {
            self.problem = Some(ChainProblem::Edited {
                position,
                seq: ev.seq,
            });
            return false;
        }
        let late = self
            .gap
            .is_some_and(|(_, from, to)| (from..=to).contains(&ev.seq));
        if late || ev.seq < self.expected {
            self.problem = Some(ChainProblem::Reordered {
                position,
                seq: ev.seq,
            });
            return false;
        }
        if ev.seq > self.expected {
            self.gap
                .get_or_insert((position, self.expected, ev.seq - 1));
        } else if self.gap.is_none() && ev.prev != self.prev {
            self.problem = Some(ChainProblem::BrokenLink {
                position,
                seq: ev.seq,
            });
            return false;
        }
        self.expected = ev.seq + 1;
        self.prev.clone_from(&ev.hash);
        self.count += 1;
        self.last = Some((ev.seq, ev.hash));
        true
    }

    /// What was found: the first problem, or the head of a whole chain.
    pub fn report(self) -> ChainReport {
        let problem = self.problem.or_else(|| {
            self.gap.map(|(position, from, to)| ChainProblem::Removed {
                position,
                missing_from: from,
                missing_to: to,
            })
        });
        ChainReport {
            events: self.count,
            last_seq: self.last.as_ref().map(|(s, _)| *s),
            last_hash: self.last.map(|(_, h)| h),
            problem,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<AuditEvent> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|seq| {
                let e = AuditDraft::new(Timestamp(seq as i64 * 1000), "lease.issued", "admin")
                    .lease(format!("lse_{seq}"))
                    .data("ttl", 60)
                    .seal(seq, &prev);
                prev = e.hash.clone();
                e
            })
            .collect()
    }

    fn check(events: Vec<AuditEvent>) -> ChainReport {
        verify(events.into_iter().map(Ok))
    }

    #[test]
    fn an_intact_chain_verifies_and_survives_json() {
        let events = chain(5);
        let lines: Vec<String> = events.iter().map(AuditEvent::to_json).collect();
        let parsed = lines
            .iter()
            .map(|l| serde_json::from_str::<AuditEvent>(l).map_err(|e| e.to_string()));
        let r = verify(parsed);
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.events, 5);
        assert_eq!(r.last_seq, Some(5));
        assert!(lines[0].contains(r#""prev":"0000"#));
    }

    #[test]
    fn the_line_made_while_sealing_is_the_events_json_and_hashes_to_its_hash() {
        let drafts = [
            AuditDraft::new(Timestamp(1), "a", "admin"),
            AuditDraft::new(Timestamp(-5), "lease.denied", "wl \"quoted\" \u{e9}\n")
                .outcome(Outcome::Denied)
                .task("tsk_1")
                .lease("lse_1")
                .workload("w")
                .role("r")
                .fingerprint("fp")
                .reason("a reason with \\ and \u{1f600}")
                .data("scopes", vec!["a", "b"])
                .data(
                    "nested",
                    serde_json::json!({"z": [1, null], "a": {"k": "v"}}),
                )
                .data("n", -1.5),
        ];
        for d in drafts {
            let (e, line) = d.clone().seal_line(7, GENESIS);
            assert_eq!(line, e.to_json());
            assert_eq!(e.hash, e.compute_hash());
            assert_eq!(d.seal(7, GENESIS), e);
            let back: AuditEvent = serde_json::from_str(&line).unwrap();
            assert_eq!(back, e);
        }
    }

    #[test]
    fn an_edit_is_named() {
        let mut events = chain(5);
        events[2].actor = "mallory".into();
        assert_eq!(
            check(events).problem,
            Some(ChainProblem::Edited {
                position: 3,
                seq: 3
            })
        );
    }

    #[test]
    fn a_removal_is_named() {
        let mut events = chain(6);
        events.remove(3);
        assert_eq!(
            check(events).problem,
            Some(ChainProblem::Removed {
                position: 4,
                missing_from: 4,
                missing_to: 4
            })
        );
        let mut events = chain(3);
        events.remove(0);
        assert!(matches!(
            check(events).problem,
            Some(ChainProblem::Removed {
                missing_from: 1,
                ..
            })
        ));
    }

    #[test]
    fn a_reordering_is_named() {
        let mut events = chain(6);
        events.swap(2, 3);
        assert_eq!(
            check(events).problem,
            Some(ChainProblem::Reordered {
                position: 4,
                seq: 3
            })
        );
    }

    #[test]
    fn a_replaced_event_with_a_valid_own_hash_breaks_the_link() {
        let mut events = chain(5);
        let forged = AuditDraft::new(Timestamp(3000), "lease.issued", "admin").seal(3, GENESIS);
        events[2] = forged;
        assert_eq!(
            check(events).problem,
            Some(ChainProblem::BrokenLink {
                position: 3,
                seq: 3
            })
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let r = verify(vec![Err("expected value at line 1".to_owned())]);
        assert!(matches!(
            r.problem,
            Some(ChainProblem::Malformed { position: 1, .. })
        ));
    }
}
