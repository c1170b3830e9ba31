//! What a listener serves: the egress proxy's path first, the router for
//! everything else.
//!
//! A proxied request is the one request keymint serves at volume, so it
//! does not go through axum's router: no route matching, no path
//! parameters or matched-path extensions, no boxed middleware and handler
//! futures. [`Front`] looks at the path once ([`keymint_proxy::serves`],
//! the exact paths the router's `/proxy/{upstream}` and
//! `/proxy/{upstream}/{*path}` would match) and runs what the router ran for
//! them, in the same order: the holder binding, then the proxy, which does
//! every check of its own (design 0029, "Fifth pass"). Any other path,
//! `/proxy/` and `/proxy/x/` among them, goes to the router as before,
//! its body bounded in time ([`Paced`], docs/design/0042).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use keymint_proxy::Proxy;
use keymint_proxy::within::Clock;
use tower::Service;

use crate::api::{self, AppState};

/// A listener's service: the proxy's path, then the router.
#[derive(Clone)]
pub struct Front {
    router: axum::Router,
    /// `None` on a listener that does not serve the proxy.
    proxy: Option<Arc<ProxyPath>>,
    /// How long a body to the router may take once it first waits.
    body_timeout: Duration,
}

/// How long the rest of a request body to the API may take once it has
/// to be waited for (a body that came whole with its head never waits).
/// hyper's head timeout does not run while a body is read: without this a
/// client could hold a connection, and the task reading its body, for
/// ever by sending a body a byte at a time (a "slow POST"), on routes
/// that read a body before anyone is authenticated among them.
pub const API_BODY_TIMEOUT: Duration = Duration::from_secs(30);

struct ProxyPath {
    state: AppState,
    proxy: Arc<Proxy>,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front")
            .field("proxy", &self.proxy.is_some())
            .finish_non_exhaustive()
    }
}

impl Front {
    /// The router alone (no proxy on this listener).
    pub fn router(router: axum::Router) -> Self {
        Self {
            router,
            proxy: None,
            body_timeout: API_BODY_TIMEOUT,
        }
    }

    /// The same, with `limit` for [`API_BODY_TIMEOUT`] (for tests).
    #[cfg(test)]
    pub(crate) fn with_body_timeout(mut self, limit: Duration) -> Self {
        self.body_timeout = limit;
        self
    }

    /// `proxy` on its path, with the holder binding of `state`'s broker,
    /// and `router` for every other path.
    pub fn with_proxy(router: axum::Router, state: AppState, proxy: Arc<Proxy>) -> Self {
        Self {
            router,
            proxy: Some(Arc::new(ProxyPath { state, proxy })),
            body_timeout: API_BODY_TIMEOUT,
        }
    }
}

impl ProxyPath {
    /// The holder binding, then the proxy. `Front::call` boxes this future
    /// itself: with an `async` block around it, the boxed future measured
    /// several times its size in release (design 0029, "Ninth pass").
    async fn serve(self: Arc<Self>, req: Request) -> Result<Response, Infallible> {
        let (parts, body) = req.into_parts();
        // Holder binding on the proxy's path too: a task token presented by
        // a caller that proves another workload identity is refused.
        if let Err(refused) = api::proxy_holder_binding(&self.state, &parts).await {
            return Ok(refused);
        }
        Ok(self.proxy.handle(Request::from_parts(parts, body)).await)
    }
}

impl<B> Service<http::Request<B>> for Front
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Both the proxy and axum's router are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match &self.proxy {
            Some(p) if keymint_proxy::serves(req.uri().path()) => {
                Box::pin(Arc::clone(p).serve(req.map(Body::new)))
            }
            _ => {
                let limit = self.body_timeout;
                // A body that ended with its head cannot run out of time:
                // nothing to note for it.
                let late = (req.version() <= http::Version::HTTP_11
                    && !http_body::Body::is_end_stream(req.body()))
                .then(Arc::default);
                let noted = late.clone();
                let answer = self.router.call(req.map(|b| Paced::new(b, limit, noted)));
                Box::pin(async move {
                    let mut res = answer.await?;
                    // hyper closes the connection of a body the answer
                    // left unread once its next read does not finish it;
                    // for a body that ran out of time it will not, so the
                    // answer says so (RFC 9112 §9.6), whatever the body's
                    // size (`cores::connection_service` does it for large
                    // ones).
                    if late.is_some_and(|l: Arc<AtomicBool>| l.load(Ordering::Acquire)) {
                        crate::cores::says_close(&mut res);
                    }
                    Ok(res)
                })
            }
        }
    }
}

/// A request body that must end within `limit` of when it first had to be
/// waited for; after that it ends in an error (the route refuses the
/// request, and the connection, its body unread, is closed). The same
/// lazy [`Clock`] as the proxy's body collections: a body that came whole
/// with its head, as nearly all do, makes no timer.
pub(crate) struct Paced<B> {
    body: B,
    clock: Clock,
    /// Set when the body ran out of time.
    late: Option<Arc<AtomicBool>>,
}

impl<B> Paced<B> {
    pub(crate) const fn new(body: B, limit: Duration, late: Option<Arc<AtomicBool>>) -> Self {
        Self {
            body,
            clock: Clock::new(limit),
            late,
        }
    }
}

impl<B> http_body::Body for Paced<B>
where
    B: http_body::Body + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = B::Data;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(f) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(f.map(|r| r.map_err(Into::into)));
        }
        this.clock.poll_expired(cx).map(|()| {
            if let Some(late) = &this.late {
                late.store(true, Ordering::Release);
            }
            Some(Err("the request body was not sent in time".into()))
        })
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
