//! Reconcile tests of the Skill finalizer against the mocked API server and fake daemons:
//! adding the finalizer, `ModelNotFound`, and deleting a pinned skill (unpinned from every
//! pod's desired state, then the finalizer removed, even when a daemon is down).

use std::sync::Arc;

use http::Method;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use skillkv_api::admin::{SkillOrigin, SkillState};
use skillkv_api::skills::SkillDocument;
use skillkv_api::v1alpha1::{PlacementState, Skill};

use super::reconcile;
use crate::context::Context;
use crate::fixtures::{FakeDaemon, daemon_state, status_error};
use crate::fleet::tests::{
    SECRET_PATH, SKILL_TEXT, condition, model_json, pod_json, run, serve_children, serve_lists,
    skill_json,
};
use crate::names;

const SKILL_PATH: &str = "/apis/skillkv.io/v1alpha1/namespaces/team/skills/sql";
const MODEL_PATH: &str = "/apis/skillkv.io/v1alpha1/namespaces/team/modeldeployments/llm";

fn guarded(skill: Value) -> Arc<DeserializeGuard<Skill>> {
    let skill: Skill = serde_json::from_value(skill).expect("skill parses");
    Arc::new(DeserializeGuard(Ok(skill)))
}

fn with_finalizer(mut skill: Value) -> Value {
    skill["metadata"]["finalizers"] = json!([names::SKILL_FINALIZER]);
    skill
}

