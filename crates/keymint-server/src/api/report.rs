//! The compliance report's route (`/v1/report`, admin;
//! docs/design/0034-compliance-report.md). Registered in
//! [`super::api_routes`] with the others.

use axum::extract::{RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::IntoParams;

use super::{ApiError, ApiErrors, ApiResult, AppState, Auth, query};
use crate::report::render;
use keymint_proto::ErrorCode;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ReportQuery {
    /// `json` (default), `html` or `md`.
    format: Option<String>,
}

/// The HTML page may be opened straight from the API in a browser: it
/// needs no script and loads nothing, and this policy holds it to that.
const HTML_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The compliance report: live state judged against OWASP NHI Top 10, OWASP Agentic Top 10, NIST AI RMF (AI 600-1) and NIST CSF 2.0 (admin).
#[utoipa::path(
    get,
    path = "/v1/report",
    tag = "inventory",
    params(ReportQuery),
    responses(
        (status = 200, description = "the report: JSON (docs/report.schema.json), a self-contained HTML page, or Markdown", content(
            (String = "application/json"),
            (String = "text/html"),
            (String = "text/markdown"),
        )),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
pub(super) async fn report(
    State(s): State<AppState>,
    Auth(p): Auth,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let q: ReportQuery = query(q)?;
    let format = match q.format.as_deref() {
        None | Some("json") => "json",
        Some("html") => "html",
        Some("md" | "markdown") => "md",
        Some(_) => {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                "`format` must be `json`, `html` or `md`",
            ));
        }
    };
    let r = s.broker.compliance_report(&p, &s.report).await?;
    let nosniff = (header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    Ok(match format {
        "html" => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CONTENT_SECURITY_POLICY, HTML_CSP),
                nosniff,
            ],
            render::html(&r),
        )
            .into_response(),
        "md" => (
            [
                (header::CONTENT_TYPE, "text/markdown; charset=utf-8"),
                nosniff,
            ],
            render::markdown(&r),
        )
            .into_response(),
        _ => (
            [(header::CONTENT_TYPE, "application/json"), nosniff],
            render::json(&r),
        )
            .into_response(),
    })
}
