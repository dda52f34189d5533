//! Request ids: the caller's `x-request-id` when usable, else a fresh random one; it is sent to
//! the daemon (which then logs under the same id), echoed to the client, and carried by the
//! tracing span of the request.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::proxy::REQUEST_ID_HEADER;

/// Longest caller-supplied id kept.
const MAX_ID_LEN: usize = 128;

/// The request's id, in the request extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The caller's id when it is short and plain, else a random one.
pub fn choose_id(requested: Option<&str>) -> String {
    let usable = |id: &&str| {
        !id.is_empty()
            && id.len() <= MAX_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    };
    match requested.filter(usable) {
        Some(id) => id.to_string(),
        None => format!("{:032x}", rand::random::<u128>()),
    }
}

/// Middleware: assigns the id and echoes it.
pub async fn assign(mut request: Request, next: Next) -> Response {
    let id = choose_id(
        request
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok()),
    );
    request.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", request_id = %id, path = %request.uri().path());
    let mut response = next.run(request).instrument(span).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_plain_ids_and_replaces_others() {
        assert_eq!(choose_id(Some("abc-1.2:x_y")), "abc-1.2:x_y");
        let fresh = choose_id(Some("has spaces"));
        assert_eq!(fresh.len(), 32);
        assert_ne!(fresh, choose_id(None));
        assert_eq!(choose_id(Some(&"a".repeat(200))).len(), 32);
    }
}
