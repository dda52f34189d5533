//! Tests of the router's flags and their resolution into a [`RouterConfig`].

use super::*;
use clap::Parser;

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    args: RouterArgs,
}

#[test]
fn backend_values_parse_with_their_options() {
    let spec: BackendSpec = "http://10.0.0.1:8080".parse().expect("parses");
    assert_eq!(spec.url, "http://10.0.0.1:8080");
    assert_eq!(spec.admin, AdminEndpoint::NextPort);
    let spec: BackendSpec = "http://a:1/,admin=http://a:9,admin-token-file=/t"
        .parse()
        .expect("parses");
    assert_eq!(spec.url, "http://a:1");
    assert_eq!(spec.admin, AdminEndpoint::Url("http://a:9".to_string()));
    assert_eq!(spec.admin_token_file, Some(PathBuf::from("/t")));
    let spec: BackendSpec = "http://a:1,admin=none".parse().expect("parses");
    assert_eq!(spec.admin, AdminEndpoint::Disabled);
    for bad in ["https://a:1", "a b", "http://a:1/v1", "http://a:1,bogus=1"] {
        assert!(bad.parse::<BackendSpec>().is_err(), "{bad}");
    }
}

#[test]
fn an_unloadable_embeddings_folder_is_a_configuration_error() {
    let cli = Cli::parse_from([
        "router",
        "--backend",
        "http://127.0.0.1:8080",
        "--detector-embeddings",
        "/nonexistent/embeddings",
    ]);
    match cli.args.into_config_where(false) {
        Err(ConfigureRouterError::DetectorEmbeddings(source)) => {
            assert!(source.to_string().contains("tokenizer.json"), "{source}");
        }
        other => panic!("expected DetectorEmbeddings, got {other:?}"),
    }
}

#[test]
fn args_resolve_admin_urls_and_tokens() {
    let dir = tempfile::tempdir().expect("temp dir");
    let shared = dir.path().join("shared");
    let own = dir.path().join("own");
    std::fs::write(&shared, "s3cret\n").expect("write");
    std::fs::write(&own, "mine").expect("write");
    let cli = Cli::parse_from([
        "router".to_string(),
        "--backend".to_string(),
        "http://127.0.0.1:8080".to_string(),
        "--backend".to_string(),
        format!("http://127.0.0.1:9000,admin-token-file={}", own.display()),
        "--backend".to_string(),
        "http://127.0.0.1:7000,admin=none".to_string(),
        "--admin-token-file".to_string(),
        shared.display().to_string(),
        "--require-api-key".to_string(),
        "true".to_string(),
    ]);
    let config = cli.args.into_config().expect("resolves");
    let admin: Vec<_> = config
        .backends
        .iter()
        .map(|b| (b.admin_url.as_deref(), b.admin_token.as_deref()))
        .collect();
    assert_eq!(
        admin,
        [
            (Some("http://127.0.0.1:8081"), Some("s3cret")),
            (Some("http://127.0.0.1:9001"), Some("mine")),
            (None, Some("s3cret")),
        ]
    );
    assert_eq!(config.backends[0].name, "127.0.0.1:8080");
    assert!(matches!(
        config.api_keys.authenticate(None),
        crate::auth::Authentication::Denied
    ));
}

#[test]
fn no_backend_is_an_error_outside_a_cluster() {
    let cli = Cli::parse_from(["router"]);
    assert!(matches!(
        cli.args.into_config_where(false),
        Err(ConfigureRouterError::NoBackends)
    ));
    let cli = Cli::parse_from(["router", "--discovery", "static"]);
    assert!(matches!(
        cli.args.into_config_where(true),
        Err(ConfigureRouterError::NoBackends)
    ));
}

#[test]
fn discovery_is_chosen_in_a_cluster_without_backends() {
    let cli = Cli::parse_from(["router"]);
    let discovery = cli
        .args
        .into_config_where(true)
        .expect("resolves")
        .discovery
        .expect("discovers in a pod");
    assert_eq!(
        discovery,
        DiscoveryConfig {
            namespace: None,
            api_key_selector: Some("skillkv.io/api-key=true".to_string()),
            watch_rate_limits: true,
            router_service: None,
            replicas: 1,
            fallback_admin_token: None,
        }
    );
    let cli = Cli::parse_from([
        "router",
        "--discovery",
        "kubernetes",
        "--watch-namespace",
        "team-a",
        "--router-service",
        "skillkv-router",
        "--namespace",
        "skillkv-system",
        "--api-keys-file",
        "/nonexistent/keys.yaml",
    ]);
    // The key file wins over Secrets, so reading it is attempted (and fails here).
    assert!(matches!(
        cli.args.clone().into_config_where(false),
        Err(ConfigureRouterError::ApiKeys(_))
    ));
    let mut args = cli.args;
    args.api_keys_file = None;
    let discovery = args
        .into_config_where(false)
        .expect("resolves")
        .discovery
        .expect("asked for");
    assert_eq!(discovery.namespace.as_deref(), Some("team-a"));
    assert_eq!(
        discovery.router_service,
        Some(("skillkv-system".to_string(), "skillkv-router".to_string()))
    );
    let with_backend = Cli::parse_from([
        "router",
        "--discovery",
        "kubernetes",
        "--backend",
        "http://127.0.0.1:8080",
    ]);
    assert!(matches!(
        with_backend.args.into_config_where(true),
        Err(ConfigureRouterError::BackendsWithDiscovery)
    ));
    let static_in_pod = Cli::parse_from(["router", "--backend", "http://127.0.0.1:8080"]);
    let config = static_in_pod
        .args
        .into_config_where(true)
        .expect("resolves");
    assert!(config.discovery.is_none(), "--backend means static");
}
