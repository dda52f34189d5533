//! Router overhead: the same chat request sent straight to a backend that answers at once and
//! through the router in front of it, interleaved, one at a time on kept-alive connections.
//! The added latency (through the router minus direct, at p50 and p99) is what the router costs
//! a client; the router's own histogram (`skillkv_router_overhead_seconds`: arrival to the
//! upstream request) is printed next to it.

use std::time::Instant;

use axum::Json;
use axum::routing::{get, post};
use serde_json::{Value, json};
use skillkv_daemon::cli::bench::percentile;
use skillkv_daemon::cli::bench::skills::workload;
use skillkv_router::BackendConfig;
use skillkv_router::routing::RoutingConfig;

use crate::real::{client, sample_value};
use crate::{BenchResult, metrics_text, post_json, start_router, wait_router_healthy};

async fn answer() -> Json<Value> {
    Json(
        json!({"id": "chatcmpl-0", "object": "chat.completion", "created": 0, "model": "instant",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 120, "completion_tokens": 1, "total_tokens": 121}}),
    )
}

async fn models() -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": "instant", "object": "model", "created": 0, "owned_by": "bench"}]}),
    )
}

/// Fraction of the router's overhead observations at or below `le` seconds.
fn histogram_share(metrics: &str, le: &str) -> Option<f64> {
    let below = sample_value(
        metrics,
        &format!("skillkv_router_overhead_seconds_bucket{{le=\"{le}\"}}"),
    )?;
    let count = sample_value(metrics, "skillkv_router_overhead_seconds_count")?;
    Some(below / count.max(1.0))
}

/// Measures and prints the router's overhead over `requests` requests.
pub async fn measure(requests: usize) -> BenchResult<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let backend = format!("http://{}", listener.local_addr()?);
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(answer))
        .route("/v1/models", get(models));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (api, health, stop) = start_router(
        vec![BackendConfig::without_admin(&backend)],
        RoutingConfig::default(),
    )
    .await?;
    let http = client();
    wait_router_healthy(&http, &health, 1).await?;
    let question = workload(4, 1, 1.1, 1).remove(0).question;
    let body = json!({"model": "instant", "max_tokens": 8, "skills": ["skill-00", "skill-01"],
        "messages": [{"role": "user", "content": question}]});
    let direct_url = format!("{backend}/v1/chat/completions");
    let router_url = format!("{api}/v1/chat/completions");
    let warmup = (requests / 10).max(50);
    let (mut direct, mut routed) = (Vec::new(), Vec::new());
    for index in 0..warmup + requests {
        for (url, into) in [(&direct_url, &mut direct), (&router_url, &mut routed)] {
            let started = Instant::now();
            let (status, _, _) = post_json(&http, url, &body).await?;
            let elapsed = started.elapsed().as_secs_f64();
            if !status.is_success() {
                return Err(format!("{url}: {status}").into());
            }
            if index >= warmup {
                into.push(elapsed);
            }
        }
    }
    let metrics = metrics_text(&http, &health).await?;
    drop(stop);
    let ms = |values: &[f64], q: f64| percentile(values, q) * 1e3;
    println!(
        "router overhead against an instant backend ({requests} requests each, sequential, interleaved):"
    );
    println!(
        "  direct        p50 {:.3} ms  p99 {:.3} ms\n  via router    p50 {:.3} ms  p99 {:.3} ms\n  added         p50 {:.3} ms  p99 {:.3} ms  (targets p50 < 1 ms: {}; p99 < 5 ms: {})",
        ms(&direct, 0.5),
        ms(&direct, 0.99),
        ms(&routed, 0.5),
        ms(&routed, 0.99),
        ms(&routed, 0.5) - ms(&direct, 0.5),
        ms(&routed, 0.99) - ms(&direct, 0.99),
        crate::met(ms(&routed, 0.5) - ms(&direct, 0.5) < 1.0),
        crate::met(ms(&routed, 0.99) - ms(&direct, 0.99) < 5.0),
    );
    if let (Some(under_1ms), Some(under_5ms)) = (
        histogram_share(&metrics, "0.001"),
        histogram_share(&metrics, "0.005"),
    ) {
        println!(
            "  router-side (arrival to upstream request): {:.1}% under 1 ms, {:.1}% under 5 ms",
            under_1ms * 100.0,
            under_5ms * 100.0
        );
    }
    Ok(())
}
