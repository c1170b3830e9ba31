//! [`bind_private`]: a listening Unix socket that only its owner (and
//! optionally one group) can connect to, from the first instant it exists
//! at its path.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::BindError;

/// Options for [`bind_private_with`].
#[derive(Debug, Clone, Default)]
pub struct BindOptions {
    /// Give this group access: the socket is `0660` and owned by the group
    /// (we must be a member, or root). A parent directory that this call
    /// creates is then `0710` and also given the group, so that members can
    /// reach the socket; an existing parent is left as it is.
    pub group: Option<u32>,
}

/// [`bind_private_with`] with owner-only access (`0600`). Must be called
/// within a tokio runtime, like `tokio::net::UnixListener::bind`.
pub fn bind_private(path: impl AsRef<Path>) -> Result<tokio::net::UnixListener, BindError> {
    bind_private_with(path, &BindOptions::default())
}

/// Binds a tokio listener at `path`; see [`bind_private_std`]. Must be
/// called within a tokio runtime.
pub fn bind_private_with(
    path: impl AsRef<Path>,
    options: &BindOptions,
) -> Result<tokio::net::UnixListener, BindError> {
    let path = path.as_ref();
    let std = bind_private_std(path, options)?;
    let io = |what| {
        move |source| BindError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    };
    std.set_nonblocking(true).map_err(io("set non-blocking"))?;
    tokio::net::UnixListener::from_std(std).map_err(io("register"))
}

/// Binds a std listener at `path`:
///
/// 1. the parent directory is created (`0700`) if missing, and refused if
///    it is owned by someone other than us or root, or writable by group or
///    others (unless it is sticky and ours);
/// 2. whatever is at `path` is left alone unless it is a socket that no
///    server answers on (a stale socket), which is removed; a regular file,
///    a directory or a symlink is refused, never removed;
/// 3. the socket is bound inside a fresh `0700` directory next to `path`,
///    given its mode (`0600`, or `0660` and the group), and only then
///    renamed to `path` with `RENAME_NOREPLACE`; so nobody else can ever
///    connect to it with looser permissions, and a concurrent server that
///    took `path` in between is not displaced.
///
/// The listener's `local_addr` still names the temporary path (the kernel
/// keeps the name it was bound to). The temporary path is a few bytes
/// longer than `path`, and must fit the 107-byte limit of `sun_path` too.
pub fn bind_private_std(path: &Path, options: &BindOptions) -> Result<UnixListener, BindError> {
    let bad = || BindError::BadPath(path.to_owned());
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(bad)?;
    path.file_name().ok_or_else(bad)?;
    let io = |what: &'static str, p: &Path| {
        let p = p.to_owned();
        move |source| BindError::Io {
            what,
            path: p,
            source,
        }
    };

    // 1. The parent.
    if !parent.exists() {
        let mode = if options.group.is_some() {
            0o710
        } else {
            0o700
        };
        DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(parent)
            .map_err(io("create directory", parent))?;
        if let Some(gid) = options.group {
            std::os::unix::fs::chown(parent, None, Some(gid))
                .map_err(io("change the group of", parent))?;
        }
    }
    check_parent(parent)?;

    // 2. A stale socket.
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect", path)(e)),
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(BindError::InUse(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                fs::remove_file(path).map_err(io("remove the stale socket", path))?;
            }
            Err(e) => return Err(io("probe", path)(e)),
        },
        Ok(_) => return Err(BindError::NotASocket(path.to_owned())),
    }

    // 3. Bind in private, set the mode, then move into place.
    let staging = Staging::create(parent)?;
    let tmp = staging.0.join("s");
    let listener = UnixListener::bind(&tmp).map_err(io("bind", &tmp))?;
    let mode = if options.group.is_some() {
        0o660
    } else {
        0o600
    };
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .map_err(io("set the mode of", &tmp))?;
    if let Some(gid) = options.group {
        std::os::unix::fs::chown(&tmp, None, Some(gid)).map_err(io("change the group of", &tmp))?;
    }
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        &tmp,
        rustix::fs::CWD,
        path,
        rustix::fs::RenameFlags::NOREPLACE,
    )
    .map_err(|e| {
        if e == rustix::io::Errno::EXIST {
            BindError::InUse(path.to_owned())
        } else {
            io("rename the socket to", path)(e.into())
        }
    })?;
    Ok(listener)
}

fn check_parent(parent: &Path) -> Result<(), BindError> {
    let unsafe_parent = |why| BindError::UnsafeParent {
        path: parent.to_owned(),
        why,
    };
    let m = fs::metadata(parent).map_err(|source| BindError::Io {
        what: "inspect",
        path: parent.to_owned(),
        source,
    })?;
    if !m.is_dir() {
        return Err(unsafe_parent("not a directory"));
    }
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != me && m.uid() != 0 {
        return Err(unsafe_parent("owned by another user"));
    }
    let sticky = m.mode() & 0o1000 != 0;
    if m.mode() & 0o022 != 0 && !(sticky && m.uid() == me) {
        return Err(unsafe_parent("writable by group or others"));
    }
    Ok(())
}

/// A fresh `0700` directory next to the socket path, removed on drop.
struct Staging(PathBuf);

impl Staging {
    fn create(parent: &Path) -> Result<Self, BindError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let mut last = None;
        for _ in 0..64 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = parent.join(format!(".km-{}-{n}", std::process::id()));
            match DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(Self(dir)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(source) => {
                    return Err(BindError::Io {
                        what: "create directory",
                        path: dir,
                        source,
                    });
                }
            }
        }
        Err(BindError::Io {
            what: "create a staging directory in",
            path: parent.to_owned(),
            source: last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)),
        })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Best effort: the directory is private and empty after the rename
        // (or holds only our unexposed socket on an error path).
        let _ = fs::remove_file(self.0.join("s"));
        let _ = fs::remove_dir(&self.0);
    }
}
