//! `POST /v1/completions`: a text or token-list prompt, answered in OpenAI's `text_completion`
//! shape (legacy logprobs included), streamed or not.

use axum::Extension;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::server::AppState;
use crate::server::errors::ApiError;
use crate::server::openai::generate::{
    Finish, Generation, PromptSkills, TokenLogprobs, log_prompt,
};
use crate::server::openai::sse::{ChunkFormat, stream_response};
use crate::server::openai::types::{ApiJson, CommonFields, SkillsField, Usage, unix_now};
use crate::server::request_id::RequestId;

/// The request body.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// Alternatives per token, and the chosen tokens' logprobs.
    pub logprobs: Option<usize>,
    /// Echo the prompt back (unsupported).
    pub echo: Option<bool>,
    /// Candidates to pick from (only 1).
    pub best_of: Option<u32>,
    /// Text after the completion (unsupported).
    pub suffix: Option<String>,
    /// Sampling and the rest.
    #[serde(flatten)]
    pub common: CommonFields,
}

/// A prompt: text or token ids, alone or in a one-element list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// A list of texts.
    Texts(Vec<String>),
    /// A list of token-id lists.
    TokenLists(Vec<Vec<u32>>),
}

impl CompletionRequest {
    /// Refuses what this server does not do.
    fn check_supported(&self) -> Result<(), ApiError> {
        if self.echo == Some(true) {
            return Err(ApiError::bad_param("echo", "`echo` is not supported"));
        }
        if let Some(best_of) = self.best_of.filter(|&best_of| best_of != 1) {
            return Err(ApiError::bad_param(
                "best_of",
                format!("best_of = {best_of} is not supported; only 1 is"),
            ));
        }
        if self
            .suffix
            .as_ref()
            .is_some_and(|suffix| !suffix.is_empty())
        {
            return Err(ApiError::bad_param("suffix", "`suffix` is not supported"));
        }
        Ok(())
    }
}

fn one_prompt<T: Clone>(prompts: &[T]) -> Result<T, ApiError> {
    match prompts {
        [prompt] => Ok(prompt.clone()),
        _ => Err(ApiError::bad_param(
            "prompt",
            "exactly one prompt per request is supported",
        )),
    }
}

/// `POST /v1/completions`.
pub async fn create(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let serving = state.serving()?;
    request.check_supported()?;
    let sampling = request
        .common
        .sampling(&serving.info.id, request.logprobs)?;
    let encode = |text: &str| {
        log_prompt(&state, text);
        serving
            .tokenizer
            .encode(text)
            .map_err(|error| ApiError::bad_param("prompt", error.to_string()))
    };
    let prompt_tokens = match &request.prompt {
        Prompt::Text(text) => encode(text)?,
        Prompt::Tokens(tokens) => tokens.clone(),
        Prompt::Texts(texts) => encode(&one_prompt(texts)?)?,
        Prompt::TokenLists(lists) => one_prompt(lists)?,
    };
    // Skills are chat messages; a raw completion prompt gets none, and asking for some is an
    // error rather than a silent no-op.
    if let Some(SkillsField::Names(names)) = &request.common.skills
        && !names.is_empty()
    {
        return Err(ApiError::bad_param(
            "skills",
            "skills apply to /v1/chat/completions only; send no `skills` to /v1/completions",
        ));
    }
    let generation = Generation::start(
        &state,
        &request_id,
        prompt_tokens,
        PromptSkills::default(),
        sampling,
    )?;
    let header = generation.cache_header();
    let mut format = CompletionChunks {
        id: format!("cmpl-{request_id}"),
        model: serving.info.id.clone(),
        created: unix_now(),
        include_usage: request.common.include_usage(),
        text_offset: 0,
    };
    if request.common.streaming() {
        return Ok(stream_response(generation, format));
    }
    let collected = generation.collect().await?;
    let logprobs = collected
        .logprobs
        .as_deref()
        .map(|tokens| format.legacy_logprobs(tokens));
    let body = json!({
        "id": format.id,
        "object": "text_completion",
        "created": format.created,
        "model": format.model,
        "system_fingerprint": Value::Null,
        "choices": [{
            "index": 0,
            "text": collected.text,
            "logprobs": logprobs,
            "finish_reason": collected.finish.reason,
        }],
        "usage": Usage::from(collected.finish.usage),
    });
    Ok(([header], axum::Json(body)).into_response())
}

