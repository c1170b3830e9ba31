//! [`Selector`]s and the validated set of them that an entry carries.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::peer::PeerInfo;
use crate::procfs::is_sha256_hex;

/// One property of the peer process that an entry requires.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Selector {
    /// The effective uid at `connect` from `SO_PEERCRED`.
    Uid(u32),
    /// The effective gid at `connect` from `SO_PEERCRED` (the primary
    /// group only).
    Gid(u32),
    /// The executable's path, matched only when it is known to name the
    /// running executable (see [`PeerInfo::exe_path_verified`]).
    ExePath(PathBuf),
    /// The SHA-256 of the running executable, 64 hex digits (stored lower
    /// case).
    ExeSha256(String),
    /// The cgroup v2 path equals this, or lies below it (component-wise:
    /// `/a/b` matches `/a/b` and `/a/b/c`, not `/a/bc`).
    CgroupPrefix(String),
    /// The container id parsed from the cgroup path (64 hex digits).
    ContainerId(String),
}

impl Selector {
    /// Whether the peer has this property.
    pub fn matches(&self, peer: &PeerInfo) -> bool {
        match self {
            Self::Uid(u) => peer.uid == *u,
            Self::Gid(g) => peer.gid == *g,
            Self::ExePath(p) => peer.exe_path_verified && peer.exe_path == *p,
            Self::ExeSha256(h) => peer.exe_sha256 == *h,
            Self::CgroupPrefix(prefix) => peer
                .cgroup
                .as_deref()
                .is_some_and(|c| cgroup_within(c, prefix)),
            Self::ContainerId(id) => peer.container_id.as_deref() == Some(id.as_str()),
        }
    }

    fn kind(&self) -> usize {
        match self {
            Self::Uid(_) => 0,
            Self::Gid(_) => 1,
            Self::ExePath(_) => 2,
            Self::ExeSha256(_) => 3,
            Self::CgroupPrefix(_) => 4,
            Self::ContainerId(_) => 5,
        }
    }

    fn name(&self) -> &'static str {
        [
            "uid",
            "gid",
            "exe_path",
            "exe_sha256",
            "cgroup_prefix",
            "container_id",
        ][self.kind()]
    }

    /// Whether attributes observed by attestation (as in
    /// [`crate::AttestedWorkload::attributes`]: `uid`, `gid`, `exe_sha256`,
    /// `exe_path` only when verified, `cgroup`, `container_id`) satisfy
    /// this selector. For a server that re-checks what a node agent reports.
    pub fn matches_observed(&self, observed: &std::collections::BTreeMap<String, String>) -> bool {
        let get = |k: &str| observed.get(k).map(String::as_str);
        match self {
            Self::Uid(u) => get("uid") == Some(u.to_string().as_str()),
            Self::Gid(g) => get("gid") == Some(g.to_string().as_str()),
            Self::ExePath(p) => get("exe_path").is_some_and(|v| Path::new(v) == p),
            Self::ExeSha256(h) => get("exe_sha256") == Some(h.as_str()),
            Self::CgroupPrefix(prefix) => get("cgroup").is_some_and(|c| cgroup_within(c, prefix)),
            Self::ContainerId(id) => get("container_id") == Some(id.as_str()),
        }
    }

    /// Whether some process could satisfy both `self` and `other`, which
    /// have the same kind.
    fn compatible(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::CgroupPrefix(a), Self::CgroupPrefix(b)) => {
                cgroup_within(a, b) || cgroup_within(b, a)
            }
            (a, b) => a == b,
        }
    }

    /// Checks and normalises one selector. The message names the kind and
    /// what was expected, never the value (it may come from an API caller).
    fn validate(self) -> Result<Self, ConfigError> {
        let invalid = |why: &str| Err(ConfigError(format!("`{}` {why}", self.name())));
        match &self {
            Self::ExePath(p) => {
                if !p.is_absolute() || p.components().any(|c| c.as_os_str() == "..") {
                    return invalid("must be an absolute path without `..`");
                }
                Ok(self)
            }
            Self::ExeSha256(h) | Self::ContainerId(h)
                if !is_sha256_hex(&h.to_ascii_lowercase()) =>
            {
                invalid("must be 64 hex digits")
            }
            Self::ExeSha256(h) => Ok(Self::ExeSha256(h.to_ascii_lowercase())),
            Self::ContainerId(h) => Ok(Self::ContainerId(h.to_ascii_lowercase())),
            Self::CgroupPrefix(p) => {
                let ok = p.starts_with('/')
                    && (p == "/" || !p.ends_with('/'))
                    && !p.split('/').any(|c| c == "." || c == "..")
                    && !p.contains("//")
                    && !p.chars().any(char::is_control);
                if !ok {
                    return invalid("must be an absolute cgroup path without a trailing `/`");
                }
                Ok(self)
            }
            Self::Uid(_) | Self::Gid(_) => Ok(self),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uid(v) | Self::Gid(v) => write!(f, "{} = {v}", self.name()),
            Self::ExePath(p) => write!(f, "exe_path = {:?}", p.display().to_string()),
            Self::ExeSha256(s) | Self::CgroupPrefix(s) | Self::ContainerId(s) => {
                write!(f, "{} = {s:?}", self.name())
            }
        }
    }
}

