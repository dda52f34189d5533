//! The router in front of fake daemons on loopback: pass-through streaming, request ids,
//! retries before the first byte and none after, API keys, rate limits, model listing, and
//! routing by the skills the daemons report on their admin event streams, with the skills the
//! router detected handed to the daemon.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use skillkv_api::admin::AdminEvent;
use skillkv_router::auth::{ApiKeyEntry, ApiKeys};
use skillkv_router::ratelimit::RateLimiter;
use skillkv_router::{BackendConfig, RouterConfig};
use tokio::sync::Semaphore;

use common::{FakeDaemon, Mode, TestRouter, body_text, chat, config, dead_address, skill};

#[tokio::test]
async fn streams_pass_through_as_they_arrive() {
    let gate = Arc::new(Semaphore::new(0));
    let daemon = FakeDaemon::start("a", "m", Vec::new(), Some(gate.clone())).await;
    let router = TestRouter::start(config(vec![daemon.backend_without_admin()])).await;
    let response = router
        .post("/v1/chat/completions", chat("m", true), &[])
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    // The daemon holds its second chunk until the gate opens: the first must arrive now.
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first chunk arrives before the daemon finishes")
        .expect("a frame")
        .expect("no error");
    let first = String::from_utf8_lossy(first.data_ref().expect("data")).into_owned();
    assert!(first.contains("first"), "{first}");
    gate.add_permits(1);
    let rest = body.collect().await.expect("rest").to_bytes();
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.contains("second") && rest.ends_with("data: [DONE]\n\n"),
        "{rest}"
    );
}

#[tokio::test]
async fn request_ids_reach_the_daemon_and_come_back() {
    let daemon = FakeDaemon::start("a", "m", Vec::new(), None).await;
    let router = TestRouter::start(config(vec![daemon.backend_without_admin()])).await;
    let response = router
        .post(
            "/v1/chat/completions",
            chat("m", false),
            &[("x-request-id", "req-42")],
        )
        .await;
    assert_eq!(response.headers()["x-request-id"], "req-42");
    let response = router
        .post("/v1/chat/completions", chat("m", false), &[])
        .await;
    let generated = response.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert_eq!(generated.len(), 32);
    let seen = daemon.state.seen_request_ids.lock().expect("lock").clone();
    assert_eq!(seen, vec!["req-42".to_string(), generated]);
}

#[tokio::test]
async fn a_refused_connection_is_retried_on_another_pod() {
    let dead = dead_address().await;
    let daemon = FakeDaemon::start("b", "m", Vec::new(), None).await;
    let router = TestRouter::start(config(vec![
        BackendConfig::without_admin(&format!("http://{dead}")),
        daemon.backend_without_admin(),
    ]))
    .await;
    let response = router
        .post("/v1/chat/completions", chat("m", false), &[])
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["x-skillkv-backend"],
        daemon.name().as_str()
    );
    assert_eq!(daemon.requests(), 1);
    let (_, metrics) = router.get(router.health, "/metrics").await;
    assert!(
        metrics.contains("skillkv_router_retries_total{cause=\"connect\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_503_before_the_first_byte_is_retried_and_the_last_one_returned() {
    let busy = FakeDaemon::start("a", "m", Vec::new(), None).await;
    busy.set_mode(Mode::Unavailable);
    let ok = FakeDaemon::start("b", "m", Vec::new(), None).await;
    let router = TestRouter::start(config(vec![
        busy.backend_without_admin(),
        ok.backend_without_admin(),
    ]))
    .await;
    let response = router
        .post("/v1/chat/completions", chat("m", true), &[])
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-skillkv-backend"], ok.name().as_str());
    assert!(body_text(response).await.contains("second"));
    assert_eq!((busy.requests(), ok.requests()), (1, 1));
    // When every pod is unavailable the client gets the daemon's own 503.
    ok.set_mode(Mode::Unavailable);
    let response = router
        .post("/v1/chat/completions", chat("m", false), &[])
        .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = serde_json::from_str(&body_text(response).await).expect("json");
    assert_eq!(body["error"]["code"], "unavailable");
}

#[tokio::test]
async fn nothing_is_retried_after_bytes_were_sent_and_the_stream_ends_with_an_error() {
    let gate = Arc::new(Semaphore::new(0));
    let failing = FakeDaemon::start("a", "m", Vec::new(), Some(gate.clone())).await;
    failing.set_mode(Mode::FailAfterFirstChunk);
    let spare = FakeDaemon::start("b", "m", Vec::new(), None).await;
    let router = TestRouter::start(config(vec![
        failing.backend_without_admin(),
        spare.backend_without_admin(),
    ]))
    .await;
    let response = router
        .post("/v1/chat/completions", chat("m", true), &[])
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["x-skillkv-backend"],
        failing.name().as_str()
    );
    let mut body = response.into_body();
    let first = body.frame().await.expect("a frame").expect("no error");
    let mut text = String::from_utf8_lossy(first.data_ref().expect("data")).into_owned();
    // The first chunk has reached the client; now the daemon dies.
    gate.add_permits(1);
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("the stream ends instead of hanging")
        .expect("the router ends the stream cleanly")
        .to_bytes();
    text.push_str(&String::from_utf8_lossy(&rest));
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 2, "{text}");
    assert!(events[0].contains("first"));
    let error: Value =
        serde_json::from_str(events[1].trim_start_matches("data: ")).expect("error event");
    assert_eq!(error["error"]["type"], "server_error");
    assert_eq!(spare.requests(), 0);
}

