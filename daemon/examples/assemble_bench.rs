//! Prompt assembly per request: a chat request with every skill of a folder (the bundled three,
//! ~5,800 tokens on SmolLM2) tokenized from the skills' texts, against the same request taking
//! each skill's kept rendering and tokens (what a skill version holds, and what the server
//! passes since 2026-12-03). Both in one run; it checks that the two give the same tokens.
//!
//! ```sh
//! make model
//! cargo run --release -p skillkv-daemon --example assemble_bench -- \
//!     ~/.cache/skillkv/models/SmolLM2-135M-Instruct.Q4_1.gguf skills [RUNS]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use skillkv_daemon::engine::chat_template::{ChatMessage, ChatTemplate};
use skillkv_daemon::engine::gguf::GgufFile;
use skillkv_daemon::engine::tokenizer::GgufTokenizer;
use skillkv_daemon::skills::{
    AssembledPrompt, TokenizedSkill, assemble_chat, load_skill_dir, tokenize_skill,
};

/// Median milliseconds of `runs` calls.
fn median_millis(runs: usize, mut call: impl FnMut() -> AssembledPrompt) -> f64 {
    let mut millis: Vec<f64> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            std::hint::black_box(call());
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    millis.sort_by(f64::total_cmp);
    millis[millis.len() / 2]
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(model), Some(skills)) = (args.first(), args.get(1)) else {
        eprintln!("usage: assemble_bench MODEL.gguf SKILLS_DIR [RUNS]");
        return ExitCode::FAILURE;
    };
    let runs: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(51);
    match run(model.into(), skills.into(), runs.max(1)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("assemble_bench: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(model: PathBuf, skills: PathBuf, runs: usize) -> Result<(), Box<dyn std::error::Error>> {
    let gguf = GgufFile::open(&model)?;
    let tokenizer = GgufTokenizer::from_gguf(&gguf.content)?;
    let template = ChatTemplate::from_gguf(&gguf.content)?;
    let documents = load_skill_dir(&skills)?;
    let texts: Vec<&str> = documents.values().map(|d| d.text.as_str()).collect();
    let tokenized = texts
        .iter()
        .map(|text| tokenize_skill(&template, &tokenizer, text))
        .collect::<Result<Vec<TokenizedSkill>, _>>()?;
    let kept: Vec<(&str, &TokenizedSkill)> = texts.iter().copied().zip(&tokenized).collect();
    let conversation = [ChatMessage::new(
        "user",
        "our service got slow after the last deploy; where do I start looking?",
    )];
    let from_texts = assemble_chat(&template, &tokenizer, &texts, &conversation)?;
    let from_kept = assemble_chat(&template, &tokenizer, &kept, &conversation)?;
    if from_texts != from_kept {
        return Err("kept tokens and tokenized texts assemble different prompts".into());
    }
    let texts_ms = median_millis(runs, || {
        assemble_chat(&template, &tokenizer, &texts, &conversation).expect("assembled once")
    });
    let kept_ms = median_millis(runs, || {
        assemble_chat(&template, &tokenizer, &kept, &conversation).expect("assembled once")
    });
    println!(
        "{} skills, {} prompt tokens, {runs} runs: tokenizing the texts {texts_ms:.3} ms median, \
         kept tokens {kept_ms:.3} ms median ({:.0}x)",
        texts.len(),
        from_texts.tokens.len(),
        texts_ms / kept_ms
    );
    Ok(())
}
