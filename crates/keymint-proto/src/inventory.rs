//! Wire types of the credential inventory, its findings and the leak
//! response (`/v1/inventory…`, docs/design/0027). The entries themselves are
//! [`keymint_core::inventory::InventoryItem`].

use keymint_core::Timestamp;
use keymint_core::inventory::{Finding, InventoryItem};
use serde::{Deserialize, Serialize};

use crate::SecretString;

/// A page of the inventory (`GET /v1/inventory`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InventoryPage {
    pub items: Vec<InventoryItem>,
    /// Pass as `before` for the next page of stored entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Registering a static key, or changing an entry's facts
/// (`POST /v1/inventory`, `PATCH /v1/inventory/{id}`). Absent fields are
/// left as they are; an empty string clears an optional text field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InventoryChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Only when registering: `openai`, `anthropic`, `openrouter`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Only when registering: the key's fingerprint as `keymint scan`
    /// computes it (HMAC-SHA-256, 64 hex digits). The key itself is never
    /// sent; `keymint inventory set --key-file` computes both locally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Only when registering: the key's hint (`sk-proj-Ab3…9xQz`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub business_owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub technical_owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workloads: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_by: Option<Timestamp>,
    /// The documented manual revocation step, for keys no provider API
    /// revokes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<String>,
}

/// Importing a key into keymint's custody (`POST /v1/inventory/import`):
/// the server seals it and keeps its fingerprint; it is never returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InventoryImport {
    pub key: SecretString,
    /// The entry's facts (`fingerprint` and `hint` are computed here).
    #[serde(default)]
    pub facts: InventoryChange,
}

/// Retiring an entry (`POST /v1/inventory/{id}/retire`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InventoryRetire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The findings on the inventory (`GET /v1/inventory/findings`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FindingList {
    pub findings: Vec<Finding>,
    /// Entries evaluated.
    pub evaluated: u64,
}

/// What the leak response did for one reported key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeakResponse {
    /// The inventory entry.
    pub item: String,
    pub provider: String,
    pub rule: String,
    /// `revoked`, `suspended`, `alerted`, `failed` (when the provider was
    /// unavailable the detail says when it is tried again), or `pending`
    /// (another attempt holds it).
    pub outcome: String,
    /// Why, in words (no secret, no provider body).
    pub detail: String,
}
