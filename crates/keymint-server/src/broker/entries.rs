//! Registration entries and nodes (docs/design/0012): which processes on
//! which node are which workload, and a node agent acting for them.
//!
//! Admins create and delete entries; a node lists its own. A node's request
//! with `X-Keymint-Entry` and `X-Keymint-Attested` becomes the entry's
//! workload once the server has checked that the entry is the node's and
//! that its selectors hold for what the agent observed.

use std::collections::BTreeMap;

use base64::Engine as _;
use keymint_attest::{Entry, RawSelectors, Registry, Selectors};
use keymint_core::audit::{AuditDraft, Outcome};
use keymint_core::id;
use keymint_core::model::RegistrationEntry;
use serde::Deserialize;

use super::{Broker, BrokerError, Principal, Proven, Result};

/// The most a node may report as observed attributes (decoded JSON).
pub const MAX_ATTESTED_BYTES: usize = 4096;

/// `POST /v1/entries`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEntry {
    pub workload: String,
    pub node: String,
    pub selectors: serde_json::Value,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// Parses selectors; the message names what is wrong and what was
/// expected, never the caller's value (serde's own messages start with it,
/// and a selector's value can be a path or a pasted secret).
fn selectors_of(v: &serde_json::Value) -> Result<Selectors> {
    let raw = RawSelectors::deserialize(v).map_err(|e| {
        let message = e.to_string();
        let (what, expected) = keymint_proto::json_error::describe_serde_message(&message);
        let expected = expected.map_or(String::new(), |x| format!(", {x}"));
        BrokerError::BadRequest(format!("invalid `selectors`: {what}{expected}"))
    })?;
    Selectors::try_from(raw)
        .map_err(|e| BrokerError::BadRequest(format!("invalid `selectors`: {e}")))
}

fn attest_entry(e: &RegistrationEntry) -> Result<Entry> {
    Ok(Entry {
        workload: e.workload.clone(),
        selectors: selectors_of(&e.selectors)?,
        attributes: e.attributes.clone(),
    })
}

impl Broker {
    /// Whether `name` is a configured node.
    pub fn is_node(&self, name: &str) -> bool {
        self.node_names().any(|n| n == name)
    }

    /// Creates an entry (admin only). The node must be configured, the
    /// selectors valid, and the node's entries must still load as one
    /// registry (no two equally specific entries one process could match).
    pub async fn create_entry(&self, p: &Principal, req: NewEntry) -> Result<RegistrationEntry> {
        Self::require_admin(p)?;
        keymint_core::rules::check_workload_name("workload", &req.workload)?;
        if !self.is_node(&req.node) {
            return Err(BrokerError::BadRequest(
                "`node` names no configured node (`[[nodes]]`)".into(),
            ));
        }
        if let Some(k) = ["node", "entry"]
            .into_iter()
            .find(|k| req.attributes.contains_key(*k))
        {
            return Err(BrokerError::BadRequest(format!(
                "attribute `{k}` is set by the server for requests through a node"
            )));
        }
        let selectors = selectors_of(&req.selectors)?;
        let now = self.now();
        let entry = RegistrationEntry {
            id: id::entry_id(now),
            workload: req.workload,
            node: req.node,
            // Normalised: hex lower case, one key per kind.
            selectors: serde_json::to_value(&selectors)
                .map_err(|e| BrokerError::BadRequest(e.to_string()))?,
            attributes: req.attributes,
            created_at: now,
        };
        let new = attest_entry(&entry)?;
        new.check_text()
            .map_err(|e| BrokerError::BadRequest(e.to_string()))?;
        let _guard = self.entry_lock.lock().await;
        let existing = self.store.list_entries(Some(&entry.node)).await?;
        let mut all = Vec::with_capacity(existing.len() + 1);
        for e in &existing {
            let old = attest_entry(e)?;
            // Named by its id: Registry's own message quotes workloads and
            // selectors, which are the caller's values.
            if old.selectors.conflicts_with(&new.selectors) {
                return Err(BrokerError::BadRequest(format!(
                    "`selectors` are equally specific as entry `{}` of this node and could \
                     match the same process; add a selector to one of them",
                    e.id
                )));
            }
            all.push(old);
        }
        all.push(new);
        Registry::new(all).map_err(|_| {
            BrokerError::BadRequest("the node's entries would not load as one registry".into())
        })?;
        let ev = AuditDraft::new(now, "entry.created", p.actor())
            .workload(&entry.workload)
            .data("entry", entry.id.clone())
            .data("node", entry.node.clone())
            .data("selectors", entry.selectors.clone());
        self.store.create_entry(entry.clone(), ev).await?;
        self.notify_audit();
        Ok(entry)
    }

    /// Entries: all (or one node's) for the admin, its own for a node.
    pub async fn list_entries(
        &self,
        p: &Principal,
        node: Option<&str>,
    ) -> Result<Vec<RegistrationEntry>> {
        match p {
            Principal::Admin => Ok(self.store.list_entries(node).await?),
            Principal::Node { name } => match node {
                Some(n) if n != name => Err(BrokerError::Forbidden(format!(
                    "node `{name}` may list only its own entries"
                ))),
                _ => Ok(self.store.list_entries(Some(name)).await?),
            },
            _ => Err(BrokerError::Forbidden(
                "listing entries needs the admin token or a node's credential".into(),
            )),
        }
    }

    pub async fn get_entry(&self, p: &Principal, entry_id: &str) -> Result<RegistrationEntry> {
        Self::require_admin(p)?;
        self.entry(entry_id).await
    }

