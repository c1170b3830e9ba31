//! The inventory's routes (`/v1/inventory…`, admin; docs/design/0027).
//! Registered in [`super::api_routes`] with the others.

use axum::Json;
use axum::extract::{RawQuery, State};
use keymint_core::inventory::InventoryItem;
use keymint_proto::inventory::{
    FindingList, InventoryChange, InventoryImport, InventoryPage, InventoryRetire,
};
use serde::Deserialize;
use utoipa::IntoParams;

use super::{ApiErrors, ApiResult, AppState, Auth, Body, Path, limit_of, query};

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct InventoryQuery {
    /// The next page: entries with ids below this one (`next` of the last page).
    before: Option<String>,
    /// 1 to 1000; 100 if not given.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// List live leases too (the first page only); default true.
    issued: Option<bool>,
}

/// List the credential inventory: stored entries newest first, then the live leases (admin).
#[utoipa::path(
    get,
    path = "/v1/inventory",
    tag = "inventory",
    params(InventoryQuery),
    responses(
        (status = 200, description = "a page of the inventory", body = InventoryPage),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
pub(super) async fn list_inventory(
    State(s): State<AppState>,
    Auth(p): Auth,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<InventoryPage>> {
    let q: InventoryQuery = query(q)?;
    let limit = limit_of(q.limit)?;
    Ok(Json(
        s.broker
            .inventory_list(&p, q.before, limit, q.issued.unwrap_or(true))
            .await?,
    ))
}

/// Register a static key by its fingerprint and hint, never the key (admin).
#[utoipa::path(
    post,
    path = "/v1/inventory",
    tag = "inventory",
    request_body = InventoryChange,
    responses(
        (status = 200, description = "the entry", body = InventoryItem),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
pub(super) async fn register_inventory(
    State(s): State<AppState>,
    Auth(p): Auth,
    Body(c): Body<InventoryChange>,
) -> ApiResult<Json<InventoryItem>> {
    Ok(Json(s.broker.inventory_register(&p, c).await?))
}

/// Show one entry: `inv_…`, or a lease `lse_…` (admin).
#[utoipa::path(
    get,
    path = "/v1/inventory/{id}",
    tag = "inventory",
    params(("id" = String, Path, description = "`inv_…` or `lse_…`")),
    responses(
        (status = 200, description = "the entry", body = InventoryItem),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
pub(super) async fn show_inventory(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<InventoryItem>> {
    Ok(Json(s.broker.inventory_show(&p, &id).await?))
}

/// Change an entry's facts: owners, purpose, environment, expiry, rotation date, revocation step (admin).
#[utoipa::path(
    post,
    path = "/v1/inventory/{id}",
    tag = "inventory",
    params(("id" = String, Path, description = "`inv_…`")),
    request_body = InventoryChange,
    responses(
        (status = 200, description = "the entry", body = InventoryItem),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
pub(super) async fn update_inventory(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
    Body(c): Body<InventoryChange>,
) -> ApiResult<Json<InventoryItem>> {
    Ok(Json(s.broker.inventory_update(&p, &id, c).await?))
}

/// Retire an entry: kept for the record, no longer judged (admin).
#[utoipa::path(
    post,
    path = "/v1/inventory/{id}/retire",
    tag = "inventory",
    params(("id" = String, Path, description = "`inv_…`")),
    request_body(content = InventoryRetire, description = "optional; an empty body is `{}`"),
    responses(
        (status = 200, description = "the entry", body = InventoryItem),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
pub(super) async fn retire_inventory(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
    Body(r): Body<InventoryRetire>,
) -> ApiResult<Json<InventoryItem>> {
    Ok(Json(s.broker.inventory_retire(&p, &id, r).await?))
}

/// Import a key into keymint's custody: sealed, fingerprinted, never returned (admin).
#[utoipa::path(
    post,
    path = "/v1/inventory/import",
    tag = "inventory",
    request_body = InventoryImport,
    responses(
        (status = 200, description = "the entry", body = InventoryItem),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
pub(super) async fn import_inventory(
    State(s): State<AppState>,
    Auth(p): Auth,
    Body(i): Body<InventoryImport>,
) -> ApiResult<Json<InventoryItem>> {
    Ok(Json(s.broker.inventory_import(&p, i).await?))
}

/// Evaluate the findings on the inventory now; new ones are audited and announced (admin).
#[utoipa::path(
    get,
    path = "/v1/inventory/findings",
    tag = "inventory",
    responses(
        (status = 200, description = "the findings", body = FindingList),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
pub(super) async fn inventory_findings(
    State(s): State<AppState>,
    Auth(p): Auth,
) -> ApiResult<Json<FindingList>> {
    Ok(Json(s.broker.inventory_findings(&p).await?))
}
