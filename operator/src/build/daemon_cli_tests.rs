//! The daemon container the operator generates, checked against the daemon's own clap
//! definition of `skillkv` (daemon/src/cli): every argument parses, every value lands in the
//! field meant, every environment variable is one the daemon reads, and the paths and ports the
//! flags name are the ones the pod mounts and exposes. A renamed daemon flag fails here instead
//! of in a crash-looping pod.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{CommandFactory, Parser};
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;
use skillkv_api::v1alpha1::ModelDeployment;
use skillkv_daemon::cli::serve::{API_KEYS_ENV, ServeArgs};
use skillkv_daemon::cli::{Cli, Command};

use super::tests::{CONFIG, model};
use super::*;

fn full_model() -> ModelDeployment {
    model(json!({
        "model": {"uri": "pvc://models/llama/q4.gguf"},
        "servedName": "llama-q4",
        "engine": {"kvCacheBytes": 2147483648_i64, "pinnedFraction": 0.25,
                   "maxBatchTokens": 1024, "maxSeqs": 32},
        "persistence": {"hostPath": "/var/lib/skillkv"}
    }))
}

fn pod(md: &ModelDeployment) -> PodSpec {
    build_daemon_deployment(md, CONFIG)
        .expect("builds")
        .spec
        .and_then(|spec| spec.template.spec)
        .expect("pod spec")
}

fn daemon(pod: &PodSpec) -> &Container {
    pod.containers
        .iter()
        .find(|c| c.name == "daemon")
        .expect("daemon container")
}

/// The daemon's parse of `skillkv <args>`.
fn parse(args: &[String]) -> ServeArgs {
    let argv = std::iter::once("skillkv".to_owned()).chain(args.iter().cloned());
    match Cli::try_parse_from(argv) {
        Ok(Cli {
            command: Command::Serve(serve),
            ..
        }) => serve,
        Ok(other) => panic!("{args:?} is not `serve`: {other:?}"),
        Err(error) => panic!("the daemon rejects {args:?}: {error}"),
    }
}

/// Each environment variable the daemon reads, with the long flag it stands for (`None` for
/// variables read outside clap).
fn daemon_env() -> BTreeMap<String, Option<String>> {
    let cli = Cli::command();
    let serve = cli
        .find_subcommand("serve")
        .expect("the daemon has `serve`")
        .clone();
    let mut env: BTreeMap<String, Option<String>> = cli
        .get_arguments()
        .chain(serve.get_arguments())
        .filter_map(|arg| {
            let name = arg.get_env()?.to_string_lossy().into_owned();
            Some((name, arg.get_long().map(str::to_owned)))
        })
        .collect();
    env.insert(API_KEYS_ENV.to_owned(), None);
    env
}

#[test]
fn the_daemon_parses_the_generated_arguments_into_the_spec_values() {
    let pod = pod(&full_model());
    let container = daemon(&pod);
    let serve = parse(container.args.as_deref().expect("args"));

    assert_eq!(serve.host.to_string(), "0.0.0.0");
    assert_eq!(i32::from(serve.port), names::DAEMON_PUBLIC_PORT);
    assert_eq!(i32::from(serve.admin_port), names::DAEMON_ADMIN_PORT);
    assert_eq!(serve.model, Some(PathBuf::from("/models/llama-q4.gguf")));
    assert_eq!(serve.kv_cache_bytes, Some(2_147_483_648));
    assert_eq!(serve.pinned_fraction, 0.25);
    assert_eq!(serve.max_batch_tokens, 1024);
    assert_eq!(serve.max_seqs, 32);
    assert_eq!(serve.kv_store, Some(PathBuf::from(KV_STORE_MOUNT)));
    assert_eq!(
        serve.admin_token_file,
        Some(PathBuf::from(format!(
            "{}/{}",
            names::ADMIN_TOKEN_MOUNT,
            names::ADMIN_TOKEN_KEY
        )))
    );
}

#[test]
fn without_engine_settings_the_daemon_keeps_its_defaults() {
    let md = model(json!({"model": {"uri": "file:///models/m.gguf"}}));
    let pod = pod(&md);
    let args = daemon(&pod).args.clone().expect("args");
    let serve = parse(&args);
    let defaults = parse(&["serve".to_owned()]);
    assert_eq!(serve.kv_cache_bytes, defaults.kv_cache_bytes);
    assert_eq!(serve.pinned_fraction, defaults.pinned_fraction);
    assert_eq!(serve.max_batch_tokens, defaults.max_batch_tokens);
    assert_eq!(serve.max_seqs, defaults.max_seqs);
    assert_eq!(serve.model, Some(PathBuf::from("/models/llm.gguf")));
    assert!(
        !args.iter().any(|arg| arg.starts_with("--kv-store")),
        "{args:?}"
    );
}

