//! Bad input gives a clear message and the rest of the scan carries on.

use std::io::Read;

use keymint_scan::content::{CHUNK, ContentScanner, Outcome};
use keymint_scan::{Engine, Fingerprinter, Source};

use crate::{Rng, findings, github_token, p, run_json};

/// A long single line of generated filler with one key near the end.
struct OneLine {
    left: u64,
    key_at: u64,
    key: Vec<u8>,
    pos: u64,
}

impl Read for OneLine {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for b in &mut buf[..n] {
            let i = self.pos;
            *b = if i >= self.key_at && i < self.key_at + self.key.len() as u64 {
                self.key[(i - self.key_at) as usize]
            } else {
                b"abcdefgh ijklmn opqrs-tuv_wxyz "[(i % 31) as usize]
            };
            self.pos += 1;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn scan_one_line(total: u64) {
    let mut rng = Rng::new();
    let key = github_token(&mut rng);
    let key_at = total - 1000;
    let reader = OneLine {
        left: total,
        key_at,
        key: format!(" {key} ").into_bytes(),
        pos: 0,
    };
    let engine = Engine::with_rules(&[]).unwrap();
    let fp = Fingerprinter::default();
    let mut cs = ContentScanner::new(&engine, &fp);
    let mut hits = Vec::new();
    let outcome = cs
        .scan_reader(reader, &Source::Stdin, "big.txt", &mut hits)
        .unwrap();
    assert_eq!(outcome, Outcome::Scanned { bytes: total });
    assert_eq!(hits.len(), 1);
    let loc = &hits[0].location;
    assert_eq!(
        (loc.line, loc.column, loc.offset),
        (1, key_at + 2, key_at + 1)
    );
    assert_eq!(hits[0].secret.expose(), key);
}

#[test]
fn a_long_single_line_is_scanned_in_bounded_chunks() {
    // Several chunks; memory is one chunk plus the overlap whatever the size.
    scan_one_line(3 * CHUNK as u64 + 12_345);
}

#[test]
fn a_two_gigabyte_single_line() {
    scan_one_line(2 << 30);
}

#[cfg(unix)]
#[test]
fn a_symlink_loop_is_reported_and_the_rest_is_scanned() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::os::unix::fs::symlink("..", dir.path().join("sub/loop")).unwrap();
    std::fs::write(
        dir.path().join("sub/k.txt"),
        format!("T={}\n", github_token(&mut rng)),
    )
    .unwrap();
    let (code, doc, err) = run_json(&["--follow", p(dir.path())]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(findings(&doc).len(), 1);
    let issues = doc["issues"].as_array().unwrap();
    assert!(
        issues.iter().any(|i| i["message"]
            .as_str()
            .unwrap()
            .contains("symbolic link loop")),
        "{issues:?}"
    );
    assert!(err.contains("warning:") && err.contains("loop"), "{err}");
}

/// A pipe named on the command line (what `keymint scan <(cmd)` passes) is
/// read; a device named there is an error, not a clean scan; pipes and
/// devices met while walking a directory are passed over.
#[cfg(unix)]
#[test]
fn a_pipe_named_on_the_command_line_is_read_and_a_device_is_an_error() {
    use std::io::Write;
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let key = github_token(&mut rng);
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (fifo, key, opened) = (fifo.clone(), key.clone(), opened.clone());
        std::thread::spawn(move || {
            let mut w = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
            opened.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = w.write_all(format!("T={key}\n").as_bytes());
        })
    };
    let (code, doc, err) = run_json(&[p(&fifo)]);
    // A scan that never opened the pipe leaves the writer waiting for a
    // reader: one is opened here, so that the test fails rather than hangs.
    if !opened.load(std::sync::atomic::Ordering::SeqCst) {
        drop(std::fs::File::open(&fifo).unwrap());
    }
    writer.join().unwrap();
    assert_eq!(code, 1, "{err}");
    assert_eq!(findings(&doc).len(), 1, "{doc}");
    assert_eq!(findings(&doc)[0]["locations"][0]["path"], p(&fifo));

