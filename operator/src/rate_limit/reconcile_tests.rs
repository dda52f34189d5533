//! Reconcile tests of RateLimitPolicies against the mocked API server: a conflict between two
//! policies sets Conflicted on the reconciled one, matched keys are counted by tenant, an
//! unchanged status is not written again, and an API failure is an error that is counted.

use std::sync::Arc;

use http::Method;
use k8s_openapi::ByteString;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use skillkv_api::v1alpha1::RateLimitPolicy;

use super::{error_policy, reconcile};
use crate::context::Context;
use crate::fixtures::{ApiServerVerifier, list_of, status_error};
use crate::fleet::tests::{condition, run};

const LIST_PATH: &str = "/apis/skillkv.io/v1alpha1/ratelimitpolicies";

fn policy_json(name: &str, rpm: i64) -> Value {
    json!({
        "apiVersion": "skillkv.io/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": name, "namespace": "team", "uid": format!("uid-{name}"), "generation": 2},
        "spec": {"subject": "tenant", "selector": {"tenants": ["acme"]},
                 "limits": {"requestsPerMinute": rpm}},
    })
}

const STATUS_PATH: &str = "/apis/skillkv.io/v1alpha1/namespaces/team/ratelimitpolicies/a/status";

/// Answers the two reads of a reconcile: every policy, then the API-key Secrets.
async fn serve_reads(api: &mut ApiServerVerifier, policies: Vec<Value>, secrets: Vec<Value>) {
    let all = list_of("RateLimitPolicyList", "skillkv.io/v1alpha1", policies);
    api.expect(Method::GET, LIST_PATH, 200, all).await;
    let secrets = list_of("SecretList", "v1", secrets);
    api.expect(Method::GET, "/api/v1/secrets", 200, secrets)
        .await;
}

fn guarded(policy: &Value) -> Arc<DeserializeGuard<RateLimitPolicy>> {
    let policy: RateLimitPolicy = serde_json::from_value(policy.clone()).expect("policy parses");
    Arc::new(DeserializeGuard(Ok(policy)))
}

fn key_secret(name: &str, tenant: &str) -> Value {
    let tenant = serde_json::to_value(ByteString(tenant.as_bytes().to_vec())).unwrap_or_default();
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": name, "namespace": "team", "labels": {"skillkv.io/api-key": "true"}},
           "data": {"tenant": tenant}})
}

#[tokio::test]
async fn a_second_policy_with_other_limits_marks_the_policy_conflicted() {
    let (ctx, mut api, _daemons) = Context::test();
    let mine = policy_json("a", 10);
    let task = tokio::spawn(reconcile(guarded(&mine), ctx.clone()));
    let (status, result) = run(
        async {
            serve_reads(
                &mut api,
                vec![mine.clone(), policy_json("b", 20)],
                vec![key_secret("k1", "acme"), key_secret("k2", "other")],
            )
            .await;
            api.expect(Method::PATCH, STATUS_PATH, 200, mine.clone())
                .await
        },
        task,
    )
    .await;
    assert_eq!(
        result.expect("reconcile succeeds"),
        Action::requeue(ctx.settings.resync())
    );
    let conflicted = condition(&status, "Conflicted");
    assert_eq!(conflicted["status"], "True");
    assert_eq!(conflicted["reason"], "SubjectClaimedTwice");
    assert!(
        conflicted["message"]
            .as_str()
            .unwrap_or_default()
            .contains("team/b"),
        "{conflicted}"
    );
    let accepted = condition(&status, "Accepted");
    assert_eq!(accepted["status"], "False");
    assert_eq!(accepted["reason"], "Conflicted");
    assert_eq!(status["status"]["matchedKeys"], 1, "only acme's key");
    assert_eq!(status["status"]["observedGeneration"], 2);
}

#[tokio::test]
async fn an_unchanged_accepted_policy_is_not_written_again() {
    let (ctx, mut api, _daemons) = Context::test();
    let mut mine = policy_json("a", 10);
    // First pass: accepted, written.
    let task = tokio::spawn(reconcile(guarded(&mine), ctx.clone()));
    let (status, result) = run(
        async {
            serve_reads(&mut api, vec![mine.clone()], vec![]).await;
            api.expect(Method::PATCH, STATUS_PATH, 200, mine.clone())
                .await
        },
        task,
    )
    .await;
    result.expect("reconcile succeeds");
    assert_eq!(condition(&status, "Accepted")["reason"], "Accepted");
    assert_eq!(condition(&status, "Conflicted")["status"], "False");

    // Second pass with that status stored: two reads, no write.
    mine["status"] = status["status"].clone();
    let task = tokio::spawn(reconcile(guarded(&mine), ctx.clone()));
    let ((), result) = run(
        async {
            serve_reads(&mut api, vec![mine.clone()], vec![]).await;
        },
        task,
    )
    .await;
    result.expect("reconcile succeeds");
}

#[tokio::test]
async fn an_api_failure_is_an_error_with_backoff_and_a_metric() {
    let (ctx, mut api, _daemons) = Context::test();
    let mine = policy_json("a", 10);
    let guard = guarded(&mine);
    let task = tokio::spawn(reconcile(guard.clone(), ctx.clone()));
    let ((), result) = run(
        async {
            let forbidden = status_error(403, "Forbidden", "cannot list ratelimitpolicies");
            api.expect(Method::GET, LIST_PATH, 403, forbidden).await;
        },
        task,
    )
    .await;
    let error = result.expect_err("a refused list fails the reconcile");
    assert_eq!(
        error_policy(guard, &error, ctx.clone()),
        Action::requeue(ctx.settings.progress() * 3)
    );
    let metrics = ctx.metrics.render();
    assert!(
        metrics.contains("controller=\"ratelimitpolicy\",reason=\"KubernetesApiError\""),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_malformed_policy_is_skipped_without_api_calls() {
    let (ctx, _api, _daemons) = Context::test();
    let mut broken = policy_json("a", 10);
    broken["spec"]["limits"] = json!("not an object");
    let guard: DeserializeGuard<RateLimitPolicy> =
        serde_json::from_value(broken).expect("the guard always deserializes");
    assert!(guard.0.is_err());
    let action = reconcile(Arc::new(guard), ctx.clone())
        .await
        .expect("skipped, not failed");
    assert_eq!(action, Action::await_change());
    assert!(ctx.metrics.render().contains("reason=\"InvalidObject\""));
}
