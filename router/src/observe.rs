//! The response body on its way back to the client: passed through frame by frame as it
//! arrives (never buffered), while the router watches it for the token usage to charge to rate
//! limits. When it ends — completed, failed, or dropped because the client left — the request's
//! latency is recorded and its in-flight slot and concurrency slots are released. A stream
//! whose daemon fails midway ends with one OpenAI error event, never a silent cut.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use serde_json::Value;
use skillkv_api::openai_error::ErrorBody;

use crate::fleet::InFlight;
use crate::fleet::sse::SseParser;
use crate::metrics::RouterMetrics;
use crate::ratelimit::Admission;

/// Most bytes of a non-streamed answer kept to read its usage.
const MAX_KEPT_BYTES: usize = 1 << 20;

/// Reads token usage out of a response as it passes.
#[derive(Debug)]
pub struct UsageScanner {
    streaming: bool,
    sse: SseParser,
    kept: Vec<u8>,
    usage: Option<u64>,
    chunks: u64,
    prompt_estimate: u64,
}

fn usage_total(value: &Value) -> Option<u64> {
    let usage = value.get("usage")?;
    let prompt = usage.get("prompt_tokens").and_then(Value::as_u64)?;
    let completion = usage
        .get("completion_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Some(prompt + completion)
}

impl UsageScanner {
    /// A scanner for an SSE (`streaming`) or JSON answer; `prompt_estimate` stands in for the
    /// prompt's tokens when the answer reports no usage.
    pub fn new(streaming: bool, prompt_estimate: u64) -> Self {
        Self {
            streaming,
            sse: SseParser::default(),
            kept: Vec::new(),
            usage: None,
            chunks: 0,
            prompt_estimate,
        }
    }

    /// Looks at one chunk of the body.
    pub fn feed(&mut self, data: &[u8]) {
        if self.streaming {
            for event in self.sse.feed(data) {
                let Ok(value) = serde_json::from_str::<Value>(&event.data) else {
                    continue;
                };
                if let Some(total) = usage_total(&value) {
                    self.usage = Some(total);
                } else if value.get("choices").is_some() {
                    self.chunks += 1;
                }
            }
        } else if self.kept.len() + data.len() <= MAX_KEPT_BYTES {
            self.kept.extend_from_slice(data);
        }
    }

    /// Prompt plus completion tokens: the reported usage, or an estimate (the prompt estimate
    /// plus one token per streamed chunk).
    pub fn tokens(&self) -> u64 {
        if !self.streaming
            && let Some(total) = serde_json::from_slice::<Value>(&self.kept)
                .ok()
                .as_ref()
                .and_then(usage_total)
        {
            return total;
        }
        self.usage.unwrap_or(self.prompt_estimate + self.chunks)
    }
}

/// What to settle when the body ends.
#[derive(Debug)]
pub struct Settlement {
    /// The rate-limit admission to charge and release.
    pub admission: Option<Admission>,
    /// The pod's in-flight slot.
    pub in_flight: InFlight,
    /// Metrics to record latency in.
    pub metrics: Arc<RouterMetrics>,
    /// The request's model.
    pub model: String,
    /// When the request arrived.
    pub started: Instant,
}

/// The observed response body.
#[derive(Debug)]
pub struct ObservedBody {
    inner: Body,
    scanner: UsageScanner,
    settlement: Option<Settlement>,
    done: bool,
}

impl ObservedBody {
    /// Wraps `inner`.
    pub fn new(inner: Body, scanner: UsageScanner, settlement: Settlement) -> Self {
        Self {
            inner,
            scanner,
            settlement: Some(settlement),
            done: false,
        }
    }

    fn settle(&mut self) {
        let Some(settlement) = self.settlement.take() else {
            return;
        };
        let now = Instant::now();
        if let Some(admission) = &settlement.admission {
            admission.charge_tokens(self.scanner.tokens(), now);
        }
        settlement
            .metrics
            .latency
            .with_label_values(&[settlement.model.as_str()])
            .observe(now.duration_since(settlement.started).as_secs_f64());
    }
}

/// The SSE event that ends a stream whose daemon failed midway.
fn stream_error_frame() -> Bytes {
    let body = ErrorBody::new(
        "the backend serving this stream failed before it finished",
        "server_error",
        None,
        Some("backend_failed"),
    );
    let json = serde_json::to_string(&body).unwrap_or_else(|_| "{}".to_string());
    Bytes::from(format!("data: {json}\n\n"))
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.scanner.feed(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                tracing::warn!(%error, "the backend failed mid-response");
                this.settle();
                this.done = true;
                if this.scanner.streaming {
                    Poll::Ready(Some(Ok(Frame::data(stream_error_frame()))))
                } else {
                    Poll::Ready(Some(Err(error)))
                }
            }
            Poll::Ready(None) => {
                this.done = true;
                this.settle();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        if self.done {
            SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        }
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        self.settle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_usage_wins_over_the_chunk_estimate() {
        let mut scanner = UsageScanner::new(true, 10);
        scanner.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choi");
        scanner.feed(b"ces\":[{\"delta\":{\"content\":\"b\"}}]}\n\n");
        assert_eq!(scanner.tokens(), 12);
        scanner.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":30,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n");
        assert_eq!(scanner.tokens(), 32);
    }

    #[test]
    fn json_answers_report_their_usage() {
        let mut scanner = UsageScanner::new(false, 10);
        scanner.feed(br#"{"choices":[],"usage":{"prompt_tokens":7,"#);
        scanner.feed(br#""completion_tokens":5,"total_tokens":12}}"#);
        assert_eq!(scanner.tokens(), 12);
        let mut unreadable = UsageScanner::new(false, 10);
        unreadable.feed(b"not json");
        assert_eq!(unreadable.tokens(), 10);
    }

    #[test]
    fn the_stream_error_frame_is_an_openai_error_event() {
        let frame = stream_error_frame();
        let text = std::str::from_utf8(&frame).expect("utf-8");
        let json: Value =
            serde_json::from_str(text.trim_start_matches("data: ").trim()).expect("json");
        assert_eq!(json["error"]["type"], "server_error");
        assert!(text.ends_with("\n\n"));
    }
}