#[test]
fn every_environment_variable_is_one_the_daemon_reads_with_a_valid_value() {
    let known = daemon_env();
    let pod = pod(&full_model());
    let container = daemon(&pod);
    let mut args = container.args.clone().expect("args");
    for var in container.env.iter().flatten() {
        let Some(flag) = known.get(&var.name) else {
            panic!(
                "the daemon reads no {}; it reads {:?}",
                var.name,
                known.keys()
            );
        };
        // The value must parse as the flag the variable stands for.
        if let (Some(flag), Some(value)) = (flag, &var.value) {
            args.push(format!("--{flag}={value}"));
        }
    }
    parse(&args);
    assert!(known.contains_key(DAEMON_LOG_FORMAT_ENV), "{known:?}");
}

#[test]
fn the_paths_and_ports_in_the_flags_are_mounted_and_exposed() {
    let pod = pod(&full_model());
    let container = daemon(&pod);
    let serve = parse(container.args.as_deref().expect("args"));
    let mounts = container.volume_mounts.clone().unwrap_or_default();
    let mounted = |path: &std::path::Path| mounts.iter().any(|m| path.starts_with(&m.mount_path));
    for path in [serve.model, serve.kv_store, serve.admin_token_file]
        .into_iter()
        .flatten()
    {
        assert!(
            mounted(&path),
            "{} is not mounted: {mounts:?}",
            path.display()
        );
    }
    let kv = mounts
        .iter()
        .find(|m| m.mount_path == KV_STORE_MOUNT)
        .expect("kv store mount");
    assert_ne!(kv.read_only, Some(true), "the daemon saves prefills there");
    // kubelet creates the folder root-owned: an init step hands it to the daemon's user.
    let uid = container
        .security_context
        .as_ref()
        .and_then(|context| context.run_as_user)
        .expect("the daemon's user is fixed");
    let prepare = pod
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "prepare-kv-store")
        .expect("an init step prepares the KV store");
    let script = prepare.command.clone().unwrap_or_default().join(" ");
    assert!(
        script.contains(&format!("chown {uid}:{uid} '{KV_STORE_MOUNT}'")),
        "{script}"
    );
    assert!(
        prepare
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == kv.name && m.mount_path == KV_STORE_MOUNT)
    );

    let ports: BTreeMap<String, i32> = container
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    assert_eq!(ports.get("http").copied(), Some(i32::from(serve.port)));
    assert_eq!(
        ports.get("admin").copied(),
        Some(i32::from(serve.admin_port))
    );
    for probe in [
        &container.startup_probe,
        &container.liveness_probe,
        &container.readiness_probe,
    ] {
        let port = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .map(|get| get.port.clone());
        assert_eq!(port, Some(IntOrString::String("http".to_owned())));
    }
}

#[test]
fn sizing_settings_reach_the_daemon_flags() {
    let md = model(json!({
        "model": {"uri": "file:///m.gguf"},
        "engine": {"kvCacheFraction": 0.9, "contextLength": 4096, "kvDtype": "f32", "blockSize": 16}
    }));
    let mut args = daemon(&pod(&md)).args.clone().expect("args");
    // The token file exists only in the pod.
    args.retain(|arg| !arg.starts_with("--admin-token-file"));
    let serve = parse(&args);
    assert_eq!(serve.kv_cache_fraction, Some(0.9));
    assert_eq!(serve.kv_cache_bytes, None);
    assert_eq!(serve.context_length, Some(4096));
    let config = serve.config().expect("the daemon accepts the settings");
    assert_eq!(config.model.kv_cache_fraction, Some(0.9));
    assert_eq!(config.model.context_length, Some(4096));
}

#[test]
fn a_kv_dtype_the_daemon_cannot_store_is_refused_before_rollout() {
    for dtype in ["f16", "bf16"] {
        let md = model(json!({
            "model": {"uri": "file:///m.gguf"},
            "engine": {"kvDtype": dtype}
        }));
        let error = build_daemon_deployment(&md, CONFIG).expect_err("refused");
        assert!(
            matches!(error, BuildChildrenError::UnsupportedKvDtype(name) if name == dtype),
            "{error}"
        );
        // The daemon refuses the same value, so the operator never rolls out a crashing pod.
        let mut args = daemon_args(&md, "/models/m.gguf");
        args.retain(|arg| !arg.starts_with("--admin-token-file"));
        assert!(
            parse(&args).config().is_err(),
            "the daemon accepted --kv-dtype={dtype}"
        );
    }
    for supported in SUPPORTED_KV_DTYPES {
        let md = model(json!({
            "model": {"uri": "file:///m.gguf"},
            "engine": {"kvDtype": supported}
        }));
        check_engine_settings(&md).expect("supported");
    }
}
