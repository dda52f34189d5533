//! Forwarding a routed request: the body goes to the pods of the decision in order until one
//! answers. A connection failure or an error before the response starts, or a 503, moves the
//! request to the next pod; once a response has started it is passed through as it arrives,
//! and a failure from then on is the client's to see (never a second attempt that could
//! duplicate output). A request that named no skills carries the ones the router detected,
//! so the daemon serves what it was routed for.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use bytes::Bytes;
use http_body_util::Full;
use skillkv_api::skills::{DETECTED_SKILLS_HEADER, detected_skills_value};

use crate::error::RouteRequestError;
use crate::fleet::Pod;
use crate::observe::{ObservedBody, Settlement, UsageScanner};
use crate::ratelimit::Admission;
use crate::request::Endpoint;
use crate::routing::Decision;
use crate::server::Shared;

/// The header naming the pod that served a response.
pub const BACKEND_HEADER: &str = "x-skillkv-backend";
/// The header giving the routing reason.
pub const ROUTE_HEADER: &str = "x-skillkv-route";
/// The request-id header.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Headers that belong to one connection and are never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// A request ready to forward.
#[derive(Debug)]
pub struct Dispatch {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// The client's headers.
    pub headers: HeaderMap,
    /// The body, unchanged.
    pub body: Bytes,
    /// The request id.
    pub request_id: String,
    /// The model.
    pub model: String,
    /// The skills it needs: each pod it is sent to counts their KV as just used.
    pub skills: Vec<String>,
    /// Whether the router detected `skills` for a chat request that named none: they travel
    /// in [`DETECTED_SKILLS_HEADER`] to a pod whose skills the router knows
    /// ([`Pod::reports_skills`]), so it serves the skills it was chosen for; any other pod
    /// detects for itself.
    pub detected: bool,
    /// Where to send it.
    pub decision: Decision,
    /// Its rate-limit admission.
    pub admission: Option<Admission>,
    /// When it arrived.
    pub started: Instant,
}

fn forwardable(name: &HeaderName) -> bool {
    !HOP_BY_HOP.contains(&name.as_str())
        && name != header::HOST
        && name != header::AUTHORIZATION
        && name != header::CONTENT_LENGTH
        && name.as_str() != REQUEST_ID_HEADER
        && name.as_str() != DETECTED_SKILLS_HEADER
}

fn upstream_request(
    pod: &Pod,
    dispatch: &Dispatch,
) -> Result<Request<Full<Bytes>>, RouteRequestError> {
    let mut builder = Request::post(format!("{}{}", pod.backend.url, dispatch.endpoint.path()));
    for (name, value) in dispatch.headers.iter().filter(|(n, _)| forwardable(n)) {
        builder = builder.header(name, value);
    }
    if dispatch.detected && pod.reports_skills() {
        builder = builder.header(
            DETECTED_SKILLS_HEADER,
            detected_skills_value(&dispatch.skills),
        );
    }
    builder
        .header(REQUEST_ID_HEADER, dispatch.request_id.as_str())
        .body(Full::new(dispatch.body.clone()))
        .map_err(|error| RouteRequestError::BadGateway {
            reason: format!("cannot build the request to {}: {error}", pod.backend.name),
        })
}

/// Sends the request to the decision's pods in order; returns the first answer that started.
pub async fn forward(
    shared: &Shared,
    dispatch: Dispatch,
) -> Result<Response<Body>, RouteRequestError> {
    let attempts: Vec<Arc<Pod>> = dispatch
        .decision
        .order
        .iter()
        .filter_map(|index| shared.fleet.pod(*index))
        .take(shared.config.max_attempts)
        .collect();
    let mut last_failure = String::from("no backend to try");
    for (attempt, pod) in attempts.iter().enumerate() {
        let is_last = attempt + 1 == attempts.len();
        let request = upstream_request(pod, &dispatch)?;
        if attempt == 0 {
            shared
                .metrics
                .overhead
                .observe(dispatch.started.elapsed().as_secs_f64());
        }
        pod.note_routed(&dispatch.skills);
        let in_flight = pod.start_request();
        match shared.client.request(request).await {
            Err(error) => {
                let cause = if error.is_connect() {
                    pod.connect_failed(Instant::now());
                    "connect"
                } else {
                    "no-response"
                };
                tracing::warn!(pod = %pod.backend.name, cause, error = %error, attempt, "backend failed before answering");
                last_failure = format!("{} failed before answering ({cause})", pod.backend.name);
                if !is_last {
                    shared.metrics.retries.with_label_values(&[cause]).inc();
                }
            }
            Ok(response) if response.status() == StatusCode::SERVICE_UNAVAILABLE && !is_last => {
                tracing::info!(pod = %pod.backend.name, attempt, "backend unavailable (503); trying another");
                shared
                    .metrics
                    .retries
                    .with_label_values(&["unavailable"])
                    .inc();
                last_failure = format!("{} answered 503", pod.backend.name);
            }
            Ok(response) => {
                return Ok(respond(shared, pod, dispatch, in_flight, response));
            }
        }
    }
    Err(RouteRequestError::Unavailable {
        reason: last_failure,
    })
}

fn respond(
    shared: &Shared,
    pod: &Pod,
    dispatch: Dispatch,
    in_flight: crate::fleet::InFlight,
    response: Response<hyper::body::Incoming>,
) -> Response<Body> {
    let (mut parts, incoming) = response.into_parts();
    let streaming = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let pool = pod
        .state()
        .model
        .as_ref()
        .map_or_else(|| "unknown".to_string(), |m| m.id.clone());
    shared
        .metrics
        .requests
        .with_label_values(&[
            dispatch.model.as_str(),
            pool.as_str(),
            pod.backend.name.as_str(),
            parts.status.as_str(),
        ])
        .inc();
    tracing::info!(pod = %pod.backend.name, status = parts.status.as_u16(), reason = dispatch.decision.reason.as_str(), "forwarded");
    for name in HOP_BY_HOP {
        parts.headers.remove(*name);
    }
    if streaming {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    if let Ok(value) = HeaderValue::from_str(&pod.backend.name) {
        parts.headers.insert(BACKEND_HEADER, value);
    }
    parts.headers.insert(
        ROUTE_HEADER,
        HeaderValue::from_static(dispatch.decision.reason.as_str()),
    );
    if let Some(admission) = &dispatch.admission {
        admission.headers.write(&mut parts.headers);
    }
    let prompt_estimate = (dispatch.body.len() / 4) as u64;
    let body = ObservedBody::new(
        Body::new(incoming),
        UsageScanner::new(streaming, prompt_estimate),
        Settlement {
            admission: dispatch.admission,
            in_flight,
            metrics: shared.metrics.clone(),
            model: dispatch.model,
            started: dispatch.started,
        },
    );
    Response::from_parts(parts, Body::new(body))
}
