//! Misuse monitoring's suspensions (`/v1/suspensions…`, admin and
//! operators; docs/design/0033). Registered in [`super::api_routes`].

use axum::Json;
use axum::extract::{RawQuery, State};
use keymint_core::monitor::{Scope, Suspension};
use keymint_proto::List;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::{ApiErrors, ApiResult, AppState, Auth, Body, Path, query};

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct SuspensionQuery {
    /// Lifted suspensions too; default false (the active ones only).
    all: Option<bool>,
}

/// List the suspensions misuse monitoring made, newest first (admin, operators).
#[utoipa::path(
    get,
    path = "/v1/suspensions",
    tag = "monitoring",
    params(SuspensionQuery),
    responses(
        (status = 200, description = "the suspensions, newest first", body = List<Suspension>),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
pub(super) async fn list_suspensions(
    State(s): State<AppState>,
    Auth(p): Auth,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<List<Suspension>>> {
    let q: SuspensionQuery = query(q)?;
    Ok(Json(List {
        items: s
            .broker
            .suspensions_list(&p, q.all.unwrap_or(false))
            .await?,
    }))
}

/// Lift a suspension: the task, workload or upstream key works again if it is still live (admin, operators).
#[utoipa::path(
    post,
    path = "/v1/suspensions/{id}/lift",
    tag = "monitoring",
    params(("id" = String, Path, description = "`sus_…`")),
    responses(
        (status = 200, description = "the lifted suspension", body = Suspension),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
pub(super) async fn lift_suspension(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Suspension>> {
    Ok(Json(s.broker.suspension_lift(&p, &id).await?))
}

/// A suspension made by hand.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SuspendBody {
    /// `task` (a task's credentials), `workload` (its tasks) or `upstream` (the key keymint holds).
    scope: Scope,
    /// The task id, workload name or upstream name.
    subject: String,
    /// Why (at most 500 bytes); shown to whoever lifts it.
    reason: String,
}

/// Suspend a task's credentials, a workload's tasks or an upstream key by hand, until lifted (admin, operators).
#[utoipa::path(
    post,
    path = "/v1/suspensions",
    tag = "monitoring",
    request_body = SuspendBody,
    responses(
        (status = 201, description = "the suspension, in force on every replica within a second", body = Suspension),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
pub(super) async fn add_suspension(
    State(s): State<AppState>,
    Auth(p): Auth,
    Body(b): Body<SuspendBody>,
) -> ApiResult<(http::StatusCode, Json<Suspension>)> {
    Ok((
        http::StatusCode::CREATED,
        Json(
            s.broker
                .suspension_add(&p, b.scope, &b.subject, &b.reason)
                .await?,
        ),
    ))
}
