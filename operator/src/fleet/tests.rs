//! Reconcile tests of the ModelDeployment pipeline against the mocked API server and fake
//! daemons: the happy path, an apply conflict, an unreachable daemon, and a pod that vanished.
//! The request helpers are shared with the Skill finalizer's tests.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use kube::core::DeserializeGuard;
use serde_json::{Value, json};
use skillkv_api::v1alpha1::ModelDeployment;

use super::reconcile;
use crate::context::Context;
use crate::fixtures::{ApiServerVerifier, FakeDaemon, daemon_state, list_of, status_error};

pub(crate) const NS: &str = "team";
pub(crate) const SKILL_TEXT: &str =
    "---\nname: sql\ndescription: Writes SQL.\n---\nYou write careful SQL.\n";

pub(crate) fn model_json() -> Value {
    json!({
        "apiVersion": "skillkv.io/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "llm", "namespace": NS, "uid": "uid-llm", "generation": 3},
        "spec": {"model": {"uri": "file:///models/m.gguf"}, "replicas": 2},
    })
}

pub(crate) fn guarded_model() -> Arc<DeserializeGuard<ModelDeployment>> {
    let model: ModelDeployment = serde_json::from_value(model_json()).expect("model parses");
    Arc::new(DeserializeGuard(Ok(model)))
}

pub(crate) fn skill_json(replicas: Option<i32>, placed_on: &[&str]) -> Value {
    let placements: Vec<Value> = placed_on
        .iter()
        .map(|pod| json!({"pod": pod, "state": "Ready"}))
        .collect();
    let mut spec = json!({"modelRef": {"name": "llm"}, "source": {"inline": SKILL_TEXT}});
    if let Some(replicas) = replicas {
        spec["replicas"] = json!(replicas);
    }
    json!({
        "apiVersion": "skillkv.io/v1alpha1", "kind": "Skill",
        "metadata": {"name": "sql", "namespace": NS, "uid": "uid-sql", "generation": 1},
        "spec": spec,
        "status": {"placements": placements},
    })
}

pub(crate) fn pod_json(name: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"skillkv.io/model-deployment": "llm"}},
        "spec": {"nodeName": node, "containers": [{"name": "daemon"}]},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    })
}

pub(crate) fn secret_json() -> Value {
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": "llm-admin-token", "namespace": NS},
           "data": {"token": "czNjcjN0"}}) // "s3cr3t"
}

pub(crate) const SECRET_PATH: &str = "/api/v1/namespaces/team/secrets/llm-admin-token";
const MODEL_STATUS_PATH: &str =
    "/apis/skillkv.io/v1alpha1/namespaces/team/modeldeployments/llm/status";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/team/events";

/// Answers the admin-token Secret fetch.
pub(crate) async fn serve_secret(api: &mut ApiServerVerifier) {
    api.expect(Method::GET, SECRET_PATH, 200, secret_json())
        .await;
}

/// Answers the ModelDeployment status patch with `body`; the patch sent.
async fn expect_model_status(api: &mut ApiServerVerifier, body: Value) -> Value {
    api.expect(Method::PATCH, MODEL_STATUS_PATH, 200, body)
        .await
}

/// Answers an Event; the Event sent.
async fn expect_event(api: &mut ApiServerVerifier) -> Value {
    api.expect_echo(Method::POST, EVENTS_PATH).await
}

/// Answers the fetch and apply steps up to the pod list.
pub(crate) async fn serve_children(api: &mut ApiServerVerifier) -> Value {
    serve_secret(api).await;
    let deployment = api
        .expect_echo(
            Method::PATCH,
            "/apis/apps/v1/namespaces/team/deployments/llm-daemon",
        )
        .await;
    api.expect_echo(Method::PATCH, "/api/v1/namespaces/team/services/llm-daemon")
        .await;
    let empty = list_of("PartialObjectMetadataList", "meta.k8s.io/v1", vec![]);
    api.expect(
        Method::GET,
        "/apis/apps/v1/namespaces/team/deployments",
        200,
        empty.clone(),
    )
    .await;
    api.expect(Method::GET, "/api/v1/namespaces/team/services", 200, empty)
        .await;
    deployment
}

