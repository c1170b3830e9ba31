//! keymint's secret scanner: finds the AI keys and other secrets already
//! leaked in files (plain, gzip, tar), git history, container images,
//! notebooks, chat and ticket exports, CI logs and running processes.
//!
//! The `keymint` binary calls [`cli::run`] with [`cli::ScanArgs`]; a caller
//! that acts on findings (the `--report-to` closed loop) calls [`cli::scan`],
//! then [`cli::emit`]. [`Report::keymint_tokens`] lists the leaked `kmt_`
//! tokens with their raw value in memory ([`Finding::secret`]).
//!
//! Shape (after ripgrep and noseyparker):
//!
//! - [`rules`]: rules are data, one TOML file per provider family under
//!   `rules/`, compiled in; every rule carries examples and negative examples
//!   that the tests check. A user file adds or replaces rules.
//! - [`engine`]: a literal prefilter over every rule's keywords (SIMD Teddy
//!   searchers of the `aho-corasick` crate) runs on raw bytes; a rule's regex
//!   runs only in a window around a keyword hit;
//!   offline filters (placeholders, entropy, checksums such as GitHub's CRC32
//!   and keymint's own `kmt_` checksum) drop false alarms.
//! - [`content`]: one stream: gzip, binary skip, chunks with overlap so
//!   memory stays bounded, lines and columns, structured locations
//!   ([`structured`]: notebook cells, Slack messages, Jira issues).
//! - [`pipeline`]: a producer (paths, git history, image layers, processes)
//!   feeds a bounded channel; one worker per core scans. Synchronous, no
//!   async runtime.
//! - [`report`] and [`output`]: findings grouped by HMAC fingerprint, a
//!   baseline, human, JSON, JSON lines and SARIF 2.1.0.
//! - [`cli`]: the `keymint scan` flags and entry point.
//! - [`screen`]: the same engine set up for outbound text (the egress
//!   proxy's screen): the scanner's rules plus broad ones from
//!   `rules/screen.toml`, each finding named by a kind.
//!
//! Every check is offline. Live verification against providers is opt-in
//! through [`report::Verifier`], which the caller supplies.

pub mod cli;
pub mod content;
pub mod decode;
pub mod engine;
pub mod finding;
mod git;
mod image;
mod layout;
pub mod output;
pub mod pipeline;
mod process;
pub mod report;
pub mod rules;
pub mod screen;
pub mod structured;

pub use engine::Engine;
pub use finding::{Encoding, Finding, Fingerprinter, Location, Secret, Source};
pub use pipeline::{Issue, ScanOptions, ScanOutput, Scanner, Severity, Stats, Target};
pub use report::{Baseline, Report};
pub use screen::Screen;
