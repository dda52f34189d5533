//! `skillkv-operator`: the operator's binary. Each subcommand is a variant of [`Command`] that
//! hands its settings to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use skillkv_operator::controller;
use skillkv_operator::settings::ControllerSettings;

/// skillkv's Kubernetes operator.
#[derive(Debug, Parser)]
#[command(name = "skillkv-operator", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The operator's components.
#[derive(Debug, Subcommand)]
enum Command {
    /// Reconcile Skills, ModelDeployments, LoRAAdapters and RateLimitPolicies (leader-elected).
    Controller(ControllerSettings),
    /// Serve the fleet as one OpenAI endpoint with cache-locality routing, keys and rate limits.
    Router(skillkv_router::RouterArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Controller(settings) => {
            controller::init_logging(&settings.log_format);
            match controller::run(settings).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!(%error, "controller stopped");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Router(args) => {
            controller::init_logging(
                &std::env::var("SKILLKV_LOG_FORMAT").unwrap_or_else(|_| "json".to_owned()),
            );
            let config = match args.into_config() {
                Ok(config) => config,
                Err(error) => {
                    tracing::error!(%error, "invalid router settings");
                    return ExitCode::FAILURE;
                }
            };
            match skillkv_router::run(config).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!(%error, "router stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
