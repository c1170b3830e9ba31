//! AWS temporary credentials without a standing key
//! (docs/design/0016-oidc-issuer.md): keymint signs a workload JWT (`aud`
//! `sts.amazonaws.com` by default) and exchanges it at STS
//! (`AssumeRoleWithWebIdentity`, the Query API: a form POST answered in
//! XML) for credentials of the role's IAM role, narrowed by the role's
//! session policy.
//!
//! STS credentials cannot be revoked one by one, so the lease is
//! expire-only and `DurationSeconds` is clamped to the task's end. STS
//! never grants less than 900 s: a task that ends sooner is refused unless
//! the role says `allow_longer_than_task = true`.
//!
//! The web identity token is what the lease fingerprints (the AWS secret
//! does not exist until STS answers); `RoleSessionName` is the task id, so
//! CloudTrail's `AssumeRoleWithWebIdentity` events name the task.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use keymint_client::http::{HttpClient, HttpError};
use keymint_core::Timestamp;
use keymint_core::model::{Lease, Revocability};
use keymint_core::role::{
    AWS_MAX_SESSION_SECS, AWS_MIN_SESSION_SECS, AwsRole, EngineKind, RoleKind,
};
use keymint_issuer::Issuer;
use keymint_proto::{Credential, SecretString};
use zeroize::Zeroizing;

use crate::{Engine, EngineError, IssueContext, Prepared};

/// The largest STS answer read (a normal one is about 2 KiB).
const MAX_ANSWER: usize = 64 * 1024;
/// Seconds to wait for STS when the role says nothing.
pub const DEFAULT_TIMEOUT_SECS: u64 = 10;

#[derive(Debug)]
pub struct AwsEngine {
    issuer: Arc<Issuer>,
    http: HttpClient,
}

impl AwsEngine {
    pub fn new(issuer: Arc<Issuer>) -> Result<Self, String> {
        let http = HttpClient::builder()
            .timeout(Duration::from_secs(DEFAULT_TIMEOUT_SECS))
            .connect_timeout(Duration::from_secs(5))
            .max_body(MAX_ANSWER)
            .build()
            .map_err(|e| format!("cannot build the STS client: {e}"))?;
        Ok(Self { issuer, http })
    }
}

fn aws_role<'a>(ctx: &'a IssueContext<'_>) -> Result<&'a AwsRole, EngineError> {
    match &ctx.role.kind {
        RoleKind::Aws(a) => Ok(a),
        _ => Err(EngineError::Internal(format!(
            "role `{}` is not an aws role",
            ctx.role.name
        ))),
    }
}

/// `DurationSeconds` for a lease issued at `issued` that ends at
/// `expires_at`: what is left of it, at most STS's maximum; a lease shorter
/// than STS's minimum only when the role allows it knowingly.
pub fn session_secs(
    issued: Timestamp,
    expires_at: Timestamp,
    allow_longer_than_task: bool,
) -> Result<u64, EngineError> {
    let left = u64::try_from(issued.until(expires_at) / 1000).unwrap_or(0);
    if left >= AWS_MIN_SESSION_SECS {
        return Ok(left.min(AWS_MAX_SESSION_SECS));
    }
    if allow_longer_than_task {
        return Ok(AWS_MIN_SESSION_SECS);
    }
    Err(EngineError::BadRequest(format!(
        "the lease would end in {left} s (its task's end, or for a sub-task the deadline of a task \
         above it), and AWS grants credentials for at least {AWS_MIN_SESSION_SECS} s, which would \
         outlive the task: give the task at least 15 minutes, or set \
         `allow_longer_than_task = true` on the role"
    )))
}

/// `RoleSessionName`: 2-64 of `[\w+=,.@-]`.
fn session_name(task_id: &str) -> String {
    let mut s: String = task_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(*c))
        .take(64)
        .collect();
    while s.len() < 2 {
        s.push('_');
    }
    s
}

/// The text of the first `<name>…</name>` in `xml`, unescaped. The text
/// must hold no markup (these answers' fields are plain strings).
fn xml_text(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find(&close)?;
    let raw = &xml[start..start + len];
    if raw.contains('<') {
        return None;
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let (c, n) = [
            ("&amp;", '&'),
            ("&lt;", '<'),
            ("&gt;", '>'),
            ("&quot;", '"'),
            ("&apos;", '\''),
        ]
        .iter()
        .find(|(e, _)| tail.starts_with(e))
        .map(|(e, c)| (*c, e.len()))?;
        out.push(c);
        rest = &tail[n..];
    }
    out.push_str(rest);
    Some(out)
}

/// The credentials of a successful answer.
#[derive(Debug)]
pub struct StsCredentials {
    pub access_key_id: String,
    pub secret_access_key: SecretString,
    pub session_token: SecretString,
    pub expiration: String,
    pub assumed_role_arn: Option<String>,
}

