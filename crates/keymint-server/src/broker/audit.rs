//! The audit trail read back: verifying the whole hash chain (admin).

use keymint_core::audit::{AuditEvent, ChainReport, ChainVerifier};

use super::{Broker, Principal, Result};

/// How many stored events one read brings.
const BATCH: u32 = 5000;

/// A stored line as the verifier takes it: an event, or why it is none,
/// with the stored row's `seq` (which an edit of the text cannot move).
/// A stored event edited into something that no longer reads as one is a
/// finding of the check (`Malformed`, at its place), not a store error.
fn parse_stored(seq: u64, line: &str) -> std::result::Result<AuditEvent, String> {
    serde_json::from_str(line).map_err(|e| format!("the stored row with `seq` {seq}: {e}"))
}

impl Broker {
    /// Verifies the whole chain from its first event, in batches of the
    /// stored lines; the report names the first problem and its place in
    /// the whole chain (admin only).
    pub async fn audit_verify(&self, p: &Principal) -> Result<ChainReport> {
        Self::require_admin(p)?;
        self.walk_stored_chain(|_| {}).await
    }

    /// One pass over the stored chain, verified as it is read: `seen` gets
    /// each event that reads as one, up to the first problem. The cursor is
    /// the stored row's seq, which an edited event's text cannot move.
    pub(crate) async fn walk_stored_chain(
        &self,
        mut seen: impl FnMut(&AuditEvent),
    ) -> Result<ChainReport> {
        let mut v = ChainVerifier::new();
        let mut after = 0u64;
        loop {
            let batch = self.store.audit_lines_after(after, BATCH).await?;
            let Some(&(last, _)) = batch.last() else {
                break;
            };
            for (seq, line) in batch {
                let entry = parse_stored(seq, &line);
                if let Ok(e) = &entry {
                    seen(e);
                }
                if !v.push(entry) {
                    return Ok(v.report());
                }
            }
            after = last;
        }
        Ok(v.report())
    }
}
