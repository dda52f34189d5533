//! `skillkv skills list | prefill | detect`: look at a skills folder offline, prefill it on a
//! model (printing progress and timings), ask which skills a query would get, or list the
//! skills of a running daemon through its admin API.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use skillkv_api::admin::{DaemonState, STATE_PATH, SkillState};
use skillkv_api::skills::{DetectorSettings, LoadEmbeddingsError, SkillDocument};
use skillkv_api::v1alpha1::{Assembly, PlacementState};

use crate::cli::serve::default_model_path;
use crate::engine::EngineConfig;
use crate::server::serving::{LoadServingError, Serving, SkillsSettings};
use crate::skills::{LoadSkillDirError, SkillUpdate, load_skill_dir};

/// `skillkv skills` flags.
#[derive(Debug, Args)]
pub struct SkillsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: SkillsCommand,
}

/// The `skills` subcommands.
#[derive(Debug, Subcommand)]
pub enum SkillsCommand {
    /// List skills: of a folder (offline), or of a running daemon with `--admin-url`.
    List(ListArgs),
    /// Prefill every skill of a folder on the model and report tokens and timings.
    Prefill(PrefillArgs),
    /// Show which skills a query would be assembled with when it names none.
    Detect(DetectArgs),
}

/// `skills list` flags.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Skills folder (`NAME/SKILL.md`).
    #[arg(long, default_value = "skills", conflicts_with = "admin_url")]
    pub skills: PathBuf,
    /// Admin API of a running daemon, e.g. http://127.0.0.1:8081.
    #[arg(long)]
    pub admin_url: Option<String>,
    /// File holding the admin bearer token (with `--admin-url`).
    #[arg(long, env = "SKILLKV_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

/// `skills prefill` flags.
#[derive(Debug, Args)]
pub struct PrefillArgs {
    /// Skills folder (`NAME/SKILL.md`).
    #[arg(long, default_value = "skills")]
    pub skills: PathBuf,
    /// GGUF model [default: $SKILLKV_MODEL, else the default model under ~/.cache/skillkv].
    #[arg(long, env = "SKILLKV_MODEL")]
    pub model: Option<PathBuf>,
    /// KV cache budget in bytes.
    #[arg(long, default_value_t = 512 * 1024 * 1024)]
    pub kv_cache_bytes: usize,
    /// Skill KV store to save the prefilled KV to (and load from), as `serve --kv-store`.
    #[arg(long, env = "SKILLKV_KV_STORE")]
    pub kv_store: Option<PathBuf>,
}

/// `skills detect` flags.
#[derive(Debug, Args)]
pub struct DetectArgs {
    /// The query.
    pub query: String,
    /// Skills folder (`NAME/SKILL.md`).
    #[arg(long, default_value = "skills")]
    pub skills: PathBuf,
    /// Also print the scores of skills that were not selected.
    #[arg(long)]
    pub all: bool,
    /// Folder of static token embeddings for the semantic checks (as `serve
    /// --detector-embeddings`); scores then show each skill's cosine too.
    #[arg(long, env = "SKILLKV_DETECTOR_EMBEDDINGS")]
    pub detector_embeddings: Option<PathBuf>,
}

