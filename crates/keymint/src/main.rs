//! The one keymint binary. Everything lives in [`cli`]; this file only
//! hands over the exit code.

mod admin;
mod agent;
mod alloc;
mod approval;
mod audit;
mod bench;
mod cli;
mod entry;
mod inventory;
mod lease;
mod output;
mod policy;
mod report;
mod run;
mod scan;
mod server;
mod ssh_identity;
mod suspensions;
mod task;
mod token;
mod upstream;

fn main() -> std::process::ExitCode {
    cli::main()
}
