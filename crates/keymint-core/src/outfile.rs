//! The one way the command line writes a file it was told to write
//! (`keymint report --out`, `keymint ssh krl --out`, `keymint scan
//! --output` and `--write-baseline`): the bytes go to a new file in the
//! same directory, created exclusively (`O_CREAT | O_EXCL`, which never
//! follows a link), and that file is renamed over the path. A link at the
//! path is refused with a clear error; the rename would replace the link,
//! not write through it, even if one appeared after the check. So a
//! symbolic link planted in a shared directory (`/tmp/report.html` pointing
//! at someone's `~/.bashrc`) never gets another file overwritten, and a
//! reader of the path sees the old file or the new one, never half of one.
//!
//! The only file I/O in this crate: it sits here because it is the one
//! crate both the binary and the scanner depend on
//! (docs/design/0034-compliance-report.md, 2026-12-07).

use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// Writes `data` to `path` as described in the module documentation: the
/// new file has `mode` (less the umask). Refuses, changing nothing, a
/// `path` that is a symbolic link or something other than a regular file
/// (a directory, a device such as `/dev/null`, a FIFO).
pub fn replace(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(io::Error::other(
                "it is a symbolic link, which keymint does not write through; \
                 remove it or choose another path",
            ));
        }
        Ok(m) if !m.is_file() => {
            return Err(io::Error::other(
                "it exists and is not a regular file; choose another path",
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("the path names no file"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (tmp, mut file) = create_beside(&dir, name, mode)?;
    let written = (|| {
        file.write_all(data)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// A new file in `dir`, named after `name` with a random part, created
/// exclusively; another name is tried if one is taken.
fn create_beside(
    dir: &Path,
    name: &std::ffi::OsStr,
    mode: u32,
) -> io::Result<(PathBuf, std::fs::File)> {
    let mut last = None;
    for _ in 0..8 {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r)
            .map_err(|_| io::Error::other("the random number generator failed"))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".keymint-{}", hex::encode(r)));
        let tmp = dir.join(tmp_name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_file_is_created_or_replaced_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("report.html");
        replace(&p, b"one", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // An existing file, even one open to all, is replaced by a private one.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        replace(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Nothing else is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// A link at the path, to a file or to nothing, is refused and nothing
    /// changes: not the file it points at, not the link.
    #[test]
    fn a_symbolic_link_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let link = dir.path().join("out");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = replace(&link, b"QZKWJVB overwritten", 0o600).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("new"), &dangling).unwrap();
        assert!(replace(&dangling, b"x", 0o600).is_err());
        assert!(!dir.path().join("new").exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    }

    #[test]
    fn a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = replace(dir.path(), b"x", 0o600).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }
}