    let (code, doc, err) = run_json(&["/dev/null"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("/dev/null") && err.contains("not a regular file"),
        "{err}"
    );
    assert_eq!(doc["summary"]["errors"], 1);

    // Inside a walked directory nothing waits on the pipe.
    std::fs::write(dir.path().join("k.txt"), format!("T={key}\n")).unwrap();
    let (code, doc, err) = run_json(&[p(dir.path())]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(doc["summary"]["errors"], 0, "{err}");
}

#[test]
fn a_missing_path_is_an_error() {
    let (code, _, err) = crate::run(&["/nonexistent/keymint-scan-test"]);
    assert_eq!(code, 2);
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn a_truncated_gzip_file_is_reported_and_what_was_read_is_scanned() {
    use std::io::Write;
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let key = github_token(&mut rng);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(format!("T={key}\n").as_bytes()).unwrap();
    for i in 0..200_000 {
        gz.write_all(format!("line {i} {}\n", i * 7919 % 1000).as_bytes())
            .unwrap();
    }
    let full = gz.finish().unwrap();
    std::fs::write(dir.path().join("cut.log.gz"), &full[..full.len() / 2]).unwrap();
    let (code, doc, err) = run_json(&[p(dir.path())]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(findings(&doc).len(), 1);
    assert!(
        err.contains("error:") && err.contains("cut.log.gz"),
        "{err}"
    );
}

/// Reads at most 7 bytes at a time: UTF-16 units and surrogate pairs are
/// cut across reads.
struct OddReads<'a>(&'a [u8]);

impl Read for OddReads<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(7).min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

/// UTF-16 text with a byte order mark (PowerShell's `Out-File`, `regedit`
/// exports, "Unicode" files saved on Windows) is read as text, little- or
/// big-endian, from a file, a stream cut anywhere, or a blob; without the
/// mark its NUL bytes keep it binary.
#[test]
fn utf16_text_with_a_byte_order_mark_is_scanned() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let key = github_token(&mut rng);
    let prefix = "$env:GITHUB_TOKEN = \"";
    let text = format!("# 🔑 ünïcode\r\n{prefix}{key}\"\r\n");
    let le: Vec<u8> = [0xFF, 0xFE]
        .into_iter()
        .chain(text.encode_utf16().flat_map(u16::to_le_bytes))
        .collect();
    let be: Vec<u8> = [0xFE, 0xFF]
        .into_iter()
        .chain(text.encode_utf16().flat_map(u16::to_be_bytes))
        .collect();
    let bare: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
    std::fs::write(dir.path().join("profile.ps1"), &le).unwrap();
    std::fs::write(dir.path().join("settings.reg"), &be).unwrap();
    std::fs::write(dir.path().join("no-bom.txt"), &bare).unwrap();
    let (code, doc, err) = run_json(&[p(dir.path())]);
    assert_eq!(code, 1, "{err}");
    let f = findings(&doc);
    assert_eq!(f.len(), 1, "{doc}");
    let locs = f[0]["locations"].as_array().unwrap();
    assert_eq!(locs.len(), 2, "{locs:?}");
    for l in locs {
        assert_eq!(
            (l["line"].as_u64(), l["column"].as_u64()),
            (Some(2), Some(prefix.len() as u64 + 1))
        );
    }
    assert_eq!(doc["summary"]["binary_skipped"], 1);

    let engine = Engine::with_rules(&[]).unwrap();
    let fp = Fingerprinter::default();
    let mut cs = ContentScanner::new(&engine, &fp);
    for data in [&le, &be] {
        let mut hits = Vec::new();
        cs.scan_reader(OddReads(data), &Source::Stdin, "x", &mut hits)
            .unwrap();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].secret.expose(), key);
        let mut hits = Vec::new();
        cs.scan_bytes(data, &Source::Stdin, "x", &mut hits).unwrap();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].secret.expose(), key);
    }
}
