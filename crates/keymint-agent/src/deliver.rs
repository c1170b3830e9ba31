//! File delivery: `DIR/TASK/NAME`, the directory `0700` and the file
//! `0400`, both owned by the workload; replaced atomically (written under a
//! temporary name in the same directory, chowned, chmodded, synced, renamed
//! over the old one), removed with the task.
//!
//! `DIR` is the agent's own (`0711`, not writable by anyone else), so a
//! workload cannot swap `DIR/TASK` for a symlink; inside `DIR/TASK`, which
//! the workload owns, the agent only creates files with `O_EXCL |
//! O_NOFOLLOW`, renames (which replaces a symlink, never follows it) and
//! removes without following links.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::protocol::ApiError;

/// A credential as the variables its provider's SDK reads, one
/// `export NAME='value'` line each (POSIX shell quoting, which dotenv
/// loaders read too). Credentials with no SDK variables (database, SSH,
/// keymint's own token) give `KEYMINT_SECRET`.
pub fn env_file(c: &keymint_proto::Credential) -> zeroize::Zeroizing<Vec<u8>> {
    let mut vars = c.sdk_environment();
    if vars.is_empty() {
        vars.push(("KEYMINT_SECRET", c.secret().expose().to_owned()));
    }
    let mut out = zeroize::Zeroizing::new(Vec::new());
    for (k, v) in vars {
        let v = zeroize::Zeroizing::new(v);
        out.extend_from_slice(b"export ");
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b"='");
        out.extend_from_slice(v.replace('\'', "'\\''").as_bytes());
        out.extend_from_slice(b"'\n");
    }
    out
}

/// The delivery directory.
#[derive(Debug, Clone)]
pub struct Delivery {
    dir: PathBuf,
    in_memory: bool,
}

/// Whether `dir` is on a file system held in memory (tmpfs, ramfs), so
/// that a delivered credential never reaches a disk.
pub fn in_memory(dir: &Path) -> io::Result<bool> {
    use nix::sys::statfs::{TMPFS_MAGIC, statfs};
    const RAMFS_MAGIC: nix::libc::c_long = 0x8584_58f6;
    let t = statfs(dir).map_err(io::Error::from)?.filesystem_type();
    Ok(t == TMPFS_MAGIC || t.0 == RAMFS_MAGIC)
}

/// A file name a workload may ask for: 1–64 of `A-Za-z0-9._-`, not
/// starting with `.` (so never `..`, never a path, never one of our
/// temporary names).
pub fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "file name `{}` must be 1 to 64 of `A-Za-z0-9._-` and not start with `.`",
            name.escape_default()
        )))
    }
}

/// A server id used as a directory name or in a URL path: `[A-Za-z0-9_-]`,
/// 1–128 bytes.
pub fn check_id(what: &str, id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "`{}` is not a {what} id",
            id.escape_default()
        )))
    }
}

