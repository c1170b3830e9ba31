use std::os::unix::net::UnixStream;

use keymint_attest::{AttestError, Entry, PeerInfo, Registry, Selector, Selectors, bind_private};
use serde::Deserialize;
use tokio::io::AsyncReadExt;

use crate::support::{euid, helpers, sha256_file, spawn};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    entry: Vec<Entry>,
}

fn registry(toml_text: &str) -> Result<Registry, String> {
    let c: Config = toml::from_str(toml_text).map_err(|e| e.to_string())?;
    Registry::new(c.entry).map_err(|e| e.to_string())
}

fn self_peer() -> (PeerInfo, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    (PeerInfo::from_std(&a).unwrap(), b)
}

/// Only the binary whose hash the entry names is the workload; the other
/// binary under the same uid falls through to the less specific entry, or
/// to nothing.
#[tokio::test]
async fn only_the_named_binary_is_attested() {
    let h = helpers();
    let uid = euid();
    let ha = sha256_file(&h.a);
    let specific = registry(&format!(
        r#"
        [[entry]]
        workload = "agent-a"
        selectors = {{ uid = {uid}, exe_sha256 = "{}" }}
        attributes = {{ team = "support" }}

        [[entry]]
        workload = "any-local"
        selectors = {{ uid = {uid} }}
        "#,
        ha.to_uppercase()
    ))
    .unwrap();
    let only_a = registry(&format!(
        "[[entry]]\nworkload = \"agent-a\"\nselectors = {{ exe_sha256 = \"{ha}\" }}\n"
    ))
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = bind_private(&path).unwrap();
    for (exe, want) in [(&h.a, "agent-a"), (&h.b, "any-local")] {
        let mut child = spawn(exe, &path, false);
        let (mut conn, _) = listener.accept().await.unwrap();
        conn.read_exact(&mut [0u8; 1]).await.unwrap();
        let peer = PeerInfo::from_tokio(&conn).await.unwrap();

        let w = specific.attest(&peer).unwrap();
        assert_eq!(w.workload, want);
        assert_eq!(w.pid, child.id() as i32);
        assert_eq!(w.attributes["uid"], uid.to_string());
        assert_eq!(w.attributes["exe_sha256"], sha256_file(exe));
        assert_eq!(w.attributes["exe_path"], exe.display().to_string());
        assert_eq!(
            w.attributes.get("team").map(String::as_str),
            (want == "agent-a").then_some("support")
        );

        match only_a.attest(&peer) {
            Ok(w) => assert_eq!((exe, w.workload.as_str()), (&h.a, "agent-a")),
            Err(AttestError::NoEntry {
                uid: u,
                exe_path,
                exe_sha256,
                ..
            }) => {
                assert_eq!(exe, &h.b);
                assert_eq!(u, uid);
                assert_eq!(exe_path, h.b.display().to_string());
                assert_eq!(exe_sha256, sha256_file(&h.b));
            }
            Err(e) => panic!("{e:?}"),
        }
        drop(conn);
        child.wait().unwrap();
    }
}

#[test]
fn no_entry_says_what_it_saw() {
    let (peer, _keep) = self_peer();
    let r = Registry::new(vec![Entry {
        workload: "other".into(),
        selectors: Selectors::new([Selector::Uid(euid() + 1)]).unwrap(),
        attributes: Default::default(),
    }])
    .unwrap();
    let err = r.attest(&peer).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&format!("uid `{}`", euid())), "{msg}");
    assert!(msg.contains(peer.exe_sha256()), "{msg}");
    assert!(
        msg.contains(&peer.exe_path().display().to_string()),
        "{msg}"
    );
}

#[test]
fn cgroup_and_path_selectors() {
    let (peer, _keep) = self_peer();
    let cgroup = peer.cgroup().expect("a cgroup v2 host").to_owned();
    let exe = peer.exe_path().display().to_string();
    let here = registry(&format!(
        "[[entry]]\nworkload = \"here\"\nselectors = {{ cgroup_prefix = \"{cgroup}\", exe_path = \"{exe}\" }}\n"
    ))
    .unwrap();
    assert_eq!(here.attest(&peer).unwrap().workload, "here");
    let elsewhere = registry(&format!(
        "[[entry]]\nworkload = \"x\"\nselectors = {{ cgroup_prefix = \"/keymint-nowhere\", exe_path = \"{exe}\" }}\n"
    ))
    .unwrap();
    assert!(matches!(
        elsewhere.attest(&peer),
        Err(AttestError::NoEntry { .. })
    ));
    let other_path =
        registry("[[entry]]\nworkload = \"x\"\nselectors = { exe_path = \"/usr/bin/true\" }\n")
            .unwrap();
    assert!(matches!(
        other_path.attest(&peer),
        Err(AttestError::NoEntry { .. })
    ));
    if cgroup != "/" {
        // A prefix matches whole components only.
        let r = registry(&format!(
            "[[entry]]\nworkload = \"x\"\nselectors = {{ cgroup_prefix = \"{}\" }}\n",
            &cgroup[..cgroup.len() - 1]
        ));
        let r = r.unwrap();
        assert!(matches!(r.attest(&peer), Err(AttestError::NoEntry { .. })));
    }
}