    async fn entry(&self, entry_id: &str) -> Result<RegistrationEntry> {
        if !id::is_valid("ent_", entry_id) {
            return Err(BrokerError::NotFound("entry"));
        }
        self.store
            .get_entry(entry_id)
            .await?
            .ok_or(BrokerError::NotFound("entry"))
    }

    pub async fn delete_entry(&self, p: &Principal, entry_id: &str) -> Result<RegistrationEntry> {
        Self::require_admin(p)?;
        if !id::is_valid("ent_", entry_id) {
            return Err(BrokerError::NotFound("entry"));
        }
        let _guard = self.entry_lock.lock().await;
        let ev = AuditDraft::new(self.now(), "entry.deleted", p.actor()).data("entry", entry_id);
        let gone = self
            .store
            .delete_entry(entry_id, ev)
            .await?
            .ok_or(BrokerError::NotFound("entry"))?;
        // The node's agent ends the entry's tasks (`/v1/node/watch`), and
        // its long poll answers now (docs/design/0024).
        self.deleted_entries
            .remember(&gone.node, &gone.workload, self.now());
        self.revocation_epoch
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        self.notify_audit();
        Ok(gone)
    }

    /// A node acting for a workload: `entry_id` must be one of the node's
    /// entries and its selectors must hold for `attested` (base64url JSON of
    /// the observed attributes). Failures are audited as `auth.failed`.
    pub async fn on_behalf(
        &self,
        caller: &Principal,
        entry_id: &str,
        attested: Option<&str>,
    ) -> Result<Principal> {
        let r = self.on_behalf_inner(caller, entry_id, attested).await;
        if let Err(e @ (BrokerError::Forbidden(_) | BrokerError::NotFound(_))) = &r {
            let ev = AuditDraft::new(self.now(), "auth.failed", caller.actor())
                .outcome(Outcome::Denied)
                .reason(e.to_string())
                .data("credential", "node")
                .data("entry", entry_id.chars().take(64).collect::<String>());
            self.record_auth_failure(ev, "node").await;
        }
        r
    }

    async fn on_behalf_inner(
        &self,
        caller: &Principal,
        entry_id: &str,
        attested: Option<&str>,
    ) -> Result<Principal> {
        let Principal::Node { name: node } = caller else {
            return Err(BrokerError::Forbidden(
                "`X-Keymint-Entry` is for node agents; this caller is not a node".into(),
            ));
        };
        let observed = decode_attested(attested)?;
        let entry = match self.entry(entry_id).await {
            Ok(e) if &e.node == node => e,
            Ok(_) | Err(BrokerError::NotFound(_)) => {
                return Err(BrokerError::Forbidden(format!(
                    "entry `{}` is not an entry of node `{node}`",
                    entry_id.escape_default()
                )));
            }
            Err(e) => return Err(e),
        };
        if !selectors_of(&entry.selectors)?.matches_observed(&observed) {
            return Err(BrokerError::Forbidden(format!(
                "what node `{node}` observed does not satisfy entry `{}`",
                entry.id
            )));
        }
        let mut attributes = observed;
        // The entry's attributes are the server's; observed names that an
        // entry may not set were already refused at creation.
        attributes.extend(entry.attributes.clone());
        attributes.insert("node".into(), node.clone());
        attributes.insert("entry".into(), entry.id.clone());
        Ok(Principal::Workload {
            name: entry.workload,
            identity: Box::new(Proven {
                method: "unix",
                issuer: format!("node:{node}"),
                attributes,
            }),
        })
    }
}

/// The observed attributes a node reports: base64url (padding optional)
/// of a JSON object of strings, at most [`MAX_ATTESTED_BYTES`], only the
/// names attestation fills in.
fn decode_attested(h: Option<&str>) -> Result<BTreeMap<String, String>> {
    let bad =
        |why: &str| BrokerError::BadRequest(format!("bad `X-Keymint-Attested` header: {why}"));
    let h = h
        .ok_or_else(|| bad("missing"))?
        .trim()
        .trim_end_matches('=');
    if h.len() > MAX_ATTESTED_BYTES * 4 / 3 + 4 {
        return Err(bad("too long"));
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(h)
        .map_err(|_| bad("not base64url"))?;
    let map: BTreeMap<String, String> =
        serde_json::from_slice(&raw).map_err(|_| bad("not a JSON object of strings"))?;
    if map
        .keys()
        .any(|k| !keymint_attest::OBSERVED_ATTRIBUTES.contains(&k.as_str()))
    {
        return Err(bad(&format!(
            "an attribute is not observed (expected {})",
            keymint_attest::OBSERVED_ATTRIBUTES
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if map
        .values()
        .any(|v| !keymint_core::model::valid_text(v, 1024))
    {
        return Err(bad(
            "a value is too long or has control or bidirectional formatting characters",
        ));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn attested_headers_are_strict() {
        let ok = decode_attested(Some(&enc(r#"{"uid":"0","exe_sha256":"ab"}"#))).unwrap();
        assert_eq!(ok["uid"], "0");
        for bad in [
            None,
            Some("!!!".to_owned()),
            Some(enc("[1,2]")),
            Some(enc(r#"{"uid": 0}"#)),
            Some(enc(r#"{"node":"other"}"#)),
            Some(enc(r#"{"team":"x"}"#)),
            Some(enc(&format!(r#"{{"cgroup":"{}"}}"#, "a".repeat(5000)))),
            Some(enc("{\"cgroup\":\"a\\nb\"}")),
        ] {
            assert!(
                matches!(
                    decode_attested(bad.as_deref()),
                    Err(BrokerError::BadRequest(_))
                ),
                "{bad:?}"
            );
        }
    }
}