pub(crate) async fn serve_lists(api: &mut ApiServerVerifier, pods: Vec<Value>, skills: Vec<Value>) {
    api.expect(
        Method::GET,
        "/api/v1/namespaces/team/pods",
        200,
        list_of("PodList", "v1", pods),
    )
    .await;
    api.expect(
        Method::GET,
        "/apis/skillkv.io/v1alpha1/namespaces/team/skills",
        200,
        list_of("SkillList", "skillkv.io/v1alpha1", skills),
    )
    .await;
    api.expect(
        Method::GET,
        "/apis/skillkv.io/v1alpha1/namespaces/team/loraadapters",
        200,
        list_of("LoRAAdapterList", "skillkv.io/v1alpha1", vec![]),
    )
    .await;
}

pub(crate) fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["status"]["conditions"]
        .as_array()
        .and_then(|conditions| conditions.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

/// Runs the API side of a test beside the reconcile task, both bounded in time.
pub(crate) async fn run<T, R>(
    test: impl Future<Output = T>,
    reconcile: tokio::task::JoinHandle<R>,
) -> (T, R) {
    tokio::time::timeout(Duration::from_secs(10), async {
        let verified = test.await;
        let result = reconcile.await.expect("reconcile task");
        (verified, result)
    })
    .await
    .expect("the reconcile finishes")
}

#[tokio::test]
async fn a_new_skill_is_pushed_to_every_pod_and_reported_pending() {
    let (ctx, mut api, daemons) = Context::test();
    daemons.insert("llm-0", FakeDaemon::Up(Box::new(daemon_state(64))));
    daemons.insert("llm-1", FakeDaemon::Up(Box::new(daemon_state(64))));
    let task = tokio::spawn(reconcile(guarded_model(), ctx.clone()));
    let (bodies, result) = run(
        async {
            let deployment = serve_children(&mut api).await;
            let pods = vec![
                pod_json("llm-0", "node-a", "10.0.0.1"),
                pod_json("llm-1", "node-b", "10.0.0.2"),
            ];
            serve_lists(&mut api, pods, vec![skill_json(None, &[])]).await;
            let skill = api
                .expect(
                    Method::PATCH,
                    "/apis/skillkv.io/v1alpha1/namespaces/team/skills/sql/status",
                    200,
                    skill_json(None, &[]),
                )
                .await;
            let event = expect_event(&mut api).await;
            let gate0 = api
                .expect_echo(Method::PATCH, "/api/v1/namespaces/team/pods/llm-0/status")
                .await;
            api.expect_echo(Method::PATCH, "/api/v1/namespaces/team/pods/llm-1/status")
                .await;
            let model = expect_model_status(&mut api, model_json()).await;
            (deployment, skill, event, gate0, model)
        },
        task,
    )
    .await;
    result.expect("reconcile succeeds");
    let (deployment, skill, event, gate0, model) = bodies;

    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(
        deployment["metadata"]["ownerReferences"][0]["uid"],
        "uid-llm"
    );
    assert_eq!(
        skill["status"]["placements"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(skill["status"]["placements"][0]["state"], "Pending");
    assert_eq!(condition(&skill, "Progressing")["status"], "True");
    assert_eq!(skill["status"]["ready"], "0/2");
    assert_eq!(event["reason"], "Placed");
    assert_eq!(
        gate0["status"]["conditions"][0]["type"],
        "skillkv.io/skills-warm"
    );
    assert_eq!(gate0["status"]["conditions"][0]["status"], "False");
    assert_eq!(model["status"]["replicas"], 2);
    assert_eq!(
        model["status"]["selector"],
        "app.kubernetes.io/component=daemon,skillkv.io/model-deployment=llm"
    );

    let pushes = daemons.pushes.lock().expect("lock").clone();
    assert_eq!(pushes.len(), 2, "one push per pod");
    for (endpoint, desired) in &pushes {
        assert_eq!(endpoint.token, "s3cr3t");
        assert_eq!(desired.generation, 1);
        assert_eq!(desired.skills[0].name, "sql");
        assert_eq!(desired.skills[0].content, SKILL_TEXT);
    }
}

#[tokio::test]
async fn an_apply_conflict_fails_the_reconcile_and_sets_degraded() {
    let (ctx, mut api, _daemons) = Context::test();
    let task = tokio::spawn(reconcile(guarded_model(), ctx.clone()));
    let (status, result) = run(
        async {
            serve_secret(&mut api).await;
            let conflict = status_error(
                409,
                "Conflict",
                "Apply failed with 1 conflict: conflict with \"kubectl\"",
            );
            api.expect(
                Method::PATCH,
                "/apis/apps/v1/namespaces/team/deployments/llm-daemon",
                409,
                conflict,
            )
            .await;
            let status = expect_model_status(&mut api, model_json()).await;
            let event = expect_event(&mut api).await;
            (status, event)
        },
        task,
    )
    .await;
    let (status, event) = status;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "ApplyConflict");
    assert_eq!(event["regarding"]["name"], "llm");
    let error = result.expect_err("a conflict fails the reconcile");
    assert_eq!(error.reason(), "ApplyConflict");
    // The controller requeues with backoff instead of stopping.
    assert_eq!(
        super::error_policy(guarded_model(), &error, ctx.clone()),
        kube::runtime::controller::Action::requeue(ctx.settings.progress() * 3)
    );
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "ApplyConflict");
    let metrics = ctx.metrics.render();
    assert!(metrics.contains("reason=\"ApplyConflict\""), "{metrics}");
}

#[tokio::test]
async fn an_unsupported_kv_dtype_is_degraded_and_never_applied() {
    let (ctx, mut api, _daemons) = Context::test();
    let mut spec = model_json();
    spec["spec"]["engine"] = json!({"kvDtype": "f16"});
    let model: ModelDeployment = serde_json::from_value(spec.clone()).expect("model parses");
    let task = tokio::spawn(reconcile(
        Arc::new(DeserializeGuard(Ok(model))),
        ctx.clone(),
    ));
    let ((status, event), result) = run(
        async {
            serve_secret(&mut api).await;
            // No Deployment patch: the next request is the status.
            let status = expect_model_status(&mut api, spec.clone()).await;
            let event = expect_event(&mut api).await;
            (status, event)
        },
        task,
    )
    .await;
    assert_eq!(event["reason"], "UnsupportedKvDtype");
    assert_eq!(result.expect_err("refused").reason(), "UnsupportedKvDtype");
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "UnsupportedKvDtype");
    assert!(
        degraded["message"].as_str().unwrap_or("").contains("f16"),
        "{degraded}"
    );
}

