//! The one keymint binary. Everything lives in [`cli`]; this file only
//! hands over the exit code.

mod approval;
mod bench;
mod cli;
mod output;
mod policy;
mod run;
mod scan;

fn main() -> std::process::ExitCode {
    cli::main()
}
