//! One generation as the endpoints see it: submits to the engine, turns engine events into
//! text deltas (with OpenAI-style logprobs) and a final finish record, enforces the request
//! timeout and records the latency and token metrics. Dropping it cancels the generation.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderName, HeaderValue};

use crate::engine::sampling::SamplingParams;
use crate::engine::tokenizer::GgufTokenizer;
use crate::engine::{
    FinishReason, GenerateRequest, GenerationEvent, GenerationStream, ModularSpan,
};
use crate::server::AppState;
use crate::server::errors::ApiError;
use crate::server::metrics::{Metrics, TokenUsage};
use crate::skills::{ResolvedSkill, SkillSelection, modular_spans};

/// Response header naming the cache mode and the skills used.
pub const CACHE_HEADER: &str = "x-skillkv-cache";

/// The skills a prompt was assembled with: for the cache header and per-skill accounting.
#[derive(Debug, Clone)]
pub struct PromptSkills {
    /// Each skill and the prompt-token range of its segment.
    pub skills: Vec<(ResolvedSkill, Range<usize>)>,
    /// How they were chosen: `named`, `detected` or `routed` ([`SkillSelection::label`]).
    pub selection: &'static str,
}

impl Default for PromptSkills {
    /// No skills, as named (`/v1/completions`).
    fn default() -> Self {
        Self {
            skills: Vec::new(),
            selection: SkillSelection::Named(Vec::new()).label(),
        }
    }
}

impl PromptSkills {
    /// The segments modular assembly serves from the skills' own KV (see
    /// [`crate::skills::assembly`]), each with its first `recompute` tokens computed in context.
    pub fn modular_spans(&self, recompute: usize) -> Vec<ModularSpan> {
        let skills: Vec<_> = self
            .skills
            .iter()
            .map(|(skill, span)| (skill.assembly, span.clone()))
            .collect();
        modular_spans(&skills, recompute)
    }

    /// The assembly mode that serves the prompt: `modular` when some segment is copied from a
    /// skill's own KV, `exact` (radix prefix reuse only) otherwise.
    pub fn mode(&self) -> &'static str {
        if self.modular_spans(0).is_empty() {
            "exact"
        } else {
            "modular"
        }
    }

    /// `x-skillkv-cache: mode=exact|modular; skills=a,b; selection=named|detected|routed;
    /// warm=a; cached=b` — the assembly mode (exact prefix reuse, or modular: later skills' own
    /// KV copied and re-rotated), the skills in prompt order, how they were chosen (named in the
    /// request, detected here, or detected by the router), which of them
    /// had pinned KV and which, not pinned, had their KV in the prefix cache from an earlier
    /// request ([`crate::skills::unpinned`]).
    pub fn cache_header(&self) -> (HeaderName, HeaderValue) {
        let list = |keep: fn(&ResolvedSkill) -> bool| {
            let names: Vec<&str> = self
                .skills
                .iter()
                .filter(|(s, _)| keep(s))
                .map(|(s, _)| s.name.as_str())
                .collect();
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(",")
            }
        };
        let names = list(|_| true);
        let warm = list(|s| s.warm);
        let cached = list(|s| s.cached);
        let selection = self.selection;
        let mode = self.mode();
        let value = format!(
            "mode={mode}; skills={names}; selection={selection}; warm={warm}; cached={cached}"
        );
        (
            HeaderName::from_static(CACHE_HEADER),
            HeaderValue::from_str(&value)
                .unwrap_or_else(|_| HeaderValue::from_static("mode=exact")),
        )
    }

    /// Counts one use of each skill, with the part of its segment that `cached_tokens` covered.
    fn record_use(&self, cached_tokens: usize) {
        for (skill, span) in &self.skills {
            let cached = cached_tokens.min(span.end).saturating_sub(span.start);
            skill.counters.record_use(cached);
        }
    }
}

/// A token's text, bytes and log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenText {
    /// The token as text (lossy for partial UTF-8).
    pub token: String,
    /// Its raw bytes.
    pub bytes: Vec<u8>,
    /// Its log-probability.
    pub logprob: f32,
}

/// Logprobs of one generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The chosen token.
    pub chosen: TokenText,
    /// The most likely alternatives.
    pub top: Vec<TokenText>,
}

