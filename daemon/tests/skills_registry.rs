//! The skill registry on a real (tiny, synthetic) model: prefill and pinning, the pinned
//! budget, hot updates, removal, detection, and the admin API's desired state.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use skillkv_api::admin::{DesiredSkill, DesiredState, SkillOrigin, SkillState};
use skillkv_api::skills::SkillDocument;
use skillkv_api::v1alpha1::{Assembly, PlacementState};
use skillkv_daemon::engine::chat_template::ChatMessage;
use skillkv_daemon::engine::testing::{TinyModelSpec, write_tiny_gguf};
use skillkv_daemon::engine::{EngineConfig, GenerateRequest, GenerationEvent, KvCacheSize};
use skillkv_daemon::server::serving::{Serving, SkillsSettings};
use skillkv_daemon::skills::{
    ApplyDesiredStateError, SkillRegistry, SkillSelection, SkillUpdate, assemble_chat,
};

const TOTAL_BLOCKS: usize = 96;

fn tiny_model(label: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "skillkv-skills-{label}-{}.gguf",
        std::process::id()
    ));
    write_tiny_gguf(&path, &TinyModelSpec::default()).expect("tiny model");
    path
}

fn load(label: &str, pinned_fraction: f64) -> Serving {
    let config = EngineConfig {
        kv_cache: KvCacheSize::Blocks(TOTAL_BLOCKS),
        ..EngineConfig::default()
    };
    Serving::load(
        &tiny_model(label),
        config,
        &SkillsSettings {
            pinned_fraction,
            ..SkillsSettings::default()
        },
    )
    .expect("serving loads")
}

fn skill_text(name: &str, description: &str, body: &str) -> String {
    format!("---\nname: {name}\ndescription: \"{description}\"\n---\n{body}\n")
}

fn document(name: &str, description: &str, body: &str) -> SkillDocument {
    let text = skill_text(name, description, body);
    SkillDocument::parse(&PathBuf::from(format!("{name}/SKILL.md")), text).expect("parses")
}

fn update(document: SkillDocument) -> SkillUpdate {
    SkillUpdate {
        name: document.name().to_string(),
        document,
        origin: SkillOrigin::Directory,
        assembly: Assembly::Exact,
        priority: 0,
        pin: true,
    }
}

/// A body long enough to fill several 16-token blocks.
fn long_body(topic: &str, sentences: usize) -> String {
    (0..sentences)
        .map(|i| format!("Rule {i} about {topic}: check the {topic} carefully. "))
        .collect()
}

/// Waits (event-driven, bounded) until no skill is Pending or Prefilling.
async fn settled(registry: &Arc<SkillRegistry>) -> Vec<SkillState> {
    let mut changes = registry.watch_changes();
    tokio::time::timeout(Duration::from_secs(60), async {
        while !registry.all_settled() {
            changes.changed().await.expect("registry alive");
        }
    })
    .await
    .expect("skills settle within a minute");
    registry.snapshot()
}

