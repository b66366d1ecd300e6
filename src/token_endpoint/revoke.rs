//! The RFC 7009 revocation endpoint for the tokens this token endpoint issues.
//!
//! A token that names a client (`client_id`) is revoked only by that client, authenticated; a token without one
//! (a password grant without client credentials) by anyone presenting it, since holding it is already the power to
//! use it. Anything that is not a live token of this issuer is answered 200 like a revoked one (§2.2): the answer
//! never tells whether a token was valid. The revocation holds here at once, and on every replica through the store
//! within a second; a store that cannot take it is 503, so the client retries.

use std::net::IpAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use serde_json::Value;

use super::{presented_client, TokenEndpoint, TokenError};
use crate::auth::revocation::Revocations;
use crate::auth::Authenticator;
use crate::body::{Body, RequestBody};
use crate::store::{Revocation, Revoked, Store};

impl TokenEndpoint {
    /// Serves `POST {revocation_path}`.
    pub async fn revoke(
        &self,
        req: Request<RequestBody>,
        client_ip: IpAddr,
        authn: &Authenticator,
        revocations: &Revocations,
        store: Option<&Arc<Store>>,
    ) -> Result<Response<Body>, TokenError> {
        let (form, basic) = self.read_form(req).await?;
        let token = form.get("token").ok_or(TokenError::InvalidRequest("token is missing"))?;
        // The hint only speeds a lookup up (§2.1); any value is accepted and every token is looked at the same way.
        let client = match presented_client(&form, basic.as_ref())? {
            Some((id, secret)) => Some(self.authenticate_client(id, &secret, client_ip).await?.0),
            None => None,
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let Ok(p) = authn.verify(token, now).await else { return Ok(revoked()) };
        if p.issuer_id != self.settings.issuer {
            return Ok(revoked());
        }
        match p.claims.get("client_id").and_then(Value::as_str) {
            Some(owner) if client.as_deref() != Some(owner) => {
                return Err(if client.is_none() { TokenError::InvalidClient } else { TokenError::UnauthorizedClient });
            }
            _ => {}
        }
        let Some(jti) = p.claims.get("jti").and_then(Value::as_str) else { return Ok(revoked()) };
        // Kept as long as the token is accepted: its `exp`, plus the leeway verification allows past it.
        let until = p.expires_at.saturating_add(self.issuer.leeway);
        let entry = Revoked { what: Revocation::Jti { jti: jti.to_string() }, until };
        revocations.add_local(entry.clone());
        if let Some(store) = store {
            store.revoke(&entry).await.map_err(|e| TokenError::StoreDown(e.to_string()))?;
        }
        Ok(revoked())
    }
}

/// 200 with no content, never cached.
fn revoked() -> Response<Body> {
    let mut rsp = Response::new(Body::empty());
    *rsp.status_mut() = StatusCode::OK;
    rsp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    rsp
}
