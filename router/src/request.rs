//! What the router reads from an OpenAI request body before forwarding it untouched: the
//! `model`, the `skills` it names, the text skill detection reads when it names none (the last
//! user message, or the prompt), the prompt's token ids when the client sent ids, and whether
//! the answer streams.

use serde_json::Value;

use crate::error::RouteRequestError;

/// The generation endpoints the router forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/completions`.
    Completions,
}

impl Endpoint {
    /// The path on the daemon.
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
        }
    }
}

/// The parts of a request that routing needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSummary {
    /// The model id.
    pub model: String,
    /// The `skills` field, sorted and deduplicated, when present.
    pub skills: Option<Vec<String>>,
    /// The text skill detection reads.
    pub detection_text: String,
    /// The prompt as token ids, when sent as ids.
    pub prompt_tokens: Option<Vec<u32>>,
    /// Whether the answer is streamed.
    pub stream: bool,
}

fn bad(message: &str, param: Option<&'static str>) -> RouteRequestError {
    RouteRequestError::BadRequest {
        message: message.to_string(),
        param,
    }
}

/// The text of a message's `content`: a string, or the `text` parts of an array.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Reads the routing-relevant fields of a request body.
pub fn summarize(endpoint: Endpoint, body: &[u8]) -> Result<RequestSummary, RouteRequestError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| bad(&format!("the body is not valid JSON: {e}"), None))?;
    let Value::Object(fields) = value else {
        return Err(bad("the body must be a JSON object", None));
    };
    let model = fields
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| bad("`model` is required and must be a string", Some("model")))?
        .to_string();
    let skills = match fields.get("skills") {
        None | Some(Value::Null) => None,
        Some(Value::String(keyword)) if keyword == "auto" => None,
        Some(Value::Array(items)) => {
            let mut names = items
                .iter()
                .map(|item| item.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("`skills` must be an array of skill names", Some("skills")))?;
            names.sort();
            names.dedup();
            Some(names)
        }
        Some(_) => {
            return Err(bad(
                "`skills` must be an array of skill names",
                Some("skills"),
            ));
        }
    };
    let stream = fields
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let (detection_text, prompt_tokens) = match endpoint {
        Endpoint::ChatCompletions => {
            let text = fields
                .get("messages")
                .and_then(Value::as_array)
                .and_then(|messages| {
                    messages
                        .iter()
                        .rev()
                        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
                })
                .and_then(|m| m.get("content"))
                .map(content_text)
                .unwrap_or_default();
            (text, None)
        }
        Endpoint::Completions => match fields.get("prompt") {
            Some(Value::String(text)) => (text.clone(), None),
            Some(Value::Array(items)) if items.iter().all(Value::is_u64) => {
                let tokens = items
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(|t| u32::try_from(t).ok())
                    .collect::<Option<Vec<u32>>>();
                (String::new(), tokens)
            }
            Some(Value::Array(items)) => (
                items
                    .first()
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                None,
            ),
            _ => (String::new(), None),
        },
    };
    Ok(RequestSummary {
        model,
        skills,
        detection_text,
        prompt_tokens,
        stream,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_requests_give_model_skills_and_the_last_user_message() {
        let body = br#"{"model":"m","stream":true,"skills":["b","a","b"],
            "messages":[{"role":"user","content":"old"},{"role":"assistant","content":"x"},
                        {"role":"user","content":[{"type":"text","text":"new question"}]}]}"#;
        let summary = summarize(Endpoint::ChatCompletions, body).expect("parses");
        assert_eq!(summary.model, "m");
        assert_eq!(summary.skills, Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(summary.detection_text, "new question");
        assert!(summary.stream);
        assert_eq!(summary.prompt_tokens, None);
    }

    #[test]
    fn completion_prompts_as_text_or_token_ids() {
        let text =
            summarize(Endpoint::Completions, br#"{"model":"m","prompt":"hello"}"#).expect("parses");
        assert_eq!(text.detection_text, "hello");
        assert!(!text.stream);
        let ids =
            summarize(Endpoint::Completions, br#"{"model":"m","prompt":[1,2,3]}"#).expect("parses");
        assert_eq!(ids.prompt_tokens, Some(vec![1, 2, 3]));
    }

    #[test]
    fn auto_skills_mean_detection() {
        let body = br#"{"model":"m","skills":"auto","messages":[{"role":"user","content":"q"}]}"#;
        let summary = summarize(Endpoint::ChatCompletions, body).expect("parses");
        assert_eq!(summary.skills, None);
        assert_eq!(summary.detection_text, "q");
    }

    #[test]
    fn malformed_bodies_are_400_naming_the_param() {
        for (body, param) in [
            (&b"not json"[..], None),
            (br#"{"prompt":"x"}"#, Some("model")),
            (br#"{"model":"m","skills":"sql"}"#, Some("skills")),
            (br#"{"model":"m","skills":[1]}"#, Some("skills")),
        ] {
            let error = summarize(Endpoint::Completions, body).expect_err("rejected");
            let RouteRequestError::BadRequest { param: got, .. } = error else {
                panic!("expected a 400");
            };
            assert_eq!(got, param);
        }
    }
}