/// Shapes `text_completion` chunks.
#[derive(Debug)]
struct CompletionChunks {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    /// Characters of completion text before the next token.
    text_offset: usize,
}

impl CompletionChunks {
    fn chunk(
        &self,
        text: &str,
        logprobs: Option<Value>,
        finish_reason: Option<&str>,
        usage: Option<Usage>,
    ) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": Value::Null,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
        });
        if self.include_usage {
            chunk["usage"] = serde_json::to_value(usage).unwrap_or(Value::Null);
        }
        chunk
    }

    /// OpenAI's legacy `logprobs`: parallel lists of tokens, logprobs, alternatives, offsets.
    fn legacy_logprobs(&mut self, tokens: &[TokenLogprobs]) -> Value {
        let mut offsets = Vec::with_capacity(tokens.len());
        for token in tokens {
            offsets.push(self.text_offset);
            self.text_offset += token.chosen.token.chars().count();
        }
        let top: Vec<Value> = tokens
            .iter()
            .map(|token| {
                let alternatives: Map<String, Value> = token
                    .top
                    .iter()
                    .map(|alt| (alt.token.clone(), json!(alt.logprob)))
                    .collect();
                Value::Object(alternatives)
            })
            .collect();
        json!({
            "tokens": tokens.iter().map(|t| t.chosen.token.clone()).collect::<Vec<_>>(),
            "token_logprobs": tokens.iter().map(|t| t.chosen.logprob).collect::<Vec<_>>(),
            "top_logprobs": top,
            "text_offset": offsets,
        })
    }
}

impl ChunkFormat for CompletionChunks {
    fn opening(&mut self) -> Vec<Value> {
        Vec::new()
    }

    fn delta(&mut self, text: &str, logprobs: Option<&TokenLogprobs>) -> Option<Value> {
        if text.is_empty() && logprobs.is_none() {
            return None;
        }
        let logprobs = logprobs.map(|token| self.legacy_logprobs(std::slice::from_ref(token)));
        Some(self.chunk(text, logprobs, None, None))
    }

    fn finish(&mut self, finish: &Finish) -> Vec<Value> {
        let mut chunks = vec![self.chunk("", None, Some(finish.reason), None)];
        if self.include_usage {
            let mut usage_chunk = self.chunk("", None, None, Some(Usage::from(finish.usage)));
            usage_chunk["choices"] = json!([]);
            chunks.push(usage_chunk);
        }
        chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_parse_as_text_or_tokens() {
        let parse = |prompt: Value| -> CompletionRequest {
            serde_json::from_value(json!({"model": "m", "prompt": prompt})).expect("parses")
        };
        assert!(matches!(parse(json!("hi")).prompt, Prompt::Text(_)));
        assert!(matches!(parse(json!([1, 2])).prompt, Prompt::Tokens(ref t) if t == &[1, 2]));
        assert!(matches!(parse(json!(["a"])).prompt, Prompt::Texts(_)));
        assert!(matches!(parse(json!([[3]])).prompt, Prompt::TokenLists(_)));
        assert!(one_prompt(&["a".to_string(), "b".to_string()]).is_err());
    }

    #[test]
    fn echo_is_refused_with_its_param() {
        let request: CompletionRequest =
            serde_json::from_value(json!({"model": "m", "prompt": "x", "echo": true}))
                .expect("parses");
        let error = request.check_supported().expect_err("echo is unsupported");
        assert_eq!(error.body()["error"]["param"], "echo");
    }
}