/// Reads `AssumeRoleWithWebIdentityResponse`.
pub fn parse_answer(xml: &str) -> Option<StsCredentials> {
    let creds_start = xml.find("<Credentials>")?;
    let creds_end = xml[creds_start..].find("</Credentials>")? + creds_start;
    let creds = &xml[creds_start..creds_end];
    let access_key_id = xml_text(creds, "AccessKeyId")?;
    if access_key_id.is_empty()
        || access_key_id.len() > 128
        || !access_key_id.chars().all(|c| c.is_ascii_alphanumeric())
    {
        return None;
    }
    let expiration = xml_text(creds, "Expiration")?;
    Timestamp::parse_rfc3339(&expiration)?;
    Some(StsCredentials {
        access_key_id,
        secret_access_key: SecretString::new(xml_text(creds, "SecretAccessKey")?),
        session_token: SecretString::new(xml_text(creds, "SessionToken")?),
        expiration,
        assumed_role_arn: xml
            .find("<AssumedRoleUser>")
            .and_then(|i| xml_text(&xml[i..], "Arn")),
    })
}

/// The error code of an STS error answer, if it is a plain name (never
/// the message, which may quote the request).
fn error_code(xml: &str) -> String {
    xml_text(xml, "Code")
        .filter(|c| {
            !c.is_empty()
                && c.len() <= 64
                && c.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
        })
        .unwrap_or_else(|| "no error code".into())
}

impl AwsEngine {
    /// Exchanges `token` at STS.
    pub async fn assume_role(
        &self,
        role: &AwsRole,
        session_name: &str,
        duration_secs: u64,
        token: &str,
    ) -> Result<StsCredentials, EngineError> {
        let mut form = vec![
            ("Action", "AssumeRoleWithWebIdentity".to_owned()),
            ("Version", "2011-06-15".to_owned()),
            ("RoleArn", role.role_arn.clone()),
            ("RoleSessionName", session_name.to_owned()),
            ("DurationSeconds", duration_secs.to_string()),
        ];
        if let Some(p) = &role.session_policy {
            form.push(("Policy", p.clone()));
        }
        form.push(("WebIdentityToken", token.to_owned()));
        let body = Zeroizing::new(
            serde_urlencoded::to_string(&form)
                .map_err(|_| EngineError::Internal("cannot encode the STS request".into()))?,
        );
        let req = http::Request::post(role.endpoint())
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .header(http::header::ACCEPT, "text/xml")
            .body(Bytes::from(body.as_bytes().to_vec()))
            .map_err(|_| EngineError::Internal("the STS endpoint is not a valid URL".into()))?;
        let timeout = Duration::from_secs(role.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS));
        let res = self
            .http
            .with_timeout(timeout)
            .send(req)
            .await
            .map_err(|e| match e {
                HttpError::Timeout => EngineError::Unavailable(format!(
                    "STS did not answer within {} s",
                    timeout.as_secs()
                )),
                HttpError::TooLarge(_) => EngineError::Unavailable("STS answered too much".into()),
                HttpError::Transport(_) | HttpError::Config(_) => {
                    EngineError::Unavailable("cannot reach STS".into())
                }
            })?;
        let text = String::from_utf8_lossy(&res.body);
        let status = res.status.as_u16();
        if res.status.is_server_error() || status == 429 {
            return Err(EngineError::Unavailable(format!(
                "STS answered {status} ({})",
                error_code(&text)
            )));
        }
        if !res.status.is_success() {
            return Err(EngineError::Rejected(format!(
                "STS refused AssumeRoleWithWebIdentity: {status} ({})",
                error_code(&text)
            )));
        }
        parse_answer(&text)
            .ok_or_else(|| EngineError::Unavailable("STS's answer holds no credentials".into()))
    }
}

