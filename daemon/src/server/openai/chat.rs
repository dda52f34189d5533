//! `POST /v1/chat/completions`: renders the messages with the model's chat template, runs the
//! generation and answers in OpenAI's `chat.completion` shape, or streams
//! `chat.completion.chunk`s.

use axum::Extension;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use skillkv_api::skills::DETECTED_SKILLS_HEADER;

use crate::engine::chat_template::ChatMessage;
use crate::server::AppState;
use crate::server::errors::ApiError;
use crate::server::openai::generate::{
    Finish, Generation, PromptSkills, TokenLogprobs, TokenText, log_prompt,
};
use crate::server::openai::sse::{ChunkFormat, stream_response};
use crate::server::openai::types::{ApiJson, CommonFields, Usage, unix_now};
use crate::server::request_id::RequestId;
use crate::skills::{SkillVersion, assemble_chat};

/// The request body.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Return the chosen tokens' logprobs.
    #[serde(default)]
    pub logprobs: bool,
    /// How many alternatives per token (needs `logprobs`).
    pub top_logprobs: Option<usize>,
    /// Sampling and the rest.
    #[serde(flatten)]
    pub common: CommonFields,
}

/// One message.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// Text, or a list of text parts.
    pub content: Option<MessageContent>,
}

/// A message's content.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts; only `text` parts are supported.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    /// The part's type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its text, for `text` parts.
    pub text: Option<String>,
}

fn to_chat_messages(messages: &[Message]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_param(
            "messages",
            "`messages` must not be empty",
        ));
    }
    messages
        .iter()
        .map(|message| {
            let content = match &message.content {
                None => String::new(),
                Some(MessageContent::Text(text)) => text.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(part_text)) => text.push_str(part_text),
                            (kind, _) => {
                                return Err(ApiError::bad_param(
                                    "messages",
                                    format!("content parts of type `{kind}` are not supported; only `text`"),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage::new(message.role.clone(), content))
        })
        .collect()
}

/// `POST /v1/chat/completions`.
pub async fn create(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let serving = state.serving()?;
    let top_logprobs = match (request.logprobs, request.top_logprobs) {
        (true, top) => Some(top.unwrap_or(0)),
        (false, None) => None,
        (false, Some(_)) => {
            return Err(ApiError::bad_param(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ));
        }
    };
    let sampling = request.common.sampling(&serving.info.id, top_logprobs)?;
    let messages = to_chat_messages(&request.messages)?;
    let selection = request
        .common
        .skill_selection(headers.get(DETECTED_SKILLS_HEADER))?;
    let query = messages
        .iter()
        .rev()
        .find(|message| message.role == "user")
        .map_or("", |message| message.content.as_str());
    let resolved = serving.skills.resolve(&selection, query)?;
    let versions: Vec<&SkillVersion> = resolved.iter().map(|skill| &*skill.version).collect();
    let prompt = assemble_chat(&serving.template, &serving.tokenizer, &versions, &messages)?;
    if state.config.log_content {
        log_prompt(&state, &serving.tokenizer.decode(&prompt.tokens));
    }
    let mut skills = PromptSkills {
        skills: resolved.into_iter().zip(prompt.skill_spans).collect(),
        selection: selection.label(),
    };
    state.metrics.record_skill_selection(&selection);
    let prepared = serving
        .unpinned
        .prepare(&serving.engine, &mut skills.skills)
        .await;
    state.metrics.record_unpinned_skills(&prepared);
    let generation = Generation::start(&state, &request_id, prompt.tokens, skills, sampling)?;
    let header = generation.cache_header();
    let id = format!("chatcmpl-{request_id}");
    let model = serving.info.id.clone();
    let created = unix_now();
    if request.common.streaming() {
        let format = ChatChunks {
            id,
            model,
            created,
            include_usage: request.common.include_usage(),
        };
        return Ok(stream_response(generation, format));
    }
    let collected = generation.collect().await?;
    let body = json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": Value::Null,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": collected.text, "refusal": Value::Null},
            "logprobs": collected.logprobs.as_deref().map(chat_logprobs),
            "finish_reason": collected.finish.reason,
        }],
        "usage": Usage::from(collected.finish.usage),
    });
    Ok(([header], axum::Json(body)).into_response())
}

fn token_json(token: &TokenText) -> Value {
    json!({"token": token.token, "logprob": token.logprob, "bytes": token.bytes})
}

fn token_logprobs_json(token: &TokenLogprobs) -> Value {
    let mut value = token_json(&token.chosen);
    value["top_logprobs"] = Value::Array(token.top.iter().map(token_json).collect());
    value
}

/// OpenAI's chat `logprobs` object.
fn chat_logprobs(tokens: &[TokenLogprobs]) -> Value {
    json!({"content": tokens.iter().map(token_logprobs_json).collect::<Vec<_>>(), "refusal": Value::Null})
}

/// Shapes `chat.completion.chunk`s.
#[derive(Debug)]
struct ChatChunks {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
}

impl ChatChunks {
    fn chunk(&self, choices: Value, usage: Option<Usage>) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": Value::Null,
            "choices": choices,
        });
        if self.include_usage {
            chunk["usage"] = serde_json::to_value(usage).unwrap_or(Value::Null);
        }
        chunk
    }
}

impl ChunkFormat for ChatChunks {
    fn opening(&mut self) -> Vec<Value> {
        let choice = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": Value::Null, "finish_reason": Value::Null}]);
        vec![self.chunk(choice, None)]
    }

    fn delta(&mut self, text: &str, logprobs: Option<&TokenLogprobs>) -> Option<Value> {
        if text.is_empty() && logprobs.is_none() {
            return None;
        }
        let logprobs = logprobs.map(|token| chat_logprobs(std::slice::from_ref(token)));
        let choice = json!([{"index": 0, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": Value::Null}]);
        Some(self.chunk(choice, None))
    }

    fn finish(&mut self, finish: &Finish) -> Vec<Value> {
        let choice = json!([{"index": 0, "delta": {}, "logprobs": Value::Null, "finish_reason": finish.reason}]);
        let mut chunks = vec![self.chunk(choice, None)];
        if self.include_usage {
            chunks.push(self.chunk(json!([]), Some(Usage::from(finish.usage))));
        }
        chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_parts_are_joined_and_other_parts_refused() {
        let request: ChatRequest = serde_json::from_value(json!({
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
        }))
        .expect("parses");
        let messages = to_chat_messages(&request.messages).expect("text parts are fine");
        assert_eq!(messages[0].content, "ab");
        let image: ChatRequest = serde_json::from_value(json!({
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "image_url"}]}]
        }))
        .expect("parses");
        let error = to_chat_messages(&image.messages).expect_err("images are refused");
        assert_eq!(error.body()["error"]["param"], "messages");
    }

    #[test]
    fn usage_chunk_has_no_choices_and_counts_cached_tokens() {
        let mut format = ChatChunks {
            id: "chatcmpl-1".to_string(),
            model: "m".to_string(),
            created: 0,
            include_usage: true,
        };
        let chunks = format.finish(&Finish {
            reason: "stop",
            usage: crate::server::metrics::TokenUsage {
                prompt: 20,
                completion: 3,
                cached: 16,
            },
            text: String::new(),
        });
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[0]["usage"], Value::Null);
        assert_eq!(chunks[1]["choices"], json!([]));
        assert_eq!(chunks[1]["usage"]["total_tokens"], 23);
        assert_eq!(
            chunks[1]["usage"]["prompt_tokens_details"]["cached_tokens"],
            16
        );
    }
}
