//! Request types shared by the OpenAI endpoints: the JSON extractor that maps every body
//! rejection through [`ApiError`], the sampling fields both endpoints accept, and usage.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use skillkv_api::skills::{DETECTED_SKILLS_HEADER, parse_detected_skills};

use crate::engine::sampling::SamplingParams;
use crate::server::AppState;
use crate::server::errors::ApiError;
use crate::server::metrics::TokenUsage;
use crate::skills::SkillSelection;

/// `Json<T>` whose rejections (bad JSON, wrong types, too large) become [`ApiError`]s.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(rejection_error(&rejection, state.config.max_body_bytes)),
        }
    }
}

fn rejection_error(rejection: &JsonRejection, limit: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge { limit }
    } else {
        ApiError::BadRequest {
            message: rejection.body_text(),
            param: None,
        }
    }
}

/// One string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields both endpoints share (sampling, streaming, skills).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonFields {
    /// The model to use.
    pub model: String,
    /// Most tokens to generate.
    pub max_tokens: Option<usize>,
    /// Newer name of `max_tokens` (chat).
    pub max_completion_tokens: Option<usize>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    pub top_p: Option<f32>,
    /// Top-k sampling (extension).
    pub top_k: Option<i32>,
    /// Min-p sampling (extension).
    pub min_p: Option<f32>,
    /// Number of choices; only 1 is supported.
    pub n: Option<u32>,
    /// Seed of the sampler.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Option<OneOrMany>,
    /// Presence penalty.
    pub presence_penalty: Option<f32>,
    /// Frequency penalty.
    pub frequency_penalty: Option<f32>,
    /// Repetition penalty (extension).
    pub repetition_penalty: Option<f32>,
    /// Keep generating past end-of-sequence (extension).
    pub ignore_eos: Option<bool>,
    /// Stream server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Skills to use (skillkv extension): a list of names (`[]` for none) or `"auto"`.
    pub skills: Option<SkillsField>,
}

/// The `skills` request field.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SkillsField {
    /// `"auto"` (anything else is rejected).
    Keyword(String),
    /// Skill names.
    Names(Vec<String>),
}

impl CommonFields {
    /// Whether to stream.
    pub fn streaming(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether a streamed response ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .is_some_and(|options| options.include_usage)
    }

    /// Which skills the request wants: absent or `"auto"` means detection — the router's, when
    /// `detected_by_router` (the value of [`DETECTED_SKILLS_HEADER`]) is given, else this
    /// daemon's.
    pub fn skill_selection(
        &self,
        detected_by_router: Option<&HeaderValue>,
    ) -> Result<SkillSelection, ApiError> {
        let auto = || match detected_by_router {
            None => Ok(SkillSelection::Auto),
            Some(value) => value
                .to_str()
                .map(|value| SkillSelection::Routed(parse_detected_skills(value)))
                .map_err(|_| ApiError::BadRequest {
                    message: format!(
                        "the {DETECTED_SKILLS_HEADER} header must be comma-separated skill names"
                    ),
                    param: None,
                }),
        };
        match &self.skills {
            None => auto(),
            Some(SkillsField::Keyword(keyword)) if keyword == "auto" => auto(),
            Some(SkillsField::Keyword(other)) => Err(ApiError::bad_param(
                "skills",
                format!("`skills` must be a list of skill names or \"auto\", not \"{other}\""),
            )),
            Some(SkillsField::Names(names)) => Ok(SkillSelection::Named(names.clone())),
        }
    }

    /// Checks the request-level fields and builds the sampling parameters (ranges are checked
    /// by the engine when the request is submitted).
    pub fn sampling(
        &self,
        served_model: &str,
        top_logprobs: Option<usize>,
    ) -> Result<SamplingParams, ApiError> {
        if self.model != served_model {
            return Err(ApiError::ModelNotFound {
                model: self.model.clone(),
            });
        }
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::bad_param(
                "n",
                format!("n = {n} is not supported; only n = 1 is"),
            ));
        }
        let defaults = SamplingParams::default();
        let stop = match &self.stop {
            None => Vec::new(),
            Some(OneOrMany::One(stop)) => vec![stop.clone()],
            Some(OneOrMany::Many(stops)) => stops.clone(),
        };
        Ok(SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            seed: self.seed,
            presence_penalty: self.presence_penalty.unwrap_or(defaults.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(defaults.frequency_penalty),
            repetition_penalty: self
                .repetition_penalty
                .unwrap_or(defaults.repetition_penalty),
            max_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .unwrap_or(defaults.max_tokens),
            stop,
            logprobs: top_logprobs,
            ignore_eos: self.ignore_eos.unwrap_or(defaults.ignore_eos),
        })
    }
}

/// OpenAI's `usage`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
    /// Prompt detail: tokens served from the prefix cache.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

impl From<TokenUsage> for Usage {
    fn from(usage: TokenUsage) -> Self {
        Self {
            prompt_tokens: usage.prompt,
            completion_tokens: usage.completion,
            total_tokens: usage.prompt + usage.completion,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: usage.cached,
            },
        }
    }
}

/// Seconds since the Unix epoch, for `created`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}
