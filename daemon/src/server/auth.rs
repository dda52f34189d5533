//! Bearer-token checks for the public API keys and the admin token. Keys are kept as BLAKE3
//! digests and compared with `blake3::Hash`'s constant-time equality, so neither a key's
//! content nor its length leaks through timing.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::server::errors::ApiError;

/// A set of accepted bearer tokens; empty accepts every request.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    digests: Vec<blake3::Hash>,
}

impl KeySet {
    /// Accepts exactly these tokens (blank ones are ignored).
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        let digests = keys
            .into_iter()
            .map(str::trim)
            .filter(|key| !key.is_empty())
            .map(|key| blake3::hash(key.as_bytes()))
            .collect();
        Self { digests }
    }

    /// Whether no token is required.
    pub fn is_open(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether the request's `Authorization: Bearer` token is accepted.
    pub fn allows(&self, authorization: Option<&str>) -> bool {
        if self.is_open() {
            return true;
        }
        let Some(token) = authorization.and_then(|value| value.strip_prefix("Bearer ")) else {
            return false;
        };
        let digest = blake3::hash(token.trim().as_bytes());
        // Every key is compared so the time does not depend on which one matches.
        self.digests
            .iter()
            .fold(false, |found, key| (*key == digest) | found)
    }
}

/// Middleware: rejects requests whose bearer token the [`KeySet`] does not accept.
pub async fn require_bearer(State(keys): State<KeySet>, request: Request, next: Next) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    if keys.allows(authorization) {
        next.run(request).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_keys_pass() {
        let keys = KeySet::new(["alpha", " beta ", ""]);
        assert!(keys.allows(Some("Bearer alpha")));
        assert!(keys.allows(Some("Bearer beta")));
        assert!(!keys.allows(Some("Bearer gamma")));
        assert!(!keys.allows(Some("alpha")));
        assert!(!keys.allows(None));
    }

    #[test]
    fn an_empty_set_is_open() {
        assert!(KeySet::new([]).allows(None));
    }
}
