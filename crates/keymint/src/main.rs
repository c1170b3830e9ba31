//! The one keymint binary. Everything lives in [`cli`]; this file only
//! hands over the exit code.

mod admin;
mod agent;
mod approval;
mod bench;
mod cli;
mod entry;
mod output;
mod policy;
mod run;
mod scan;
mod ssh_identity;

fn main() -> std::process::ExitCode {
    cli::main()
}
