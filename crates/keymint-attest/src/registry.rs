//! The [`Registry`]: entries that map selector sets to workloads, and the
//! matching rule.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::{AttestError, ConfigError};
use crate::peer::PeerInfo;
use crate::selector::Selectors;

/// Attribute names that attestation fills in from the peer; an entry may
/// not set them itself.
pub const OBSERVED_ATTRIBUTES: &[&str] = &[
    "uid",
    "gid",
    "exe_path",
    "exe_sha256",
    "cgroup",
    "container_id",
];

const MAX_NAME_LEN: usize = keymint_core::model::MAX_WORKLOAD_LEN;
const MAX_VALUE_LEN: usize = 1024;

/// One workload and the selectors that identify its processes.
///
/// ```toml
/// [[entry]]
/// workload = "triage-bot"
/// selectors = { uid = 1000, exe_sha256 = "ab12...", cgroup_prefix = "/system.slice/triage.service" }
/// attributes = { team = "support" }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The workload id the peer is attested as.
    pub workload: String,
    /// What the peer must be (all of it).
    pub selectors: Selectors,
    /// Extra attributes handed to policy; names must not be one of
    /// [`OBSERVED_ATTRIBUTES`].
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// A peer that matched an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedWorkload {
    /// The entry's workload id.
    pub workload: String,
    /// The entry's attributes, plus what was observed: `uid`, `gid`,
    /// `exe_sha256`, and when known `exe_path` (only when
    /// [`PeerInfo::exe_path_verified`]), `cgroup`, `container_id`.
    pub attributes: BTreeMap<String, String>,
    /// The peer's pid, for logs; not an identity.
    pub pid: i32,
    /// Which entry matched: its index in [`Registry::entries`].
    pub entry: usize,
}

/// The configured entries.
///
/// # Precedence
///
/// A peer is attested as the workload of the matching entry with the
/// **most selectors**. Two matching entries with the same number of
/// selectors are an error ([`AttestError::Ambiguous`]), never a guess. To
/// make that error a configuration mistake rather than a runtime surprise,
/// [`Registry::new`] refuses two entries with the same number of selectors
/// that some process could match both of (no selector kind they share has
/// values that exclude each other), so a registry that loads never meets
/// an ambiguous peer.
#[derive(Debug, Clone)]
pub struct Registry {
    entries: Vec<Entry>,
}

impl Registry {
    /// Validates the entries: a workload id and attributes of sane size
    /// without control characters, no observed attribute names, no two
    /// entries with the same selector set, and no two equally specific
    /// entries that could match one process.
    pub fn new(entries: Vec<Entry>) -> Result<Self, ConfigError> {
        for e in &entries {
            e.check_text()?;
        }
        for (i, a) in entries.iter().enumerate() {
            for b in &entries[i + 1..] {
                if !a.selectors.conflicts_with(&b.selectors) {
                    continue;
                }
                if a.selectors == b.selectors {
                    return Err(ConfigError(format!(
                        "entries `{}` and `{}` have the same selectors {}",
                        a.workload, b.workload, a.selectors
                    )));
                }
                return Err(ConfigError(format!(
                    "entries `{}` {} and `{}` {} are equally specific and could match the \
                     same process; add a selector to one of them",
                    a.workload, a.selectors, b.workload, b.selectors
                )));
            }
        }
        Ok(Self { entries })
    }

