//! Real daemons for the router's end-to-end tests and the routing benchmark: the daemon library
//! (`skillkv serve`'s server, engine and skills) on a synthetic GGUF, each daemon in its own
//! Tokio runtime so that [`RealDaemon::kill`] drops every task, listener and connection at once
//! — what the router sees when a daemon process dies.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::http::{Request, StatusCode, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use skillkv_api::admin::{DaemonState, DesiredSkill, DesiredState};
use skillkv_api::v1alpha1::Assembly;
use skillkv_daemon::engine::testing::{TinyModelSpec, write_tiny_gguf};
use skillkv_daemon::engine::{EngineConfig, KvCacheSize};
use skillkv_daemon::server::serving::SkillsSettings;
use skillkv_daemon::server::{Listeners, ServeConfig, serve};
use skillkv_router::BackendConfig;
use skillkv_router::client::{Upstream, get_request, upstream_client};
use tokio::runtime::Runtime;

/// The admin bearer token every test daemon uses.
pub const ADMIN_TOKEN: &str = "e2e-admin-token";

/// The value of the sample `series` (a metric name with its labels, exactly as rendered) in a
/// Prometheus text exposition.
pub fn sample_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// Writes a synthetic model to `dir/NAME.gguf` (served as model id `NAME`).
pub fn write_model(dir: &Path, name: &str, spec: &TinyModelSpec) -> PathBuf {
    let path = dir.join(format!("{name}.gguf"));
    write_tiny_gguf(&path, spec).expect("the synthetic model is written");
    path
}

/// The text of a `SKILL.md`.
pub fn skill_markdown(name: &str, description: &str, body: &str) -> String {
    format!("---\nname: {name}\ndescription: \"{description}\"\n---\n{body}\n")
}

/// Writes `dir/NAME/SKILL.md` for each `(name, description, body)`.
pub fn write_skills(dir: &Path, skills: &[(&str, &str, &str)]) {
    for (name, description, body) in skills {
        let folder = dir.join(name);
        std::fs::create_dir_all(&folder).expect("skill folder");
        std::fs::write(
            folder.join("SKILL.md"),
            skill_markdown(name, description, body),
        )
        .expect("SKILL.md written");
    }
}

/// How to start one daemon.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// The GGUF.
    pub model: PathBuf,
    /// `--skills`.
    pub skills_dir: Option<PathBuf>,
    /// `--kv-cache-bytes`.
    pub kv_cache_bytes: usize,
    /// `--pinned-fraction`.
    pub pinned_fraction: f64,
    /// `--max-seqs`.
    pub max_seqs: usize,
    /// `--request-timeout` (seconds there).
    pub request_timeout: Duration,
}

