use std::os::unix::net::UnixStream;
use std::time::Duration;

use keymint_attest::{PeerError, PeerInfo, PidfdSource, ReadOptions, bind_private};
use tokio::io::AsyncReadExt;

use crate::support::{egid, euid, helpers, sha256_file, spawn};

#[test]
fn the_test_process_attests_itself() {
    let (a, _b) = UnixStream::pair().unwrap();
    let peer = PeerInfo::from_std(&a).unwrap();
    let exe = std::env::current_exe().unwrap();
    assert_eq!(peer.uid(), euid());
    assert_eq!(peer.gid(), egid());
    assert_eq!(peer.pid(), std::process::id() as i32);
    assert_eq!(peer.exe_path(), exe);
    assert!(peer.exe_path_verified());
    assert_eq!(peer.exe_sha256(), sha256_file(&exe));
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    if let Some(line) = cgroup.lines().find_map(|l| l.strip_prefix("0::")) {
        assert_eq!(peer.cgroup(), Some(line));
    }
    assert!(peer.start_time() > 0);
    assert!(peer.is_alive());
    // This kernel has SO_PEERPIDFD (6.5+); the fallback is for older ones.
    assert_eq!(peer.pidfd_source(), PidfdSource::PeerPidfd);
}

#[test]
fn the_executable_size_is_bounded() {
    let (a, _b) = UnixStream::pair().unwrap();
    let options = ReadOptions {
        max_exe_size: 4096,
        ..ReadOptions::default()
    };
    let err = PeerInfo::from_fd(std::os::fd::AsFd::as_fd(&a), &options).unwrap_err();
    assert!(
        matches!(err, PeerError::ExeTooLarge { limit: 4096 }),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_child_process_is_attested_with_its_own_binary() {
    let h = helpers();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = bind_private(&path).unwrap();
    for exe in [&h.a, &h.b] {
        let mut child = spawn(exe, &path, false);
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut byte = [0u8; 1];
        conn.read_exact(&mut byte).await.unwrap();
        let peer = PeerInfo::from_tokio(&conn).await.unwrap();
        assert_eq!(peer.pid(), child.id() as i32);
        assert_eq!(peer.uid(), euid());
        assert_eq!(peer.exe_path(), exe.as_path());
        assert!(peer.exe_path_verified());
        assert_eq!(peer.exe_sha256(), sha256_file(exe));
        assert!(peer.is_alive());
        drop(conn);
        assert!(child.wait().unwrap().success());
        assert!(!peer.is_alive(), "the pidfd sees the exit");
    }
}

/// The peer connects and exits (and is reaped, so its pid is free to be
/// reused) before attestation: an error, never an identity.
#[tokio::test]
async fn a_peer_that_exited_is_not_attested() {
    let h = helpers();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = bind_private(&path).unwrap();
    let mut child = spawn(&h.a, &path, true);
    let (conn, _) = listener.accept().await.unwrap();
    assert!(child.wait().unwrap().success());
    let err = PeerInfo::from_tokio(&conn).await.unwrap_err();
    assert!(matches!(err, PeerError::Exited { .. }), "{err:?}");
}

/// Same, but the peer is a zombie (exited, not yet reaped): `/proc/PID`
/// still exists, the pidfd says it is gone.
#[tokio::test]
async fn a_zombie_peer_is_not_attested() {
    let h = helpers();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = bind_private(&path).unwrap();
    let mut child = spawn(&h.a, &path, true);
    let (conn, _) = listener.accept().await.unwrap();
    let stat = format!("/proc/{}/stat", child.id());
    for _ in 0..500 {
        let s = std::fs::read_to_string(&stat).unwrap();
        if s.rsplit(')').next().unwrap().trim_start().starts_with('Z') {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = PeerInfo::from_tokio(&conn).await.unwrap_err();
    assert!(matches!(err, PeerError::Exited { .. }), "{err:?}");
    child.wait().unwrap();
}

/// The file at the executable's path is replaced while the process runs:
/// the hash is still that of what runs, and the path is no longer trusted.
#[tokio::test]
async fn a_replaced_executable_does_not_fool_the_hash() {
    let h = helpers();
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("agent");
    std::fs::copy(&h.a, &exe).unwrap();
    let path = dir.path().join("agent.sock");
    let listener = bind_private(&path).unwrap();
    let mut child = spawn(&exe, &path, false);
    let (mut conn, _) = listener.accept().await.unwrap();
    conn.read_exact(&mut [0u8; 1]).await.unwrap();
    let other = dir.path().join("other");
    std::fs::copy(&h.b, &other).unwrap();
    std::fs::rename(&other, &exe).unwrap();
    let peer = PeerInfo::from_tokio(&conn).await.unwrap();
    assert_eq!(peer.exe_sha256(), sha256_file(&h.a));
    assert_ne!(peer.exe_sha256(), sha256_file(&exe));
    assert!(!peer.exe_path_verified());
    drop(conn);
    child.wait().unwrap();
}
