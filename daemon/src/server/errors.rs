//! The one mapping from every failure the public API reports to an HTTP status and OpenAI's
//! error body `{"error":{"message","type","param","code"}}`, used by plain responses and by the
//! single SSE error event of a stream that fails midway.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::engine::handle::{GenerateError, SubmitError, ValidateRequestError};
use crate::skills::{ApplyDesiredStateError, AssemblePromptError, ResolveSkillsError};

/// Seconds a client told "overloaded" should wait before retrying.
const RETRY_AFTER_SECONDS: u64 = 1;

/// A failed API request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or a parameter is out of range.
    #[error("{message}")]
    BadRequest {
        /// What is wrong.
        message: String,
        /// The offending parameter, when one is to blame.
        param: Option<String>,
    },
    /// Missing or wrong API key / admin token.
    #[error("invalid or missing API key; send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// The `model` is not served here.
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
    /// The body exceeds `--max-body-bytes`.
    #[error("the request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The request conflicts with the server's state (admin API: a stale desired generation).
    #[error("{message}")]
    Conflict {
        /// What conflicts.
        message: String,
    },
    /// The waiting queue is full.
    #[error("the server is overloaded ({max_waiting} requests waiting); retry later")]
    Overloaded {
        /// The queue bound.
        max_waiting: usize,
    },
    /// The request ran past `--request-timeout`.
    #[error("the request exceeded the server's timeout of {seconds} s")]
    Timeout {
        /// The timeout.
        seconds: u64,
    },
    /// The model is still loading or the engine stopped.
    #[error("the server is not ready: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
    /// Something failed inside the server.
    #[error("internal error: {message}")]
    Internal {
        /// What failed (never user content).
        message: String,
    },
}

impl ApiError {
    /// A 400 blaming `param`.
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound { .. } | Self::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Timeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's error `type` and `code`.
    fn type_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::BadRequest { .. } => ("invalid_request_error", None),
            Self::Unauthorized => ("invalid_request_error", Some("invalid_api_key")),
            Self::ModelNotFound { .. } => ("invalid_request_error", Some("model_not_found")),
            Self::RouteNotFound { .. } => ("invalid_request_error", Some("not_found")),
            Self::PayloadTooLarge { .. } => ("invalid_request_error", Some("payload_too_large")),
            Self::Conflict { .. } => ("invalid_request_error", Some("conflict")),
            Self::Overloaded { .. } => ("rate_limit_error", Some("overloaded")),
            Self::Timeout { .. } => ("timeout_error", Some("timeout")),
            Self::Unavailable { .. } => ("server_error", Some("unavailable")),
            Self::Internal { .. } => ("server_error", None),
        }
    }

    /// OpenAI's error body.
    pub fn body(&self) -> serde_json::Value {
        let (kind, code) = self.type_and_code();
        let param = match self {
            Self::BadRequest { param, .. } => param.clone(),
            Self::ModelNotFound { .. } => Some("model".to_string()),
            _ => None,
        };
        json!({ "error": { "message": self.to_string(), "type": kind, "param": param, "code": code } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if matches!(self, Self::Overloaded { .. }) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        if matches!(self, Self::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<SubmitError> for ApiError {
    fn from(error: SubmitError) -> Self {
        match error {
            SubmitError::Overloaded { max_waiting } => Self::Overloaded { max_waiting },
            SubmitError::Invalid(invalid) => invalid.into(),
            SubmitError::EngineStopped => Self::Unavailable {
                reason: "the engine is not running".to_string(),
            },
        }
    }
}

impl From<ValidateRequestError> for ApiError {
    fn from(error: ValidateRequestError) -> Self {
        let param = match &error {
            ValidateRequestError::EmptyPrompt
            | ValidateRequestError::TokenOutOfVocabulary { .. } => "prompt",
            ValidateRequestError::ContextTooLong { .. } => "max_tokens",
            ValidateRequestError::Sampling(sampling) => sampling.param,
        };
        let message = match &error {
            ValidateRequestError::Sampling(sampling) => sampling.to_string(),
            other => other.to_string(),
        };
        Self::bad_param(param, message)
    }
}

impl From<GenerateError> for ApiError {
    fn from(error: GenerateError) -> Self {
        match error {
            GenerateError::KvCacheExhausted { .. } => {
                Self::bad_param("max_tokens", error.to_string())
            }
            GenerateError::Forward(_) | GenerateError::KvCopy(_) | GenerateError::MissingLogits => {
                Self::Internal {
                    message: error.to_string(),
                }
            }
            GenerateError::Cancelled | GenerateError::EngineShutDown => Self::Unavailable {
                reason: error.to_string(),
            },
        }
    }
}

impl From<ApplyDesiredStateError> for ApiError {
    fn from(error: ApplyDesiredStateError) -> Self {
        match error {
            ApplyDesiredStateError::StaleGeneration { .. }
            | ApplyDesiredStateError::ConflictingGeneration { .. } => Self::Conflict {
                message: error.to_string(),
            },
            ApplyDesiredStateError::InvalidSkill { .. } => {
                Self::bad_param("skills", error.to_string())
            }
        }
    }
}

impl From<ResolveSkillsError> for ApiError {
    fn from(error: ResolveSkillsError) -> Self {
        Self::bad_param("skills", error.to_string())
    }
}

impl From<AssemblePromptError> for ApiError {
    fn from(error: AssemblePromptError) -> Self {
        match error {
            AssemblePromptError::NotPrefixStable { .. } => Self::Internal {
                message: error.to_string(),
            },
            AssemblePromptError::Render(_) | AssemblePromptError::Encode(_) => {
                Self::bad_param("messages", error.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_maps_to_429_with_retry_after_and_openai_body() {
        let response = ApiError::from(SubmitError::Overloaded { max_waiting: 4 }).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn sampling_error_names_its_param() {
        let error = ApiError::from(ValidateRequestError::Sampling(
            crate::engine::sampling::ValidateSamplingParamsError {
                param: "temperature",
                value: "-1".to_string(),
                bound: "in [0, 2]",
            },
        ));
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
        let body = error.body();
        assert_eq!(body["error"]["param"], "temperature");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("temperature"))
        );
    }

    #[test]
    fn unknown_model_is_404_with_model_param() {
        let error = ApiError::ModelNotFound {
            model: "nope".to_string(),
        };
        assert_eq!(error.status(), StatusCode::NOT_FOUND);
        assert_eq!(error.body()["error"]["param"], "model");
        assert_eq!(error.body()["error"]["code"], "model_not_found");
    }
}
