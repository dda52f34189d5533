//! Discovery against a mocked Kubernetes API (tower-test): the initial lists fill the fleet,
//! the keys and the limits, and watch events then add and remove backends and keys.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{Request, Response};
use bytes::Bytes;
use futures::channel::mpsc::{UnboundedSender, unbounded};
use http_body_util::StreamBody;
use hyper::body::Frame;
use kube::client::Body;
use serde_json::{Value, json};

use super::*;
use crate::auth::Authentication;

type Chunks = futures::channel::mpsc::UnboundedReceiver<Result<Frame<Bytes>, Infallible>>;
type Watches = Arc<Mutex<HashMap<String, UnboundedSender<Result<Frame<Bytes>, Infallible>>>>>;

/// Which of the router's watches a request belongs to.
fn watch_key(request: &Request<Body>) -> String {
    let uri = request.uri();
    let resource = uri.path().rsplit('/').next().unwrap_or_default();
    let query = uri.query().unwrap_or_default();
    match resource {
        "secrets" if query.contains("api-key") => "api-keys".to_string(),
        "secrets" => "admin-tokens".to_string(),
        "endpointslices" if query.contains("service-name") => "router-slices".to_string(),
        other => other.to_string(),
    }
}

/// Answers lists from `lists` and keeps each watch open, its sender in `watches`.
async fn fake_api_server(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<StreamBody<Chunks>>>,
    lists: HashMap<String, Vec<Value>>,
    watches: Watches,
) {
    while let Some((request, respond)) = handle.next_request().await {
        let key = watch_key(&request);
        let (sender, chunks) = unbounded();
        if request
            .uri()
            .query()
            .unwrap_or_default()
            .contains("watch=true")
        {
            watches.lock().expect("lock").insert(key, sender);
        } else {
            let items = lists.get(&key).cloned().unwrap_or_default();
            let list = json!({"apiVersion": "v1", "kind": "List",
                              "metadata": {"resourceVersion": "1"}, "items": items});
            let _ = sender.unbounded_send(Ok(Frame::data(Bytes::from(list.to_string()))));
        }
        respond.send_response(Response::new(StreamBody::new(chunks)));
    }
}

fn send_event(watches: &Watches, key: &str, kind: &str, object: Value) {
    let line = format!("{}\n", json!({"type": kind, "object": object}));
    let watches = watches.lock().expect("lock");
    let sender = watches.get(key).expect("the watch is open");
    sender
        .unbounded_send(Ok(Frame::data(Bytes::from(line))))
        .expect("the watch is read");
}

async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn b64(text: &str) -> Value {
    serde_json::to_value(k8s_openapi::ByteString(text.as_bytes().to_vec())).expect("encodes")
}

fn daemon_slice(pods: &[(&str, &str)], version: &str) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|(pod, address)| {
            json!({"addresses": [address], "conditions": {"ready": true},
                   "targetRef": {"kind": "Pod", "name": pod, "namespace": "team"}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "llama-daemon-x1", "namespace": "team", "resourceVersion": version,
                        "labels": {"kubernetes.io/service-name": "llama-daemon",
                                   "skillkv.io/model-deployment": "llama",
                                   "app.kubernetes.io/component": "daemon",
                                   "app.kubernetes.io/managed-by": "skillkv-operator"}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": 8080}, {"name": "admin", "port": 8081}],
           "endpoints": endpoints})
}

fn api_key_secret(version: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": "key-1", "namespace": "team", "resourceVersion": version,
                        "labels": {"skillkv.io/api-key": "true"}},
           "data": {"key": b64("sk-1"), "tenant": b64("acme")}})
}

fn initial_lists() -> HashMap<String, Vec<Value>> {
    let router_endpoint = |pod: &str| {
        json!({"addresses": ["10.1.0.1"], "conditions": {"ready": true},
               "targetRef": {"kind": "Pod", "name": pod}})
    };
    HashMap::from([
        (
            "modeldeployments".to_string(),
            vec![
                json!({"apiVersion": "skillkv.io/v1alpha1", "kind": "ModelDeployment",
                        "metadata": {"name": "llama", "namespace": "team"},
                        "spec": {"model": {"uri": "file:///m.gguf"}}}),
            ],
        ),
        (
            "endpointslices".to_string(),
            vec![daemon_slice(&[("llama-daemon-a", "127.0.0.2")], "1")],
        ),
        (
            "admin-tokens".to_string(),
            vec![json!({"apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": "llama-admin-token", "namespace": "team",
                                     "labels": {"skillkv.io/model-deployment": "llama"}},
                        "data": {"token": b64("admin-t0k")}})],
        ),
        (
            "loraadapters".to_string(),
            vec![
                json!({"apiVersion": "skillkv.io/v1alpha1", "kind": "LoRAAdapter",
                        "metadata": {"name": "sql", "namespace": "team"},
                        "spec": {"modelRef": {"name": "llama"}, "source": {"uri": "file:///a"},
                                 "servedName": "llama-sql"}}),
            ],
        ),
        ("api-keys".to_string(), vec![api_key_secret("1")]),
        (
            "ratelimitpolicies".to_string(),
            vec![
                json!({"apiVersion": "skillkv.io/v1alpha1", "kind": "RateLimitPolicy",
                        "metadata": {"name": "global", "namespace": "team"},
                        "spec": {"subject": "global", "limits": {"requestsPerMinute": 120}}}),
            ],
        ),
        (
            "router-slices".to_string(),
            vec![
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                        "metadata": {"name": "router-x", "namespace": "sys",
                                     "labels": {"kubernetes.io/service-name": "router"}},
                        "addressType": "IPv4",
                        "endpoints": [router_endpoint("router-a"), router_endpoint("router-b")]}),
            ],
        ),
    ])
}

