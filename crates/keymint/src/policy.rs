//! `keymint policy`: check Cedar policies offline (`validate`, `test`,
//! `schema`) and manage the server's (`show`, `reload`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use keymint_policy::{PolicySchema, PolicySet, SCHEMA, cases};
use keymint_proto::PolicyInfo;

use crate::cli::{ClientOpts, api_err};
use crate::output::Format;

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Check policy files (or directories of `*.cedar`) against keymint's
    /// schema. Exits 1 and says what is wrong if they do not validate.
    Validate {
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Run a file of requests with expected decisions against the
    /// policies; exits 1 if any decision differs.
    Test {
        /// The cases file (TOML, `[[case]]` tables).
        #[arg(value_name = "CASES")]
        cases: PathBuf,
        /// Policy files or directories.
        #[arg(long = "policies", short = 'p', required = true, value_name = "PATH")]
        policies: Vec<PathBuf>,
    },
    /// Print keymint's Cedar schema.
    Schema,
    /// The policies in force on the server.
    Show {
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Make the server read its policy files again (like SIGHUP). An invalid
    /// set is refused and the previous one stays in force.
    Reload {
        #[command(flatten)]
        opts: ClientOpts,
    },
}

pub async fn run(cmd: PolicyCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCmd::Validate { paths } => Ok(match load(&paths) {
            Ok(set) => {
                println!("ok: {} policies valid", set.ids().len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        }),
        PolicyCmd::Test {
            cases: file,
            policies,
        } => {
            let set = match load(&policies) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::from(2));
                }
            };
            let cases = match cases::read(&file) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::from(2));
                }
            };
            let outcomes = cases::run(&set, &cases);
            let failed = outcomes.iter().filter(|o| !o.passed).count();
            for o in &outcomes {
                let mark = if o.passed { "ok  " } else { "FAIL" };
                println!(
                    "{mark} {}: expected {}, got {} ({})",
                    o.name, o.expected, o.got, o.reason
                );
            }
            println!("{} passed, {failed} failed", outcomes.len() - failed);
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        PolicyCmd::Schema => {
            print!("{SCHEMA}");
            Ok(ExitCode::SUCCESS)
        }
        PolicyCmd::Show { opts } => {
            let info: PolicyInfo = opts.client()?.get("/v1/policy").await.map_err(api_err)?;
            print_info(opts.format(), &info);
            Ok(ExitCode::SUCCESS)
        }
        PolicyCmd::Reload { opts } => {
            let info: PolicyInfo = opts
                .client()?
                .post_empty("/v1/policy/reload")
                .await
                .map_err(api_err)?;
            print_info(opts.format(), &info);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load(paths: &[PathBuf]) -> Result<PolicySet, keymint_policy::PolicyError> {
    PolicySet::load(&PolicySchema::new()?, paths)
}

fn print_info(f: Format, info: &PolicyInfo) {
    match f {
        Format::Json => println!("{}", serde_json::to_string_pretty(info).unwrap_or_default()),
        Format::Table => {
            println!(
                "{} policies from {}",
                info.policies.len(),
                info.sources.join(", ")
            );
            for p in &info.policies {
                println!("  {p}");
            }
        }
    }
}
