//! The Skill reconciler: the finalizer that unpins a deleted skill's KV from its model's daemons
//! (by re-syncing the pool without it) before the object goes away, and the `ModelNotFound`
//! condition for a skill whose ModelDeployment does not exist. Placement and the rest of a
//! skill's status belong to the ModelDeployment reconciler ([`crate::fleet`]).

use std::sync::Arc;

use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Error as FinalizerError, Event, finalizer};
use kube::{Api, ResourceExt};
use skillkv_api::v1alpha1::{ModelDeployment, Skill, condition_types as types};

use crate::conditions::{ConditionUpdate, merge_conditions};
use crate::context::Context;
use crate::fleet::{self, ReconcileError};
use crate::names;

/// The `controller` label of this reconciler's metrics.
pub const CONTROLLER: &str = "skill";

/// Why a Skill reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileSkillError {
    /// Reading the model or writing the status failed.
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[source] kube::Error),
    /// Re-syncing the model's pool without the skill failed; the finalizer stays.
    #[error("unpinning the skill failed: {0}")]
    Unpin(#[source] ReconcileError),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<FinalizerError<ReconcileSkillError>>),
    /// The object has no namespace.
    #[error("the Skill has no namespace")]
    NoNamespace,
}

/// Reconciles one Skill.
pub async fn reconcile(
    guarded: Arc<DeserializeGuard<Skill>>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileSkillError> {
    let _timer = ctx.metrics.start_reconcile(CONTROLLER);
    let skill = match &guarded.0 {
        Ok(skill) => skill.clone(),
        Err(invalid) => {
            tracing::warn!(name = ?invalid.metadata.name, namespace = ?invalid.metadata.namespace, error = %invalid.error, "ignoring a Skill that does not deserialize");
            ctx.metrics.reconcile_failed(CONTROLLER, "InvalidObject");
            return Ok(Action::await_change());
        }
    };
    let namespace = skill.namespace().ok_or(ReconcileSkillError::NoNamespace)?;
    let api: Api<Skill> = Api::namespaced(ctx.client.clone(), &namespace);
    let (namespace_ref, ctx_ref) = (namespace.as_str(), ctx.as_ref());
    let result = finalizer(
        &api,
        names::SKILL_FINALIZER,
        Arc::new(skill),
        |event| async move {
            match event {
                Event::Apply(skill) => check_model(&skill, namespace_ref, ctx_ref).await,
                Event::Cleanup(skill) => unpin(&skill, namespace_ref, ctx_ref).await,
            }
        },
    )
    .await
    .map_err(|error| ReconcileSkillError::Finalizer(Box::new(error)));
    if let Err(error) = &result {
        ctx.metrics.reconcile_failed(CONTROLLER, "FinalizerFailed");
        tracing::warn!(%error, "skill reconcile failed");
    }
    result
}

/// Backoff after a failed Skill reconcile.
pub fn error_policy(
    _skill: Arc<DeserializeGuard<Skill>>,
    _error: &ReconcileSkillError,
    ctx: Arc<Context>,
) -> Action {
    Action::requeue(ctx.settings.progress() * 3)
}

/// Sets `ModelNotFound` when the skill's ModelDeployment is missing; otherwise the pool's
/// reconciler owns the status.
async fn check_model(
    skill: &Skill,
    namespace: &str,
    ctx: &Context,
) -> Result<Action, ReconcileSkillError> {
    let models: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), namespace);
    let model = &skill.spec.model_ref.name;
    if models
        .get_opt(model)
        .await
        .map_err(ReconcileSkillError::Kube)?
        .is_some()
    {
        return Ok(Action::await_change());
    }
    let message = format!("ModelDeployment {model} does not exist in namespace {namespace}");
    let mut status = skill.status.clone().unwrap_or_default();
    let generation = skill.metadata.generation;
    let conditions = merge_conditions(
        &status.conditions,
        &[
            ConditionUpdate::unmet(types::READY, "ModelNotFound", message.clone()),
            ConditionUpdate::met(types::DEGRADED, "ModelNotFound", message),
        ],
        generation,
        k8s_openapi::jiff::Timestamp::now(),
    );
    if conditions != status.conditions || status.observed_generation != generation {
        status.conditions = conditions;
        status.observed_generation = generation;
        status.placements.clear();
        fleet::write::apply_status(skill, &status, ctx)
            .await
            .map_err(ReconcileSkillError::Kube)?;
    }
    Ok(Action::requeue(ctx.settings.resync()))
}

/// Pushes the pool's desired state without the skill. Daemons that cannot be reached do not
/// block deletion: every later reconcile pushes a desired state without the skill.
async fn unpin(
    skill: &Skill,
    namespace: &str,
    ctx: &Context,
) -> Result<Action, ReconcileSkillError> {
    let models: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(model) = models
        .get_opt(&skill.spec.model_ref.name)
        .await
        .map_err(ReconcileSkillError::Kube)?
    else {
        return Ok(Action::await_change());
    };
    if model.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    fleet::sync_model(&model, ctx, Some(&skill.name_any()))
        .await
        .map_err(ReconcileSkillError::Unpin)?;
    tracing::info!(skill = %skill.name_any(), %namespace, "unpinned deleted skill");
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests;