#[tokio::test]
async fn lists_fill_the_router_and_watch_events_change_it() {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<StreamBody<Chunks>>>();
    let watches = Watches::default();
    let server = tokio::spawn(fake_api_server(handle, initial_lists(), watches.clone()));
    let client = Client::new(service, "default");
    let targets = DiscoveryTargets {
        fleet: Arc::new(Fleet::new(Vec::new(), 16, Default::default())),
        followers: Arc::new(Followers::new(
            crate::client::upstream_client(Duration::from_millis(200)),
            Duration::from_millis(200),
        )),
        api_keys: ApiKeys::new(Vec::new(), true),
        rate_limiter: RateLimiter::default(),
        metrics: Arc::new(RouterMetrics::new().expect("metrics register")),
    };
    let discovery = Discovery::with_client(
        client,
        DiscoveryConfig {
            namespace: None,
            api_key_selector: Some("skillkv.io/api-key=true".to_string()),
            watch_rate_limits: true,
            router_service: Some(("sys".to_string(), "router".to_string())),
            replicas: 1,
            fallback_admin_token: None,
        },
    );
    let running = tokio::spawn(discovery.run(targets.clone()));
    let (fleet, keys, limiter) = (&targets.fleet, &targets.api_keys, &targets.rate_limiter);
    let names = || -> Vec<String> {
        fleet
            .pods()
            .iter()
            .map(|p| p.backend.name.clone())
            .collect()
    };

    wait_until("the first pod", || names() == ["team/llama-daemon-a"]).await;
    let pod = fleet.pods()[0].clone();
    assert_eq!(pod.backend.url, "http://127.0.0.2:8080");
    assert_eq!(
        pod.backend.admin_url.as_deref(),
        Some("http://127.0.0.2:8081")
    );
    assert_eq!(pod.backend.admin_token.as_deref(), Some("admin-t0k"));
    wait_until("the API key", || !keys.is_empty()).await;
    let Authentication::Allowed(caller) = keys.authenticate(Some("Bearer sk-1")) else {
        panic!("the Secret's key is accepted");
    };
    assert_eq!(caller.key_name.as_deref(), Some("team/key-1"));
    assert_eq!(caller.tenant.as_deref(), Some("acme"));
    wait_until("the policy", || limiter.policy_count() == 1).await;
    let policy = limiter.policies()[0].clone();
    assert_eq!(policy.name, "team/global");
    assert_eq!(
        policy.limits.requests_per_minute,
        Some(60.0),
        "split over the two ready router replicas"
    );
    wait_until("the adapter", || {
        fleet
            .declared_adapters()
            .get("llama-sql")
            .map(String::as_str)
            == Some("llama")
    })
    .await;

    // A second pod becomes ready, then the first goes away.
    wait_until("the slice watch", || {
        watches.lock().expect("lock").contains_key("endpointslices")
    })
    .await;
    let both = [
        ("llama-daemon-a", "127.0.0.2"),
        ("llama-daemon-b", "127.0.0.3"),
    ];
    send_event(
        &watches,
        "endpointslices",
        "MODIFIED",
        daemon_slice(&both, "2"),
    );
    wait_until("two pods", || names().len() == 2).await;
    assert!(
        Arc::ptr_eq(&fleet.pods()[0], &pod),
        "pod a is kept as it was"
    );
    assert_eq!(targets.followers.len(), 2);
    send_event(
        &watches,
        "endpointslices",
        "MODIFIED",
        daemon_slice(&both[1..], "3"),
    );
    wait_until("pod a to leave", || names() == ["team/llama-daemon-b"]).await;
    assert_eq!(targets.followers.len(), 1);
    let changes = &targets.metrics.membership_changes;
    assert_eq!(changes.with_label_values(&["added"]).get(), 2);
    assert_eq!(changes.with_label_values(&["removed"]).get(), 1);

    // The key's Secret is deleted: the key stops working.
    wait_until("the key watch", || {
        watches.lock().expect("lock").contains_key("api-keys")
    })
    .await;
    send_event(&watches, "api-keys", "DELETED", api_key_secret("4"));
    wait_until("the key to go", || keys.is_empty()).await;
    assert_eq!(
        keys.authenticate(Some("Bearer sk-1")),
        Authentication::Denied
    );
    running.abort();
    server.abort();
}