#[tokio::test]
async fn an_unreachable_daemon_keeps_its_placement_and_degrades_the_skill() {
    let (ctx, mut api, daemons) = Context::test();
    daemons.insert("llm-0", FakeDaemon::Down);
    let task = tokio::spawn(reconcile(guarded_model(), ctx.clone()));
    let (bodies, result) = run(
        async {
            serve_children(&mut api).await;
            serve_lists(
                &mut api,
                vec![pod_json("llm-0", "node-a", "10.0.0.1")],
                vec![skill_json(None, &["llm-0"])],
            )
            .await;
            let skill = api
                .expect(
                    Method::PATCH,
                    "/apis/skillkv.io/v1alpha1/namespaces/team/skills/sql/status",
                    200,
                    skill_json(None, &[]),
                )
                .await;
            api.expect_echo(Method::PATCH, "/api/v1/namespaces/team/pods/llm-0/status")
                .await;
            let model = expect_model_status(&mut api, model_json()).await;
            (skill, model)
        },
        task,
    )
    .await;
    result.expect("an unreachable daemon is reported, not fatal");
    let (skill, model) = bodies;
    let placement = &skill["status"]["placements"][0];
    assert_eq!(placement["pod"], "llm-0");
    assert_eq!(placement["state"], "Pending");
    assert!(
        placement["message"]
            .as_str()
            .unwrap_or_default()
            .contains("unreachable"),
        "{placement}"
    );
    assert_eq!(condition(&skill, "Degraded")["reason"], "DaemonUnreachable");
    assert_eq!(condition(&skill, "Ready")["status"], "False");
    assert_eq!(condition(&model, "Degraded")["reason"], "DaemonUnreachable");
    assert!(daemons.pushes.lock().expect("lock").is_empty());
}

