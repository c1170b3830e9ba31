//! `keymint dev`, `keymint server` and `keymint proxy`: start the broker
//! (or the egress proxy alone), serve until a signal, then stop cleanly.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use keymint_core::SystemClock;
use keymint_server::config::Config;

pub async fn dev(data_dir: &Path, listen: SocketAddr) -> anyhow::Result<ExitCode> {
    if !listen.ip().is_loopback() {
        bail!("`keymint dev` listens on loopback only, not on `{listen}`");
    }
    let config = Config::dev(data_dir, listen);
    keymint_server::write_sample_policy(data_dir)?;
    serve(&config, true).await
}

/// The SQLite store's one-process lock, off the async workers (it may wait
/// a few seconds for a process that is stopping).
async fn lock_store(config: &Config) -> anyhow::Result<Option<keymint_store::StoreLock>> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || keymint_server::lock_store(&config)).await?
}

/// `keymint server`: the broker from a configuration file.
pub async fn server(config: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config)?;
    serve(&config, false).await
}

async fn serve(config: &Config, dev: bool) -> anyhow::Result<ExitCode> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on `{}`", config.listen))?;
    let addr = listener.local_addr()?;
    let mut config = config.clone();
    config.bound_to(addr);
    let config = &config;
    // Held until the process ends: one process per SQLite store.
    let _lock = lock_store(config).await?;
    let (mut running, created) = keymint_server::start(config, Arc::new(SystemClock)).await?;
    crate::alloc::keep_memory_returned();
    #[cfg(unix)]
    {
        // SIGHUP reads the policy files again, like `keymint policy reload`.
        let broker = Arc::clone(&running.broker);
        if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    match broker.reload_policy_by("signal").await {
                        Ok(ids) => tracing::info!(policies = ids.len(), "policies reloaded"),
                        Err(e) => tracing::error!(error = %e, "policy reload refused"),
                    }
                }
            });
        }
    }
    if dev {
        let token_file = config.admin_token_file.display();
        eprintln!(
            "\nWARNING: keymint dev is for development only: plain HTTP, keys stored next to the data,\n\
             a sample role. Use `keymint server --config FILE` for anything else.\n"
        );
        eprintln!("keymint dev listening on http://{addr}");
        eprintln!(
            "  data:        {}{}",
            config.data_dir.display(),
            if created.root_key { " (new)" } else { "" }
        );
        eprintln!("  admin token: {token_file} (mode 0600)");
        eprintln!("  console:     http://{addr}/ui (sign in with the admin token)");
        eprintln!(
            "  audit file:  {}",
            config
                .audit_file
                .as_ref()
                .map_or("-".into(), |p| p.display().to_string())
        );
        eprintln!("  sample role: demo (engine token; scopes llm:chat llm:embeddings http:read)");
        eprintln!(
            "  policies:    {} (Cedar; edit, then `keymint policy reload`)",
            config.data_dir.join("policies").display()
        );
        eprintln!(
            "  node `dev`:  {} (the token `keymint agent --token-file` uses)\n",
            config.data_dir.join("node-dev.token").display()
        );
        eprintln!("Try:");
        eprintln!("  export KEYMINT_ADDR=http://{addr} KEYMINT_TOKEN=$(cat {token_file})");
        eprintln!("  keymint task start --role demo --workload my-agent --ttl 30m --issue");
        eprintln!("  keymint lease list");
        eprintln!(
            "  keymint task start --role demo --workload my-agent --env prod --intent 'delete old rows'   # held for a human"
        );
        eprintln!(
            "  keymint approval list --token-file {}",
            config.data_dir.join("approver.token").display()
        );
        eprintln!("  keymint audit tail");
        eprintln!(
            "  keymint audit verify --file {}\n",
            config
                .audit_file
                .as_ref()
                .map_or("audit.jsonl".into(), |p| p.display().to_string())
        );
    } else {
        match &config.tls {
            Some(t) => tracing::info!(
                %addr,
                mtls = t.client_ca_file.is_some(),
                "keymint server listening (TLS)"
            ),
            None => tracing::info!(%addr, "keymint server listening (plain HTTP on loopback)"),
        }
    }
    let stopping = running.stopping();
    let shutdown = stop_signal(stopping.clone());
    let acceptor = match &config.tls {
        Some(t) => Some(keymint_server::tls::acceptor(t)?),
        None => None,
    };
    let router = running.router.clone();
    let served = async {
        match acceptor {
            Some(a) => keymint_server::tls::serve(listener, a, router, shutdown).await,
            None => keymint_server::serve(listener, router, shutdown).await,
        }
        running.drained().await;
    };
    let cut = drain_unless_signalled_again(served, stopping).await;
    let code = finish(&running, cut).await;
    tracing::info!("keymint stopped");
    Ok(code)
}

