//! The node's skill KV store on a real (tiny, synthetic) model: a restarted daemon loads its
//! skills without prefilling and answers exactly as before; a corrupt file or another model
//! means a warning, a fresh prefill and still the same answer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use skillkv_api::admin::SkillState;
use skillkv_api::skills::SkillDocument;
use skillkv_api::v1alpha1::{Assembly, PlacementState};
use skillkv_daemon::engine::chat_template::ChatMessage;
use skillkv_daemon::engine::sampling::SamplingParams;
use skillkv_daemon::engine::testing::{TinyModelSpec, write_tiny_gguf};
use skillkv_daemon::engine::{EngineConfig, GenerateRequest, GenerationEvent, KvCacheSize};
use skillkv_daemon::server::serving::{Serving, SkillsSettings};
use skillkv_daemon::skills::registry::LOADED_FROM_STORE;
use skillkv_daemon::skills::{SkillSelection, SkillUpdate, assemble_chat};

const SKILL: &str = "---\nname: store-me\ndescription: \"a skill to persist\"\n---\n\
    Persist the key value cache of this skill on the node so that a restart does not pay for \
    the prefill again. Check the checksums, the header and the model digest before trusting it.\n";

fn temp_path(label: &str) -> PathBuf {
    std::env::temp_dir().join(format!("skillkv-store-it-{label}-{}", std::process::id()))
}

fn model(label: &str, seed: u64) -> PathBuf {
    let path = temp_path(&format!("{label}.gguf"));
    let spec = TinyModelSpec {
        seed,
        ..TinyModelSpec::default()
    };
    write_tiny_gguf(&path, &spec).expect("tiny model");
    path
}

fn serve(model: &Path, store: &Path) -> Serving {
    let config = EngineConfig {
        kv_cache: KvCacheSize::Blocks(64),
        ..EngineConfig::default()
    };
    let settings = SkillsSettings {
        pinned_fraction: 0.5,
        store_dir: Some(store.to_path_buf()),
        ..SkillsSettings::default()
    };
    Serving::load(model, config, &settings).expect("serving loads")
}

/// Adds the skill and waits (event-driven, bounded) until it settles.
async fn ready_skill(serving: &Serving) -> SkillState {
    let document =
        SkillDocument::parse(Path::new("store-me/SKILL.md"), SKILL.to_string()).expect("parses");
    let mut changes = serving.skills.watch_changes();
    serving.skills.upsert(vec![SkillUpdate::from_folder(
        "store-me".into(),
        document,
        Assembly::Exact,
    )]);
    tokio::time::timeout(Duration::from_secs(60), async {
        while !serving.skills.all_settled() {
            changes.changed().await.expect("registry alive");
        }
    })
    .await
    .expect("settles");
    let state = serving.skills.snapshot().remove(0);
    assert_eq!(state.state, PlacementState::Ready, "{state:?}");
    state
}

/// Greedy tokens and their logprobs for a question under the skill.
async fn answer(serving: &Serving) -> (usize, Vec<(u32, f32)>) {
    let skills = serving
        .skills
        .resolve(&SkillSelection::Named(vec!["store-me".into()]), "")
        .expect("resolves");
    let prompt = assemble_chat(
        &serving.template,
        &serving.tokenizer,
        &[skills[0].version.document.text.as_str()],
        &[ChatMessage::new("user", "what should I check?")],
    )
    .expect("assembles");
    let mut stream = serving
        .engine
        .submit(GenerateRequest {
            request_id: "store".into(),
            prompt_tokens: prompt.tokens,
            sampling: SamplingParams {
                max_tokens: 8,
                ignore_eos: true,
                ..SamplingParams::default()
            },
            adapter: None,
        })
        .expect("submits");
    let mut cached = 0;
    let mut tokens = Vec::new();
    while let Some(event) = stream.recv().await {
        match event {
            GenerationEvent::Started { cached_tokens, .. } => cached = cached_tokens,
            GenerationEvent::Token { id, logprob, .. } => tokens.push((id, logprob)),
            GenerationEvent::Finished { .. } => break,
            GenerationEvent::Failed(error) => panic!("generation failed: {error}"),
        }
    }
    (cached, tokens)
}

fn stored_files(store: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(store)
        .expect("store dir")
        .map(|entry| entry.expect("entry").path())
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loads_stored_kv_and_bad_files_are_recomputed() {
    let store = temp_path("store");
    let _ = std::fs::remove_dir_all(&store);
    let model_a = model("a", 7);

    // First start: prefilled, stored before it turns Ready.
    let first = serve(&model_a, &store);
    let computed = ready_skill(&first).await;
    assert_eq!(computed.message, None, "prefilled");
    let reference = answer(&first).await;
    assert!(
        reference.0 >= 16 * (computed.tokens / 16),
        "skill KV reused"
    );
    first.engine.shutdown().await;
    let files = stored_files(&store);
    assert_eq!(files.len(), 1, "{files:?}");

    // Restart: loaded from the store (no prefill), identical answer.
    let second = serve(&model_a, &store);
    let loaded = ready_skill(&second).await;
    assert_eq!(loaded.prefill_millis, Some(0), "loaded, not prefilled");
    assert_eq!(loaded.message.as_deref(), Some(LOADED_FROM_STORE));
    assert_eq!(answer(&second).await, reference);
    second.engine.shutdown().await;

    // A flipped byte: detected, recomputed, same answer, and a good file written again.
    let mut bytes = std::fs::read(&files[0]).expect("read");
    let middle = bytes.len() - bytes.len() / 3;
    bytes[middle] ^= 0x10;
    std::fs::write(&files[0], &bytes).expect("write");
    let third = serve(&model_a, &store);
    let recomputed = ready_skill(&third).await;
    assert_eq!(recomputed.message, None, "a corrupt file is not used");
    assert_eq!(answer(&third).await, reference);
    third.engine.shutdown().await;
    assert_ne!(std::fs::read(&files[0]).expect("rewritten"), bytes);

    // Another model (different digest): the stored KV is not used.
    let other = serve(&model("b", 8), &store);
    let state = ready_skill(&other).await;
    assert_eq!(state.message, None, "another model's KV is not used");
    other.engine.shutdown().await;
}
