//! The HTTP client the router talks to daemons with: hyper-util's pooled HTTP/1 client over
//! plain TCP (daemons are reached on loopback or the pod network), with a connect timeout so
//! a dead pod fails fast and the request moves on.

use std::time::Duration;

use axum::http::{Request, header};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The client type.
pub type Upstream = Client<HttpConnector, Full<Bytes>>;

/// A pooled client whose connections time out after `connect_timeout`.
pub fn upstream_client(connect_timeout: Duration) -> Upstream {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector)
}

/// A `GET` of `url` with an optional bearer token.
pub fn get_request(
    url: &str,
    token: Option<&str>,
) -> Result<Request<Full<Bytes>>, axum::http::Error> {
    let mut builder = Request::get(url);
    if let Some(token) = token {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    builder.body(Full::new(Bytes::new()))
}