#[async_trait]
impl Engine for AwsEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Aws
    }

    fn revocability(&self) -> Revocability {
        // STS sessions cannot be revoked one by one; their life is clamped.
        Revocability::ExpireOnly
    }

    fn is_local(&self) -> bool {
        false
    }

    fn prepare(&self, ctx: &IssueContext<'_>) -> Result<Prepared, EngineError> {
        let role = aws_role(ctx)?;
        let issued_ms = crate::ssh::id_millis(ctx.lease_id)
            .ok_or_else(|| EngineError::Internal("the lease id is malformed".into()))?;
        let issued = Timestamp::from_millis(i64::try_from(issued_ms).unwrap_or(i64::MAX));
        // Refused here, before anything is recorded or sent.
        let duration = session_secs(
            issued,
            // The task's hard end, as for every expire-only credential but
            // SSH certificates (`rules::lease_end`), not its idle deadline.
            ctx.expires_at.min(ctx.task.expires_at),
            role.allow_longer_than_task,
        )?;
        let s = crate::jwt::sign_workload_token(
            &self.issuer,
            ctx,
            std::slice::from_ref(&role.audience),
            role.algorithm,
            false,
        )?;
        Ok(Prepared {
            fingerprint_material: Zeroizing::new(s.token.as_bytes().to_vec()),
            engine_data: serde_json::json!({
                "role_arn": role.role_arn,
                "session_name": session_name(&ctx.task.id),
                "duration_secs": duration,
                "kid": s.kid,
                "sub": s.subject,
            }),
            // The web identity token, exchanged by `mint`.
            credential: Credential::Jwt {
                token: SecretString::new(s.token),
                issuer: self.issuer.url().to_owned(),
                subject: s.subject,
                audience: vec![role.audience.clone()],
                expires_at: s.expires_at.unix_seconds(),
            },
        })
    }

    async fn apply(&self, ctx: &IssueContext<'_>, prepared: &Prepared) -> Result<(), EngineError> {
        self.mint(ctx, prepared).await.map(|_| ())
    }

    async fn mint(
        &self,
        ctx: &IssueContext<'_>,
        prepared: &Prepared,
    ) -> Result<Option<Prepared>, EngineError> {
        let role = aws_role(ctx)?;
        let Credential::Jwt { token, .. } = &prepared.credential else {
            return Err(EngineError::Internal("no web identity token".into()));
        };
        let duration = prepared
            .engine_data
            .get("duration_secs")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(AWS_MIN_SESSION_SECS);
        let c = self
            .assume_role(role, &session_name(&ctx.task.id), duration, token.expose())
            .await?;
        tracing::info!(
            lease = ctx.lease_id,
            access_key_id = %c.access_key_id,
            duration,
            "STS issued temporary credentials"
        );
        // STS made the secret; the lease keeps the fingerprint of the
        // web identity token it was traded for.
        Ok(Some(Prepared {
            credential: Credential::Aws {
                access_key_id: c.access_key_id,
                secret_access_key: c.secret_access_key,
                session_token: c.session_token,
                expiration: c.expiration,
                region: role.region.clone(),
                assumed_role_arn: c.assumed_role_arn,
            },
            fingerprint_material: prepared.fingerprint_material.clone(),
            engine_data: prepared.engine_data.clone(),
        }))
    }

    async fn revoke(&self, _lease: &Lease) -> Result<(), EngineError> {
        // Nothing to call: the session expires with its clamped duration.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    const ANSWER: &str = r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>ci/agent</SubjectFromWebIdentityToken>
    <Audience>sts.amazonaws.com</Audience>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/agent/tsk_1</Arn>
      <AssumedRoleId>AROACLKWSDQRAOEXAMPLE:tsk_1</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>FAKE/session+token==&amp;</SessionToken>
      <SecretAccessKey>fake-secret-for-tests</SecretAccessKey>
      <Expiration>2026-12-03T16:00:00Z</Expiration>
      <AccessKeyId>ASIAFAKEFORTESTS</AccessKeyId>
    </Credentials>
  </AssumeRoleWithWebIdentityResult>
</AssumeRoleWithWebIdentityResponse>"#;

    #[test]
    fn an_sts_answer_is_read_and_bad_ones_are_not() {
        let c = parse_answer(ANSWER).unwrap();
        assert_eq!(c.access_key_id, "ASIAFAKEFORTESTS");
        assert_eq!(c.session_token.expose(), "FAKE/session+token==&");
        assert_eq!(c.expiration, "2026-12-03T16:00:00Z");
        assert_eq!(
            c.assumed_role_arn.as_deref(),
            Some("arn:aws:sts::123456789012:assumed-role/agent/tsk_1")
        );
        for bad in [
            ANSWER.replace("<AccessKeyId>ASIAFAKEFORTESTS", "<AccessKeyId>AS<x/>IA"),
            ANSWER.replace("2026-12-03T16:00:00Z", "tomorrow"),
            ANSWER.replace("<Credentials>", ""),
            ANSWER.replace("&amp;", "&bogus;"),
            String::new(),
        ] {
            assert!(parse_answer(&bad).is_none(), "{bad}");
        }
        assert_eq!(
            error_code(
                "<ErrorResponse><Error><Code>AccessDenied</Code><Message>no</Message></Error></ErrorResponse>"
            ),
            "AccessDenied"
        );
        assert_eq!(error_code("<Code>sk-live secret</Code>"), "no error code");
    }

    #[test]
    fn durations_are_clamped_to_the_task_and_short_tasks_refused() {
        let t0 = Timestamp::from_millis(1_800_000_000_000);
        assert_eq!(session_secs(t0, t0.plus_secs(3600), false), Ok(3600));
        assert_eq!(
            session_secs(t0, t0.plus_secs(100_000), false),
            Ok(AWS_MAX_SESSION_SECS)
        );
        let e = session_secs(t0, t0.plus_secs(600), false).unwrap_err();
        assert!(matches!(e, EngineError::BadRequest(_)));
        assert!(e.to_string().contains("allow_longer_than_task"));
        assert_eq!(session_secs(t0, t0.plus_secs(600), true), Ok(900));
    }

    #[test]
    fn session_names_fit_sts() {
        assert_eq!(session_name("tsk_0123abc"), "tsk_0123abc");
        assert_eq!(session_name("a b/c"), "abc");
        assert_eq!(session_name(""), "__");
        assert_eq!(session_name(&"x".repeat(100)).len(), 64);
    }
}
