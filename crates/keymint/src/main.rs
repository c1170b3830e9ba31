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
    quiet_on_a_closed_pipe();
    cli::main()
}

/// `keymint … | head`: the reader closed the pipe, so the rest of the
/// output has nowhere to go. Rust ignores `SIGPIPE`, and `println!` then
/// panics ("failed printing to stdout: Broken pipe"); a command line tool
/// ends quietly instead, with the status a shell gives a process ended by
/// `SIGPIPE` (128 + 13). Any other panic is reported as before.
fn quiet_on_a_closed_pipe() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        report(info);
    }));
}
