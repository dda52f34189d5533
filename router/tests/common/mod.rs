//! Test fixtures: fake daemons (axum servers on loopback that speak the daemon's OpenAI and
//! admin APIs with scripted behaviour), a router started in-process in front of them, and a
//! small HTTP client.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use skillkv_api::admin::{
    AdminEvent, DaemonState, KvBudget, LoadFigures, ModelInfo, SkillOrigin, SkillState,
};
use skillkv_api::block_hash::HashNamespace;
use skillkv_api::skills::DETECTED_SKILLS_HEADER;
use skillkv_api::v1alpha1::{Assembly, PlacementState};
use skillkv_router::client::{Upstream, upstream_client};
use skillkv_router::{BackendConfig, BoundRouter, RouterConfig};
use tokio::sync::{Semaphore, broadcast, oneshot};

/// How a fake daemon answers generation requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answers normally.
    Normal,
    /// Answers 503 with an OpenAI body.
    Unavailable,
    /// Streams one chunk, then (once the gate opens, if there is one) the connection breaks.
    FailAfterFirstChunk,
}

/// A fake daemon's shared state.
#[derive(Debug)]
pub struct FakeState {
    pub name: String,
    pub model: String,
    pub mode: Mutex<Mode>,
    pub requests: AtomicUsize,
    /// Streams wait for a permit before their second chunk (or their failure).
    pub gate: Option<Arc<Semaphore>>,
    pub events: broadcast::Sender<AdminEvent>,
    pub skills: Mutex<Vec<SkillState>>,
    pub admin_up: Mutex<bool>,
    pub seen_request_ids: Mutex<Vec<String>>,
    /// Per generation request, its `x-skillkv-detected-skills` headers joined by " | "
    /// (`None`: absent).
    pub seen_detected_skills: Mutex<Vec<Option<String>>>,
}

/// A running fake daemon.
#[derive(Debug)]
pub struct FakeDaemon {
    pub state: Arc<FakeState>,
    pub public: SocketAddr,
    pub admin: SocketAddr,
}

pub fn skill(name: &str, description: &str, keywords: &[&str]) -> SkillState {
    SkillState {
        name: name.to_string(),
        version: None,
        description: description.to_string(),
        keywords: keywords.iter().map(|k| k.to_string()).collect(),
        content_hash: "hash".to_string(),
        serving_content_hash: None,
        origin: SkillOrigin::Directory,
        assembly: Assembly::default(),
        state: PlacementState::Ready,
        message: None,
        tokens: 100,
        last_block: None,
        kv_bytes: 1000,
        prefill_millis: None,
        hits: 0,
        cached_tokens: 0,
        prefill_seconds_saved: 0.0,
    }
}

fn snapshot(state: &FakeState) -> DaemonState {
    let namespace = HashNamespace {
        model_digest: "md".into(),
        tokenizer_digest: "td".into(),
        adapter_id: None,
        kv_dtype: "f32".into(),
        kv_format_version: 1,
    };
    DaemonState {
        daemon_version: "test".to_string(),
        model: ModelInfo {
            id: state.model.clone(),
            model_digest: "md".to_string(),
            tokenizer_digest: "td".to_string(),
            chat_template_digest: "cd".to_string(),
            context_length: 2048,
            namespace_root: namespace.root(),
        },
        kv_budget: KvBudget {
            block_tokens: 16,
            total_blocks: 256,
            pinned_budget_blocks: 128,
            kv_bytes_per_token: 100,
            sized_from: Default::default(),
            memory_available_bytes: None,
        },
        load: LoadFigures::default(),
        desired_generation: None,
        skills: state.skills.lock().expect("lock").clone(),
        adapters: Vec::new(),
        device: None,
    }
}

fn chunk(name: &str, text: &str) -> Bytes {
    let value = json!({"object": "chat.completion.chunk", "model": name,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]});
    Bytes::from(format!("data: {value}\n\n"))
}

async fn generate(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    if let Some(id) = headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
        state
            .seen_request_ids
            .lock()
            .expect("lock")
            .push(id.to_string());
    }
    let detected: Vec<String> = headers
        .get_all(DETECTED_SKILLS_HEADER)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    state
        .seen_detected_skills
        .lock()
        .expect("lock")
        .push((!detected.is_empty()).then(|| detected.join(" | ")));
    let mode = *state.mode.lock().expect("lock");
    if mode == Mode::Unavailable {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": {"message": "loading", "type": "server_error", "param": null, "code": "unavailable"}})),
        )
            .into_response();
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let stream = request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if !stream {
        return Json(json!({"object": "chat.completion", "model": state.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": state.name}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}}))
        .into_response();
    }
    let name = state.name.clone();
    let gate = state.gate.clone();
    let frames = futures::stream::unfold(0u8, move |step| {
        let (name, gate) = (name.clone(), gate.clone());
        async move {
            match step {
                0 => Some((Ok::<_, std::io::Error>(chunk(&name, "first")), 1)),
                1 => {
                    if let Some(gate) = gate {
                        gate.acquire().await.expect("gate open").forget();
                    }
                    if mode == Mode::FailAfterFirstChunk {
                        Some((Err(std::io::Error::other("daemon died")), 3))
                    } else {
                        Some((Ok(chunk(&name, "second")), 2))
                    }
                }
                2 => Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), 3)),
                _ => None,
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(frames))
        .expect("response")
}

async fn models(State(state): State<Arc<FakeState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [
        {"id": state.model, "object": "model", "created": 0, "owned_by": "skillkv"},
        {"id": format!("{}-{}", state.model, state.name), "object": "model", "created": 0, "owned_by": "skillkv"},
    ]}))
}