#[tokio::test]
async fn api_keys_are_required_and_checked() {
    let daemon = FakeDaemon::start("a", "m", Vec::new(), None).await;
    let keys = ApiKeys::new(
        vec![ApiKeyEntry {
            key: "sk-good".to_string(),
            name: Some("good".to_string()),
            tenant: None,
            labels: Default::default(),
        }],
        true,
    );
    let router = TestRouter::start(RouterConfig {
        api_keys: keys,
        ..config(vec![daemon.backend_without_admin()])
    })
    .await;
    for auth in [None, Some("Bearer sk-bad")] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let response = router
            .post("/v1/chat/completions", chat("m", false), &headers)
            .await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let body: Value = serde_json::from_str(&body_text(response).await).expect("json");
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    assert_eq!(daemon.requests(), 0);
    let response = router
        .post(
            "/v1/chat/completions",
            chat("m", false),
            &[("authorization", "Bearer sk-good")],
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn rate_limits_answer_429_with_headers_and_recover() {
    let daemon = FakeDaemon::start("a", "m", Vec::new(), None).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("limits.yaml");
    std::fs::write(
        &path,
        "apiVersion: skillkv.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: tight}\nspec:\n  subject: global\n  limits: {requestsPerMinute: 600, burst: 1, tokensPerMinute: 6000}\n",
    )
    .expect("write");
    let router = TestRouter::start(RouterConfig {
        rate_limiter: RateLimiter::load(&path, 1).expect("policies load"),
        ..config(vec![daemon.backend_without_admin()])
    })
    .await;
    let first = router
        .post("/v1/chat/completions", chat("m", false), &[])
        .await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.headers()["x-ratelimit-limit-requests"], "600");
    assert_eq!(first.headers()["x-ratelimit-remaining-requests"], "0");
    assert_eq!(first.headers()["x-ratelimit-limit-tokens"], "6000");
    body_text(first).await;
    let limited = router
        .post("/v1/chat/completions", chat("m", false), &[])
        .await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.headers()["retry-after"], "1");
    assert_eq!(limited.headers()["x-ratelimit-remaining-requests"], "0");
    // The first answer's 25 tokens were charged when it completed.
    let remaining_tokens: u64 = limited.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("number");
    assert!(
        (5975..6000).contains(&remaining_tokens),
        "{remaining_tokens}"
    );
    let reset = limited.headers()["x-ratelimit-reset-requests"]
        .to_str()
        .expect("ascii")
        .to_string();
    let body: Value = serde_json::from_str(&body_text(limited).await).expect("json");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(daemon.requests(), 1);
    // One request refills every 100 ms: after the advertised reset it is admitted again.
    let wait_ms: u64 = reset.trim_end_matches("ms").parse().expect("reset in ms");
    tokio::time::sleep(Duration::from_millis(wait_ms + 20)).await;
    let again = router
        .post("/v1/chat/completions", chat("m", false), &[])
        .await;
    assert_eq!(again.status(), StatusCode::OK);
    let (_, metrics) = router.get(router.health, "/metrics").await;
    assert!(
        metrics.contains("skillkv_router_rate_limited_total{limit=\"requests\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn models_are_the_union_across_backends_and_unknown_ones_are_404() {
    let a = FakeDaemon::start("a", "m", Vec::new(), None).await;
    let b = FakeDaemon::start("b", "m", Vec::new(), None).await;
    let router = TestRouter::start(config(vec![a.backend(), b.backend()])).await;
    router.wait_healthy(2).await;
    let (status, text) = router.get(router.api, "/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    let list: Value = serde_json::from_str(&text).expect("json");
    let mut ids: Vec<&str> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["m", "m-a", "m-b"]);
    let (status, _) = router.get(router.api, "/v1/models/m-b").await;
    assert_eq!(status, StatusCode::OK);
    let response = router
        .post("/v1/chat/completions", chat("other", false), &[])
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = serde_json::from_str(&body_text(response).await).expect("json");
    assert_eq!(body["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn requests_go_where_their_skills_are_ready() {
    let cooking = skill("cooking", "Recipes for pasta and bread.", &["oven"]);
    let plain = FakeDaemon::start("a", "m", vec![cooking], None).await;
    let sql = skill(
        "sql",
        "Writing SQL queries for Postgres databases.",
        &["join", "index"],
    );
    let warm = FakeDaemon::start("b", "m", vec![sql], None).await;
    let router = TestRouter::start(config(vec![plain.backend(), warm.backend()])).await;
    router.wait_healthy(2).await;
    let seen_detected = |daemon: &FakeDaemon| {
        daemon
            .state
            .seen_detected_skills
            .lock()
            .expect("lock")
            .last()
            .cloned()
    };
    // Named in the request: the daemon gets no detection, even one a client sent.
    let body =
        json!({"model": "m", "skills": ["sql"], "messages": [{"role": "user", "content": "hi"}]});
    let response = router
        .post(
            "/v1/chat/completions",
            body,
            &[("x-skillkv-detected-skills", "cooking")],
        )
        .await;
    assert_eq!(
        response.headers()["x-skillkv-backend"],
        warm.name().as_str()
    );
    assert_eq!(response.headers()["x-skillkv-route"], "skill-hit");
    assert_eq!(seen_detected(&warm), Some(None));
    // Detected from the text: the daemon is told what the router detected, and only that.
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "write a postgres sql query with a join"}]});
    let response = router
        .post(
            "/v1/chat/completions",
            body.clone(),
            &[("x-skillkv-detected-skills", "cooking")],
        )
        .await;
    assert_eq!(
        response.headers()["x-skillkv-backend"],
        warm.name().as_str()
    );
    assert_eq!(seen_detected(&warm), Some(Some("sql".to_string())));
    // Nothing detected: the daemon is told so (an empty list), not left to detect again.
    let nothing = json!({"model": "m", "messages": [{"role": "user", "content": "hello"}]});
    let response = router.post("/v1/chat/completions", nothing, &[]).await;
    assert_eq!(response.status(), StatusCode::OK);
    let daemon = if response.headers()["x-skillkv-backend"] == warm.name().as_str() {
        &warm
    } else {
        &plain
    };
    assert_eq!(seen_detected(daemon), Some(Some(String::new())));
    // The skill goes away on the warm pod and appears on the other: routing follows events.
    warm.state
        .events
        .send(AdminEvent::SkillRemoved {
            name: "sql".to_string(),
        })
        .expect("subscriber");
    plain
        .state
        .events
        .send(AdminEvent::SkillState(skill(
            "sql",
            "Writing SQL queries for Postgres databases.",
            &["join"],
        )))
        .expect("subscriber");
    router
        .wait_for("the skill to move", |fleet| {
            fleet.pods()[0].state().skills.contains_key("sql")
                && !fleet.pods()[1].state().skills.contains_key("sql")
        })
        .await;
    let response = router.post("/v1/chat/completions", body, &[]).await;
    assert_eq!(
        response.headers()["x-skillkv-backend"],
        plain.name().as_str()
    );
}

