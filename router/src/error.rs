//! The router's answers to failed requests: one enum mapping each failure to an HTTP status and
//! OpenAI's error body (the same shapes as the daemon's), plus the 429 headers of a rate limit.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use skillkv_api::openai_error::ErrorBody;

use crate::ratelimit::Rejection;

/// A request the router answers itself, with an error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RouteRequestError {
    /// The body is not JSON or lacks a field.
    #[error("{message}")]
    BadRequest {
        /// What is wrong.
        message: String,
        /// The offending parameter.
        param: Option<&'static str>,
    },
    /// Missing or unknown API key.
    #[error("invalid or missing API key; send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// No backend serves the model.
    #[error("the model `{model}` does not exist on this server")]
    ModelNotFound {
        /// The requested model.
        model: String,
    },
    /// No such route.
    #[error("no route for {path}")]
    RouteNotFound {
        /// The requested path.
        path: String,
    },
    /// The body exceeds the limit.
    #[error("the request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit.
        limit: usize,
    },
    /// A rate limit rejected the request.
    #[error("{}", .0.message())]
    RateLimited(Rejection),
    /// Every backend that could serve the model failed before answering.
    #[error("no backend could serve the request: {reason}")]
    Unavailable {
        /// The last failure.
        reason: String,
    },
    /// A backend answered with something that is not HTTP.
    #[error("the backend failed: {reason}")]
    BadGateway {
        /// What failed.
        reason: String,
    },
}

impl RouteRequestError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound { .. } | Self::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadGateway { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// OpenAI's error body.
    pub fn body(&self) -> ErrorBody {
        let message = self.to_string();
        match self {
            Self::BadRequest { param, .. } => {
                ErrorBody::new(message, "invalid_request_error", *param, None)
            }
            Self::Unauthorized => ErrorBody::new(
                message,
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            ),
            Self::ModelNotFound { .. } => ErrorBody::new(
                message,
                "invalid_request_error",
                Some("model"),
                Some("model_not_found"),
            ),
            Self::RouteNotFound { .. } => {
                ErrorBody::new(message, "invalid_request_error", None, Some("not_found"))
            }
            Self::PayloadTooLarge { .. } => ErrorBody::new(
                message,
                "invalid_request_error",
                None,
                Some("payload_too_large"),
            ),
            Self::RateLimited(rejection) => {
                ErrorBody::new(message, "rate_limit_error", None, Some(rejection.code()))
            }
            Self::Unavailable { .. } => {
                ErrorBody::new(message, "server_error", None, Some("unavailable"))
            }
            Self::BadGateway { .. } => {
                ErrorBody::new(message, "server_error", None, Some("bad_gateway"))
            }
        }
    }
}

impl IntoResponse for RouteRequestError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        match &self {
            Self::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::RateLimited(rejection) => rejection.write_headers(headers),
            Self::Unavailable { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(1u32));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthorized_is_401_with_invalid_api_key_code_and_bearer_challenge() {
        let response = RouteRequestError::Unauthorized.into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let body = RouteRequestError::Unauthorized.body();
        assert_eq!(body.error.code.as_deref(), Some("invalid_api_key"));
        assert_eq!(body.error.kind, "invalid_request_error");
    }

    #[test]
    fn unknown_model_blames_the_model_param() {
        let error = RouteRequestError::ModelNotFound {
            model: "nope".to_string(),
        };
        assert_eq!(error.status(), StatusCode::NOT_FOUND);
        assert_eq!(error.body().error.param.as_deref(), Some("model"));
        assert!(error.body().error.message.contains("nope"));
    }
}