fn state_of<'a>(states: &'a [SkillState], name: &str) -> &'a SkillState {
    states
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("{name} missing from {states:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skills_are_prefilled_pinned_and_their_kv_serves_requests() {
    let serving = load("pin", 0.5);
    let registry = &serving.skills;
    registry.upsert(vec![
        update(document("alpha", "about caches", &long_body("cache", 6))),
        update(document("beta", "about queues", &long_body("queue", 6))),
    ]);
    let states = settled(registry).await;
    for name in ["alpha", "beta"] {
        let state = state_of(&states, name);
        assert_eq!(state.state, PlacementState::Ready, "{state:?}");
        assert!(state.tokens >= 32, "{state:?}");
        assert_eq!(
            state.kv_bytes,
            (state.tokens * registry.config().kv_bytes_per_token) as u64
        );
        assert!(state.prefill_millis.is_some());
        assert_eq!(
            state.serving_content_hash.as_ref(),
            Some(&state.content_hash)
        );
    }
    let kv = serving.engine.kv_stats().await.expect("engine runs");
    let alpha_blocks = state_of(&states, "alpha").tokens / 16;
    assert!(kv.pinned >= alpha_blocks, "{kv:?}");

    // A request naming both (in any order) is assembled in canonical order and reuses the
    // pinned KV of the first skill.
    let resolved = registry
        .resolve(
            &SkillSelection::Named(vec!["beta".into(), "alpha".into()]),
            "",
        )
        .expect("resolves");
    assert_eq!(
        resolved.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["alpha", "beta"]
    );
    assert!(resolved.iter().all(|s| s.warm));
    let texts: Vec<&str> = resolved
        .iter()
        .map(|s| s.version.document.text.as_str())
        .collect();
    let prompt = assemble_chat(
        &serving.template,
        &serving.tokenizer,
        &texts,
        &[ChatMessage::new("user", "hello")],
    )
    .expect("assembles");
    assert_eq!(
        prompt.skill_spans[0].end,
        resolved[0].version.prefix_tokens.len()
    );
    let mut stream = serving
        .engine
        .submit(GenerateRequest {
            request_id: "t".into(),
            prompt_tokens: prompt.tokens,
            sampling: skillkv_daemon::engine::sampling::SamplingParams {
                max_tokens: 2,
                ..Default::default()
            },
            adapter: None,
        })
        .expect("submits");
    let Some(GenerationEvent::Started { cached_tokens, .. }) = stream.recv().await else {
        panic!("the first event is Started");
    };
    assert_eq!(cached_tokens, alpha_blocks * 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skill_beyond_the_pinned_budget_fails_and_evicts_nothing() {
    // 96 blocks × 0.25 = 24 pinned blocks: room for one skill of ~19 blocks, not two.
    let serving = load("budget", 0.25);
    let registry = &serving.skills;
    let big = |name: &str, topic: &str| update(document(name, topic, &long_body(topic, 7)));
    registry.upsert(vec![SkillUpdate {
        priority: 10,
        ..big("first", "tables")
    }]);
    let first = state_of(&settled(registry).await, "first").clone();
    assert_eq!(first.state, PlacementState::Ready);
    let pinned_before = serving.engine.kv_stats().await.expect("runs").pinned;

    registry.upsert(vec![big("second", "graphs")]);
    let states = settled(registry).await;
    let second = state_of(&states, "second");
    assert_eq!(second.state, PlacementState::Failed);
    let message = second.message.as_deref().unwrap_or_default();
    assert!(message.starts_with("InsufficientKVCapacity"), "{message}");
    assert_eq!(state_of(&states, "first").state, PlacementState::Ready);
    assert_eq!(
        serving.engine.kv_stats().await.expect("runs").pinned,
        pinned_before
    );
    // Not warm, but still usable: a request naming it is assembled from its text.
    let resolved = registry
        .resolve(&SkillSelection::Named(vec!["second".into()]), "")
        .expect("resolves");
    assert!(!resolved[0].warm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpinned_skill_is_known_served_cold_and_pinned_when_asked() {
    let serving = load("unpinned", 0.5);
    let registry = &serving.skills;
    let known_only = || SkillUpdate {
        pin: false,
        ..update(document("delta", "tables", &long_body("tables", 5)))
    };
    registry.upsert(vec![known_only()]);
    let states = settled(registry).await;
    assert_eq!(state_of(&states, "delta").state, PlacementState::Unpinned);
    assert_eq!(serving.engine.kv_stats().await.expect("runs").pinned, 0);
    // Requests may name it: it is assembled from its text, not warm.
    let resolved = registry
        .resolve(&SkillSelection::Named(vec!["delta".into()]), "")
        .expect("an unpinned skill resolves");
    assert!(!resolved[0].warm);
    assert!(
        !registry.upsert(vec![known_only()]),
        "same text, still unpinned"
    );

    // Placement moves here: the same text is prefilled and pinned.
    assert!(registry.upsert(vec![update(document(
        "delta",
        "tables",
        &long_body("tables", 5)
    ))]));
    let pinned = state_of(&settled(registry).await, "delta").clone();
    assert_eq!(pinned.state, PlacementState::Ready);
    assert!(serving.engine.kv_stats().await.expect("runs").pinned > 0);
    let resolved = registry
        .resolve(&SkillSelection::Named(vec!["delta".into()]), "")
        .expect("resolves");
    assert!(resolved[0].warm);

    // And away again: the pin is released, the skill stays known.
    assert!(registry.upsert(vec![known_only()]));
    let states = settled(registry).await;
    assert_eq!(state_of(&states, "delta").state, PlacementState::Unpinned);
    let mut changes = registry.watch_changes();
    tokio::time::timeout(Duration::from_secs(30), async {
        while serving.engine.kv_stats().await.expect("runs").pinned > 0 {
            // The unpin is sent right after the switch; stats reflect it once processed.
            let _ = tokio::time::timeout(Duration::from_millis(50), changes.changed()).await;
        }
    })
    .await
    .expect("the pin is released");
    let resolved = registry
        .resolve(&SkillSelection::Named(vec!["delta".into()]), "")
        .expect("still known");
    assert!(!resolved[0].warm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_update_switches_versions_and_releases_the_old_pin() {
    let serving = load("hot", 0.5);
    let registry = &serving.skills;
    registry.upsert(vec![update(document("gamma", "v1", &long_body("one", 5)))]);
    let v1 = state_of(&settled(registry).await, "gamma").clone();
    let in_flight = registry
        .resolve(&SkillSelection::Named(vec!["gamma".into()]), "")
        .expect("resolves");

    registry.upsert(vec![update(document("gamma", "v2", &long_body("two", 5)))]);
    let v2 = state_of(&settled(registry).await, "gamma").clone();
    assert_eq!(v2.state, PlacementState::Ready);
    assert_ne!(v1.content_hash, v2.content_hash);
    assert_eq!(v2.serving_content_hash.as_ref(), Some(&v2.content_hash));
    // The request that resolved before the switch keeps the version it started with.
    assert_eq!(in_flight[0].version.document.content_hash, v1.content_hash);

    // The old pin is released: pinned blocks shrink to what v2 (plus shared blocks) holds.
    let mut changes = registry.watch_changes();
    let v2_blocks = v2.tokens / 16;
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let kv = serving.engine.kv_stats().await.expect("runs");
            if kv.pinned <= v2_blocks {
                return;
            }
            // The unpin is sent right after the switch; stats reflect it once processed.
            let _ = tokio::time::timeout(Duration::from_millis(50), changes.changed()).await;
        }
    })
    .await
    .expect("the old version's pin is released");

    // Same text again changes nothing.
    assert!(!registry.upsert(vec![update(document("gamma", "v2", &long_body("two", 5)))]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_skill_unpins_it_and_detection_picks_by_description() {
    let serving = load("remove", 0.5);
    let registry = &serving.skills;
    registry.upsert(vec![
        update(document(
            "sql-tuning",
            "Use when a SQL query is slow: indexes, query plans, joins",
            &long_body("index", 3),
        )),
        update(document(
            "kubernetes-debugging",
            "Use when a Kubernetes pod crashes or is stuck pending",
            &long_body("pod", 3),
        )),
    ]);
    settled(registry).await;
    let detected = registry
        .resolve(
            &SkillSelection::Auto,
            "my SQL query is slow, which indexes should I add to the joins?",
        )
        .expect("resolves");
    assert_eq!(
        detected.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["sql-tuning"]
    );
    let none = registry
        .resolve(&SkillSelection::Named(vec![]), "my SQL query is slow")
        .expect("resolves");
    assert!(none.is_empty());
    let unknown = registry
        .resolve(&SkillSelection::Named(vec!["nope".into()]), "")
        .expect_err("unknown");
    assert!(
        unknown.to_string().contains("kubernetes-debugging"),
        "{unknown}"
    );

    // Detection reuses its detector until the skills change: not a state or priority change.
    assert_eq!(registry.detector_builds(), 1);
    let mut reprioritised = update(document(
        "kubernetes-debugging",
        "Use when a Kubernetes pod crashes or is stuck pending",
        &long_body("pod", 3),
    ));
    reprioritised.priority = 5;
    assert!(registry.upsert(vec![reprioritised]));
    let query = "my SQL query is slow, which indexes should I add to the joins?";
    registry.resolve(&SkillSelection::Auto, query).unwrap();
    assert_eq!(registry.detector_builds(), 1);

    assert!(registry.remove(&["sql-tuning".to_string()]));
    assert!(!registry.remove(&["sql-tuning".to_string()]));
    assert_eq!(registry.snapshot().len(), 1);
    // The removed skill is no longer detected.
    let after = registry.resolve(&SkillSelection::Auto, query).unwrap();
    assert!(
        after.is_empty(),
        "{:?}",
        after.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    assert_eq!(registry.detector_builds(), 2);
}

fn desired(generation: u64, skills: &[(&str, &str)]) -> DesiredState {
    DesiredState {
        generation,
        skills: skills
            .iter()
            .map(|(name, body)| DesiredSkill {
                name: (*name).to_string(),
                content: skill_text(name, "desired skill", body),
                priority: 0,
                assembly: Assembly::Exact,
                pin: true,
            })
            .collect(),
        adapters: vec![skillkv_api::admin::DesiredAdapter {
            name: "my-adapter".into(),
            uri: "file:///adapters/x".into(),
            scale: 1.0,
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_is_idempotent_ordered_and_complete() {
    let serving = load("desired", 0.5);
    let first = desired(1, &[("one", "first body"), ("two", "second body")]);
    let applied = serving.desired.apply(first.clone()).expect("applies");
    assert!(applied.changed);
    assert_eq!(serving.desired.generation(), Some(1));
    // The same document again changes nothing.
    assert!(!serving.desired.apply(first).expect("applies").changed);
    // Older, or the same generation with other content, is refused.
    assert!(matches!(
        serving.desired.apply(desired(0, &[])),
        Err(ApplyDesiredStateError::StaleGeneration {
            given: 0,
            applied: 1
        })
    ));
    assert!(matches!(
        serving.desired.apply(desired(1, &[])),
        Err(ApplyDesiredStateError::ConflictingGeneration { generation: 1 })
    ));
    // A malformed SKILL.md is refused with its name.
    let mut bad = desired(2, &[]);
    bad.skills.push(DesiredSkill {
        name: "broken".into(),
        content: "no front matter".into(),
        priority: 0,
        assembly: Assembly::Exact,
        pin: true,
    });
    let error = serving.desired.apply(bad).expect_err("malformed");
    assert!(error.to_string().contains("broken"), "{error}");

    let states = settled(&serving.skills).await;
    assert_eq!(states.len(), 2);
    assert!(states.iter().all(|s| s.state == PlacementState::Ready));
    let adapters = serving.desired.adapters();
    assert_eq!(adapters.len(), 1);
    assert!(
        adapters[0]
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("not supported")
    );

    // The set is complete: a skill absent from the next generation is removed.
    assert!(
        serving
            .desired
            .apply(desired(3, &[("two", "second body")]))
            .expect("applies")
            .changed
    );
    let names: Vec<String> = serving
        .skills
        .snapshot()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["two"]);
}
