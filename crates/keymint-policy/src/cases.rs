//! `keymint policy test CASES`: a TOML file of requests with the decision
//! each must get, so that a policy change is tested in CI like code.
//!
//! ```toml
//! [[case]]
//! name = "the CI bot may start triage tasks in prod"
//! action = "start_task"
//! principal = { id = "github:acme/bot", method = "jwt", attributes = { repository = "acme/bot" } }
//! role = { name = "triage", engine = "token", scopes = ["llm:chat"] }
//! context = { intent = "triage", environment = "prod", ttl_secs = 900 }
//! expect = "allow"        # or "deny" or "approval"
//! ```

use std::path::Path;

use serde::Deserialize;

use crate::{Action, PolicySet, Principal, Query, RequestFacts, RoleFacts, Verdict};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(rename = "case", default)]
    cases: Vec<Case>,
}

/// One request and the decision it must get.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub action: Action,
    pub principal: Principal,
    pub role: RoleFacts,
    #[serde(default)]
    pub context: RequestFacts,
    pub expect: Verdict,
    /// Policies that must be among those that decided it.
    #[serde(default)]
    pub decided_by: Vec<String>,
}

/// The outcome of one case.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub name: String,
    pub expected: Verdict,
    pub got: Verdict,
    pub reason: String,
    pub passed: bool,
}

/// Reads a cases file; the error says what is wrong and where.
pub fn read(path: &Path) -> Result<Vec<Case>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let f: File = toml::from_str(&text).map_err(|e| format!("`{}`: {e}", path.display()))?;
    if f.cases.is_empty() {
        return Err(format!("`{}` holds no [[case]]", path.display()));
    }
    Ok(f.cases)
}

/// Runs every case against `set`.
pub fn run(set: &PolicySet, cases: &[Case]) -> Vec<Outcome> {
    cases
        .iter()
        .map(|c| {
            let d = set.decide(&Query {
                action: c.action,
                principal: c.principal.clone(),
                role: c.role.clone(),
                context: c.context.clone(),
            });
            let by = c.decided_by.iter().all(|p| d.policies.contains(p));
            Outcome {
                name: c.name.clone(),
                expected: c.expect,
                got: d.verdict,
                reason: d.reason(),
                passed: d.verdict == c.expect && by,
            }
        })
        .collect()
}
