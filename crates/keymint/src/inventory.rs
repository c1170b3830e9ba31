//! `keymint inventory`: the credential inventory (docs/design/0027): list,
//! show, set (register a static key or change an entry's facts), import (a
//! key into keymint's custody), retire, and findings.
//!
//! `set --key-file` reads the key here, computes its fingerprint (the same
//! HMAC `keymint scan` computes, so a later scan finds the same entry) and
//! its hint, and sends only those: the key never leaves this machine.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use keymint_client::encode;
use keymint_core::Timestamp;
use keymint_core::inventory::InventoryItem;
use keymint_proto::SecretString;
use keymint_proto::inventory::{
    FindingList, InventoryChange, InventoryImport, InventoryPage, InventoryRetire,
};
use keymint_scan::finding::Fingerprinter;

use crate::cli::{ClientOpts, api_err};
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum InventoryCmd {
    /// Every credential keymint knows: held, registered, found, issued.
    List {
        /// The next page (the id printed after the last page).
        #[arg(long)]
        before: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
        /// Leave out the live leases.
        #[arg(long)]
        no_issued: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// One entry (`inv_…`, or a lease `lse_…`).
    Show {
        id: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Register a static key (`--key-file` and `--provider`, no ID), or
    /// change an entry's facts (ID).
    Set {
        id: Option<String>,
        /// The key to register; only its fingerprint and hint are sent.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// The scanner's fingerprint key, if `keymint scan` runs with one.
        #[arg(long, value_name = "FILE")]
        fingerprint_key_file: Option<PathBuf>,
        #[command(flatten)]
        facts: Facts,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Hand a key to keymint's custody: sealed on the server, never shown
    /// again.
    Import {
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        #[command(flatten)]
        facts: Facts,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Retire an entry: kept for the record, no longer judged.
    Retire {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Evaluate the findings now (no owner, no expiry, too old, unused,
    /// shared, leaked, rotation due).
    Findings {
        #[command(flatten)]
        opts: ClientOpts,
    },
}

/// An entry's facts; absent ones are left as they are, `""` clears one.
#[derive(Debug, Args)]
pub struct Facts {
    #[arg(long)]
    name: Option<String>,
    /// `openai`, `anthropic`, `openrouter`, … (when registering).
    #[arg(long)]
    provider: Option<String>,
    #[arg(long)]
    business_owner: Option<String>,
    #[arg(long)]
    technical_owner: Option<String>,
    #[arg(long)]
    purpose: Option<String>,
    #[arg(long)]
    environment: Option<String>,
    /// A workload that uses it (repeatable; replaces the list).
    #[arg(long = "workload")]
    workloads: Vec<String>,
    /// A scope it carries (repeatable; replaces the list).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// RFC 3339, or `+90d` from now.
    #[arg(long)]
    created_at: Option<String>,
    /// RFC 3339, or `+90d` from now.
    #[arg(long)]
    expires_at: Option<String>,
    /// RFC 3339, or `+90d` from now.
    #[arg(long)]
    last_used_at: Option<String>,
    /// RFC 3339, or `+90d` from now.
    #[arg(long)]
    rotate_by: Option<String>,
    /// The documented manual revocation step.
    #[arg(long)]
    revocation: Option<String>,
}

fn when(field: &str, v: Option<String>) -> anyhow::Result<Option<Timestamp>> {
    let Some(v) = v else { return Ok(None) };
    if let Some(rel) = v.strip_prefix('+') {
        let secs = keymint_core::duration::parse_secs(rel)
            .map_err(|e| anyhow::anyhow!("--{field}: {e}"))?;
        let now = keymint_core::Clock::now(&keymint_core::SystemClock);
        return Ok(Some(now.plus_secs(secs)));
    }
    Timestamp::parse_rfc3339(&v)
        .map(Some)
        .ok_or_else(|| anyhow::anyhow!("--{field} must be RFC 3339 or `+DURATION`"))
}

impl Facts {
    fn change(self) -> anyhow::Result<InventoryChange> {
        Ok(InventoryChange {
            name: self.name,
            provider: self.provider,
            fingerprint: None,
            hint: None,
            business_owner: self.business_owner,
            technical_owner: self.technical_owner,
            purpose: self.purpose,
            environment: self.environment,
            workloads: (!self.workloads.is_empty()).then_some(self.workloads),
            scopes: (!self.scopes.is_empty()).then_some(self.scopes),
            created_at: when("created-at", self.created_at)?,
            expires_at: when("expires-at", self.expires_at)?,
            last_used_at: when("last-used-at", self.last_used_at)?,
            rotate_by: when("rotate-by", self.rotate_by)?,
            revocation: self.revocation,
        })
    }
}

/// The longest key a key file may hold (as `POST /v1/inventory/import`).
const MAX_KEY: usize = 4096;

/// Reads the one key `path` holds: at most [`MAX_KEY`] bytes, trimmed,
/// without white space or control characters inside. A file that is not
/// one key (an `.env` file, a log, `/dev/zero`) is refused without reading
/// it whole and without showing any of it: registered, its fingerprint and
/// hint would be the file's, not a key's.
fn read_key(path: &std::path::Path) -> anyhow::Result<zeroize::Zeroizing<String>> {
    use std::io::Read as _;
    let mut raw = zeroize::Zeroizing::new(Vec::new());
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_KEY as u64 + 2).read_to_end(&mut raw))
        .with_context(|| format!("cannot read the key file `{}`", path.display()))?;
    let not_one_key = || {
        anyhow::anyhow!(
            "the key file `{}` does not hold one key: at most {MAX_KEY} bytes of UTF-8 without white space or control characters inside",
            path.display()
        )
    };
    let text = std::str::from_utf8(&raw).map_err(|_| not_one_key())?;
    let key = zeroize::Zeroizing::new(text.trim().to_owned());
    if key.is_empty() {
        bail!("the key file `{}` is empty", path.display());
    }
    if key.len() > MAX_KEY || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(not_one_key());
    }
    Ok(key)
}

fn print_item(opts: &ClientOpts, i: &InventoryItem) {
    if opts.format() == Format::Json {
        output::json(i);
        return;
    }
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let ts = |v: Option<Timestamp>| v.map_or_else(|| "-".into(), |t| t.to_string());
    println!("id               {}", i.id);
    println!("name             {}", i.name);
    println!("origin           {:?}", i.origin);
    println!("status           {:?}", i.status);
    println!("provider         {}", i.provider);
    println!("hint             {}", opt(&i.hint));
    println!("fingerprint      {}", i.fingerprint);
    println!("business owner   {}", opt(&i.business_owner));
    println!("technical owner  {}", opt(&i.technical_owner));
    println!("purpose          {}", opt(&i.purpose));
    println!("environment      {}", opt(&i.environment));
    println!("workloads        {}", i.workloads.join(", "));
    println!("scopes           {}", i.scopes.join(", "));
    println!("created          {}", i.created_at);
    println!("expires          {}", ts(i.expires_at));
    println!("last used        {}", ts(i.last_used_at));
    println!("rotate by        {}", ts(i.rotate_by));
    println!("last rotated     {}", ts(i.rotated_at));
    println!("leaked           {}", ts(i.leaked_at));
    println!("revocation       {}", i.revocation);
    for s in &i.sightings {
        println!(
            "seen             {} ({}{}, {})",
            s.location,
            s.source,
            s.environment
                .as_deref()
                .map(|e| format!(", {e}"))
                .unwrap_or_default(),
            s.seen_at
        );
    }
}

pub async fn run(cmd: InventoryCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        InventoryCmd::List {
            before,
            limit,
            no_issued,
            opts,
        } => {
            let mut q = vec![format!("issued={}", !no_issued)];
            if let Some(b) = before {
                q.push(format!("before={}", encode(&b)));
            }
            if let Some(l) = limit {
                q.push(format!("limit={l}"));
            }
            let page: InventoryPage = opts
                .client()?
                .get(&format!("/v1/inventory?{}", q.join("&")))
                .await
                .map_err(api_err)?;
            if opts.format() == Format::Json {
                output::json(&page);
            } else {
                let rows: Vec<Vec<String>> = page
                    .items
                    .iter()
                    .map(|i| {
                        vec![
                            i.id.clone(),
                            format!("{:?}", i.origin).to_lowercase(),
                            format!("{:?}", i.status).to_lowercase(),
                            i.provider.clone(),
                            i.hint.clone().unwrap_or_else(|| "-".into()),
                            i.business_owner
                                .clone()
                                .or_else(|| i.technical_owner.clone())
                                .unwrap_or_else(|| "-".into()),
                            i.expires_at
                                .map_or_else(|| "never".into(), |t| t.to_string()),
                            i.sightings.len().to_string(),
                        ]
                    })
                    .collect();
                output::table(
                    &[
                        "ID", "ORIGIN", "STATUS", "PROVIDER", "HINT", "OWNER", "EXPIRES", "SEEN",
                    ],
                    &rows,
                );
                if let Some(n) = page.next {
                    println!("more: --before {n}");
                }
            }
        }
        InventoryCmd::Show { id, opts } => {
            let i: InventoryItem = opts
                .client()?
                .get(&format!("/v1/inventory/{}", encode(&id)))
                .await
                .map_err(api_err)?;
            print_item(&opts, &i);
        }
        InventoryCmd::Set {
            id,
            key_file,
            fingerprint_key_file,
            facts,
            opts,
        } => {
            let mut change = facts.change()?;
            let i: InventoryItem = match (id, key_file) {
                (Some(_), Some(_)) => bail!(
                    "give an ID to change an entry, or --key-file to register a key, not both"
                ),
                (None, None) => bail!(
                    "give an ID to change an entry, or --key-file (and --provider) to register a key"
                ),
                (Some(id), None) => opts
                    .client()?
                    .post(&format!("/v1/inventory/{}", encode(&id)), &change)
                    .await
                    .map_err(api_err)?,
                (None, Some(path)) => {
                    let key = read_key(&path)?;
                    let fp = match &fingerprint_key_file {
                        Some(f) => Fingerprinter::new(
                            &std::fs::read(f)
                                .with_context(|| format!("cannot read `{}`", f.display()))?,
                        ),
                        None => Fingerprinter::default(),
                    };
                    change.fingerprint = Some(fp.fingerprint(key.as_bytes()));
                    change.hint = Some(keymint_core::inventory::hint(&key, 12));
                    opts.client()?
                        .post("/v1/inventory", &change)
                        .await
                        .map_err(api_err)?
                }
            };
            print_item(&opts, &i);
        }
        InventoryCmd::Import {
            key_file,
            facts,
            opts,
        } => {
            let key = read_key(&key_file)?;
            let body = InventoryImport {
                key: SecretString::new(key.to_string()),
                facts: facts.change()?,
            };
            let i: InventoryItem = opts
                .client()?
                .post("/v1/inventory/import", &body)
                .await
                .map_err(api_err)?;
            print_item(&opts, &i);
        }
        InventoryCmd::Retire { id, reason, opts } => {
            let i: InventoryItem = opts
                .client()?
                .post(
                    &format!("/v1/inventory/{}/retire", encode(&id)),
                    &InventoryRetire { reason },
                )
                .await
                .map_err(api_err)?;
            if opts.format() == Format::Json {
                output::json(&i);
            } else {
                println!("retired {}", i.id);
            }
        }
        InventoryCmd::Findings { opts } => {
            let f: FindingList = opts
                .client()?
                .get("/v1/inventory/findings")
                .await
                .map_err(api_err)?;
            if opts.format() == Format::Json {
                output::json(&f);
            } else {
                let rows: Vec<Vec<String>> = f
                    .findings
                    .iter()
                    .map(|x| vec![x.item.clone(), x.kind.as_str().to_owned(), x.detail.clone()])
                    .collect();
                output::table(&["ITEM", "FINDING", "DETAIL"], &rows);
                println!("{} finding(s) on {} entries", f.findings.len(), f.evaluated);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
