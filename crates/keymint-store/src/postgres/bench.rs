//! A bulk loader for benchmarks that need a large store (the restart
//! figure with 1,000,000 active leases); never called by the broker.

use keymint_core::model::{Lease, Task};

use super::row::{execute, to_json_list};
use super::{PostgresStore, pg_err, tasks};
use crate::Result;

impl PostgresStore {
    /// Inserts many active leases at once, bypassing grants and audit, in
    /// one transaction: one `INSERT ... SELECT FROM unnest(...)` for the
    /// leases rather than a statement per row. For benchmarks only, like
    /// `SqliteStore::bulk_load_for_bench`.
    pub async fn bulk_load_for_bench(&self, tasks: Vec<Task>, leases: Vec<Lease>) -> Result<()> {
        let c = self.conn().await?;
        c.batch_execute("BEGIN")
            .await
            .map_err(|e| pg_err("bulk load", &e))?;
        for t in &tasks {
            tasks::insert_task(&c, t).await?;
        }
        let col = |f: &dyn Fn(&Lease) -> String| leases.iter().map(f).collect::<Vec<String>>();
        let ids = col(&|l| l.id.clone());
        let task_ids = col(&|l| l.task.clone());
        let workloads = col(&|l| l.workload.clone());
        let roles = col(&|l| l.role.clone());
        let engines = col(&|l| l.engine.as_str().to_owned());
        let scopes = col(&|l| to_json_list(&l.scopes));
        let states = col(&|l| l.state.as_str().to_owned());
        let revocability = col(&|l| {
            match l.revocability {
                keymint_core::model::Revocability::Revocable => "revocable",
                keymint_core::model::Revocability::ExpireOnly => "expire_only",
            }
            .to_owned()
        });
        let fingerprints = col(&|l| l.fingerprint.clone());
        let created: Vec<i64> = leases.iter().map(|l| l.created_at.millis()).collect();
        let expires: Vec<i64> = leases.iter().map(|l| l.expires_at.millis()).collect();
        execute(
            &c,
            "INSERT INTO leases (id, task_id, workload, role, engine, scopes, state, \
             revocability, fingerprint, created_ms, expires_ms) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::text[], $7::text[], $8::text[], $9::text[], $10::bigint[], $11::bigint[])",
            &[
                &ids,
                &task_ids,
                &workloads,
                &roles,
                &engines,
                &scopes,
                &states,
                &revocability,
                &fingerprints,
                &created,
                &expires,
            ],
        )
        .await?;
        c.batch_execute("COMMIT")
            .await
            .map_err(|e| pg_err("bulk load", &e))
    }
}
