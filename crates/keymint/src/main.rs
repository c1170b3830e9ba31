//! The one keymint binary. Everything lives in [`cli`]; this file only
//! hands over the exit code.

mod admin;
mod bench;
mod cli;
mod output;
mod run;
mod ssh_identity;

fn main() -> std::process::ExitCode {
    cli::main()
}
