//! The status step of a pool's reconcile: server-side apply of the Skill, LoRAAdapter and
//! ModelDeployment statuses (only when they changed), the pods' `skillkv.io/skills-warm`
//! condition, and Events for placements and failures.

use std::collections::BTreeSet;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Patch;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde_json::json;
use skillkv_api::v1alpha1::{
    AdapterState, LoRAAdapter, ModelDeployment, PlacementState, Skill, SkillStatus,
    condition_types as types,
};

use super::plan::ResolvedSkill;
use super::status::{Observed, adapter_status, model_status, pod_is_warm, skill_status};
use super::{ReconcileError, apply_params};
use crate::conditions::{ConditionUpdate, merge_conditions};
use crate::context::Context;
use crate::names;

/// Applies `status` to the object's status subresource.
pub async fn apply_status<K, S>(object: &K, status: &S, ctx: &Context) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    S: Serialize,
{
    let api: Api<K> = match object.meta().namespace.as_deref() {
        Some(namespace) => Api::namespaced(ctx.client.clone(), namespace),
        None => Api::default_namespaced(ctx.client.clone()),
    };
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(&object.name_any(), &apply_params(), &Patch::Apply(&patch))
        .await?;
    Ok(())
}

/// Sets one condition on a ModelDeployment (used when a reconcile fails).
pub async fn model_condition(
    model: &ModelDeployment,
    ctx: &Context,
    update: ConditionUpdate,
) -> Result<(), kube::Error> {
    let mut status = model.status.clone().unwrap_or_default();
    let generation = model.metadata.generation;
    status.conditions = merge_conditions(
        &status.conditions,
        &[update],
        generation,
        k8s_openapi::jiff::Timestamp::now(),
    );
    apply_status(model, &status, ctx).await
}

/// Writes every status of the pool; returns whether everything is settled (nothing pending).
pub async fn statuses(
    model: &ModelDeployment,
    skills: &[ResolvedSkill],
    adapters: &[LoRAAdapter],
    observed: Observed<'_>,
    ctx: &Context,
) -> Result<bool, ReconcileError> {
    let mut settled = true;
    for resolved in skills {
        let new = skill_status(resolved, observed);
        settled &= new
            .placements
            .iter()
            .all(|p| p.state == PlacementState::Ready);
        let old = resolved.skill.status.clone().unwrap_or_default();
        if new != old {
            apply_status(&resolved.skill, &new, ctx)
                .await
                .map_err(ReconcileError::Kube)?;
            skill_events(&resolved.skill, &old, &new, ctx).await;
        }
    }
    for adapter in adapters {
        let new = adapter_status(adapter, observed);
        settled &= new
            .placements
            .iter()
            .all(|p| p.state == AdapterState::Ready);
        let old = adapter.status.clone().unwrap_or_default();
        if new != old {
            apply_status(adapter, &new, ctx)
                .await
                .map_err(ReconcileError::Kube)?;
            let newly_failed = new.placements.iter().find(|p| {
                p.state == AdapterState::Failed
                    && !old
                        .placements
                        .iter()
                        .any(|o| o.pod == p.pod && o.state == AdapterState::Failed)
            });
            if let Some(failed) = newly_failed {
                let note = format!(
                    "{}: {}",
                    failed.pod,
                    failed.message.clone().unwrap_or_default()
                );
                publish(adapter, EventType::Warning, "LoadFailed", note, ctx).await;
            }
        }
    }
    for pod in observed.pods {
        let warm = pod_is_warm(&pod.name, observed);
        settled &= warm && pod.ready;
        if pod.warm != Some(warm) {
            set_pod_warm(&pod.name, model, warm, ctx).await?;
        }
    }
    let new = model_status(model, observed);
    if Some(&new) != model.status.as_ref() {
        apply_status(model, &new, ctx)
            .await
            .map_err(ReconcileError::Kube)?;
    }
    Ok(settled)
}

async fn set_pod_warm(
    pod: &str,
    model: &ModelDeployment,
    warm: bool,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let namespace = model.namespace().ok_or(ReconcileError::NoNamespace)?;
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "status": {"conditions": [{
            "type": names::SKILLS_WARM_CONDITION,
            "status": if warm { "True" } else { "False" },
            "reason": if warm { "SkillsWarm" } else { "SkillsNotWarm" },
            "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
        }]},
    });
    match api
        .patch_status(pod, &apply_params(), &Patch::Apply(&patch))
        .await
    {
        Ok(_) => Ok(()),
        // The pod vanished since it was listed: the next reconcile places around it.
        Err(kube::Error::Api(status)) if status.is_not_found() => {
            tracing::info!(%pod, "pod vanished before its readiness gate was set");
            Ok(())
        }
        Err(error) => Err(ReconcileError::Kube(error)),
    }
}

async fn skill_events(skill: &Skill, old: &SkillStatus, new: &SkillStatus, ctx: &Context) {
    let before: BTreeSet<&str> = old.placements.iter().map(|p| p.pod.as_str()).collect();
    let added: Vec<&str> = new
        .placements
        .iter()
        .map(|p| p.pod.as_str())
        .filter(|pod| !before.contains(pod))
        .collect();
    if !added.is_empty() {
        publish(
            skill,
            EventType::Normal,
            "Placed",
            format!("placed on {}", added.join(", ")),
            ctx,
        )
        .await;
    }
    let degraded_reason = |status: &SkillStatus| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == types::DEGRADED && c.status == "True")
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    if let Some((reason, message)) = degraded_reason(new)
        && degraded_reason(old).map(|(r, _)| r) != Some(reason.clone())
        && (reason == "InsufficientKVCapacity" || reason == "PrefillFailed")
    {
        publish(skill, EventType::Warning, &reason, message, ctx).await;
    }
}

/// Publishes an Event on `object`; a failure to publish is logged, never fatal.
pub async fn publish<K: Resource<DynamicType = ()>>(
    object: &K,
    type_: EventType,
    reason: &str,
    note: String,
    ctx: &Context,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &object.object_ref(&())).await {
        tracing::warn!(object = %object.meta().name.clone().unwrap_or_default(), %error, "publishing an Event failed");
    }
}