#[tokio::test]
async fn a_pod_whose_event_stream_drops_is_avoided_until_it_returns() {
    let sql = skill("sql", "SQL", &[]);
    let a = FakeDaemon::start("a", "m", vec![sql.clone()], None).await;
    let b = FakeDaemon::start("b", "m", Vec::new(), None).await;
    let router = TestRouter::start(config(vec![a.backend(), b.backend()])).await;
    router.wait_healthy(2).await;
    let body =
        json!({"model": "m", "skills": ["sql"], "messages": [{"role": "user", "content": "hi"}]});
    // The admin API goes down: after missed events the router re-reads the snapshot, which
    // fails, so the session ends and reconnects keep failing until the API is back.
    a.take_admin_down();
    a.state
        .events
        .send(AdminEvent::EventsMissed { count: 1 })
        .expect("subscriber");
    router
        .wait_for("pod a to turn unhealthy", |fleet| {
            !fleet.pods()[0].is_healthy(std::time::Instant::now())
        })
        .await;
    let response = router.post("/v1/chat/completions", body.clone(), &[]).await;
    assert_eq!(response.headers()["x-skillkv-backend"], b.name().as_str());
    let (status, _) = router.get(router.health, "/readyz").await;
    assert_eq!(status, StatusCode::OK);
    a.bring_admin_up();
    router.wait_healthy(2).await;
    let response = router.post("/v1/chat/completions", body, &[]).await;
    assert_eq!(response.headers()["x-skillkv-backend"], a.name().as_str());
}

#[tokio::test]
async fn a_daemon_whose_skills_the_router_does_not_know_detects_for_itself() {
    let daemon = FakeDaemon::start("a", "m", Vec::new(), None).await;
    let router = TestRouter::start(config(vec![daemon.backend_without_admin()])).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "a sql query"}]});
    let response = router
        .post(
            "/v1/chat/completions",
            body,
            &[("x-skillkv-detected-skills", "cooking")],
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let seen = daemon
        .state
        .seen_detected_skills
        .lock()
        .expect("lock")
        .clone();
    assert_eq!(
        seen,
        [None],
        "no detection handed over, not even the client's"
    );
}
