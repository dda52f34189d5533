//! The `skillkv` command line: argument parsing, logging setup and dispatch to subcommands.

pub mod bench;
pub mod chat;
pub mod http;
pub mod logging;
pub mod serve;
pub mod skills;

use clap::{Parser, Subcommand};

/// skillkv's node-local daemon.
#[derive(Debug, Parser)]
#[command(name = "skillkv", version, about)]
pub struct Cli {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = logging::LogFormat::Text, global = true, env = "SKILLKV_LOG_FORMAT")]
    pub log_format: logging::LogFormat,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OpenAI API and the admin API.
    Serve(serve::ServeArgs),
    /// List, prefill or detect skills.
    Skills(skills::SkillsArgs),
    /// Chat with a model on stdin/stdout (a quick check, no server).
    Chat(chat::ChatArgs),
    /// Benchmarks (ratios measured side by side in one run).
    Bench(bench::BenchArgs),
}

/// Parses the command line and runs it.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logging::init(cli.log_format)?;
    match cli.command {
        Command::Serve(args) => serve::run(args)?,
        Command::Skills(args) => skills::run(args)?,
        Command::Chat(args) => chat::run(&args)?,
        Command::Bench(args) => bench::run(args)?,
    }
    Ok(())
}