/// `c` is `prefix` or lies below it.
fn cgroup_within(c: &str, prefix: &str) -> bool {
    prefix == "/"
        || c.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// A validated, non-empty set of selectors, at most one of each kind; all
/// of them must match (AND).
///
/// From TOML it is a table with one key per kind:
///
/// ```toml
/// selectors = { uid = 1000, exe_sha256 = "ab12...", cgroup_prefix = "/system.slice/agent.service" }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(try_from = "RawSelectors", into = "RawSelectors")]
pub struct Selectors(Vec<Selector>);

impl Selectors {
    /// Validates `selectors`: at least one, at most one of each kind, hex
    /// digests and container ids of 64 digits, absolute paths.
    pub fn new(selectors: impl IntoIterator<Item = Selector>) -> Result<Self, ConfigError> {
        let mut v = selectors
            .into_iter()
            .map(Selector::validate)
            .collect::<Result<Vec<_>, _>>()?;
        if v.is_empty() {
            return Err(ConfigError("an entry needs at least one selector".into()));
        }
        v.sort_by_key(Selector::kind);
        if let Some(w) = v.windows(2).find(|w| w[0].kind() == w[1].kind()) {
            return Err(ConfigError(format!(
                "`{}` is given twice in one selector set",
                w[0].name()
            )));
        }
        Ok(Self(v))
    }

    /// The selectors, in a fixed order.
    pub fn iter(&self) -> impl Iterator<Item = &Selector> {
        self.0.iter()
    }

    /// How many selectors: more is more specific.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false (a set is never empty); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// All selectors match.
    pub fn matches(&self, peer: &PeerInfo) -> bool {
        self.0.iter().all(|s| s.matches(peer))
    }

    /// All selectors are satisfied by these observed attributes (see
    /// [`Selector::matches_observed`]).
    pub fn matches_observed(&self, observed: &std::collections::BTreeMap<String, String>) -> bool {
        self.0.iter().all(|s| s.matches_observed(observed))
    }

    /// Whether two entries with these sets may not both be in one
    /// [`crate::Registry`]: the same sets, or equally specific ones that one
    /// process could match.
    pub fn conflicts_with(&self, other: &Self) -> bool {
        self == other || (self.len() == other.len() && self.overlaps(other))
    }

    /// Whether one process could match both sets: no kind present in both
    /// has values that exclude each other.
    pub(crate) fn overlaps(&self, other: &Self) -> bool {
        self.0.iter().all(|a| {
            other
                .0
                .iter()
                .filter(|b| b.kind() == a.kind())
                .all(|b| a.compatible(b))
        })
    }
}

impl fmt::Display for Selectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{ ")?;
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{s}")?;
        }
        f.write_str(" }")
    }
}

/// The table form of [`Selectors`], one optional key per kind, before it is
/// checked: deserialise this first to tell a malformed table (serde's
/// error) from an invalid selector ([`Selectors::try_from`]'s
/// [`ConfigError`], which never holds a value).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSelectors {
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exe_path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exe_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container_id: Option<String>,
}

impl From<Selectors> for RawSelectors {
    fn from(s: Selectors) -> Self {
        let mut r = Self::default();
        for sel in s.0 {
            match sel {
                Selector::Uid(v) => r.uid = Some(v),
                Selector::Gid(v) => r.gid = Some(v),
                Selector::ExePath(v) => r.exe_path = Some(v),
                Selector::ExeSha256(v) => r.exe_sha256 = Some(v),
                Selector::CgroupPrefix(v) => r.cgroup_prefix = Some(v),
                Selector::ContainerId(v) => r.container_id = Some(v),
            }
        }
        r
    }
}

impl TryFrom<RawSelectors> for Selectors {
    type Error = ConfigError;

