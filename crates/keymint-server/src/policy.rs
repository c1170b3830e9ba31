//! The policy in force: a [`keymint_policy::PolicySet`] loaded from the
//! configured files, swapped whole on reload. A reload that fails leaves
//! the previous set in force.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use keymint_policy::{DECISION_BUDGET, PolicyError, PolicySchema, PolicySet};

#[derive(Debug)]
pub struct PolicyState {
    schema: PolicySchema,
    paths: Vec<PathBuf>,
    current: RwLock<Arc<PolicySet>>,
    /// A decision's time budget, in microseconds.
    budget_micros: AtomicU64,
}

impl PolicyState {
    /// Loads the policies in `paths`; none means an empty set (deny all).
    pub fn load(paths: &[PathBuf]) -> Result<Self, PolicyError> {
        let schema = PolicySchema::new()?;
        let set = if paths.is_empty() {
            PolicySet::empty(schema.clone())
        } else {
            PolicySet::load(&schema, paths)?
        };
        Ok(Self {
            schema,
            paths: paths.to_vec(),
            current: RwLock::new(Arc::new(set)),
            budget_micros: AtomicU64::new(micros(DECISION_BUDGET)),
        })
    }

    /// A state holding exactly `src` (tests, tools).
    pub fn from_source(name: &str, src: &str) -> Result<Self, PolicyError> {
        let schema = PolicySchema::new()?;
        let set = PolicySet::from_sources(&schema, &[(PathBuf::from(name), src.to_owned())])?;
        Ok(Self {
            schema,
            paths: Vec::new(),
            current: RwLock::new(Arc::new(set)),
            budget_micros: AtomicU64::new(micros(DECISION_BUDGET)),
        })
    }

    pub fn current(&self) -> Arc<PolicySet> {
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// How long a decision may take before it denies as timed out
    /// ([`DECISION_BUDGET`] unless set).
    pub fn decision_budget(&self) -> Duration {
        Duration::from_micros(self.budget_micros.load(Ordering::Relaxed))
    }

    /// Sets the decision budget (tests and tools: a zero budget makes
    /// every decision time out).
    pub fn set_decision_budget(&self, budget: Duration) {
        self.budget_micros.store(micros(budget), Ordering::Relaxed);
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Reads the files again; on success the new set is in force.
    pub fn reload(&self) -> Result<Arc<PolicySet>, PolicyError> {
        let set = Arc::new(if self.paths.is_empty() {
            PolicySet::empty(self.schema.clone())
        } else {
            PolicySet::load(&self.schema, &self.paths)?
        });
        match self.current.write() {
            Ok(mut g) => *g = Arc::clone(&set),
            Err(poisoned) => *poisoned.into_inner() = Arc::clone(&set),
        }
        Ok(set)
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