/// Why a `skills` command failed.
#[derive(Debug, thiserror::Error)]
pub enum RunSkillsError {
    /// The folder could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadSkillDirError),
    /// The model could not be loaded.
    #[error(transparent)]
    Serving(#[from] LoadServingError),
    /// `--detector-embeddings` names a folder that cannot be loaded.
    #[error("loading --detector-embeddings failed")]
    LoadDetectorEmbeddings(#[source] LoadEmbeddingsError),
    /// No model path.
    #[error("no --model given, $SKILLKV_MODEL unset and $HOME unknown")]
    NoModelPath,
    /// The admin API could not be asked.
    #[error("asking {url} failed: {message}")]
    Admin {
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// Writing the output failed.
    #[error("writing the output failed")]
    Output(#[from] std::io::Error),
    /// Skills did not become Ready.
    #[error("{failed} skill(s) failed to prefill")]
    Failed {
        /// How many.
        failed: usize,
    },
}

/// Runs `skillkv skills …`.
pub fn run(args: SkillsArgs) -> Result<(), RunSkillsError> {
    let stdout = &mut std::io::stdout().lock();
    match args.command {
        SkillsCommand::List(list) => match &list.admin_url {
            Some(url) => {
                let token = match &list.admin_token_file {
                    Some(path) => std::fs::read_to_string(path)?.trim().to_string(),
                    None => String::new(),
                };
                let state = fetch_state(url, &token)?;
                print_states(stdout, &state.skills)
            }
            None => print_folder(stdout, &list.skills),
        },
        SkillsCommand::Prefill(prefill) => run_prefill(stdout, &prefill),
        SkillsCommand::Detect(detect) => run_detect(stdout, &detect),
    }
}

fn print_folder(out: &mut impl Write, dir: &Path) -> Result<(), RunSkillsError> {
    let skills = load_skill_dir(dir)?;
    writeln!(
        out,
        "{:<28} {:<10} {:<12} DESCRIPTION",
        "NAME", "VERSION", "HASH"
    )?;
    for (name, document) in &skills {
        let front = &document.front_matter;
        writeln!(
            out,
            "{:<28} {:<10} {:<12} {}",
            name,
            front.version.as_deref().unwrap_or("-"),
            &document.content_hash[..12],
            one_line(&front.description, 80)
        )?;
    }
    Ok(())
}

fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        flat
    } else {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

fn print_states(out: &mut impl Write, skills: &[SkillState]) -> Result<(), RunSkillsError> {
    writeln!(
        out,
        "{:<28} {:<11} {:>7} {:>10} {:>8} {:>9}  MESSAGE",
        "NAME", "STATE", "TOKENS", "KV_BYTES", "HITS", "PREFILL"
    )?;
    for skill in skills {
        writeln!(
            out,
            "{:<28} {:<11} {:>7} {:>10} {:>8} {:>9}  {}",
            skill.name,
            format!("{:?}", skill.state),
            skill.tokens,
            skill.kv_bytes,
            skill.hits,
            skill
                .prefill_millis
                .map_or_else(|| "-".to_string(), |ms| format!("{ms} ms")),
            skill.message.as_deref().unwrap_or("")
        )?;
    }
    Ok(())
}

fn fetch_state(url: &str, token: &str) -> Result<DaemonState, RunSkillsError> {
    let full = format!("{}{STATE_PATH}", url.trim_end_matches('/'));
    let admin_error = |message: String| RunSkillsError::Admin {
        url: full.clone(),
        message,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let response = crate::cli::http::get(&full, token)
            .await
            .map_err(|error| admin_error(error.to_string()))?;
        serde_json::from_slice(&response).map_err(|error| admin_error(error.to_string()))
    })
}

fn run_prefill(out: &mut impl Write, args: &PrefillArgs) -> Result<(), RunSkillsError> {
    let skills = load_skill_dir(&args.skills)?;
    let model = match &args.model {
        Some(path) => path.clone(),
        None => default_model_path().ok_or(RunSkillsError::NoModelPath)?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let config = EngineConfig {
            kv_cache: crate::engine::KvCacheSize::Bytes(args.kv_cache_bytes),
            ..EngineConfig::default()
        };
        let settings = SkillsSettings {
            pinned_fraction: 1.0,
            store_dir: args.kv_store.clone(),
            ..SkillsSettings::default()
        };
        let started = Instant::now();
        let serving = tokio::task::spawn_blocking(move || Serving::load(&model, config, &settings))
            .await
            .map_err(|_| RunSkillsError::Failed {
                failed: skills.len(),
            })??;
        writeln!(
            out,
            "model {} loaded in {:.1} s; prefilling {} skill(s)",
            serving.info.id,
            started.elapsed().as_secs_f64(),
            skills.len()
        )?;
        let count = skills.len();
        serving.skills.upsert(
            skills
                .into_iter()
                .map(|(name, document)| SkillUpdate::from_folder(name, document, Assembly::Exact))
                .collect(),
        );
        let states = wait_reporting(out, &serving.skills, count).await?;
        print_states(out, &states)?;
        serving.engine.shutdown().await;
        let failed = states
            .iter()
            .filter(|s| s.state == PlacementState::Failed)
            .count();
        if failed > 0 {
            return Err(RunSkillsError::Failed { failed });
        }
        Ok(())
    })
}

/// Prints a progress line per skill as it becomes Ready or Failed; returns the final states.
async fn wait_reporting(
    out: &mut impl Write,
    registry: &Arc<crate::skills::SkillRegistry>,
    count: usize,
) -> Result<Vec<SkillState>, RunSkillsError> {
    let mut changes = registry.watch_changes();
    let mut reported = std::collections::BTreeSet::new();
    loop {
        let states = registry.snapshot();
        for state in &states {
            let done = state.state.is_settled();
            if done && reported.insert(state.name.clone()) {
                let millis = state.prefill_millis.unwrap_or(0).max(1);
                writeln!(
                    out,
                    "[{}/{count}] {} {:?}: {} tokens in {} ms ({:.0} tok/s){}",
                    reported.len(),
                    state.name,
                    state.state,
                    state.tokens,
                    millis,
                    state.tokens as f64 * 1000.0 / millis as f64,
                    state
                        .message
                        .as_deref()
                        .map(|m| format!(" — {m}"))
                        .unwrap_or_default()
                )?;
            }
        }
        if registry.all_settled() {
            return Ok(states);
        }
        // Wake on the next change; the bound only keeps a stuck engine from hanging the CLI.
        if tokio::time::timeout(Duration::from_secs(600), changes.changed())
            .await
            .is_err()
        {
            return Ok(registry.snapshot());
        }
    }
}

fn run_detect(out: &mut impl Write, args: &DetectArgs) -> Result<(), RunSkillsError> {
    let skills = load_skill_dir(&args.skills)?;
    let detector = DetectorSettings::load(args.detector_embeddings.as_deref())
        .map_err(RunSkillsError::LoadDetectorEmbeddings)?
        .build(skills.values().map(SkillDocument::card));
    let selected = detector.detect(&args.query);
    if selected.is_empty() {
        writeln!(out, "no skill selected")?;
    }
    for detection in &selected {
        writeln!(out, "{detection}")?;
    }
    if args.all {
        writeln!(out, "-- all scores --")?;
        for detection in detector.scores(&args.query) {
            writeln!(out, "{detection}")?;
        }
    }
    Ok(())
}