    fn try_from(r: RawSelectors) -> Result<Self, ConfigError> {
        let v = [
            r.uid.map(Selector::Uid),
            r.gid.map(Selector::Gid),
            r.exe_path.map(Selector::ExePath),
            r.exe_sha256.map(Selector::ExeSha256),
            r.cgroup_prefix.map(Selector::CgroupPrefix),
            r.container_id.map(Selector::ContainerId),
        ];
        Self::new(v.into_iter().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "AB00000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn within() {
        assert!(cgroup_within("/a/b", "/a/b"));
        assert!(cgroup_within("/a/b/c", "/a/b"));
        assert!(!cgroup_within("/a/bc", "/a/b"));
        assert!(!cgroup_within("/a", "/a/b"));
        assert!(cgroup_within("/anything", "/"));
    }

    #[test]
    fn validation() {
        assert!(Selectors::new([]).is_err());
        assert!(Selectors::new([Selector::Uid(1), Selector::Uid(2)]).is_err());
        assert!(Selectors::new([Selector::ExeSha256("abc".into())]).is_err());
        assert!(Selectors::new([Selector::ContainerId(format!("{H}0"))]).is_err());
        assert!(Selectors::new([Selector::ExePath("bin/cat".into())]).is_err());
        assert!(Selectors::new([Selector::ExePath("/usr/../bin/cat".into())]).is_err());
        for bad in ["", "a/b", "/a/", "/a//b", "/a/../b"] {
            assert!(
                Selectors::new([Selector::CgroupPrefix(bad.into())]).is_err(),
                "{bad}"
            );
        }
        // A message names the kind and what was expected, never the value
        // (selectors also come from API callers).
        let secret = "sk-proj-FAKE<script>";
        for (bad, kind) in [
            (Selector::ExePath(secret.into()), "`exe_path`"),
            (Selector::ExeSha256(secret.into()), "`exe_sha256`"),
            (Selector::ContainerId(secret.into()), "`container_id`"),
            (Selector::CgroupPrefix(secret.into()), "`cgroup_prefix`"),
        ] {
            let e = Selectors::new([bad]).unwrap_err().to_string();
            assert!(e.starts_with(kind), "{e}");
            assert!(!e.contains("sk-proj") && !e.contains("<script"), "{e}");
        }
        let s = Selectors::new([Selector::ExeSha256(H.into()), Selector::Uid(0)]).unwrap();
        assert_eq!(
            s.iter().cloned().collect::<Vec<_>>(),
            [
                Selector::Uid(0),
                Selector::ExeSha256(H.to_ascii_lowercase())
            ]
        );
    }

    #[test]
    fn overlap() {
        let a = Selectors::new([Selector::Uid(1)]).unwrap();
        let b = Selectors::new([Selector::Gid(1)]).unwrap();
        let c = Selectors::new([Selector::Uid(2)]).unwrap();
        let d = Selectors::new([Selector::CgroupPrefix("/a".into())]).unwrap();
        let e = Selectors::new([Selector::CgroupPrefix("/a/b".into())]).unwrap();
        let f = Selectors::new([Selector::CgroupPrefix("/b".into())]).unwrap();
        assert!(a.overlaps(&b));
        assert!(!a.overlaps(&c));
        assert!(d.overlaps(&e) && e.overlaps(&d));
        assert!(!d.overlaps(&f));
    }
}

#[cfg(test)]
mod observed_tests {
    use std::collections::BTreeMap;

    use super::*;

    fn sel(json: &str) -> Selectors {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn selectors_round_trip_through_json() {
        let s = sel(r#"{"uid": 1000, "cgroup_prefix": "/system.slice"}"#);
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(text, r#"{"uid":1000,"cgroup_prefix":"/system.slice"}"#);
        assert_eq!(sel(&text), s);
        assert!(serde_json::from_str::<Selectors>(r#"{"uid": 1, "pid": 2}"#).is_err());
        assert!(serde_json::from_str::<Selectors>("{}").is_err());
    }

    #[test]
    fn observed_attributes_are_matched_like_a_peer() {
        let s = sel(r#"{"uid": 1000, "cgroup_prefix": "/system.slice/a.service"}"#);
        let mut seen: BTreeMap<String, String> = [
            ("uid", "1000"),
            ("gid", "1000"),
            ("cgroup", "/system.slice/a.service/x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert!(s.matches_observed(&seen));
        seen.insert("cgroup".into(), "/system.slice/a.servicex".into());
        assert!(!s.matches_observed(&seen));
        seen.insert("cgroup".into(), "/system.slice/a.service".into());
        seen.insert("uid".into(), "0".into());
        assert!(!s.matches_observed(&seen));
        // An unverified path is never reported, so a path selector fails.
        let p = sel(r#"{"exe_path": "/usr/bin/agent"}"#);
        assert!(!p.matches_observed(&seen));
        seen.insert("exe_path".into(), "/usr/bin/agent".into());
        assert!(p.matches_observed(&seen));
    }
}
