//! OpenAI's error body, `{"error":{"message","type","param","code"}}`, as the daemon and the
//! router both answer it and as the router reads it back from a daemon.

use serde::{Deserialize, Serialize};

/// The whole error response body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// A sentence for humans.
    pub message: String,
    /// OpenAI's error class: `invalid_request_error`, `rate_limit_error`, `server_error`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// The request parameter to blame, if any.
    pub param: Option<String>,
    /// A machine-readable code, if any: `invalid_api_key`, `model_not_found`, …
    pub code: Option<String>,
}

impl ErrorBody {
    /// A body with every field given.
    pub fn new(
        message: impl Into<String>,
        kind: &str,
        param: Option<&str>,
        code: Option<&str>,
    ) -> Self {
        Self {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.to_string(),
                param: param.map(str::to_string),
                code: code.map(str::to_string),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_with_openai_field_names_and_explicit_nulls() {
        let body = ErrorBody::new(
            "no such model",
            "invalid_request_error",
            Some("model"),
            None,
        );
        let json = serde_json::to_value(&body).expect("serializes");
        assert_eq!(json["error"]["type"], "invalid_request_error");
        assert_eq!(json["error"]["param"], "model");
        assert!(json["error"]["code"].is_null());
        assert!(
            json["error"]
                .as_object()
                .is_some_and(|o| o.contains_key("code"))
        );
        let back: ErrorBody = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, body);
    }
}
