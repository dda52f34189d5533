//! Request ids: honours the caller's `x-request-id`, else the trace id of a W3C `traceparent`,
//! else makes one; echoes it in the response and runs the request inside a tracing span that
//! carries it, so every log line of the request names it.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

/// The header carrying the id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Longest caller-supplied id kept.
const MAX_ID_LEN: usize = 128;

/// The request's id, in the request extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Middleware: assigns the id, logs the request's outcome.
pub async fn assign(mut request: Request, next: Next) -> Response {
    let id = choose_id(
        header_str(&request, REQUEST_ID_HEADER),
        header_str(&request, "traceparent"),
    );
    request.extensions_mut().insert(RequestId(id.clone()));
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let span = tracing::info_span!("request", request_id = %id, %method, %path);
    async move {
        let started = std::time::Instant::now();
        let mut response = next.run(request).await;
        tracing::info!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "response"
        );
        if let Ok(value) = HeaderValue::from_str(&id) {
            response.headers_mut().insert(REQUEST_ID_HEADER, value);
        }
        response
    }
    .instrument(span)
    .await
}

fn header_str<'a>(request: &'a Request, name: &str) -> Option<&'a str> {
    request
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
}

/// The caller's id when usable, else the traceparent's trace id, else a fresh random one.
fn choose_id(request_id: Option<&str>, traceparent: Option<&str>) -> String {
    let usable = |id: &&str| {
        !id.is_empty()
            && id.len() <= MAX_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    };
    if let Some(id) = request_id.filter(usable) {
        return id.to_string();
    }
    if let Some(trace_id) = traceparent.and_then(trace_id_of) {
        return trace_id.to_string();
    }
    format!("{:032x}", rand::random::<u128>())
}

/// The trace id of `version-traceid-parentid-flags`, when well formed and not all zeros.
fn trace_id_of(traceparent: &str) -> Option<&str> {
    let trace_id = traceparent.trim().split('-').nth(1)?;
    let valid = trace_id.len() == 32
        && trace_id.bytes().all(|b| b.is_ascii_hexdigit())
        && trace_id.bytes().any(|b| b != b'0');
    valid.then_some(trace_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_id_wins_then_traceparent_then_random() {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(choose_id(Some("abc-1"), Some(traceparent)), "abc-1");
        assert_eq!(
            choose_id(None, Some(traceparent)),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            choose_id(Some("bad id with spaces"), Some(traceparent)),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let fresh = choose_id(
            None,
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        );
        assert_eq!(fresh.len(), 32);
        assert_ne!(fresh, choose_id(None, None));
    }
}
