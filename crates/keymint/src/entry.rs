//! `keymint entry`: registration entries, which say which processes on
//! which node are which workload (docs/design/0012). The admin creates and
//! deletes them; node agents fetch their own.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use keymint_client::encode;
use keymint_core::model::RegistrationEntry;
use keymint_proto::List;
use sha2::Digest;

use crate::cli::{ClientOpts, api_err};
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum EntryCmd {
    /// Register a workload: processes on NODE that match every selector
    /// given are WORKLOAD.
    Create {
        /// The workload a matching process is.
        #[arg(long)]
        workload: String,
        /// The node (`[[nodes]]`) whose agent attests it.
        #[arg(long)]
        node: String,
        #[arg(long)]
        uid: Option<u32>,
        #[arg(long)]
        gid: Option<u32>,
        /// The executable's SHA-256 (64 hex digits).
        #[arg(long, conflicts_with = "exe")]
        exe_sha256: Option<String>,
        /// Read this file and use its SHA-256 (`--exe-sha256` of a binary
        /// you have at hand).
        #[arg(long)]
        exe: Option<PathBuf>,
        /// The executable's path (matched only when verified on the node).
        #[arg(long)]
        exe_path: Option<PathBuf>,
        /// The cgroup v2 path, or a cgroup above it.
        #[arg(long)]
        cgroup_prefix: Option<String>,
        #[arg(long)]
        container_id: Option<String>,
        /// An attribute for policy, `KEY=VALUE` (repeatable).
        #[arg(long = "attribute", value_name = "KEY=VALUE")]
        attributes: Vec<String>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Entries, oldest first (a node's credential lists its own).
    List {
        /// Only this node's.
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Delete an entry: agents stop acting for it at once.
    Delete {
        id: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

/// SHA-256 of a file, streamed.
fn sha256_file(path: &std::path::Path) -> anyhow::Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open `{}`", path.display()))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read `{}`", path.display()))?;
    Ok(hex::encode(h.finalize()))
}

pub async fn run(cmd: EntryCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        EntryCmd::Create {
            workload,
            node,
            uid,
            gid,
            exe_sha256,
            exe,
            exe_path,
            cgroup_prefix,
            container_id,
            attributes,
            opts,
        } => {
            let exe_sha256 = match (exe_sha256, exe) {
                (Some(h), _) => Some(h),
                (None, Some(p)) => Some(sha256_file(&p)?),
                (None, None) => None,
            };
            let mut selectors = serde_json::Map::new();
            let mut put = |k: &str, v: Option<serde_json::Value>| {
                if let Some(v) = v {
                    selectors.insert(k.to_owned(), v);
                }
            };
            put("uid", uid.map(Into::into));
            put("gid", gid.map(Into::into));
            put("exe_sha256", exe_sha256.map(Into::into));
            put(
                "exe_path",
                exe_path.map(|p| p.to_string_lossy().into_owned().into()),
            );
            put("cgroup_prefix", cgroup_prefix.map(Into::into));
            put("container_id", container_id.map(Into::into));
            if selectors.is_empty() {
                bail!(
                    "give at least one selector (--uid, --gid, --exe-sha256/--exe, --exe-path, \
                     --cgroup-prefix, --container-id)"
                );
            }
            let mut attrs = BTreeMap::new();
            for a in attributes {
                let Some((k, v)) = a.split_once('=') else {
                    bail!("--attribute `{a}` must be KEY=VALUE");
                };
                attrs.insert(k.to_owned(), v.to_owned());
            }
            let e: RegistrationEntry = opts
                .client()?
                .post(
                    "/v1/entries",
                    &serde_json::json!({
                        "workload": workload,
                        "node": node,
                        "selectors": selectors,
                        "attributes": attrs,
                    }),
                )
                .await
                .map_err(api_err)?;
            if opts.format() == Format::Json {
                output::json(&e);
            } else {
                println!("{}", e.id);
            }
        }
        EntryCmd::List { node, opts } => {
            let q = node.map_or(String::new(), |n| format!("?node={}", encode(&n)));
            let l: List<RegistrationEntry> = opts
                .client()?
                .get(&format!("/v1/entries{q}"))
                .await
                .map_err(api_err)?;
            if opts.format() == Format::Json {
                output::json(&l.items);
            } else {
                let rows: Vec<Vec<String>> = l
                    .items
                    .iter()
                    .map(|e| {
                        vec![
                            e.id.clone(),
                            e.node.clone(),
                            e.workload.clone(),
                            selectors_text(&e.selectors),
                        ]
                    })
                    .collect();
                output::table(&["ID", "NODE", "WORKLOAD", "SELECTORS"], &rows);
            }
        }
        EntryCmd::Delete { id, opts } => {
            let e: RegistrationEntry = opts
                .client()?
                .delete(&format!("/v1/entries/{}", encode(&id)))
                .await
                .map_err(api_err)?;
            if opts.format() == Format::Json {
                output::json(&e);
            } else {
                println!("deleted {} ({} on {})", e.id, e.workload, e.node);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `uid=1000 exe_sha256=ab12…`: hashes shortened for a table.
fn selectors_text(v: &serde_json::Value) -> String {
    let Some(m) = v.as_object() else {
        return v.to_string();
    };
    m.iter()
        .map(|(k, v)| {
            let s = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
            let s = if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
                format!("{}…", &s[..12])
            } else {
                s
            };
            format!("{k}={s}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}
