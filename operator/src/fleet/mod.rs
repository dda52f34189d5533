//! The ModelDeployment reconciler, which owns everything about one pool of daemon pods: its
//! children (Deployment, headless Service, admin-token Secret), skill and adapter placement over
//! its pods, pushing each pod's desired state, reading the daemons' state back, and the statuses
//! of the ModelDeployment and of its Skills and LoRAAdapters, plus the pods' readiness gate.
//!
//! Pipeline: fetch → validate → build → apply → plan → push → status.

mod children;
mod gather;
pub mod plan;
pub mod status;
pub mod write;

#[cfg(test)]
pub(crate) mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::join_all;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use skillkv_api::admin::DesiredState;
use skillkv_api::v1alpha1::{ModelDeployment, condition_types as types};

use crate::build::{BuildChildrenError, ResolveModelUriError};
use crate::conditions::ConditionUpdate;
use crate::context::Context;
use crate::daemon::DaemonAdminError;
use plan::{PodReport, plan};
use status::Observed;

pub use children::apply_params;

/// The `controller` label of this reconciler's metrics.
pub const CONTROLLER: &str = "modeldeployment";

/// Why a ModelDeployment reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[source] kube::Error),
    /// Applying a child failed (for example a conflict with another field manager).
    #[error("applying {kind} {name} failed: {source}")]
    ApplyChild {
        /// The child's kind.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The children cannot be generated from the spec.
    #[error(transparent)]
    Build(#[from] BuildChildrenError),
    /// The admin-token Secret exists but holds no token.
    #[error("Secret {secret} holds no admin token")]
    AdminTokenMissing {
        /// The Secret.
        secret: String,
    },
    /// The object has no namespace.
    #[error("the object has no namespace")]
    NoNamespace,
}

impl ReconcileError {
    fn apply(kind: &'static str, name: &str, source: kube::Error) -> Self {
        Self::ApplyChild {
            kind,
            name: name.to_owned(),
            source,
        }
    }

    /// The Condition reason and metric label of the error.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ApplyChild {
                source: kube::Error::Api(status),
                ..
            } if status.is_conflict() => "ApplyConflict",
            Self::ApplyChild { .. } => "ApplyFailed",
            Self::Kube(_) => "KubernetesApiError",
            Self::Build(BuildChildrenError::ModelUri(ResolveModelUriError::ServedName {
                ..
            })) => "InvalidServedName",
            Self::Build(BuildChildrenError::ModelUri(_)) => "InvalidModelUri",
            Self::Build(BuildChildrenError::UnsupportedKvDtype(_)) => "UnsupportedKvDtype",
            Self::Build(_) => "InvalidSpec",
            Self::AdminTokenMissing { .. } => "AdminTokenMissing",
            Self::NoNamespace => "InvalidSpec",
        }
    }
}

/// Reconciles one ModelDeployment (the controller's entry point).
pub async fn reconcile(
    guarded: Arc<DeserializeGuard<ModelDeployment>>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let _timer = ctx.metrics.start_reconcile(CONTROLLER);
    let model = match &guarded.0 {
        Ok(model) => model,
        Err(invalid) => {
            tracing::warn!(name = ?invalid.metadata.name, namespace = ?invalid.metadata.namespace, error = %invalid.error, "ignoring a ModelDeployment that does not deserialize");
            ctx.metrics.reconcile_failed(CONTROLLER, "InvalidObject");
            return Ok(Action::await_change());
        }
    };
    if model.metadata.deletion_timestamp.is_some() {
        // Children are garbage-collected through their owner references.
        return Ok(Action::await_change());
    }
    match sync_model(model, &ctx, None).await {
        Ok(action) => Ok(action),
        Err(error) => {
            ctx.metrics.reconcile_failed(CONTROLLER, error.reason());
            tracing::warn!(model = %model.name_any(), namespace = ?model.namespace(), reason = error.reason(), %error, "reconcile failed");
            let update = ConditionUpdate::met(types::DEGRADED, error.reason(), error.to_string());
            if let Err(status_error) = write::model_condition(model, &ctx, update).await {
                tracing::warn!(model = %model.name_any(), error = %status_error, "writing the Degraded condition failed");
            }
            write::publish(
                model,
                EventType::Warning,
                error.reason(),
                error.to_string(),
                &ctx,
            )
            .await;
            Err(error)
        }
    }
}

/// Backoff after a failed reconcile: the controller retries, never crashes.
pub fn error_policy(
    _model: Arc<DeserializeGuard<ModelDeployment>>,
    error: &ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    let delay = match error {
        ReconcileError::Build(_) => ctx.settings.resync(),
        _ => ctx.settings.progress() * 3,
    };
    Action::requeue(delay)
}

/// One full pass over a pool. `excluding` names a skill being deleted (its finalizer runs this
/// to unpin it before it goes away).
pub async fn sync_model(
    model: &ModelDeployment,
    ctx: &Context,
    excluding: Option<&str>,
) -> Result<Action, ReconcileError> {
    let namespace = model.namespace().ok_or(ReconcileError::NoNamespace)?;
    let name = model.name_any();
    let token = children::ensure_admin_token(model, &namespace, ctx).await?;
    children::apply_children(model, &namespace, ctx).await?;

    let pods = gather::pool_pods(&name, &namespace, ctx).await?;
    let skills = gather::model_skills(&name, &namespace, ctx, excluding).await?;
    let adapters = gather::model_adapters(&name, &namespace, ctx).await?;
    let reports = gather::daemon_reports(&pods, &token, ctx).await;
    let plan = plan(&pods, &reports, &skills, &adapters);

    let pushes = plan.desired.iter().filter_map(|(pod, desired)| {
        let state = reports.get(pod).and_then(PodReport::state)?;
        if !plan::needs_push(desired, state) {
            return None;
        }
        let endpoint = gather::endpoint(&pods, pod, &token)?;
        let document = DesiredState {
            generation: state.desired_generation.unwrap_or(0) + 1,
            skills: desired.skills.clone(),
            adapters: desired.adapters.clone(),
        };
        Some(async move {
            let result: Result<_, DaemonAdminError> =
                ctx.daemons.put_desired(&endpoint, &document).await;
            (pod.clone(), document.generation, result)
        })
    });
    let mut push_errors = BTreeMap::new();
    let mut pushed_any = false;
    for (pod, generation, result) in join_all(pushes).await {
        match result {
            Ok(applied) => {
                tracing::info!(%pod, generation, changed = applied.changed, "pushed desired state");
                pushed_any = true;
            }
            Err(error) => {
                tracing::warn!(%pod, generation, %error, "pushing desired state failed");
                push_errors.insert(pod, error.to_string());
            }
        }
    }

    let observed = Observed {
        pods: &pods,
        reports: &reports,
        push_errors: &push_errors,
        plan: &plan,
        now: Timestamp::now(),
    };
    let settled = write::statuses(model, &skills, &adapters, observed, ctx).await?;
    Ok(if settled && !pushed_any && push_errors.is_empty() {
        Action::requeue(ctx.settings.resync())
    } else {
        Action::requeue(ctx.settings.progress())
    })
}
