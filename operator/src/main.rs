//! `skillkv-operator`: the controller (reconcilers) and the router (OpenAI front door).
//!
//! Subcommands appear here as they are built; see the project's issues for what is planned.

use clap::Parser;

/// skillkv's Kubernetes operator.
#[derive(Debug, Parser)]
#[command(name = "skillkv-operator", version, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    println!(
        "skillkv-operator {}: no subcommands are built yet (controller and router are planned)",
        env!("CARGO_PKG_VERSION")
    );
}
