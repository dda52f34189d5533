//! `skillkv chat`: a quick interactive check of a model without a server. Reads one user message
//! per line from stdin, streams the answer to stdout, and keeps the conversation (so the prefix
//! cache serves the history). `/reset` starts over; `/exit` or end of input quits.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use crate::cli::serve::default_model_path;
use crate::engine::chat_template::ChatMessage;
use crate::engine::sampling::SamplingParams;
use crate::engine::{EngineConfig, GenerateRequest, GenerationEvent};
use crate::server::serving::{Serving, SkillsSettings};
use crate::skills::assemble_chat;

/// `skillkv chat` flags.
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// GGUF model [default: $SKILLKV_MODEL, else the default model].
    #[arg(long, env = "SKILLKV_MODEL")]
    pub model: Option<PathBuf>,
    /// A system message that opens the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler, for reproducible answers at temperature > 0.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print prompt tokens, cached tokens and speed after each answer.
    #[arg(long)]
    pub stats: bool,
}

/// Runs `skillkv chat` on stdin/stdout.
pub fn run(args: &ChatArgs) -> anyhow::Result<()> {
    let path = match &args.model {
        Some(path) => path.clone(),
        None => default_model_path().ok_or_else(|| anyhow::anyhow!("no --model and no $HOME"))?,
    };
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        max_tokens: args.max_tokens,
        ..SamplingParams::default()
    };
    sampling.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let serving = Serving::load(&path, EngineConfig::default(), &SkillsSettings::default())?;
        let stdin = std::io::stdin();
        let mut stdout = std::io::stdout();
        let mut conversation = opening(args);
        eprintln!(
            "skillkv chat with {} — one message per line; /reset starts over, /exit quits",
            serving.info.id
        );
        for line in stdin.lock().lines() {
            let line = line?;
            match line.trim() {
                "" => continue,
                "/exit" | "/quit" => break,
                "/reset" => {
                    conversation = opening(args);
                    writeln!(stdout, "(conversation reset)")?;
                    continue;
                }
                _ => {}
            }
            conversation.push(ChatMessage::new("user", line));
            let answer =
                answer(&serving, &conversation, &sampling, args.stats, &mut stdout).await?;
            conversation.push(ChatMessage::new("assistant", answer));
        }
        serving.engine.shutdown().await;
        Ok(())
    })
}

fn opening(args: &ChatArgs) -> Vec<ChatMessage> {
    args.system
        .iter()
        .map(|system| ChatMessage::new("system", system.clone()))
        .collect()
}

/// Streams one answer to `out` and returns its text.
async fn answer(
    serving: &Serving,
    conversation: &[ChatMessage],
    sampling: &SamplingParams,
    stats: bool,
    out: &mut impl Write,
) -> anyhow::Result<String> {
    let prompt = assemble_chat::<&str>(&serving.template, &serving.tokenizer, &[], conversation)?;
    let started = Instant::now();
    let mut stream = serving.engine.submit(GenerateRequest {
        request_id: "chat".to_string(),
        prompt_tokens: prompt.tokens,
        sampling: sampling.clone(),
        adapter: None,
    })?;
    let mut text = String::new();
    while let Some(event) = stream.recv().await {
        match event {
            GenerationEvent::Token { text: piece, .. } => {
                write!(out, "{piece}")?;
                out.flush()?;
                text.push_str(&piece);
            }
            GenerationEvent::Finished {
                text: rest,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                reason,
            } => {
                writeln!(out, "{rest}")?;
                text.push_str(&rest);
                if stats {
                    let seconds = started.elapsed().as_secs_f64();
                    writeln!(
                        out,
                        "[{prompt_tokens} prompt tokens ({cached_tokens} cached), \
                         {completion_tokens} generated in {seconds:.2}s, finish: {reason:?}]"
                    )?;
                }
                return Ok(text);
            }
            GenerationEvent::Failed(error) => return Err(error.into()),
            GenerationEvent::Started { .. } => {}
        }
    }
    anyhow::bail!("the engine stopped before the answer finished")
}
