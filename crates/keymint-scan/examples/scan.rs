//! `keymint scan` without the rest of the `keymint` binary: the same flags
//! and exit codes, for benchmarks and manual runs.
//!
//! ```sh
//! cargo run --release -p keymint-scan --example scan -- [FLAGS] [PATH]...
//! ```

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "keymint-scan")]
struct Cli {
    #[command(flatten)]
    scan: keymint_scan::cli::ScanArgs,
}

fn main() -> std::process::ExitCode {
    keymint_scan::cli::run(&Cli::parse().scan)
}
