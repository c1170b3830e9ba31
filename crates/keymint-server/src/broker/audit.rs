//! The audit trail read back: verifying the whole hash chain (admin).

use keymint_core::audit::{ChainReport, GENESIS, verify_from};

use super::{Broker, Principal, Result};

impl Broker {
    /// Verifies the whole chain from its first event, in batches; the
    /// report names the first problem (admin only).
    pub async fn audit_verify(&self, p: &Principal) -> Result<ChainReport> {
        Self::require_admin(p)?;
        let mut report = ChainReport {
            events: 0,
            last_seq: None,
            last_hash: None,
            problem: None,
        };
        let mut after = 0u64;
        let mut prev = GENESIS.to_owned();
        loop {
            let batch = self.store.audit_after(after, 5000).await?;
            let Some(last) = batch.last() else { break };
            let next_after = last.seq;
            let r = verify_from(batch.into_iter().map(Ok), after + 1, &prev);
            report.events += r.events;
            if let Some(problem) = r.problem {
                report.problem = Some(problem);
                break;
            }
            report.last_seq = r.last_seq;
            if let Some(h) = r.last_hash.clone() {
                prev = h;
            }
            report.last_hash = r.last_hash;
            after = next_after;
        }
        Ok(report)
    }
}
