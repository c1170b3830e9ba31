//! `keymint lease`: issue a credential inside a task, list, show, renew and
//! revoke leases.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use keymint_client::encode;
use keymint_core::duration::parse_secs;
use keymint_proto::{
    IssueLease, IssuedLease, Lease, List, RenewLease, Renewed, RevokeLeases, Revoked,
};

use crate::cli::{ClientOpts, api_err, query};
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum LeaseCmd {
    /// Issue a credential inside a task; prints the secret once.
    Issue {
        task: String,
        #[arg(long, value_parser = parse_secs)]
        ttl: Option<u64>,
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// For SSH roles: the OpenSSH public key file to certify.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// For SSH roles: a principal to certify (repeatable; default: all
        /// the role grants).
        #[arg(long = "principal")]
        principals: Vec<String>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// List leases, newest first (never their secrets).
    List {
        /// Only the leases of this task.
        #[arg(long)]
        task: Option<String>,
        /// Only the leases of this workload.
        #[arg(long)]
        workload: Option<String>,
        /// Only the leases of this role.
        #[arg(long)]
        role: Option<String>,
        /// Only leases in this state: pending, active, revoking, revoked or
        /// expired.
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Show one lease (never its secret).
    Show {
        id: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Extend a lease, never past its task's end.
    ///
    /// A lease whose credential carries its own expiry (an SSH
    /// certificate, a workload JWT, AWS or federated credentials) cannot be
    /// extended: issue a new one.
    Renew {
        id: String,
        /// How much longer, e.g. 10m (default: the role's default TTL).
        #[arg(long, value_parser = parse_secs)]
        increment: Option<u64>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Revoke one lease, or every live lease of a task, workload or role.
    Revoke {
        id: Option<String>,
        #[arg(long, conflicts_with_all = ["id", "workload", "role"])]
        task: Option<String>,
        #[arg(long, conflicts_with_all = ["id", "task", "role"])]
        workload: Option<String>,
        #[arg(long, conflicts_with_all = ["id", "task", "workload"])]
        role: Option<String>,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

pub async fn run(cmd: LeaseCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        LeaseCmd::Issue {
            task,
            ttl,
            scopes,
            public_key,
            principals,
            opts,
        } => {
            let public_key = match public_key {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read `{}`", path.display()))?,
                ),
                None => None,
            };
            let req = IssueLease {
                ttl_secs: ttl,
                scopes: if scopes.is_empty() {
                    None
                } else {
                    Some(scopes)
                },
                public_key,
                principals: (!principals.is_empty()).then_some(principals),
            };
            let issued: IssuedLease = opts
                .client()?
                .post(&format!("/v1/tasks/{}/leases", encode(&task)), &req)
                .await
                .map_err(api_err)?;
            print_issued(opts.format(), &issued);
        }
        LeaseCmd::List {
            task,
            workload,
            role,
            state,
            limit,
            opts,
        } => {
            let q = query(&[
                ("task", task),
                ("workload", workload),
                ("role", role),
                ("state", state),
                ("limit", Some(limit.to_string())),
            ]);
            let l: List<Lease> = opts
                .client()?
                .get(&format!("/v1/leases{q}"))
                .await
                .map_err(api_err)?;
            output::leases(opts.format(), &l.items);
        }
        LeaseCmd::Show { id, opts } => {
            let l: Lease = opts
                .client()?
                .get(&format!("/v1/leases/{}", encode(&id)))
                .await
                .map_err(api_err)?;
            output::leases(opts.format(), &[l]);
        }
        LeaseCmd::Renew {
            id,
            increment,
            opts,
        } => {
            let r: Renewed = opts
                .client()?
                .post(
                    &format!("/v1/leases/{}/renew", encode(&id)),
                    &RenewLease {
                        increment_secs: increment,
                    },
                )
                .await
                .map_err(api_err)?;
            if opts.format() == Format::Json {
                output::json(&r);
            } else {
                output::leases(opts.format(), &[r.lease]);
                if r.capped {
                    eprintln!(
                        "note: the renewal was capped by the role's maximum TTL or the task's end"
                    );
                }
            }
        }
        LeaseCmd::Revoke {
            id,
            task,
            workload,
            role,
            opts,
        } => {
            let c = opts.client()?;
            let leases = match id {
                Some(id) => vec![
                    c.post_empty::<Lease>(&format!("/v1/leases/{}/revoke", encode(&id)))
                        .await
                        .map_err(api_err)?,
                ],
                None => {
                    if task.is_none() && workload.is_none() && role.is_none() {
                        bail!("name a lease id, or one of --task, --workload, --role");
                    }
                    let r: Revoked = c
                        .post(
                            "/v1/leases/revoke",
                            &RevokeLeases {
                                task,
                                workload,
                                role,
                            },
                        )
                        .await
                        .map_err(api_err)?;
                    r.revoked
                }
            };
            output::leases(opts.format(), &leases);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn print_issued(fmt: Format, issued: &IssuedLease) {
    if fmt == Format::Json {
        return output::json(issued);
    }
    println!("lease    {}", issued.lease.id);
    println!("expires  {}", issued.lease.expires_at);
    match &issued.credential {
        keymint_proto::Credential::Bearer { token } => println!("token    {}", token.expose()),
        keymint_proto::Credential::Database {
            engine,
            host,
            port,
            database,
            username,
            password,
            tls,
        } => {
            println!("engine   {engine}");
            println!("host     {host}:{port}");
            println!("database {database}");
            println!("username {username}");
            println!("password {}", password.expose());
            if *tls {
                println!("tls      required");
            }
        }
        keymint_proto::Credential::SshCertificate {
            certificate,
            serial,
            key_id,
            principals,
            valid_before,
            ..
        } => {
            println!("serial      {serial}");
            println!("key id      {key_id}");
            println!("principals  {}", principals.join(","));
            println!("valid until {valid_before} (Unix seconds)");
            println!("certificate {}", certificate.expose());
        }
        keymint_proto::Credential::Jwt {
            token,
            issuer,
            subject,
            audience,
            expires_at,
        } => {
            println!("issuer   {issuer}");
            println!("subject  {subject}");
            println!("audience {}", audience.join(","));
            println!("exp      {expires_at} (Unix seconds)");
            println!("jwt      {}", token.expose());
        }
        keymint_proto::Credential::Aws {
            access_key_id,
            secret_access_key,
            session_token,
            expiration,
            region,
            ..
        } => {
            println!("region            {region}");
            println!("expiration        {expiration}");
            println!("access key id     {access_key_id}");
            println!("secret access key {}", secret_access_key.expose());
            println!("session token     {}", session_token.expose());
        }
        keymint_proto::Credential::ApiKey {
            provider,
            api_key,
            base_url,
            ..
        } => {
            println!("provider {provider}");
            println!("base url {base_url}");
            println!("api key  {}", api_key.expose());
        }
        keymint_proto::Credential::ProviderToken {
            provider,
            access_token,
            base_url,
            expires_at,
        } => {
            println!("provider     {provider}");
            println!("base url     {base_url}");
            println!("expires at   {expires_at}");
            println!("access token {}", access_token.expose());
        }
    }
}
