//! What the benchmark measures: one streamed request's sample (TTFT, warm skills, cached
//! tokens), the results per policy, and the table that sets them side by side with ratios to
//! round-robin.

use std::time::{Duration, Instant};

use axum::http::{Request, StatusCode, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use skillkv_daemon::cli::bench::percentile;
use skillkv_router::client::Upstream;
use skillkv_router::routing::Policy;

/// What one request saw.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    /// Seconds to the first generated text.
    pub ttft: f64,
    /// Skills the request named.
    pub skills: usize,
    /// Of those, the ones the serving daemon had pinned (`x-skillkv-cache: … warm=`).
    pub warm: usize,
    /// And the ones it had not pinned but found in its prefix cache (`… cached=`).
    pub cached: usize,
    /// `usage.prompt_tokens`.
    pub prompt_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`.
    pub cached_tokens: u64,
    /// No answer, an error status, or a stream that did not finish.
    pub failed: bool,
}

/// What one policy measured.
#[derive(Debug)]
pub struct PolicyResult {
    /// The routing policy.
    pub policy: Policy,
    /// One per request, in workload order.
    pub samples: Vec<Sample>,
    /// From the first request sent to the last answer.
    pub wall: Duration,
}

impl PolicyResult {
    pub fn ok(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(|s| !s.failed)
    }
    /// Skill uses whose KV the serving daemon held, pinned or cached.
    pub fn hit_rate(&self) -> f64 {
        self.share_of_skill_uses(|s| s.warm + s.cached)
    }
    /// Skill uses whose KV the serving daemon had pinned.
    pub fn pinned_hit_rate(&self) -> f64 {
        self.share_of_skill_uses(|s| s.warm)
    }
    fn share_of_skill_uses(&self, hits: impl Fn(&Sample) -> usize) -> f64 {
        let (hit, total) = self
            .ok()
            .fold((0, 0), |(h, t), s| (h + hits(s), t + s.skills));
        hit as f64 / total.max(1) as f64
    }
    pub fn cached_share(&self) -> f64 {
        let (cached, prompt) = self.ok().fold((0, 0), |(c, p), s| {
            (c + s.cached_tokens, p + s.prompt_tokens)
        });
        cached as f64 / prompt.max(1) as f64
    }
    pub fn ttft(&self, q: f64) -> f64 {
        let values: Vec<f64> = self.ok().map(|s| s.ttft).collect();
        percentile(&values, q)
    }
    pub fn rps(&self) -> f64 {
        self.ok().count() as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

pub fn policy_name(policy: Policy) -> &'static str {
    match policy {
        Policy::Locality => "locality",
        Policy::RoundRobin => "round-robin",
        Policy::LeastLoaded => "least-loaded",
    }
}

pub fn print_table(results: &[PolicyResult]) {
    let baseline = results.iter().find(|r| r.policy == Policy::RoundRobin);
    println!(
        "{:<13} {:>9} {:>10} {:>10} {:>11} {:>11} {:>8} {:>7}  vs round-robin (hit, TTFT p50, req/s)",
        "policy", "hit rate", "pinned hit", "cached tok", "TTFT p50", "TTFT p99", "req/s", "failed"
    );
    for result in results {
        let ratios = baseline.map_or_else(String::new, |base| {
            format!(
                "{:.2}x  {:.2}x  {:.2}x",
                result.hit_rate() / base.hit_rate().max(1e-9),
                result.ttft(0.5) / base.ttft(0.5).max(1e-9),
                result.rps() / base.rps().max(1e-9)
            )
        });
        println!(
            "{:<13} {:>8.1}% {:>9.1}% {:>9.1}% {:>8.1} ms {:>8.1} ms {:>8.2} {:>7}  {ratios}",
            policy_name(result.policy),
            result.hit_rate() * 100.0,
            result.pinned_hit_rate() * 100.0,
            result.cached_share() * 100.0,
            result.ttft(0.5) * 1e3,
            result.ttft(0.99) * 1e3,
            result.rps(),
            result.samples.iter().filter(|s| s.failed).count(),
        );
    }
}

/// How many skills the cache header's `key` list names.
fn header_list_len(cache: &str, key: &str) -> usize {
    cache
        .split(';')
        .find_map(|part| part.trim().strip_prefix(key))
        .map_or(0, |names| {
            names
                .split(',')
                .filter(|n| !n.is_empty() && *n != "none")
                .count()
        })
}

/// One streamed request: TTFT, the daemon's cache header and the final usage.
pub async fn one_request(http: Upstream, url: String, body: Value, skills: usize) -> Sample {
    let started = Instant::now();
    let mut sample = Sample {
        skills,
        failed: true,
        ..Sample::default()
    };
    let Ok(request) = Request::post(&url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
    else {
        return sample;
    };
    let Ok(Ok(response)) =
        tokio::time::timeout(Duration::from_secs(300), http.request(request)).await
    else {
        return sample;
    };
    if response.status() != StatusCode::OK {
        eprintln!("request failed: {}", response.status());
        return sample;
    }
    let cache = response
        .headers()
        .get("x-skillkv-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    sample.warm = header_list_len(&cache, "warm=");
    sample.cached = header_list_len(&cache, "cached=");
    // TTFT: the first event carrying generated text (the opening event only names the role),
    // or the finish event if every token decoded to nothing.
    let mut body = response.into_body();
    let (mut pending, mut first, mut done) = (String::new(), None, false);
    while let Some(Ok(frame)) = body.frame().await {
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.push_str(&String::from_utf8_lossy(data));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let data = event.trim().trim_start_matches("data: ");
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let Ok(value) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if let Some(error) = value.get("error") {
                eprintln!("request failed mid-stream: {error}");
            }
            let choice = &value["choices"][0];
            let text = choice["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty());
            if first.is_none() && (text || !choice["finish_reason"].is_null()) {
                first = Some(started.elapsed().as_secs_f64());
            }
            if let Some(usage) = value.get("usage").filter(|u| !u.is_null()) {
                sample.prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or(0);
                sample.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0);
            }
        }
    }
    sample.failed = first.is_none() || !done;
    sample.ttft = first.unwrap_or(f64::NAN);
    sample
}