impl Delivery {
    /// Creates `dir` (`0711`, ours) if missing, refuses one owned by
    /// someone else or writable by group or others, and removes whatever a
    /// previous agent left in it.
    pub fn prepare(dir: &Path) -> io::Result<Self> {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)?;
        }
        match DirBuilder::new().mode(0o711).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let m = fs::symlink_metadata(dir)?;
        if !m.is_dir() {
            return Err(io::Error::other(format!(
                "`{}` is not a directory",
                dir.display()
            )));
        }
        if m.uid() != nix::unistd::geteuid().as_raw() {
            return Err(io::Error::other(format!(
                "`{}` is owned by another user",
                dir.display()
            )));
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o711))?;
        for e in fs::read_dir(dir)? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                fs::remove_dir_all(&p)?;
            } else {
                fs::remove_file(&p)?;
            }
            tracing::info!(path = %p.display(), "removed a file left by an earlier agent");
        }
        Ok(Self {
            dir: dir.to_owned(),
            in_memory: in_memory(dir)?,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the directory is on tmpfs or ramfs (see [`in_memory`]).
    pub fn is_in_memory(&self) -> bool {
        self.in_memory
    }

    /// Writes `contents` to `DIR/task/name` for `(uid, gid)`, replacing any
    /// earlier version atomically. Blocking (it syncs). `task` and `name`
    /// must have passed [`check_id`] and [`check_name`].
    pub fn write(
        &self,
        task: &str,
        name: &str,
        (uid, gid): (u32, u32),
        contents: &[u8],
    ) -> io::Result<PathBuf> {
        let tdir = self.dir.join(task);
        match DirBuilder::new().mode(0o700).create(&tdir) {
            Ok(()) => {
                std::os::unix::fs::chown(&tdir, Some(uid), Some(gid))?;
                fs::set_permissions(&tdir, fs::Permissions::from_mode(0o700))?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Only the agent creates entries in DIR; still, never
                // write through a link.
                if !fs::symlink_metadata(&tdir)?.is_dir() {
                    return Err(io::Error::other("the task directory is not a directory"));
                }
            }
            Err(e) => return Err(e),
        }
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dest = tdir.join(name);
        let mut last = None;
        for _ in 0..16 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let tmp = tdir.join(format!(".{name}.{}.{n}", std::process::id()));
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
                .open(&tmp);
            let mut file = match file {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    last = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let written = (|| {
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
                file.set_permissions(fs::Permissions::from_mode(0o400))?;
                file.write_all(contents)?;
                file.sync_all()?;
                fs::rename(&tmp, &dest)
            })();
            if let Err(e) = written {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            return Ok(dest);
        }
        Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)))
    }

    /// Removes `DIR/task` and everything in it (links are removed, not
    /// followed). Missing is fine.
    pub fn remove_task(&self, task: &str) -> io::Result<()> {
        match fs::remove_dir_all(self.dir.join(task)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    /// Removes one delivered file. Missing is fine.
    pub fn remove_file(&self, task: &str, name: &str) -> io::Result<()> {
        match fs::remove_file(self.dir.join(task).join(name)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_files_carry_the_sdk_variables_quoted() {
        use keymint_core::role::FederatedProvider;
        use keymint_proto::{Credential, SecretString};
        let c = Credential::ProviderToken {
            provider: FederatedProvider::Anthropic,
            access_token: SecretString::new("tok'en".into()),
            base_url: "http://127.0.0.1:1".into(),
            expires_at: 1,
        };
        let f = String::from_utf8(env_file(&c).to_vec()).unwrap();
        assert_eq!(
            f,
            "export ANTHROPIC_AUTH_TOKEN='tok'\\''en'\nexport ANTHROPIC_BASE_URL='http://127.0.0.1:1'\n"
        );
        let b = Credential::Bearer {
            token: SecretString::new("kmt_x".into()),
        };
        assert_eq!(
            String::from_utf8(env_file(&b).to_vec()).unwrap(),
            "export KEYMINT_SECRET='kmt_x'\n"
        );
    }

    #[test]
    fn names_are_plain_file_names() {
        for ok in ["token", "db.json", "a-b_c.1", &"x".repeat(64)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/etc/passwd",
            ".hidden",
            "a\0b",
            "ä",
            &"x".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_id("task", "tsk_01J-x").is_ok());
        for bad in ["", "../t", "a/b", "a.b", "t?x"] {
            assert!(check_id("task", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn files_are_private_replaced_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("deliver");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("stale"), "x").unwrap();
        fs::create_dir(dir.join("tsk_old")).unwrap();
        let d = Delivery::prepare(&dir).unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "leftovers removed");
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o7777, 0o711);

        let me = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let p = d.write("tsk_1", "token", me, b"one").unwrap();
        assert_eq!(p, dir.join("tsk_1/token"));
        let m = fs::metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o400);
        assert_eq!(
            fs::metadata(dir.join("tsk_1")).unwrap().mode() & 0o7777,
            0o700
        );
        let ino = m.ino();
        d.write("tsk_1", "token", me, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_ne!(
            fs::metadata(&p).unwrap().ino(),
            ino,
            "replaced, not rewritten"
        );
        assert_eq!(
            fs::read_dir(dir.join("tsk_1")).unwrap().count(),
            1,
            "no temporaries"
        );

        // A symlink planted at the name is replaced, not written through.
        let victim = tmp.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        d.write("tsk_1", "token", me, b"three").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert!(!fs::symlink_metadata(&p).unwrap().file_type().is_symlink());

        d.remove_task("tsk_1").unwrap();
        assert!(!dir.join("tsk_1").exists());
        d.remove_task("tsk_1").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn memory_and_disk_are_told_apart() {
        assert!(
            in_memory(Path::new("/dev/shm")).unwrap(),
            "/dev/shm is tmpfs"
        );
        assert!(
            !in_memory(Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap(),
            "the source tree is on a disk"
        );
    }

    #[test]
    fn a_directory_of_someone_else_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        fs::write(&file, "").unwrap();
        assert!(Delivery::prepare(&file).is_err());
    }
}