/// Serves one settled pass over `pods` (name, node, IP) with one skill, after the children:
/// the lists, the skill's status patch (returned), its event, each pod's gate and the model's
/// status.
async fn serve_one_skill_pass(
    api: &mut ApiServerVerifier,
    pods: &[(&str, &str, &str)],
    skill: Value,
) -> Value {
    let pod_objects = pods
        .iter()
        .map(|(name, node, ip)| pod_json(name, node, ip))
        .collect();
    serve_lists(api, pod_objects, vec![skill]).await;
    let patched = api
        .expect(
            Method::PATCH,
            "/apis/skillkv.io/v1alpha1/namespaces/team/skills/sql/status",
            200,
            skill_json(None, &[]),
        )
        .await;
    expect_event(api).await;
    for (name, _, _) in pods {
        api.expect_echo(
            Method::PATCH,
            &format!("/api/v1/namespaces/team/pods/{name}/status"),
        )
        .await;
    }
    expect_model_status(api, model_json()).await;
    patched
}

#[tokio::test]
async fn a_vanished_pod_is_replaced_by_a_surviving_one() {
    let (ctx, mut api, daemons) = Context::test();
    daemons.insert("llm-1", FakeDaemon::Up(Box::new(daemon_state(64))));
    let task = tokio::spawn(reconcile(guarded_model(), ctx.clone()));
    let (skill, result) = run(
        async {
            serve_children(&mut api).await;
            // The skill was on llm-0, which is gone; llm-1 remains.
            serve_one_skill_pass(
                &mut api,
                &[("llm-1", "node-b", "10.0.0.2")],
                skill_json(Some(1), &["llm-0"]),
            )
            .await
        },
        task,
    )
    .await;
    result.expect("reconcile succeeds");
    let placements = skill["status"]["placements"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(placements.len(), 1);
    assert_eq!(placements[0]["pod"], "llm-1");
    assert_eq!(placements[0]["node"], "node-b");
    let pushes = daemons.pushes.lock().expect("lock").clone();
    assert_eq!(pushes.len(), 1);
    assert_eq!(pushes[0].0.pod, "llm-1");
    assert_eq!(pushes[0].0.base_url, "http://10.0.0.2:8081");
}

#[tokio::test]
async fn every_pod_knows_every_skill_and_only_placed_pods_pin_it() {
    let (ctx, mut api, daemons) = Context::test();
    daemons.insert("llm-0", FakeDaemon::Up(Box::new(daemon_state(64))));
    daemons.insert("llm-1", FakeDaemon::Up(Box::new(daemon_state(64))));
    let task = tokio::spawn(reconcile(guarded_model(), ctx.clone()));
    let (skill, result) = run(
        async {
            serve_children(&mut api).await;
            serve_one_skill_pass(
                &mut api,
                &[
                    ("llm-0", "node-a", "10.0.0.1"),
                    ("llm-1", "node-b", "10.0.0.2"),
                ],
                skill_json(Some(1), &[]),
            )
            .await
        },
        task,
    )
    .await;
    result.expect("reconcile succeeds");
    let placements = skill["status"]["placements"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(placements.len(), 1, "replicas: 1 places one copy");
    let placed = placements[0]["pod"].as_str().expect("pod").to_string();

    // Both pods get the skill, so a request naming it can be served on either; only the
    // placed one pins it.
    let pushes = daemons.pushes.lock().expect("lock").clone();
    assert_eq!(pushes.len(), 2, "one push per pod");
    for (endpoint, desired) in &pushes {
        assert_eq!(desired.skills.len(), 1, "{}", endpoint.pod);
        assert_eq!(desired.skills[0].name, "sql");
        assert_eq!(
            desired.skills[0].pin,
            endpoint.pod == placed,
            "{}",
            endpoint.pod
        );
    }
}
