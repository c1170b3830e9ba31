//! `GET /health` (200 while the agent runs; `status` says `ok` or
//! `degraded`) and `GET /ready` (503 until the first entry sync, and while
//! the server is unreachable).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::state::{HealthReport, Shared};

pub fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .with_state(shared)
}

async fn health(State(s): State<Arc<Shared>>) -> Json<HealthReport> {
    Json(s.health())
}

async fn ready(State(s): State<Arc<Shared>>) -> (StatusCode, Json<HealthReport>) {
    let h = s.health();
    let code = if h.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(h))
}
