//! Running processes (Linux): the environment (`/proc/<pid>/environ`) and
//! the command line (`/proc/<pid>/cmdline`) of every process the user may
//! read. A variable is located by name, an argument by position.

use std::path::Path;

use crossbeam_channel::Sender;

use crate::finding::Source;
use crate::pipeline::{Severity, Shared, Work};

pub(crate) fn scan_processes(proc_root: &Path, tx: &Sender<Work>, shared: &Shared<'_>) {
    let dir = match std::fs::read_dir(proc_root) {
        Ok(d) => d,
        Err(e) => {
            shared.issue(
                Severity::Error,
                proc_root.display().to_string(),
                format!("cannot list processes (is this Linux?): {e}"),
            );
            return;
        }
    };
    let mut unreadable = 0u64;
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        let environ = match std::fs::read(path.join("environ")) {
            Ok(e) => e,
            // Another user's process, or one that just exited.
            Err(_) => {
                unreadable += 1;
                continue;
            }
        };
        let command = std::fs::read_to_string(path.join("comm"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        // Keys are passed as arguments too (`--api-key sk-…`).
        let cmdline = std::fs::read(path.join("cmdline")).unwrap_or_default();
        for (data, name) in [(environ, "environ"), (cmdline, "cmdline")] {
            if data.is_empty() {
                continue;
            }
            // One variable or argument per line, so that `line` names it.
            let data: Vec<u8> = data
                .iter()
                .map(|&b| if b == 0 { b'\n' } else { b })
                .collect();
            let work = Work::Blob {
                data,
                source: Source::Process {
                    pid,
                    command: command.clone(),
                },
                name: name.into(),
            };
            if tx.send(work).is_err() {
                return;
            }
        }
    }
    if unreadable > 0 {
        shared.issue(
            Severity::Warning,
            proc_root.display().to_string(),
            format!("{unreadable} processes not readable by this user were skipped"),
        );
    }
}

/// The variable name on a given line of an environ dump.
pub(crate) fn variable_at(data: &[u8], line: u64) -> Option<String> {
    let l = data
        .split(|&b| b == b'\n')
        .nth(usize::try_from(line).ok()?.checked_sub(1)?)?;
    let name = l.split(|&b| b == b'=').next()?;
    Some(String::from_utf8_lossy(name).into_owned())
}
