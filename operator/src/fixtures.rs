//! Test fixtures, in the style of kube-rs's controller-rs: [`Context::test`] builds a context
//! whose client talks to a mocked API server ([`ApiServerVerifier`], which asserts each request
//! in order and answers it) and whose daemons are fakes ([`FakeDaemons`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use skillkv_api::admin::{
    DaemonState, DesiredState, DesiredStateApplied, KvBudget, LoadFigures, ModelInfo, SkillOrigin,
    SkillState,
};
use skillkv_api::block_hash::BlockHash;
use skillkv_api::skills::SkillDocument;
use skillkv_api::v1alpha1::PlacementState;

use crate::context::{Context, Metrics};
use crate::daemon::{DaemonAdmin, DaemonAdminError, DaemonEndpoint};
use crate::settings::ControllerSettings;

/// The mocked API server's side of the client.
pub struct ApiServerVerifier(tower_test::mock::Handle<Request<Body>, Response<Body>>);

impl std::fmt::Debug for ApiServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiServerVerifier")
    }
}

impl ApiServerVerifier {
    /// Waits for the next request, asserts its method and path, answers `status` with `body`,
    /// and returns the request's JSON body (`Null` when empty).
    pub async fn expect(&mut self, method: Method, path: &str, status: u16, body: Value) -> Value {
        let (request, send) = self
            .0
            .next_request()
            .await
            .expect("the client sends a request");
        assert_eq!(request.method(), method, "method of {}", request.uri());
        assert_eq!(
            request.uri().path(),
            path,
            "path (query: {:?})",
            request.uri().query()
        );
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .expect("request body");
        let sent = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("request body is JSON")
        };
        let response = Response::builder()
            .status(status)
            .body(Body::from(
                serde_json::to_vec(&body).expect("response JSON"),
            ))
            .expect("response");
        send.send_response(response);
        sent
    }

    /// Answers the next request (a PATCH or POST) by echoing its body with `status` 200.
    pub async fn expect_echo(&mut self, method: Method, path: &str) -> Value {
        let (request, send) = self
            .0
            .next_request()
            .await
            .expect("the client sends a request");
        assert_eq!(request.method(), method, "method of {}", request.uri());
        assert_eq!(request.uri().path(), path);
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .expect("request body");
        let sent: Value = serde_json::from_slice(&bytes).expect("request body is JSON");
        let mut echo = sent.clone();
        if echo.get("metadata").is_none() {
            echo["metadata"] = json!({"name": path.rsplit('/').nth(usize::from(path.ends_with("/status"))).unwrap_or("x")});
        }
        let response = Response::builder()
            .status(200)
            .body(Body::from(serde_json::to_vec(&echo).expect("echo JSON")))
            .expect("response");
        send.send_response(response);
        sent
    }
}

/// A Kubernetes `Status` error body.
pub fn status_error(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "code": code, "reason": reason, "message": message})
}

/// An empty list of kind `kind`.
pub fn list_of(kind: &str, api_version: &str, items: Vec<Value>) -> Value {
    json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": "1"}, "items": items})
}

/// One fake daemon.
#[derive(Debug, Clone)]
pub enum FakeDaemon {
    /// Answers with this state; pushes make their skills Ready at once.
    Up(Box<DaemonState>),
    /// Every call fails as unreachable.
    Down,
}

/// Fake daemons keyed by pod name, recording every push.
#[derive(Debug, Default)]
pub struct FakeDaemons {
    /// Pod → daemon.
    pub daemons: Mutex<BTreeMap<String, FakeDaemon>>,
    /// Every push: (endpoint, document).
    pub pushes: Mutex<Vec<(DaemonEndpoint, DesiredState)>>,
}

impl FakeDaemons {
    /// Adds a daemon for `pod`.
    pub fn insert(&self, pod: &str, daemon: FakeDaemon) {
        self.daemons
            .lock()
            .expect("lock")
            .insert(pod.to_owned(), daemon);
    }
}

