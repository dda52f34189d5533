//! The fetch step of a pool's reconcile: its pods, the Skills and LoRAAdapters that name it
//! (with each skill's SKILL.md text resolved from `inline` or its ConfigMap and validated), and
//! each daemon's state.

use std::collections::BTreeMap;
use std::path::Path;

use futures::future::join_all;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use skillkv_api::skills::SkillDocument;
use skillkv_api::v1alpha1::{LoRAAdapter, Skill};

use super::ReconcileError;
use super::plan::{PodReport, PoolPod, ResolvedSkill, SkillContent};
use crate::context::Context;
use crate::daemon::DaemonEndpoint;
use crate::names;

/// The pool's pods that are not terminating, sorted by name.
pub async fn pool_pods(
    model: &str,
    namespace: &str,
    ctx: &Context,
) -> Result<Vec<PoolPod>, ReconcileError> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let selector = names::selector_string(model);
    let list = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(ReconcileError::Kube)?;
    let mut pods: Vec<PoolPod> = list
        .items
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .map(|pod| {
            let status = pod.status.clone().unwrap_or_default();
            let condition = |type_: &str| {
                status
                    .conditions
                    .iter()
                    .flatten()
                    .find(|c| c.type_ == type_)
                    .map(|c| c.status == "True")
            };
            PoolPod {
                name: pod.name_any(),
                node: pod.spec.as_ref().and_then(|spec| spec.node_name.clone()),
                ip: status.pod_ip.clone().filter(|ip| !ip.is_empty()),
                ready: condition("Ready").unwrap_or(false),
                warm: condition(names::SKILLS_WARM_CONDITION),
            }
        })
        .collect();
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(pods)
}

/// The Skills of the model, sorted by name, minus `excluding` and those being deleted.
pub async fn model_skills(
    model: &str,
    namespace: &str,
    ctx: &Context,
    excluding: Option<&str>,
) -> Result<Vec<ResolvedSkill>, ReconcileError> {
    let api: Api<Skill> = Api::namespaced(ctx.client.clone(), namespace);
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(ReconcileError::Kube)?;
    let mut skills: Vec<Skill> = list
        .items
        .into_iter()
        .filter(|skill| skill.spec.model_ref.name == model)
        .filter(|skill| skill.metadata.deletion_timestamp.is_none())
        .filter(|skill| Some(skill.name_any().as_str()) != excluding)
        .collect();
    skills.sort_by_key(ResourceExt::name_any);
    let mut resolved = Vec::with_capacity(skills.len());
    for skill in skills {
        let content = skill_text(&skill, namespace, ctx).await?.and_then(|text| {
            SkillDocument::parse(Path::new(&skill.name_any()), text)
                .map(|document| SkillContent {
                    hash: document.content_hash.clone(),
                    text: document.text,
                })
                .map_err(|error| format!("SKILL.md does not parse: {error}"))
        });
        resolved.push(ResolvedSkill { skill, content });
    }
    Ok(resolved)
}

/// The skill's SKILL.md text; the inner error is a user-facing reason (missing ConfigMap/key).
async fn skill_text(
    skill: &Skill,
    namespace: &str,
    ctx: &Context,
) -> Result<Result<String, String>, ReconcileError> {
    if let Some(inline) = &skill.spec.source.inline {
        return Ok(Ok(inline.clone()));
    }
    let Some(reference) = &skill.spec.source.config_map_ref else {
        return Ok(Err("source sets neither inline nor configMapRef".to_owned()));
    };
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(config_map) = api
        .get_opt(&reference.name)
        .await
        .map_err(ReconcileError::Kube)?
    else {
        return Ok(Err(format!("ConfigMap {} not found", reference.name)));
    };
    Ok(config_map
        .data
        .and_then(|mut data| data.remove(&reference.key))
        .ok_or_else(|| format!("ConfigMap {} has no key {}", reference.name, reference.key)))
}

/// The LoRAAdapters of the model that are not being deleted, sorted by name.
pub async fn model_adapters(
    model: &str,
    namespace: &str,
    ctx: &Context,
) -> Result<Vec<LoRAAdapter>, ReconcileError> {
    let api: Api<LoRAAdapter> = Api::namespaced(ctx.client.clone(), namespace);
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(ReconcileError::Kube)?;
    let mut adapters: Vec<LoRAAdapter> = list
        .items
        .into_iter()
        .filter(|adapter| {
            adapter.spec.model_ref.name == model && adapter.metadata.deletion_timestamp.is_none()
        })
        .collect();
    adapters.sort_by_key(ResourceExt::name_any);
    Ok(adapters)
}

/// The admin endpoint of a pod, once it has an IP.
pub fn endpoint(pods: &[PoolPod], pod: &str, token: &str) -> Option<DaemonEndpoint> {
    let ip = pods.iter().find(|p| p.name == pod)?.ip.as_deref()?;
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    };
    Some(DaemonEndpoint {
        pod: pod.to_owned(),
        base_url: format!("http://{host}:{}", names::DAEMON_ADMIN_PORT),
        token: token.to_owned(),
    })
}

/// Asks every pod's daemon for its state, concurrently.
pub async fn daemon_reports(
    pods: &[PoolPod],
    token: &str,
    ctx: &Context,
) -> BTreeMap<String, PodReport> {
    let asks = pods.iter().map(|pod| async move {
        let report = match endpoint(pods, &pod.name, token) {
            None => PodReport::NoAddress,
            Some(endpoint) => match ctx.daemons.state(&endpoint).await {
                Ok(state) => PodReport::State(Box::new(state)),
                Err(error) => {
                    tracing::warn!(pod = %pod.name, %error, "reading daemon state failed");
                    PodReport::Unreachable(error.to_string())
                }
            },
        };
        (pod.name.clone(), report)
    });
    join_all(asks).await.into_iter().collect()
}
