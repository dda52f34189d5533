//! A minimal HTTP/1.1 GET for the command line (the admin API of a running daemon).

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Why a GET failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpGetError {
    /// The URL or header is unusable.
    #[error("invalid request: {0}")]
    Request(#[from] axum::http::Error),
    /// Connecting or exchanging failed.
    #[error("request failed: {0}")]
    Send(#[from] hyper_util::client::legacy::Error),
    /// Reading the body failed.
    #[error("reading the response failed: {0}")]
    Body(#[from] hyper::Error),
    /// The server answered with an error status.
    #[error("HTTP {status}: {body}")]
    Status {
        /// The status.
        status: u16,
        /// The body, as text.
        body: String,
    },
}

/// GETs `url` (http only) with an optional bearer token and returns the body of a 2xx answer.
pub async fn get(url: &str, bearer: &str) -> Result<Bytes, HttpGetError> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut request = axum::http::Request::get(url);
    if !bearer.is_empty() {
        request = request.header("authorization", format!("Bearer {bearer}"));
    }
    let response = client.request(request.body(Empty::new())?).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(HttpGetError::Status {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    Ok(body)
}