/// What a generation yields next.
#[derive(Debug, Clone)]
pub enum Piece {
    /// New text (possibly empty while text is held back) and the token's logprobs when asked.
    Delta {
        /// Text.
        text: String,
        /// Logprobs, when requested.
        logprobs: Option<TokenLogprobs>,
    },
    /// The end.
    Finished(Finish),
}

/// How a generation ended.
#[derive(Debug, Clone)]
pub struct Finish {
    /// OpenAI's `finish_reason`.
    pub reason: &'static str,
    /// Token counts.
    pub usage: TokenUsage,
    /// Text released at the end.
    pub text: String,
}

/// A whole non-streamed generation.
#[derive(Debug, Clone)]
pub struct Collected {
    /// The full text.
    pub text: String,
    /// Per-token logprobs, when requested.
    pub logprobs: Option<Vec<TokenLogprobs>>,
    /// How it ended.
    pub finish: Finish,
}

/// A running generation.
#[derive(Debug)]
pub struct Generation {
    stream: GenerationStream,
    metrics: Arc<Metrics>,
    tokenizer: Arc<GgufTokenizer>,
    want_logprobs: bool,
    started: Instant,
    deadline: tokio::time::Instant,
    timeout: Duration,
    first_token: Option<Duration>,
    content_log: Option<String>,
    skills: PromptSkills,
}

impl Generation {
    /// Submits the prompt; overload and invalid parameters fail here, before any byte is sent.
    pub fn start(
        state: &AppState,
        request_id: &str,
        prompt_tokens: Vec<u32>,
        skills: PromptSkills,
        sampling: SamplingParams,
    ) -> Result<Self, ApiError> {
        let serving = state.serving()?;
        let want_logprobs = sampling.logprobs.is_some();
        let modular = skills.modular_spans(serving.skills.config().modular_recompute_tokens);
        let stream = serving.engine.submit_assembled(
            GenerateRequest {
                request_id: request_id.to_string(),
                prompt_tokens,
                sampling,
                adapter: None,
            },
            modular,
        )?;
        let timeout = state.config.request_timeout;
        Ok(Self {
            stream,
            metrics: state.metrics.clone(),
            tokenizer: serving.tokenizer.clone(),
            want_logprobs,
            started: Instant::now(),
            deadline: tokio::time::Instant::now() + timeout,
            timeout,
            first_token: None,
            content_log: state.config.log_content.then(String::new),
            skills,
        })
    }

    /// The `x-skillkv-cache` response header.
    pub fn cache_header(&self) -> (HeaderName, HeaderValue) {
        self.skills.cache_header()
    }

    /// The next piece; an error ends the generation.
    pub async fn next(&mut self) -> Result<Piece, ApiError> {
        loop {
            let event = tokio::time::timeout_at(self.deadline, self.stream.recv())
                .await
                .map_err(|_| ApiError::Timeout {
                    seconds: self.timeout.as_secs(),
                })?;
            match event {
                None => {
                    return Err(ApiError::Internal {
                        message: "the engine ended the generation without a result".to_string(),
                    });
                }
                Some(GenerationEvent::Started {
                    queue_time,
                    cached_tokens,
                    modular_tokens,
                }) => {
                    self.metrics.queue.observe(queue_time.as_secs_f64());
                    self.skills.record_use(cached_tokens);
                    tracing::debug!(
                        mode = self.skills.mode(),
                        cached_tokens,
                        modular_tokens,
                        "generation admitted"
                    );
                }
                Some(GenerationEvent::Token {
                    id,
                    logprob,
                    top_logprobs,
                    text,
                }) => {
                    if self.first_token.is_none() {
                        let ttft = self.started.elapsed();
                        self.metrics.ttft.observe(ttft.as_secs_f64());
                        self.first_token = Some(ttft);
                    }
                    if let Some(log) = &mut self.content_log {
                        log.push_str(&text);
                    }
                    let logprobs = self.want_logprobs.then(|| TokenLogprobs {
                        chosen: self.token_text(id, logprob),
                        top: top_logprobs
                            .iter()
                            .map(|&(id, logprob)| self.token_text(id, logprob))
                            .collect(),
                    });
                    return Ok(Piece::Delta { text, logprobs });
                }
                Some(GenerationEvent::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                    text,
                }) => {
                    let reason = match reason {
                        FinishReason::Length => "length",
                        FinishReason::Stop | FinishReason::Eos => "stop",
                        FinishReason::Cancelled => {
                            return Err(ApiError::Unavailable {
                                reason: "the generation was cancelled".to_string(),
                            });
                        }
                    };
                    let usage = TokenUsage {
                        prompt: prompt_tokens,
                        completion: completion_tokens,
                        cached: cached_tokens,
                    };
                    self.metrics.record_generation(
                        &usage,
                        self.started.elapsed(),
                        self.first_token,
                    );
                    if let Some(log) = &mut self.content_log {
                        log.push_str(&text);
                        tracing::debug!(completion = %log, "completion");
                    }
                    tracing::info!(
                        finish_reason = reason,
                        prompt_tokens,
                        completion_tokens,
                        cached_tokens,
                        "generation finished"
                    );
                    return Ok(Piece::Finished(Finish {
                        reason,
                        usage,
                        text,
                    }));
                }
                Some(GenerationEvent::Failed(error)) => {
                    tracing::warn!(%error, "generation failed");
                    return Err(error.into());
                }
            }
        }
    }

    /// Runs the generation to its end.
    pub async fn collect(mut self) -> Result<Collected, ApiError> {
        let mut text = String::new();
        let mut logprobs = self.want_logprobs.then(Vec::new);
        loop {
            match self.next().await? {
                Piece::Delta {
                    text: delta,
                    logprobs: token,
                } => {
                    text.push_str(&delta);
                    if let (Some(all), Some(token)) = (&mut logprobs, token) {
                        all.push(token);
                    }
                }
                Piece::Finished(finish) => {
                    text.push_str(&finish.text);
                    return Ok(Collected {
                        text,
                        logprobs,
                        finish,
                    });
                }
            }
        }
    }

    fn token_text(&self, id: u32, logprob: f32) -> TokenText {
        let bytes = self
            .tokenizer
            .token_bytes(id)
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        TokenText {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
            logprob,
        }
    }
}