impl DaemonOptions {
    /// Defaults for `model`: 64 MiB of KV, half of it for skills, requests cut at 60 s.
    pub fn new(model: &Path) -> Self {
        Self {
            model: model.to_path_buf(),
            skills_dir: None,
            kv_cache_bytes: 64 * 1024 * 1024,
            pinned_fraction: 0.5,
            max_seqs: 8,
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// A daemon serving in its own runtime.
#[derive(Debug)]
pub struct RealDaemon {
    /// The public (OpenAI) address.
    pub public: SocketAddr,
    /// The admin address.
    pub admin: SocketAddr,
    runtime: Option<Runtime>,
}

impl RealDaemon {
    /// Starts a daemon; it is ready once [`Self::wait_ready`] returns.
    pub fn start(options: &DaemonOptions) -> Self {
        let config = ServeConfig {
            model_path: options.model.clone(),
            port: 0,
            admin_port: 0,
            admin_token: Some(ADMIN_TOKEN.to_string()),
            engine: EngineConfig {
                kv_cache: KvCacheSize::Bytes(options.kv_cache_bytes),
                max_seqs: options.max_seqs,
                ..EngineConfig::default()
            },
            request_timeout: options.request_timeout,
            shutdown_grace: Duration::from_secs(1),
            load_event_interval: Duration::from_millis(100),
            skills_dir: options.skills_dir.clone(),
            skills: SkillsSettings {
                pinned_fraction: options.pinned_fraction,
                ..SkillsSettings::default()
            },
            ..ServeConfig::default()
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("daemon")
            .enable_all()
            .build()
            .expect("the daemon's runtime starts");
        // The listeners bind port 0 in the daemon's runtime and report the ports they got.
        let (bound, addresses) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            let listeners = Listeners::bind(&config).await.expect("the daemon binds");
            let public = listeners.public_addr().expect("public address");
            let admin = listeners.admin_addr().expect("the admin API is served");
            bound.send((public, admin)).expect("the starter waits");
            if let Err(error) = serve(config, listeners).await {
                panic!("the daemon failed: {error:?}");
            }
        });
        let (public, admin) = addresses
            .recv_timeout(Duration::from_secs(30))
            .expect("the daemon binds its listeners");
        Self {
            public,
            admin,
            runtime: Some(runtime),
        }
    }

    /// Its name in the router (`host:port` of the public API).
    pub fn name(&self) -> String {
        self.public.to_string()
    }

    /// A router backend following its admin API.
    pub fn backend(&self) -> BackendConfig {
        BackendConfig {
            admin_url: Some(format!("http://{}", self.admin)),
            admin_token: Some(ADMIN_TOKEN.to_string()),
            ..BackendConfig::without_admin(&format!("http://{}", self.public))
        }
    }

    /// A router backend without admin API (routed by load alone).
    pub fn backend_without_admin(&self) -> BackendConfig {
        BackendConfig::without_admin(&format!("http://{}", self.public))
    }

    /// Waits until `/readyz` answers 200: the model is loaded and no skill is still being
    /// prefilled.
    pub async fn wait_ready(&self, client: &Upstream, within: Duration) {
        let deadline = Instant::now() + within;
        let url = format!("http://{}/readyz", self.public);
        loop {
            let request = get_request(&url, None).expect("request");
            let status = tokio::time::timeout(Duration::from_secs(2), client.request(request))
                .await
                .ok()
                .and_then(Result::ok)
                .map(|response| response.status());
            if status == Some(StatusCode::OK) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon {} not ready after {within:?} (last status {status:?})",
                self.public
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET /admin/v1/state`.
    pub async fn state(&self, client: &Upstream) -> DaemonState {
        let request = get_request(
            &format!("http://{}{}", self.admin, skillkv_api::admin::STATE_PATH),
            Some(ADMIN_TOKEN),
        )
        .expect("request");
        let response = within(Duration::from_secs(30), "the admin state", async {
            client
                .request(request)
                .await
                .expect("the admin API answers")
        })
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = within(Duration::from_secs(30), "the admin state body", async {
            response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes()
        })
        .await;
        serde_json::from_slice(&body).expect("a daemon state")
    }

    /// `PUT /admin/v1/desired` with `(name, SKILL.md text, priority, pin)` skills.
    pub async fn put_desired(
        &self,
        client: &Upstream,
        generation: u64,
        skills: &[(String, String, i32, bool)],
        assembly: Assembly,
    ) {
        let desired = DesiredState {
            generation,
            skills: skills
                .iter()
                .map(|(name, content, priority, pin)| DesiredSkill {
                    name: name.clone(),
                    content: content.clone(),
                    priority: *priority,
                    assembly,
                    pin: *pin,
                })
                .collect(),
            adapters: Vec::new(),
        };
        let request = Request::put(format!(
            "http://{}{}",
            self.admin,
            skillkv_api::admin::DESIRED_PATH
        ))
        .header(header::AUTHORIZATION, format!("Bearer {ADMIN_TOKEN}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(&desired).expect("serializes"),
        )))
        .expect("request");
        let response = within(Duration::from_secs(30), "PUT desired", async {
            client
                .request(request)
                .await
                .expect("the admin API answers")
        })
        .await;
        assert!(
            response.status().is_success(),
            "PUT desired: {}",
            response.status()
        );
    }

    /// Waits until no skill is Pending or Prefilling; returns the skills by state.
    pub async fn wait_skills_settled(
        &self,
        client: &Upstream,
        within_time: Duration,
    ) -> DaemonState {
        let deadline = Instant::now() + within_time;
        loop {
            let state = self.state(client).await;
            let settled = state.skills.iter().all(|skill| skill.state.is_settled());
            if settled {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "skills of {} not settled after {within_time:?}",
                self.public
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the daemon: every task of its runtime (listeners, connections, the server) is
    /// dropped without a goodbye, so connections reset and new ones are refused.
    pub fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for RealDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Awaits `future`, failing the test if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
}

/// A client for tests.
pub fn client() -> Upstream {
    upstream_client(Duration::from_secs(2))
}