async fn admin_state(State(state): State<Arc<FakeState>>) -> Response<Body> {
    if !*state.admin_up.lock().expect("lock") {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    Json(snapshot(&state)).into_response()
}

async fn admin_events(State(state): State<Arc<FakeState>>) -> Response<Body> {
    if !*state.admin_up.lock().expect("lock") {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let receiver = state.events.subscribe();
    let frames = futures::stream::unfold(receiver, |mut receiver| async move {
        let event = receiver.recv().await.ok()?;
        let frame = format!(
            "event: {}\ndata: {}\n\n",
            event.name(),
            serde_json::to_string(&event).expect("serializes")
        );
        Some((Ok::<_, std::io::Error>(Bytes::from(frame)), receiver))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(frames))
        .expect("response")
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, router).await.expect("serve") });
    address
}

impl FakeDaemon {
    /// Starts a fake daemon serving `model` with `skills` Ready.
    pub async fn start(
        name: &str,
        model: &str,
        skills: Vec<SkillState>,
        gate: Option<Arc<Semaphore>>,
    ) -> Self {
        let state = Arc::new(FakeState {
            name: name.to_string(),
            model: model.to_string(),
            mode: Mutex::new(Mode::Normal),
            requests: AtomicUsize::new(0),
            gate,
            events: broadcast::channel(64).0,
            skills: Mutex::new(skills),
            admin_up: Mutex::new(true),
            seen_request_ids: Mutex::new(Vec::new()),
            seen_detected_skills: Mutex::new(Vec::new()),
        });
        let public = serve(
            Router::new()
                .route("/v1/chat/completions", post(generate))
                .route("/v1/completions", post(generate))
                .route("/v1/models", get(models))
                .with_state(state.clone()),
        )
        .await;
        let admin = serve(
            Router::new()
                .route("/admin/v1/state", get(admin_state))
                .route("/admin/v1/events", get(admin_events))
                .with_state(state.clone()),
        )
        .await;
        Self {
            state,
            public,
            admin,
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().expect("lock") = mode;
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// A backend entry following this daemon's admin API.
    pub fn backend(&self) -> BackendConfig {
        BackendConfig {
            admin_url: Some(format!("http://{}", self.admin)),
            ..BackendConfig::without_admin(&format!("http://{}", self.public))
        }
    }

    /// A backend entry without admin API (routed by load alone).
    pub fn backend_without_admin(&self) -> BackendConfig {
        BackendConfig::without_admin(&format!("http://{}", self.public))
    }

    /// Ends the admin event streams and refuses new ones.
    pub fn take_admin_down(&self) {
        *self.state.admin_up.lock().expect("lock") = false;
    }

    pub fn bring_admin_up(&self) {
        *self.state.admin_up.lock().expect("lock") = true;
    }

    pub fn name(&self) -> String {
        self.public.to_string()
    }
}

/// A loopback address where nothing listens.
pub async fn dead_address() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    listener.local_addr().expect("address")
}

/// A router running in-process.
#[derive(Debug)]
pub struct TestRouter {
    pub api: SocketAddr,
    pub health: SocketAddr,
    pub fleet: Arc<skillkv_router::fleet::Fleet>,
    pub client: Upstream,
    _stop: oneshot::Sender<()>,
}

impl TestRouter {
    pub async fn start(config: RouterConfig) -> Self {
        let config = RouterConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            health_listen: "127.0.0.1:0".parse().expect("address"),
            ..config
        };
        let bound = BoundRouter::bind(config).await.expect("router binds");
        let api = bound.api_addr().expect("api address");
        let health = bound.health_addr().expect("health address");
        let fleet = bound.fleet();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(bound.serve(async move {
            let _ = stopped.await;
        }));
        Self {
            api,
            health,
            fleet,
            client: upstream_client(Duration::from_secs(2)),
            _stop: stop,
        }
    }

    /// Waits until `count` pods are healthy (their event streams connected).
    pub async fn wait_healthy(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = Instant::now();
            let healthy = self
                .fleet
                .pods()
                .iter()
                .filter(|p| p.is_healthy(now))
                .count();
            if healthy == count {
                return;
            }
            assert!(
                now < deadline,
                "{healthy} of {count} pods healthy after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until `condition` holds of the fleet.
    pub async fn wait_for(
        &self,
        what: &str,
        condition: impl Fn(&skillkv_router::fleet::Fleet) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition(&self.fleet) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn post(
        &self,
        path: &str,
        body: Value,
        headers: &[(&str, &str)],
    ) -> Response<hyper::body::Incoming> {
        let mut builder = Request::post(format!("http://{}{path}", self.api))
            .header(header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        self.client.request(request).await.expect("router answers")
    }

    pub async fn get(&self, address: SocketAddr, path: &str) -> (StatusCode, String) {
        let request = skillkv_router::client::get_request(&format!("http://{address}{path}"), None)
            .expect("request");
        let response = self.client.request(request).await.expect("answers");
        let status = response.status();
        (status, body_text(response).await)
    }
}

pub async fn body_text(response: Response<hyper::body::Incoming>) -> String {
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

pub fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hello"}]})
}

pub fn config(backends: Vec<BackendConfig>) -> RouterConfig {
    RouterConfig {
        backends,
        max_reconnect_backoff: Duration::from_millis(200),
        ..RouterConfig::default()
    }
}
