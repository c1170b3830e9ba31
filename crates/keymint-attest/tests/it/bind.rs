use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;

use keymint_attest::{BindError, BindOptions, PeerInfo, bind_private, bind_private_with};

fn mode(p: &std::path::Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

#[tokio::test]
async fn the_socket_is_owner_only_and_the_parent_is_created_private() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("run/keymint");
    let path = parent.join("agent.sock");
    let listener = bind_private(&path).unwrap();
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&parent), 0o700);
    // Nothing left behind but the socket.
    let names: Vec<_> = std::fs::read_dir(&parent)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["agent.sock"]);
    // It works at its final path.
    let client = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (conn, _) = listener.accept().await.unwrap();
    let peer = PeerInfo::from_tokio(&conn).await.unwrap();
    assert_eq!(peer.pid(), std::process::id() as i32);
    drop(client);
}

#[tokio::test]
async fn group_access() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("shared");
    let path = parent.join("agent.sock");
    // Root may give any group; others only their own.
    let gid = if nix::unistd::geteuid().is_root() {
        4242
    } else {
        nix::unistd::getegid().as_raw()
    };
    let _l = bind_private_with(&path, &BindOptions { group: Some(gid) }).unwrap();
    assert_eq!(mode(&path), 0o660);
    assert_eq!(std::fs::metadata(&path).unwrap().gid(), gid);
    assert_eq!(mode(&parent), 0o710);
    assert_eq!(std::fs::metadata(&parent).unwrap().gid(), gid);
}

#[tokio::test]
async fn a_stale_regular_file_or_symlink_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    std::fs::write(&path, "precious").unwrap();
    let err = bind_private(&path).unwrap_err();
    assert!(matches!(err, BindError::NotASocket(_)), "{err:?}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");

    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let err = bind_private(&link).unwrap_err();
    assert!(matches!(err, BindError::NotASocket(_)), "{err:?}");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );

    let sub = dir.path().join("a-dir");
    std::fs::create_dir(&sub).unwrap();
    assert!(matches!(bind_private(&sub), Err(BindError::NotASocket(_))));
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_a_live_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let live = UnixListener::bind(&path).unwrap();
    let err = bind_private(&path).unwrap_err();
    assert!(matches!(err, BindError::InUse(_)), "{err:?}");
    drop(live); // std does not unlink: a stale socket stays behind
    assert!(path.exists());
    let listener = bind_private(&path).unwrap();
    assert_eq!(mode(&path), 0o600);
    let _c = tokio::net::UnixStream::connect(&path).await.unwrap();
    listener.accept().await.unwrap();
}

#[tokio::test]
async fn an_open_parent_is_refused_unless_sticky_and_ours() {
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    for m in [0o777, 0o770, 0o702] {
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(m)).unwrap();
        let err = bind_private(open.join("s.sock")).unwrap_err();
        assert!(
            matches!(err, BindError::UnsafeParent { .. }),
            "{m:o}: {err:?}"
        );
    }
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let _l = bind_private(open.join("s.sock")).unwrap();
    assert_eq!(mode(&open.join("s.sock")), 0o600);
}

#[tokio::test]
async fn a_path_without_a_parent_is_refused() {
    assert!(matches!(
        bind_private("agent.sock"),
        Err(BindError::BadPath(_))
    ));
}