/// Waits for `served` (the listeners' drain), unless a second signal to
/// stop comes first (an operator who does not want to wait out the
/// requests in flight, for up to 30 s): then it stops waiting, and the
/// connections still open end with the process. Answers whether it was
/// cut short.
async fn drain_unless_signalled_again(
    served: impl std::future::Future<Output = ()>,
    stopping: tokio_util::sync::CancellationToken,
) -> bool {
    tokio::select! {
        () = served => false,
        () = async {
            stopping.cancelled().await;
            signalled().await;
        } => {
            tracing::warn!("second signal: stopping without waiting for the requests in flight");
            true
        }
    }
}

/// What every stop does after the drain: the use through the proxy since
/// the last interval goes to the audit trail and its chunks give back what
/// they hold unused (a chunk with a request still in flight, after a cut
/// drain, stays open and is charged in full at the next start, as after a
/// crash), the background workers stop, and another replica takes the
/// background duties at once (docs/design/0022). Exits 0 after a full
/// drain, 1 after a cut one.
async fn finish(running: &keymint_server::Running, cut: bool) -> ExitCode {
    running.proxy.shutdown().await;
    running.stop();
    if let Err(e) = running.broker.store().release_duties().await {
        tracing::warn!(error = %e, "cannot release the background duties");
    }
    if cut {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `keymint proxy`: [`serve_proxy`] from a configuration file, optionally on
/// another (loopback) address.
pub async fn proxy(config: &Path, listen: Option<SocketAddr>) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(config)?;
    if let Some(l) = listen {
        if !l.ip().is_loopback() {
            bail!("plain HTTP is only served on loopback, not on `{l}`");
        }
        config.listen = l;
    }
    serve_proxy(&config).await
}

/// `keymint proxy`: the broker core and the egress proxy, serving only the
/// proxy's routes (one process per data directory).
async fn serve_proxy(config: &Config) -> anyhow::Result<ExitCode> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on `{}`", config.listen))?;
    let addr = listener.local_addr()?;
    let mut config = config.clone();
    config.bound_to(addr);
    let config = &config;
    // Held until the process ends: one process per SQLite store.
    let _lock = lock_store(config).await?;
    let (mut running, _) = keymint_server::start(config, Arc::new(SystemClock)).await?;
    crate::alloc::keep_memory_returned();
    tracing::info!(%addr, upstreams = config.upstreams.len(), "keymint proxy listening (plain HTTP on loopback)");
    let stopping = running.stopping();
    let shutdown = stop_signal(stopping.clone());
    let router = running.proxy_router.clone();
    let served = async {
        keymint_server::serve(listener, router, shutdown).await;
        running.drained().await;
    };
    let cut = drain_unless_signalled_again(served, stopping).await;
    Ok(finish(&running, cut).await)
}

/// Resolves when the process is asked to stop (`SIGINT`, or `SIGTERM` as
/// a service manager or Kubernetes sends), and cancels `stopping` then, so
/// that every listener drains at once. Without a handler `SIGTERM` would
/// end the process on the spot: the requests in flight cut, the budget
/// chunks held open (charged in full at the next start) and the last
/// interval's use through the proxy never audited.
async fn stop_signal(stopping: tokio_util::sync::CancellationToken) {
    tokio::select! {
        () = signalled() => {}
        () = stopping.cancelled() => {}
    }
    tracing::info!("stopping: draining connections (a second SIGINT or SIGTERM stops at once)");
    stopping.cancel();
}

/// Resolves at the next `SIGINT` or `SIGTERM` (`SIGINT` only where
/// `SIGTERM` cannot be handled). Once tokio handles a signal it keeps its
/// handler for the life of the process, so a signal between two of these
/// waits is ignored, never the default action (the process's end).
async fn signalled() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot handle SIGTERM; stopping on SIGINT only");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
