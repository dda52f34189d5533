//! Server-sent events on the wire: `data: <json>\n\n` frames, the closing `data: [DONE]\n\n`,
//! and for a stream that fails midway exactly one `data: {"error":...}\n\n` frame and then the
//! end. Each endpoint supplies a [`ChunkFormat`] that shapes its chunks.

use std::collections::VecDeque;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use serde_json::Value;

use crate::server::errors::ApiError;
use crate::server::openai::generate::{Finish, Generation, Piece, TokenLogprobs};

/// The last frame of a successful stream.
pub const DONE_FRAME: &[u8] = b"data: [DONE]\n\n";

/// One `data:` frame.
pub fn data_frame(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// How an endpoint shapes its streamed chunks.
pub trait ChunkFormat: Send + 'static {
    /// Chunks sent before the first token (chat: the role).
    fn opening(&mut self) -> Vec<Value>;
    /// The chunk of one delta, or `None` when it carries nothing.
    fn delta(&mut self, text: &str, logprobs: Option<&TokenLogprobs>) -> Option<Value>;
    /// The chunks that end the stream (finish reason, then usage when asked for).
    fn finish(&mut self, finish: &Finish) -> Vec<Value>;
}

struct StreamState<F> {
    generation: Option<Generation>,
    format: F,
    pending: VecDeque<Bytes>,
}

/// A streaming response driven by `generation`. Dropping the body (client gone) drops the
/// generation, which cancels it in the engine.
pub fn stream_response<F: ChunkFormat>(generation: Generation, mut format: F) -> Response {
    let (name, value) = generation.cache_header();
    let pending = format.opening().iter().map(data_frame).collect();
    let state = StreamState {
        generation: Some(generation),
        format,
        pending,
    };
    let frames = futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(frame) = state.pending.pop_front() {
                return Some((Ok::<_, std::convert::Infallible>(frame), state));
            }
            let generation = state.generation.as_mut()?;
            match generation.next().await {
                Ok(Piece::Delta { text, logprobs }) => {
                    if let Some(chunk) = state.format.delta(&text, logprobs.as_ref()) {
                        state.pending.push_back(data_frame(&chunk));
                    }
                }
                Ok(Piece::Finished(finish)) => {
                    if !finish.text.is_empty()
                        && let Some(chunk) = state.format.delta(&finish.text, None)
                    {
                        state.pending.push_back(data_frame(&chunk));
                    }
                    state
                        .pending
                        .extend(state.format.finish(&finish).iter().map(data_frame));
                    state.pending.push_back(Bytes::from_static(DONE_FRAME));
                    state.generation = None;
                }
                Err(error) => {
                    state.pending.push_back(error_frame(&error));
                    state.generation = None;
                }
            }
        }
    });
    let mut response = event_stream(frames);
    response.headers_mut().insert(name, value);
    response
}

/// A `text/event-stream` response whose body is `frames`.
pub fn event_stream<S>(frames: S) -> Response
where
    S: futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
{
    let mut response = Response::new(Body::from_stream(frames));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The single error frame of a stream that failed midway.
pub fn error_frame(error: &ApiError) -> Bytes {
    data_frame(&error.body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_follow_the_sse_wire_format() {
        let frame = data_frame(&serde_json::json!({"a": 1}));
        assert_eq!(&frame[..], b"data: {\"a\":1}\n\n");
        let error = error_frame(&ApiError::Timeout { seconds: 3 });
        let text = std::str::from_utf8(&error).expect("utf-8");
        assert!(text.starts_with("data: {\"error\":"));
        assert!(text.ends_with("}\n\n"));
        assert_eq!(text.matches("\n\n").count(), 1);
    }
}
