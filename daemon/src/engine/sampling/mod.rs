//! Sampling of the next token from the model's logits.
//!
//! Owns [`SamplingParams`] (the per-request knobs, OpenAI-style, with their validation) and
//! re-exports [`Sampler`], the per-sequence sampler with its own seeded random generator.

mod sampler;

pub use sampler::{SampledToken, Sampler};

/// Most `top_logprobs` a request may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// How to choose each generated token and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature in [0, 2]; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: i32,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`, in (0, 1].
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one, in [0, 1].
    pub min_p: f32,
    /// Seed of the sequence's random generator; `None` draws one.
    pub seed: Option<u64>,
    /// OpenAI presence penalty in [-2, 2], subtracted once from every token already generated.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty in [-2, 2], subtracted per earlier occurrence in the output.
    pub frequency_penalty: f32,
    /// Hugging Face / llama.cpp repetition penalty (> 0, 1 = off) over the whole context.
    pub repetition_penalty: f32,
    /// Most tokens to generate (≥ 1).
    pub max_tokens: usize,
    /// Strings that end the output (not included in it).
    pub stop: Vec<String>,
    /// Return the chosen token's logprob and this many top alternatives (≤ 20).
    pub logprobs: Option<usize>,
    /// Keep generating past the end-of-sequence token.
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            max_tokens: 256,
            stop: Vec::new(),
            logprobs: None,
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Params that always pick the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every parameter against its allowed range.
    pub fn validate(&self) -> Result<(), ValidateSamplingParamsError> {
        check_f32(
            "temperature",
            self.temperature,
            (0.0..=2.0).contains(&self.temperature),
            "in [0, 2]",
        )?;
        check_f32(
            "top_p",
            self.top_p,
            self.top_p > 0.0 && self.top_p <= 1.0,
            "in (0, 1]",
        )?;
        check_f32(
            "min_p",
            self.min_p,
            (0.0..=1.0).contains(&self.min_p),
            "in [0, 1]",
        )?;
        for (param, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            check_f32(param, value, (-2.0..=2.0).contains(&value), "in [-2, 2]")?;
        }
        check_f32(
            "repetition_penalty",
            self.repetition_penalty,
            self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite(),
            "> 0",
        )?;
        check("top_k", self.top_k, self.top_k >= 0, "≥ 0")?;
        check("max_tokens", self.max_tokens, self.max_tokens >= 1, "≥ 1")?;
        if let Some(top_logprobs) = self.logprobs {
            check(
                "logprobs",
                top_logprobs,
                top_logprobs <= MAX_TOP_LOGPROBS,
                "≤ 20",
            )?;
        }
        Ok(())
    }
}

/// A sampling parameter outside its allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{param}` = {value} is out of range: it must be {bound}")]
pub struct ValidateSamplingParamsError {
    /// The parameter's name, as in the OpenAI API.
    pub param: &'static str,
    /// The rejected value.
    pub value: String,
    /// The allowed range.
    pub bound: &'static str,
}

fn check(
    param: &'static str,
    value: impl std::fmt::Display,
    valid: bool,
    bound: &'static str,
) -> Result<(), ValidateSamplingParamsError> {
    if valid {
        Ok(())
    } else {
        Err(ValidateSamplingParamsError {
            param,
            value: value.to_string(),
            bound,
        })
    }
}

/// Like [`check`]; NaN fails every range.
fn check_f32(
    param: &'static str,
    value: f32,
    valid: bool,
    bound: &'static str,
) -> Result<(), ValidateSamplingParamsError> {
    check(param, value, valid && !value.is_nan(), bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(params: SamplingParams) -> ValidateSamplingParamsError {
        params.validate().expect_err("params must be rejected")
    }

    #[test]
    fn defaults_and_greedy_are_valid() {
        assert_eq!(SamplingParams::default().validate(), Ok(()));
        assert_eq!(SamplingParams::greedy().validate(), Ok(()));
    }

    #[test]
    fn each_out_of_range_param_is_named_with_its_bound() {
        let base = SamplingParams::default;
        let cases = [
            (
                SamplingParams {
                    temperature: 2.5,
                    ..base()
                },
                "temperature",
                "in [0, 2]",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..base()
                },
                "temperature",
                "in [0, 2]",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..base()
                },
                "top_p",
                "in (0, 1]",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..base()
                },
                "top_p",
                "in (0, 1]",
            ),
            (
                SamplingParams {
                    top_k: -1,
                    ..base()
                },
                "top_k",
                "≥ 0",
            ),
            (
                SamplingParams {
                    min_p: -0.1,
                    ..base()
                },
                "min_p",
                "in [0, 1]",
            ),
            (
                SamplingParams {
                    presence_penalty: 2.1,
                    ..base()
                },
                "presence_penalty",
                "in [-2, 2]",
            ),
            (
                SamplingParams {
                    frequency_penalty: -3.0,
                    ..base()
                },
                "frequency_penalty",
                "in [-2, 2]",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..base()
                },
                "repetition_penalty",
                "> 0",
            ),
            (
                SamplingParams {
                    logprobs: Some(21),
                    ..base()
                },
                "logprobs",
                "≤ 20",
            ),
            (
                SamplingParams {
                    max_tokens: 0,
                    ..base()
                },
                "max_tokens",
                "≥ 1",
            ),
        ];
        for (params, param, bound) in cases {
            let error = rejected(params);
            assert_eq!((error.param, error.bound), (param, bound), "{error}");
            assert!(error.to_string().contains(param), "{error}");
        }
    }

    #[test]
    fn boundary_values_are_accepted() {
        let params = SamplingParams {
            temperature: 2.0,
            top_p: 1.0,
            min_p: 1.0,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            logprobs: Some(20),
            max_tokens: 1,
            ..SamplingParams::default()
        };
        assert_eq!(params.validate(), Ok(()));
    }
}
