//! keymint access tokens (`kmt_…`, see `keymint_core::token`).
//!
//! The token is the credential; keymint itself is the provider (the egress
//! proxy and the introspection endpoint ask the store whether it is live).
//! So preparing is all there is to issuing, and revoking is the state change
//! the broker records: nothing outside keymint has to be told.

use async_trait::async_trait;
use keymint_core::model::{Lease, Revocability};
use keymint_core::role::EngineKind;
use keymint_core::token::{Token, TokenKind};
use keymint_proto::{Credential, SecretString};
use zeroize::Zeroizing;

use crate::{Engine, EngineError, IssueContext, Prepared};

#[derive(Debug, Default, Clone, Copy)]
pub struct TokenEngine;

#[async_trait]
impl Engine for TokenEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Token
    }

    fn revocability(&self) -> Revocability {
        Revocability::Revocable
    }

    fn is_local(&self) -> bool {
        true
    }

    fn prepare(&self, _ctx: &IssueContext<'_>) -> Result<Prepared, EngineError> {
        let token = Token::generate(TokenKind::Access)
            .map_err(|_| EngineError::Internal("the random number generator failed".into()))?;
        Ok(Prepared {
            fingerprint_material: Zeroizing::new(token.expose().as_bytes().to_vec()),
            credential: Credential::Bearer {
                token: SecretString::new(token.expose().to_owned()),
            },
            engine_data: serde_json::Value::Null,
        })
    }

    async fn apply(&self, _: &IssueContext<'_>, _: &Prepared) -> Result<(), EngineError> {
        Ok(())
    }

    async fn revoke(&self, _lease: &Lease) -> Result<(), EngineError> {
        Ok(())
    }
}
