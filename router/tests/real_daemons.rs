//! The router in front of real daemons (the daemon library on the tiny synthetic model, each in
//! its own runtime, on loopback): requests land on the daemon that holds their skill, pinned or
//! cached by an earlier request; a daemon
//! killed mid-run has its new requests rerouted and its in-flight stream ended with an error
//! event, and nothing hangs; rate limits answer 429 with their headers and recover. Every wait
//! has a deadline.

mod common;
mod real;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use skillkv_api::v1alpha1::Assembly;
use skillkv_daemon::engine::testing::TinyModelSpec;
use skillkv_router::RouterConfig;
use skillkv_router::ratelimit::RateLimiter;
use skillkv_router::routing::{Policy, RoutingConfig};

use crate::common::{TestRouter, body_text, config};
use crate::real::{
    DaemonOptions, RealDaemon, client, skill_markdown, within, write_model, write_skills,
};

/// The whole of any one test.
const TEST_LIMIT: Duration = Duration::from_secs(60);
/// Any one request.
const REQUEST_LIMIT: Duration = Duration::from_secs(20);

fn header(response: &axum::http::Response<hyper::body::Incoming>, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// A skill body of `sentences` sentences about `topic` (several 16-token blocks).
fn body(topic: &str, sentences: usize) -> String {
    (0..sentences)
        .map(|i| format!("Rule {i} about {topic}: check the {topic} carefully. "))
        .collect()
}

fn chat(
    model: &str,
    question: &str,
    skills: Option<&[&str]>,
    stream: bool,
    max_tokens: usize,
) -> Value {
    let mut request = json!({
        "model": model,
        "stream": stream,
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": question}],
    });
    if let Some(skills) = skills {
        request["skills"] = json!(skills);
    }
    request
}

/// Starts one daemon per skills list and waits until each is ready.
async fn daemons(
    model: &std::path::Path,
    dir: &std::path::Path,
    skills: &[&[(&str, &str, &str)]],
) -> Vec<RealDaemon> {
    let started: Vec<RealDaemon> = skills
        .iter()
        .enumerate()
        .map(|(index, skills)| {
            let mut options = DaemonOptions::new(model);
            if !skills.is_empty() {
                let folder = dir.join(format!("skills-{index}"));
                write_skills(&folder, skills);
                options.skills_dir = Some(folder);
            }
            RealDaemon::start(&options)
        })
        .collect();
    let http = client();
    for daemon in &started {
        daemon.wait_ready(&http, Duration::from_secs(30)).await;
    }
    started
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_land_on_the_daemon_that_holds_their_skill() {
    within(TEST_LIMIT, "the test", async {
        let dir = tempfile::tempdir().expect("temp dir");
        let model = write_model(dir.path(), "tiny", &TinyModelSpec::default());
        let alpha_body = body("caches", 8);
        let beta_body = body("queues", 8);
        let gamma_body = body("kernels", 8);
        let skills: [&[(&str, &str, &str)]; 3] = [
            &[("alpha", "eviction of cache blocks", &alpha_body)],
            &[("beta", "backpressure in message queues", &beta_body)],
            &[("gamma", "tiling of matmul kernels", &gamma_body)],
        ];
        let fleet = daemons(&model, dir.path(), &skills).await;
        let router =
            TestRouter::start(config(fleet.iter().map(RealDaemon::backend).collect())).await;
        router.wait_healthy(3).await;
        router
            .wait_for("every daemon's skill to be known", |fleet| {
                fleet
                    .pods()
                    .iter()
                    .all(|pod| !pod.state().skills.is_empty())
            })
            .await;
        let http = client();
        for (daemon, name) in fleet.iter().zip(["alpha", "beta", "gamma"]) {
            let state = daemon.state(&http).await;
            let skill_tokens = state.skills[0].tokens;
            for stream in [false, true] {
                let response = within(
                    REQUEST_LIMIT,
                    "a chat request",
                    router.post(
                        "/v1/chat/completions",
                        chat(
                            "tiny",
                            "What should I check first?",
                            Some(&[name]),
                            stream,
                            4,
                        ),
                        &[],
                    ),
                )
                .await;
                assert_eq!(response.status(), StatusCode::OK, "{name}");
                assert_eq!(
                    header(&response, "x-skillkv-backend"),
                    daemon.name(),
                    "{name}"
                );
                assert_eq!(header(&response, "x-skillkv-route"), "skill-hit", "{name}");
                // The daemon itself reports the skill's pinned KV as used.
                let cache = header(&response, "x-skillkv-cache");
                assert!(cache.contains(&format!("warm={name}")), "{name}: {cache}");
                let text = within(REQUEST_LIMIT, "the body", body_text(response)).await;
                if stream {
                    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
                } else {
                    let answer: Value = serde_json::from_str(&text).expect("json");
                    let cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .expect("cached tokens");
                    assert!(
                        cached >= (skill_tokens as u64 / 16) * 16 && cached > 0,
                        "{name}: {cached} cached of a {skill_tokens}-token skill"
                    );
                }
            }
        }
        // Without `skills`, the router detects the skill in the text and hands it to the daemon.
        let response = within(
            REQUEST_LIMIT,
            "a detected request",
            router.post(
                "/v1/chat/completions",
                chat(
                    "tiny",
                    "How do I stop backpressure in message queues?",
                    None,
                    false,
                    4,
                ),
                &[],
            ),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header(&response, "x-skillkv-backend"), fleet[1].name());
        let cache = header(&response, "x-skillkv-cache");
        assert!(
            cache.contains("selection=routed") && cache.contains("warm=beta"),
            "{cache}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpinned_skill_draws_its_requests_to_the_daemon_that_cached_it() {
    within(TEST_LIMIT, "the test", async {
        let dir = tempfile::tempdir().expect("temp dir");
        let model = write_model(dir.path(), "tiny", &TinyModelSpec::default());
        let fleet = daemons(&model, dir.path(), &[&[], &[], &[]]).await;
        // Every daemon knows both skills and pins neither (as for a Skill whose replicas the
        // budget could not place).
        let skills: Vec<(String, String, i32, bool)> = [("alpha", "caches"), ("delta", "sockets")]
            .iter()
            .map(|(name, topic)| {
                let text = skill_markdown(name, &format!("about {topic}"), &body(topic, 8));
                (name.to_string(), text, 0, false)
            })
            .collect();
        let http = client();
        for daemon in &fleet {
            daemon
                .put_desired(&http, 1, &skills, Assembly::Modular)
                .await;
            daemon
                .wait_skills_settled(&http, Duration::from_secs(30))
                .await;
        }
        let router =
            TestRouter::start(config(fleet.iter().map(RealDaemon::backend).collect())).await;
        router.wait_healthy(3).await;
        router
            .wait_for("every daemon's skills to be known", |fleet| {
                fleet.pods().iter().all(|pod| pod.state().skills.len() == 2)
            })
            .await;

        let ask = |skills: &'static [&'static str]| {
            router.post(
                "/v1/chat/completions",
                chat("tiny", "What should I check first?", Some(skills), false, 2),
                &[],
            )
        };
        // delta is warm nowhere: hashing picks a daemon, which prefills it on its own.
        let first = within(REQUEST_LIMIT, "the first request", ask(&["delta"])).await;
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(header(&first, "x-skillkv-route"), "hash");
        assert!(header(&first, "x-skillkv-cache").ends_with("warm=none; cached=none"));
        let holder = header(&first, "x-skillkv-backend");
        router
            .wait_for("the holder's delta blocks to reach the router", |fleet| {
                fleet.pods().iter().any(|pod| {
                    let state = pod.state();
                    pod.backend.name == holder
                        && state.skills["delta"]
                            .last_block
                            .is_some_and(|block| state.prefix.contains(&block))
                })
            })
            .await;
        // A request for another skill set that includes delta goes where delta's KV is, and
        // that daemon copies it from its cache.
        let second = within(
            REQUEST_LIMIT,
            "the second request",
            ask(&["alpha", "delta"]),
        )
        .await;
        assert_eq!(second.status(), StatusCode::OK);
        assert_eq!(header(&second, "x-skillkv-backend"), holder);
        assert_eq!(header(&second, "x-skillkv-route"), "skill-hit");
        let cache = header(&second, "x-skillkv-cache");
        assert!(
            cache.starts_with("mode=modular;") && cache.ends_with("warm=none; cached=delta"),
            "{cache}"
        );
    })
    .await;
}

/// Wider and deeper than the default tiny model, so a 1500-token answer takes far longer than
/// the few milliseconds a test needs to act while it streams.
fn slow_spec() -> TinyModelSpec {
    TinyModelSpec {
        n_layers: 4,
        hidden: 128,
        ffn: 256,
        context_length: 2048,
        ..TinyModelSpec::default()
    }
}

/// An `x-ratelimit-reset-*` value (`250ms`, `1.5s`) as a duration.
fn reset_duration(value: &str) -> Duration {
    if let Some(millis) = value.strip_suffix("ms") {
        Duration::from_millis(millis.parse().expect("milliseconds"))
    } else {
        let seconds = value.strip_suffix('s').expect("a unit");
        Duration::from_secs_f64(seconds.parse().expect("seconds"))
    }
}

fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemon_ends_its_stream_with_an_error_and_new_requests_move_on() {
    within(TEST_LIMIT, "the test", async {
        let dir = tempfile::tempdir().expect("temp dir");
        let model = write_model(dir.path(), "tiny", &slow_spec());
        let mut fleet = daemons(&model, dir.path(), &[&[], &[], &[]]).await;
        // Without admin streams the router learns of the death only from connections, so the
        // retry path is taken deterministically; round-robin visits every daemon in turn.
        let router = TestRouter::start(RouterConfig {
            routing: RoutingConfig {
                policy: Policy::RoundRobin,
                ..RoutingConfig::default()
            },
            ..config(
                fleet
                    .iter()
                    .map(RealDaemon::backend_without_admin)
                    .collect(),
            )
        })
        .await;
        let mut request = chat("tiny", "Tell me a very long story.", None, true, 1500);
        request["ignore_eos"] = json!(true);
        let response = within(
            REQUEST_LIMIT,
            "the stream's headers",
            router.post("/v1/chat/completions", request, &[]),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        let victim_name = header(&response, "x-skillkv-backend");
        let victim = fleet
            .iter()
            .position(|daemon| daemon.name() == victim_name)
            .expect("the stream names its backend");
        let mut body = response.into_body();
        let mut received = String::new();
        while !received.contains("\n\n") {
            let frame = within(REQUEST_LIMIT, "the first event", body.frame())
                .await
                .expect("the stream has a first event")
                .expect("the first event arrives intact");
            if let Some(data) = frame.data_ref() {
                received.push_str(&String::from_utf8_lossy(data));
            }
        }
        fleet[victim].kill();
        // The rest of the stream: whatever was already on its way, then one error event and
        // the end — within a deadline, never a hang, never `[DONE]`.
        let rest = within(
            Duration::from_secs(10),
            "the end of the broken stream",
            async {
                let mut rest = String::new();
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(frame) => {
                            if let Some(data) = frame.data_ref() {
                                rest.push_str(&String::from_utf8_lossy(data));
                            }
                        }
                        Err(error) => panic!(
                            "the router passed a broken body instead of an error event: {error}"
                        ),
                    }
                }
                rest
            },
        )
        .await;
        assert!(
            !rest.contains("[DONE]"),
            "the stream finished before the kill: {rest}"
        );
        let last = rest.trim_end().rsplit("\n\n").next().unwrap_or_default();
        let error: Value =
            serde_json::from_str(last.trim_start_matches("data: ")).expect("an error event");
        assert_eq!(error["error"]["type"], "server_error", "{last}");
        assert_eq!(error["error"]["code"], "backend_failed", "{last}");

        // New requests: the one whose turn is the dead daemon fails to connect before any
        // byte and is retried on another; all succeed elsewhere.
        for _ in 0..3 {
            let response = within(
                REQUEST_LIMIT,
                "a request after the kill",
                router.post(
                    "/v1/chat/completions",
                    chat("tiny", "Hello?", None, false, 2),
                    &[],
                ),
            )
            .await;
            assert_eq!(response.status(), StatusCode::OK);
            assert_ne!(header(&response, "x-skillkv-backend"), victim_name);
            within(REQUEST_LIMIT, "the body", body_text(response)).await;
        }
        let (_, metrics) = within(
            REQUEST_LIMIT,
            "metrics",
            router.get(router.health, "/metrics"),
        )
        .await;
        assert!(
            metric(&metrics, "skillkv_router_retries_total") >= 1.0,
            "{metrics}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_headers_and_recover_after_the_window() {
    within(TEST_LIMIT, "the test", async {
        let dir = tempfile::tempdir().expect("temp dir");
        let model = write_model(dir.path(), "tiny", &slow_spec());
        let fleet = daemons(&model, dir.path(), &[&[]]).await;
        // One request per 2 s, no burst; a token budget (1000 tokens/s) whose trio reflects the
        // daemon's real usage.
        let limits = dir.path().join("limits.yaml");
        std::fs::write(
            &limits,
            "apiVersion: skillkv.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: tight}\nspec:\n  subject: global\n  limits: {requestsPerMinute: 30, burst: 1, tokensPerMinute: 60000}\n",
        )
        .expect("write the policy");
        let router = TestRouter::start(RouterConfig {
            rate_limiter: RateLimiter::load(&limits, 1).expect("the policy loads"),
            ..config(fleet.iter().map(RealDaemon::backend).collect())
        })
        .await;
        router.wait_healthy(1).await;
        let post = |question: String| {
            within(
                REQUEST_LIMIT,
                "a chat request",
                router.post("/v1/chat/completions", chat("tiny", &question, None, false, 3), &[]),
            )
        };
        let first = post("Hello there, how are you today? ".repeat(8)).await;
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(header(&first, "x-ratelimit-limit-requests"), "30");
        assert_eq!(header(&first, "x-ratelimit-remaining-requests"), "0");
        assert_eq!(header(&first, "x-ratelimit-limit-tokens"), "60000");
        let answer: Value = serde_json::from_str(&body_text(first).await).expect("json");
        let used = answer["usage"]["total_tokens"].as_u64().expect("usage");
        assert!(used > 200, "{answer}");

        let limited = post("Hello again?".to_string()).await;
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header(&limited, "x-ratelimit-limit-requests"), "30");
        assert_eq!(header(&limited, "x-ratelimit-remaining-requests"), "0");
        let reset = reset_duration(&header(&limited, "x-ratelimit-reset-requests"));
        assert!(reset > Duration::ZERO && reset <= Duration::from_secs(2), "{reset:?}");
        let retry_after: f64 = header(&limited, "retry-after").parse().expect("whole seconds");
        assert_eq!(retry_after, reset.as_secs_f64().ceil().max(1.0), "{reset:?}");
        // The first answer's real usage was charged when it completed, moments ago (at most
        // 200 ms of refill, 200 tokens, has come back since).
        let remaining: u64 = header(&limited, "x-ratelimit-remaining-tokens").parse().expect("a number");
        assert!(
            (60_000 - used..=60_000 - used + 200).contains(&remaining),
            "{remaining} tokens left after {used}"
        );
        let error: Value = serde_json::from_str(&body_text(limited).await).expect("json");
        assert_eq!(error["error"]["type"], "rate_limit_error");
        assert_eq!(error["error"]["code"], "rate_limit_exceeded");

        // Polling, the next request is admitted once the advertised reset has passed, not before.
        let refused_at = Instant::now();
        let again = loop {
            let response = post("Are you back?".to_string()).await;
            if response.status() != StatusCode::TOO_MANY_REQUESTS {
                break response;
            }
            assert!(refused_at.elapsed() < reset + Duration::from_secs(1), "still limited a second after the reset");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(refused_at.elapsed() + Duration::from_millis(50) >= reset, "admitted before the reset");
        assert_eq!(again.status(), StatusCode::OK);
        body_text(again).await;

        // maxConcurrent 1 (a second router, so the request rate is not in the way): while a
        // long stream is open the next request is refused; once its client leaves, requests
        // are admitted again.
        let concurrency = dir.path().join("concurrency.yaml");
        std::fs::write(
            &concurrency,
            "apiVersion: skillkv.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: one-at-a-time}\nspec:\n  subject: global\n  limits: {maxConcurrent: 1}\n",
        )
        .expect("write the policy");
        let single = TestRouter::start(RouterConfig {
            rate_limiter: RateLimiter::load(&concurrency, 1).expect("the policy loads"),
            ..config(fleet.iter().map(RealDaemon::backend).collect())
        })
        .await;
        single.wait_healthy(1).await;
        let mut request = chat("tiny", "A long answer, please.", None, true, 1500);
        request["ignore_eos"] = json!(true);
        let open = within(REQUEST_LIMIT, "the stream", single.post("/v1/chat/completions", request, &[])).await;
        assert_eq!(open.status(), StatusCode::OK);
        let second = chat("tiny", "Me too?", None, false, 3);
        let concurrent = within(REQUEST_LIMIT, "a second request", single.post("/v1/chat/completions", second.clone(), &[])).await;
        assert_eq!(concurrent.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header(&concurrent, "retry-after"), "1");
        let error: Value = serde_json::from_str(&body_text(concurrent).await).expect("json");
        assert_eq!(error["error"]["code"], "concurrency_limit_exceeded");
        // The client leaves mid-stream: the router drops the stream and frees its slot.
        drop(open);
        let left_at = Instant::now();
        // Refusals so far: the one above, plus any while the slot is being released.
        let mut refused = 1.0;
        loop {
            let response = within(
                REQUEST_LIMIT,
                "a request after the stream",
                single.post("/v1/chat/completions", second.clone(), &[]),
            )
            .await;
            if response.status() == StatusCode::OK {
                body_text(response).await;
                break;
            }
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
            refused += 1.0;
            assert!(
                left_at.elapsed() < Duration::from_secs(2),
                "still refused 2 s after the stream's client left"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (_, metrics) = single.get(single.health, "/metrics").await;
        assert_eq!(metric(&metrics, "skillkv_router_rate_limited_total{limit=\"concurrency\"}"), refused, "{metrics}");
        let (_, metrics) = router.get(router.health, "/metrics").await;
        assert!(metric(&metrics, "skillkv_router_rate_limited_total{limit=\"requests\"}") >= 1.0, "{metrics}");
    })
    .await;
}
