//! `skillkv bench …`: benchmarks that print ratios measured side by side in one run.

pub mod engine;
pub mod modular;
pub mod skills;

use clap::{Args, Subcommand};

/// `skillkv bench` flags.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark.
    #[command(subcommand)]
    pub command: BenchCommand,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The engine: prefill and decode throughput, cold vs cached time to first token.
    Engine(engine::BenchEngineArgs),
    /// The skills workload: skill KV cache off vs on, and start-to-Ready with the node's store.
    Skills(skills::BenchSkillsArgs),
    /// Modular vs exact skill assembly on a real model: greedy agreement and next-token KL.
    Modular(modular::BenchModularArgs),
}

/// Runs `skillkv bench …`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Engine(args) => engine::run(&args)?,
        BenchCommand::Skills(args) => skills::run(&args)?,
        BenchCommand::Modular(args) => modular::run(&args)?,
    }
    Ok(())
}

/// Percentile `q` (0–1) of `values` (nearest rank); 0 for none.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(percentile(&values, 0.5), 3.0);
        assert_eq!(percentile(&values, 0.99), 5.0);
        assert_eq!(percentile(&values, 0.0), 1.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