fn deleted(skill: Value) -> Value {
    let mut skill = with_finalizer(skill);
    skill["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    skill
}

/// A daemon that holds `sql` pinned from desired generation 1.
fn daemon_pinning_sql() -> FakeDaemon {
    let document = SkillDocument::parse(std::path::Path::new("sql"), SKILL_TEXT.to_owned())
        .expect("SKILL.md parses");
    let mut state = daemon_state(64);
    state.desired_generation = Some(1);
    state.skills.push(SkillState {
        name: "sql".to_owned(),
        version: None,
        description: document.front_matter.description.clone(),
        keywords: Vec::new(),
        content_hash: document.content_hash.clone(),
        serving_content_hash: Some(document.content_hash),
        origin: SkillOrigin::Desired,
        assembly: Default::default(),
        state: PlacementState::Ready,
        message: None,
        tokens: 12,
        last_block: None,
        kv_bytes: 12 * 1024,
        prefill_millis: Some(3),
        hits: 0,
        cached_tokens: 0,
        prefill_seconds_saved: 0.0,
    });
    FakeDaemon::Up(Box::new(state))
}

#[tokio::test]
async fn a_new_skill_gets_the_finalizer_first() {
    let (ctx, mut api, _daemons) = Context::test();
    let task = tokio::spawn(reconcile(guarded(skill_json(None, &[])), ctx.clone()));
    let (patch, result) = run(
        api.expect(
            Method::PATCH,
            SKILL_PATH,
            200,
            with_finalizer(skill_json(None, &[])),
        ),
        task,
    )
    .await;
    assert_eq!(result.expect("reconcile succeeds"), Action::await_change());
    let added = patch
        .as_array()
        .and_then(|ops| ops.iter().find(|op| op["op"] == "add"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(added["path"], "/metadata/finalizers");
    assert_eq!(added["value"], json!([names::SKILL_FINALIZER]));
}

#[tokio::test]
async fn a_skill_of_a_missing_model_is_reported_model_not_found() {
    let (ctx, mut api, _daemons) = Context::test();
    let skill = with_finalizer(skill_json(None, &["llm-0"]));
    let task = tokio::spawn(reconcile(guarded(skill.clone()), ctx.clone()));
    let (status, result) = run(
        async {
            let missing = status_error(404, "NotFound", "modeldeployments \"llm\" not found");
            api.expect(Method::GET, MODEL_PATH, 404, missing).await;
            api.expect(Method::PATCH, &format!("{SKILL_PATH}/status"), 200, skill)
                .await
        },
        task,
    )
    .await;
    result.expect("a missing model is a condition, not an error");
    assert_eq!(condition(&status, "Ready")["reason"], "ModelNotFound");
    assert_eq!(condition(&status, "Degraded")["status"], "True");
    assert_eq!(
        status["status"]["placements"]
            .as_array()
            .map_or(0, Vec::len),
        0,
        "placements on a missing model are cleared: {status}"
    );
}

#[tokio::test]
async fn a_skill_of_an_existing_model_is_left_to_the_pool_reconciler() {
    let (ctx, mut api, _daemons) = Context::test();
    let task = tokio::spawn(reconcile(
        guarded(with_finalizer(skill_json(None, &[]))),
        ctx.clone(),
    ));
    let ((), result) = run(
        async {
            api.expect(Method::GET, MODEL_PATH, 200, model_json()).await;
        },
        task,
    )
    .await;
    assert_eq!(result.expect("reconcile succeeds"), Action::await_change());
}

/// Serves the pool re-sync of a deletion: children, lists (the deleted skill still listed),
/// the pod's readiness gate and the model's status. Returns the gate patch.
async fn serve_unpin_sync(api: &mut crate::fixtures::ApiServerVerifier, pods: &[&str]) -> Value {
    api.expect(Method::GET, MODEL_PATH, 200, model_json()).await;
    serve_children(api).await;
    let listed: Vec<Value> = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| pod_json(pod, &format!("node-{i}"), &format!("10.0.0.{}", i + 1)))
        .collect();
    serve_lists(api, listed, vec![deleted(skill_json(None, pods))]).await;
    let mut gate = Value::Null;
    for pod in pods {
        let sent = api
            .expect_echo(
                Method::PATCH,
                &format!("/api/v1/namespaces/team/pods/{pod}/status"),
            )
            .await;
        if gate.is_null() {
            gate = sent;
        }
    }
    api.expect(
        Method::PATCH,
        &format!("{MODEL_PATH}/status"),
        200,
        model_json(),
    )
    .await;
    gate
}

#[tokio::test]
async fn deleting_a_skill_unpins_it_then_removes_the_finalizer() {
    let (ctx, mut api, daemons) = Context::test();
    daemons.insert("llm-0", daemon_pinning_sql());
    let task = tokio::spawn(reconcile(
        guarded(deleted(skill_json(None, &["llm-0"]))),
        ctx.clone(),
    ));
    let ((gate, removal), result) = run(
        async {
            let gate = serve_unpin_sync(&mut api, &["llm-0"]).await;
            let removal = api
                .expect(Method::PATCH, SKILL_PATH, 200, skill_json(None, &[]))
                .await;
            (gate, removal)
        },
        task,
    )
    .await;
    result.expect("cleanup succeeds");

    let pushes = daemons.pushes.lock().expect("lock").clone();
    assert_eq!(
        pushes.len(),
        1,
        "the pod gets a desired state without the skill"
    );
    assert_eq!(pushes[0].0.pod, "llm-0");
    assert_eq!(pushes[0].1.generation, 2);
    assert!(pushes[0].1.skills.is_empty(), "{:?}", pushes[0].1);
    // Nothing is pinned on the pod any more, so it is warm.
    assert_eq!(gate["status"]["conditions"][0]["status"], "True");

    let ops = removal.as_array().cloned().unwrap_or_default();
    assert!(
        ops.iter()
            .any(|op| op["op"] == "remove" && op["path"] == "/metadata/finalizers/0"),
        "{removal}"
    );
    assert!(
        ops.iter()
            .any(|op| op["op"] == "test" && op["value"] == names::SKILL_FINALIZER),
        "the removal only takes out our own finalizer: {removal}"
    );
}

#[tokio::test]
async fn an_unreachable_daemon_does_not_block_deletion() {
    let (ctx, mut api, daemons) = Context::test();
    daemons.insert("llm-0", FakeDaemon::Down);
    let task = tokio::spawn(reconcile(
        guarded(deleted(skill_json(None, &["llm-0"]))),
        ctx.clone(),
    ));
    let (removal, result) = run(
        async {
            serve_unpin_sync(&mut api, &["llm-0"]).await;
            api.expect(Method::PATCH, SKILL_PATH, 200, skill_json(None, &[]))
                .await
        },
        task,
    )
    .await;
    result.expect("cleanup succeeds without the daemon");
    assert!(daemons.pushes.lock().expect("lock").is_empty());
    assert!(
        removal
            .as_array()
            .is_some_and(|ops| ops.iter().any(|op| op["op"] == "remove")),
        "{removal}"
    );
}

#[tokio::test]
async fn a_failed_unpin_keeps_the_finalizer_and_counts_the_error() {
    let (ctx, mut api, _daemons) = Context::test();
    let task = tokio::spawn(reconcile(
        guarded(deleted(skill_json(None, &["llm-0"]))),
        ctx.clone(),
    ));
    let ((), result) = run(
        async {
            api.expect(Method::GET, MODEL_PATH, 200, model_json()).await;
            let down = status_error(503, "ServiceUnavailable", "etcd is down");
            api.expect(Method::GET, SECRET_PATH, 503, down).await;
        },
        task,
    )
    .await;
    let error = result.expect_err("the unpin failed");
    assert!(error.to_string().contains("unpinning"), "{error}");
    let metrics = ctx.metrics.render();
    assert!(
        metrics.contains("controller=\"skill\",reason=\"FinalizerFailed\""),
        "{metrics}"
    );
}