    /// The entries.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The workload of the most specific entry that matches `peer`.
    pub fn attest(&self, peer: &PeerInfo) -> Result<AttestedWorkload, AttestError> {
        let mut best: Option<(usize, &Entry)> = None;
        let mut tie: Option<&Entry> = None;
        for (i, e) in self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.selectors.matches(peer))
        {
            match best {
                Some((_, b)) if b.selectors.len() > e.selectors.len() => {}
                Some((_, b)) if b.selectors.len() == e.selectors.len() => tie = Some(e),
                _ => {
                    best = Some((i, e));
                    tie = None;
                }
            }
        }
        let Some((index, entry)) = best else {
            return Err(AttestError::NoEntry {
                uid: peer.uid,
                gid: peer.gid,
                exe_path: peer.exe_path.display().to_string(),
                exe_sha256: peer.exe_sha256.clone(),
                cgroup: peer.cgroup.clone().unwrap_or_default(),
            });
        };
        if let Some(t) = tie {
            return Err(AttestError::Ambiguous {
                first: entry.workload.clone(),
                second: t.workload.clone(),
            });
        }
        let mut attributes = entry.attributes.clone();
        attributes.insert("uid".into(), peer.uid.to_string());
        attributes.insert("gid".into(), peer.gid.to_string());
        attributes.insert("exe_sha256".into(), peer.exe_sha256.clone());
        if peer.exe_path_verified {
            attributes.insert("exe_path".into(), peer.exe_path.display().to_string());
        }
        if let Some(c) = &peer.cgroup {
            attributes.insert("cgroup".into(), c.clone());
        }
        if let Some(c) = &peer.container_id {
            attributes.insert("container_id".into(), c.clone());
        }
        Ok(AttestedWorkload {
            workload: entry.workload.clone(),
            attributes,
            pid: peer.pid,
            entry: index,
        })
    }
}

impl Entry {
    /// Checks the entry's text: the workload's name as a task's
    /// ([`keymint_core::model::valid_workload`]), attribute names and
    /// values as free text, and no attribute that attestation fills in.
    /// The message names what is wrong, never the value (an entry may come
    /// from an API caller).
    pub fn check_text(&self) -> Result<(), ConfigError> {
        if !keymint_core::model::valid_workload(&self.workload, MAX_NAME_LEN) {
            return Err(ConfigError(format!(
                "an entry's `workload` must be 1 to {MAX_NAME_LEN} bytes, not only whitespace, \
                 without control, bidirectional formatting or invisible characters"
            )));
        }
        for (k, v) in &self.attributes {
            check_text("an attribute name", k, MAX_NAME_LEN)?;
            check_text("an attribute value", v, MAX_VALUE_LEN)?;
            if let Some(k) = OBSERVED_ATTRIBUTES.iter().find(|o| **o == k.as_str()) {
                return Err(ConfigError(format!(
                    "an entry sets attribute `{k}`, which attestation fills in"
                )));
            }
        }
        Ok(())
    }
}

fn check_text(what: &str, s: &str, max: usize) -> Result<(), ConfigError> {
    if s.is_empty() || !keymint_core::model::valid_text(s, max) {
        return Err(ConfigError(format!(
            "{what} must be 1 to {max} bytes without control or bidirectional formatting characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example in docs/design/0010-local-attestation.md loads.
    #[test]
    fn the_design_example_loads() {
        #[derive(Deserialize)]
        struct Config {
            entry: Vec<Entry>,
        }
        let doc = include_str!("../../../docs/design/0010-local-attestation.md");
        let start = doc.find("```toml\n[[entry]]").unwrap() + "```toml\n".len();
        let end = start + doc[start..].find("```").unwrap();
        let c: Config = toml::from_str(&doc[start..end]).unwrap();
        let r = Registry::new(c.entry).unwrap();
        assert_eq!(r.entries().len(), 3);
    }

    /// `Registry::new` refuses such registries; `attest` still fails closed
    /// if one gets through.
    #[test]
    fn an_ambiguous_match_is_an_error() {
        use crate::selector::Selector;
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = PeerInfo::from_std(&a).unwrap();
        let entry = |w: &str, s: Selector| Entry {
            workload: w.into(),
            selectors: Selectors::new([s]).unwrap(),
            attributes: BTreeMap::new(),
        };
        let entries = vec![
            entry("by-uid", Selector::Uid(peer.uid())),
            entry("by-hash", Selector::ExeSha256(peer.exe_sha256().into())),
        ];
        assert!(Registry::new(entries.clone()).is_err());
        let r = Registry { entries };
        assert_eq!(
            r.attest(&peer),
            Err(AttestError::Ambiguous {
                first: "by-uid".into(),
                second: "by-hash".into()
            })
        );
    }
}
