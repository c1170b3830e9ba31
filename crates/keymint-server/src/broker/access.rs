//! Access: which tasks and leases a principal may act on. The admin acts on
//! any; a task token on its own task and the tasks below it; a workload on
//! its own tasks and everything below them; operators and nodes on none.

use keymint_core::id;
use keymint_core::model::{Lease, Task};

use super::{Broker, BrokerError, Principal, Result};

/// How many parents a walk up a task tree follows at most.
const MAX_DEPTH: usize = 32;

impl Broker {
    /// Whether `p` may act on task `t`: admins on any, a task token on its
    /// own task and the tasks below it.
    async fn may_act_on(&self, p: &Principal, t: &Task) -> Result<bool> {
        let own = match p {
            Principal::Admin => return Ok(true),
            Principal::Operator { .. } | Principal::Node { .. } => return Ok(false),
            Principal::Workload { name, .. } => {
                // Its own tasks and everything below them.
                let mut cur = t.clone();
                for _ in 0..MAX_DEPTH {
                    if &cur.workload == name {
                        return Ok(true);
                    }
                    let Some(parent) = cur.parent.as_deref() else {
                        return Ok(false);
                    };
                    match self.store.get_task(parent).await? {
                        Some(next) => cur = next,
                        None => return Ok(false),
                    }
                }
                return Ok(false);
            }
            Principal::Task { task, .. } => task,
        };
        let mut cur = t.clone();
        for _ in 0..MAX_DEPTH {
            if cur.id == own.id {
                return Ok(true);
            }
            let Some(parent) = cur.parent.as_deref() else {
                return Ok(false);
            };
            match self.store.get_task(parent).await? {
                Some(next) => cur = next,
                None => return Ok(false),
            }
        }
        Ok(false)
    }

    pub(super) async fn task_for(&self, p: &Principal, id: &str) -> Result<Task> {
        if !id::is_valid("tsk_", id) {
            return Err(BrokerError::NotFound("task"));
        }
        let t = self
            .store
            .get_task(id)
            .await?
            .ok_or(BrokerError::NotFound("task"))?;
        self.may_act_on_or_refuse(p, t).await
    }

    /// [`Self::task_for`] for a lease about to be granted: the task may
    /// come from the store's cache ([`keymint_store::Store::task_before_grant`]),
    /// because the store's write job grants the lease again against the
    /// task as it is in its transaction (status, deadline, scopes), and
    /// what the checks here and the decision read of a task (its id,
    /// parent, workload, role, intent, purpose, environment, delegation)
    /// never changes after it starts.
    pub(super) async fn task_to_grant_in(&self, p: &Principal, id: &str) -> Result<Task> {
        if !id::is_valid("tsk_", id) {
            return Err(BrokerError::NotFound("task"));
        }
        let t = self
            .store
            .task_before_grant(id)
            .await?
            .ok_or(BrokerError::NotFound("task"))?;
        self.may_act_on_or_refuse(p, t).await
    }

    async fn may_act_on_or_refuse(&self, p: &Principal, t: Task) -> Result<Task> {
        let id = t.id.as_str();
        if !self.may_act_on(p, &t).await? {
            return Err(BrokerError::Forbidden(format!(
                "task `{id}` is outside the caller's task tree"
            )));
        }
        Ok(t)
    }

    pub(super) async fn lease_for(&self, p: &Principal, id: &str) -> Result<Lease> {
        if !id::is_valid("lse_", id) {
            return Err(BrokerError::NotFound("lease"));
        }
        let l = self
            .store
            .get_lease(id)
            .await?
            .ok_or(BrokerError::NotFound("lease"))?;
        self.task_for(p, &l.task).await?;
        Ok(l)
    }

    pub(crate) fn require_admin(p: &Principal) -> Result<()> {
        match p {
            Principal::Admin => Ok(()),
            Principal::Task { .. }
            | Principal::Operator { .. }
            | Principal::Node { .. }
            | Principal::Workload { .. } => {
                Err(BrokerError::Forbidden("this needs the admin token".into()))
            }
        }
    }
}