/// Logs the prompt at debug level, only with `--log-content`.
pub fn log_prompt(state: &AppState, prompt: &str) {
    if state.config.log_content {
        tracing::debug!(prompt, "prompt");
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use skillkv_api::block_hash::HashNamespace;
    use skillkv_api::skills::SkillDocument;
    use skillkv_api::v1alpha1::Assembly;

    use super::*;
    use crate::skills::{SkillVersion, TokenizedSkill};

    fn skill(name: &str, assembly: Assembly) -> ResolvedSkill {
        let text = format!("---\nname: {name}\ndescription: d\n---\nbody\n");
        let document = SkillDocument::parse(Path::new("SKILL.md"), text).expect("parses");
        ResolvedSkill {
            name: name.to_string(),
            version: Arc::new(SkillVersion::new(
                document,
                TokenizedSkill {
                    rendered: String::new(),
                    tokens: Vec::new(),
                },
                HashNamespace::default().root(),
            )),
            warm: true,
            cached: false,
            assembly,
            counters: Arc::default(),
        }
    }

    fn header(skills: Vec<(ResolvedSkill, Range<usize>)>) -> String {
        let skills = PromptSkills {
            skills,
            ..PromptSkills::default()
        };
        let (name, value) = skills.cache_header();
        assert_eq!(name, CACHE_HEADER);
        value.to_str().expect("ascii").to_string()
    }

    #[test]
    fn the_cache_header_names_the_mode_that_serves_the_prompt() {
        let modular_later = header(vec![
            (skill("a", Assembly::Exact), 0..40),
            (skill("b", Assembly::Modular), 40..90),
        ]);
        assert_eq!(
            modular_later,
            "mode=modular; skills=a,b; selection=named; warm=a,b; cached=none"
        );
        // A modular first skill sits at position 0: its pinned KV is the exact prefix.
        let modular_first = header(vec![
            (skill("a", Assembly::Modular), 0..40),
            (skill("b", Assembly::Exact), 40..90),
        ]);
        assert!(modular_first.starts_with("mode=exact;"), "{modular_first}");
        assert!(header(Vec::new()).starts_with("mode=exact; skills=none"));
    }

    #[test]
    fn modular_spans_carry_the_recompute_setting() {
        let skills = PromptSkills {
            skills: vec![
                (skill("a", Assembly::Modular), 0..40),
                (skill("b", Assembly::Modular), 40..90),
            ],
            selection: "detected",
        };
        assert_eq!(
            skills.modular_spans(8),
            vec![ModularSpan {
                start: 40,
                len: 50,
                recompute: 8
            }]
        );
    }
}