#[test]
fn malformed_selectors_are_refused() {
    let h64 = "a".repeat(64);
    for (toml_text, want) in [
        ("selectors = {}", "at least one selector"),
        ("selectors = { uid = -1 }", ""),
        ("selectors = { user = 1 }", "unknown field"),
        ("selectors = { exe_sha256 = \"abc\" }", "64 hex digits"),
        (
            &format!("selectors = {{ exe_sha256 = \"{}g\" }}", &h64[..63]),
            "64 hex digits",
        ),
        ("selectors = { container_id = \"abc\" }", "64 hex digits"),
        ("selectors = { exe_path = \"cat\" }", "absolute"),
        ("selectors = { cgroup_prefix = \"system.slice\" }", "cgroup"),
        ("selectors = { cgroup_prefix = \"/a/\" }", "cgroup"),
    ] {
        let text = format!("[[entry]]\nworkload = \"w\"\n{toml_text}\n");
        let err = registry(&text).unwrap_err();
        assert!(err.contains(want), "{toml_text}: {err}");
    }
}

#[test]
fn bad_registries_are_refused() {
    let h = "b".repeat(64);
    for (text, want) in [
        (
            "[[entry]]\nworkload = \"a\"\nselectors = { uid = 1 }\n\
             [[entry]]\nworkload = \"b\"\nselectors = { uid = 1 }\n",
            "same selectors",
        ),
        // Equally specific and one process could match both: refused at
        // load time, so it can never be an ambiguous match at run time.
        (
            &format!(
                "[[entry]]\nworkload = \"a\"\nselectors = {{ uid = 1 }}\n\
                 [[entry]]\nworkload = \"b\"\nselectors = {{ exe_sha256 = \"{h}\" }}\n"
            ),
            "equally specific",
        ),
        (
            "[[entry]]\nworkload = \"a\"\nselectors = { cgroup_prefix = \"/a\" }\n\
             [[entry]]\nworkload = \"b\"\nselectors = { cgroup_prefix = \"/a/b\" }\n",
            "equally specific",
        ),
        (
            "[[entry]]\nworkload = \"a\"\nselectors = { uid = 1 }\nattributes = { uid = \"0\" }\n",
            "attestation fills in",
        ),
        (
            "[[entry]]\nworkload = \"\"\nselectors = { uid = 1 }\n",
            "workload",
        ),
        // A workload id is checked as a task's workload is.
        (
            "[[entry]]\nworkload = \"   \"\nselectors = { uid = 1 }\n",
            "workload",
        ),
        (
            "[[entry]]\nworkload = \"a\\u200Bb\"\nselectors = { uid = 1 }\n",
            "invisible",
        ),
        (
            "[[entry]]\nworkload = \"ew\\u202E2\"\nselectors = { uid = 1 }\n",
            "bidirectional",
        ),
    ] {
        let err = registry(text).unwrap_err();
        assert!(err.contains(want), "{text}: {err}");
    }
    // Disjoint sets of equal size, and nested prefixes with different
    // specificity, are fine.
    registry(
        "[[entry]]\nworkload = \"a\"\nselectors = { uid = 1 }\n\
         [[entry]]\nworkload = \"b\"\nselectors = { uid = 2 }\n\
         [[entry]]\nworkload = \"c\"\nselectors = { cgroup_prefix = \"/x\", uid = 1 }\n\
         [[entry]]\nworkload = \"d\"\nselectors = { cgroup_prefix = \"/y\", uid = 1 }\n",
    )
    .unwrap();
}

/// The more selectors, the more specific; the fallback only catches what
/// nothing more specific claims.
#[test]
fn precedence_is_by_number_of_selectors() {
    let (peer, _keep) = self_peer();
    let uid = euid();
    let hash = peer.exe_sha256().to_owned();
    let cgroup = peer.cgroup().unwrap().to_owned();
    let r = registry(&format!(
        r#"
        [[entry]]
        workload = "one"
        selectors = {{ uid = {uid} }}
        [[entry]]
        workload = "three"
        selectors = {{ uid = {uid}, exe_sha256 = "{hash}", cgroup_prefix = "{cgroup}" }}
        [[entry]]
        workload = "two"
        selectors = {{ uid = {uid}, exe_sha256 = "{hash}" }}
        "#
    ))
    .unwrap();
    assert_eq!(r.attest(&peer).unwrap().workload, "three");
}
