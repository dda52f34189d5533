//! The text side of a generating sequence: streaming detokenization and stop strings, applied
//! on the engine thread so that a stop string ends generation at once.

use std::sync::Arc;

use crate::engine::detokenize::StreamDecoder;
use crate::engine::stop::StopMatcher;
use crate::engine::tokenizer::GgufTokenizer;

/// What one generated token adds to the text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextDelta {
    /// Text that can be shown now (possibly empty).
    pub text: String,
    /// Whether a stop string ended the output with this token.
    pub stopped: bool,
}

/// Detokenizer and stop matcher of one sequence.
#[derive(Debug)]
pub struct TextState {
    tokenizer: Arc<GgufTokenizer>,
    decoder: StreamDecoder,
    stops: StopMatcher,
}

impl TextState {
    /// Text state for a sequence with these stop strings.
    pub fn new(tokenizer: Arc<GgufTokenizer>, stops: &[String]) -> Self {
        Self {
            tokenizer,
            decoder: StreamDecoder::new(),
            stops: StopMatcher::new(stops),
        }
    }

    /// Adds a generated token.
    pub fn push(&mut self, token: u32) -> TextDelta {
        let decoded = self.decoder.push(&self.tokenizer, token);
        let out = self.stops.push(&decoded);
        TextDelta {
            text: out.text,
            stopped: out.stopped_by.is_some(),
        }
    }

    /// Ends the stream: the text still held back (an incomplete character, or a tail that
    /// might have become a stop string), cut at a stop string if one completes now.
    pub fn finish(&mut self) -> TextDelta {
        if self.stops.is_stopped() {
            return TextDelta::default();
        }
        let tail = self.decoder.finish();
        let mut out = self.stops.push(&tail);
        out.text.push_str(&self.stops.finish());
        TextDelta {
            text: out.text,
            stopped: out.stopped_by.is_some(),
        }
    }
}
