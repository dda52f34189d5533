//! The API side of a ModelDeployment's children: the admin-token Secret (created once, then
//! read), the daemon Deployment and headless Service (server-side apply, one field manager,
//! forced), and the removal of children that carry the pool's label but are no longer desired.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use skillkv_api::v1alpha1::ModelDeployment;

use super::ReconcileError;
use crate::build::{self, DaemonPoolConfig};
use crate::context::Context;
use crate::names;

/// Server-side apply parameters of every write.
pub fn apply_params() -> PatchParams {
    PatchParams::apply(names::FIELD_MANAGER).force()
}

/// Reads the pool's admin token, creating its Secret with a fresh token the first time.
pub async fn ensure_admin_token(
    model: &ModelDeployment,
    namespace: &str,
    ctx: &Context,
) -> Result<String, ReconcileError> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let name = names::admin_token_secret_name(&model.name_any());
    if let Some(token) = secrets
        .get_opt(&name)
        .await
        .map_err(ReconcileError::Kube)?
        .as_ref()
        .and_then(token_of)
    {
        return Ok(token);
    }
    let token = build::generate_admin_token();
    let secret = build::build_admin_token_secret(model, &token)?;
    let params = PostParams {
        field_manager: Some(names::FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    };
    match secrets.create(&params, &secret).await {
        Ok(_) => Ok(token),
        // Another writer created it in between: use theirs.
        Err(kube::Error::Api(status)) if status.is_already_exists() => secrets
            .get(&name)
            .await
            .map_err(ReconcileError::Kube)
            .and_then(|secret| {
                token_of(&secret).ok_or(ReconcileError::AdminTokenMissing { secret: name })
            }),
        Err(error) => Err(ReconcileError::Kube(error)),
    }
}

fn token_of(secret: &Secret) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(names::ADMIN_TOKEN_KEY)?;
    let token = String::from_utf8(bytes.0.clone()).ok()?;
    (!token.trim().is_empty()).then(|| token.trim().to_owned())
}

/// Applies the Deployment and Service, then deletes labelled leftovers of other names.
pub async fn apply_children(
    model: &ModelDeployment,
    namespace: &str,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let settings = &ctx.settings;
    let deployment = build::build_daemon_deployment(
        model,
        DaemonPoolConfig {
            default_image: &settings.daemon_image,
            pull_policy: &settings.daemon_image_pull_policy,
            pull_secrets: &settings.daemon_image_pull_secrets.0,
            model_cache_dir: &settings.model_cache_dir,
            fetch_image: settings.model_fetch_image.as_deref(),
        },
    )?;
    let service = build::build_daemon_service(model)?;
    let pool = names::daemon_pool_name(&model.name_any());

    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    deployments
        .patch(&pool, &apply_params(), &Patch::Apply(&deployment))
        .await
        .map_err(|source| ReconcileError::apply("Deployment", &pool, source))?;
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), namespace);
    services
        .patch(&pool, &apply_params(), &Patch::Apply(&service))
        .await
        .map_err(|source| ReconcileError::apply("Service", &pool, source))?;

    let selector = ListParams::default().labels(&format!(
        "{}={},{}={}",
        names::MODEL_LABEL,
        model.name_any(),
        names::MANAGED_BY_LABEL,
        names::MANAGED_BY
    ));
    for orphan in deployments
        .list_metadata(&selector)
        .await
        .map_err(ReconcileError::Kube)?
    {
        if orphan.name_any() != pool {
            tracing::info!(deployment = %orphan.name_any(), %namespace, "deleting orphaned daemon Deployment");
            deployments
                .delete(&orphan.name_any(), &DeleteParams::background())
                .await
                .map_err(ReconcileError::Kube)?;
        }
    }
    for orphan in services
        .list_metadata(&selector)
        .await
        .map_err(ReconcileError::Kube)?
    {
        if orphan.name_any() != pool {
            tracing::info!(service = %orphan.name_any(), %namespace, "deleting orphaned daemon Service");
            services
                .delete(&orphan.name_any(), &DeleteParams::background())
                .await
                .map_err(ReconcileError::Kube)?;
        }
    }
    Ok(())
}