/// A daemon state with an empty cache and `pinned_budget_blocks` of 16-token blocks.
pub fn daemon_state(pinned_budget_blocks: usize) -> DaemonState {
    DaemonState {
        daemon_version: "test".to_owned(),
        model: ModelInfo {
            id: "m".to_owned(),
            model_digest: "0".repeat(64),
            tokenizer_digest: "0".repeat(64),
            chat_template_digest: "0".repeat(64),
            context_length: 8192,
            namespace_root: BlockHash([0; 32]),
        },
        kv_budget: KvBudget {
            block_tokens: 16,
            total_blocks: pinned_budget_blocks * 2,
            pinned_budget_blocks,
            kv_bytes_per_token: 1024,
            sized_from: Default::default(),
            memory_available_bytes: None,
        },
        load: LoadFigures::default(),
        desired_generation: None,
        skills: Vec::new(),
        adapters: Vec::new(),
        device: None,
    }
}

impl DaemonAdmin for FakeDaemons {
    fn state<'a>(
        &'a self,
        endpoint: &'a DaemonEndpoint,
    ) -> BoxFuture<'a, Result<DaemonState, DaemonAdminError>> {
        Box::pin(async move {
            match self.daemons.lock().expect("lock").get(&endpoint.pod) {
                Some(FakeDaemon::Up(state)) => Ok((**state).clone()),
                _ => Err(DaemonAdminError::Unreachable {
                    pod: endpoint.pod.clone(),
                    message: "connection refused".to_owned(),
                }),
            }
        })
    }

    fn put_desired<'a>(
        &'a self,
        endpoint: &'a DaemonEndpoint,
        desired: &'a DesiredState,
    ) -> BoxFuture<'a, Result<DesiredStateApplied, DaemonAdminError>> {
        Box::pin(async move {
            let mut daemons = self.daemons.lock().expect("lock");
            let Some(FakeDaemon::Up(state)) = daemons.get_mut(&endpoint.pod) else {
                return Err(DaemonAdminError::Unreachable {
                    pod: endpoint.pod.clone(),
                    message: "connection refused".to_owned(),
                });
            };
            if state
                .desired_generation
                .is_some_and(|g| g >= desired.generation)
            {
                return Err(DaemonAdminError::StaleGeneration {
                    pod: endpoint.pod.clone(),
                    generation: desired.generation,
                });
            }
            state.desired_generation = Some(desired.generation);
            state.skills = desired
                .skills
                .iter()
                .map(|skill| {
                    let document =
                        SkillDocument::parse(Path::new(&skill.name), skill.content.clone()).ok();
                    let hash = document
                        .as_ref()
                        .map(|d| d.content_hash.clone())
                        .unwrap_or_default();
                    SkillState {
                        name: skill.name.clone(),
                        version: None,
                        description: document
                            .as_ref()
                            .map(|d| d.front_matter.description.clone())
                            .unwrap_or_default(),
                        keywords: document
                            .map(|d| d.front_matter.keywords)
                            .unwrap_or_default(),
                        serving_content_hash: Some(hash.clone()),
                        content_hash: hash,
                        origin: SkillOrigin::Desired,
                        assembly: skill.assembly,
                        state: PlacementState::Ready,
                        message: None,
                        tokens: skill.content.len() / 4,
                        last_block: None,
                        kv_bytes: (skill.content.len() / 4) as u64 * 1024,
                        prefill_millis: Some(5),
                        hits: 0,
                        cached_tokens: 0,
                        prefill_seconds_saved: 0.0,
                    }
                })
                .collect();
            self.pushes
                .lock()
                .expect("lock")
                .push((endpoint.clone(), desired.clone()));
            Ok(DesiredStateApplied {
                generation: desired.generation,
                changed: true,
            })
        })
    }
}

impl Context {
    /// A context on a mocked API server and fake daemons.
    pub fn test() -> (Arc<Context>, ApiServerVerifier, Arc<FakeDaemons>) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let daemons = Arc::new(FakeDaemons::default());
        let metrics = Arc::new(Metrics::new().expect("metrics register"));
        let settings = ControllerSettings {
            daemon_image: "registry.test/skillkv:1".to_owned(),
            ..ControllerSettings::default()
        };
        let ctx = Context::new(client, settings, daemons.clone(), metrics);
        (Arc::new(ctx), ApiServerVerifier(handle), daemons)
    }
}
