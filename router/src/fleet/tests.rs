//! Unit tests of the fleet state: snapshots, events, pools, candidates and detection.

use super::*;
use skillkv_api::admin::{AdapterState, SkillOrigin};
use skillkv_api::block_hash::HashNamespace;
use skillkv_api::v1alpha1::Assembly;

fn namespace() -> HashNamespace {
    HashNamespace {
        model_digest: "m".into(),
        tokenizer_digest: "t".into(),
        adapter_id: None,
        kv_dtype: "f32".into(),
        kv_format_version: 1,
    }
}

fn skill(name: &str, state: PlacementState, description: &str) -> SkillState {
    SkillState {
        name: name.to_string(),
        version: None,
        description: description.to_string(),
        keywords: Vec::new(),
        content_hash: "h".to_string(),
        serving_content_hash: None,
        origin: SkillOrigin::Directory,
        assembly: Assembly::default(),
        state,
        message: None,
        tokens: 100,
        last_block: None,
        kv_bytes: 1000,
        prefill_millis: None,
        hits: 0,
        cached_tokens: 0,
        prefill_seconds_saved: 0.0,
    }
}

fn snapshot(model: &str, skills: Vec<SkillState>) -> DaemonState {
    DaemonState {
        daemon_version: "0".to_string(),
        model: ModelInfo {
            id: model.to_string(),
            model_digest: "m".to_string(),
            tokenizer_digest: "t".to_string(),
            chat_template_digest: "c".to_string(),
            context_length: 1024,
            namespace_root: namespace().root(),
        },
        kv_budget: KvBudget {
            block_tokens: 16,
            total_blocks: 64,
            pinned_budget_blocks: 32,
            kv_bytes_per_token: 10,
            sized_from: Default::default(),
            memory_available_bytes: None,
        },
        load: LoadFigures::default(),
        desired_generation: None,
        skills,
        adapters: vec![AdapterState {
            name: format!("{model}-lora"),
            state: AdapterPhase::Ready,
            message: None,
        }],
        device: None,
    }
}

fn fleet(n: usize) -> Fleet {
    let backends = (0..n)
        .map(|i| BackendConfig {
            admin_url: Some(format!("http://127.0.0.1:{}", 9000 + i)),
            ..BackendConfig::without_admin(&format!("http://127.0.0.1:{}", 8000 + i))
        })
        .collect();
    Fleet::new(backends, 128, DetectorSettings::default())
}

#[test]
fn pods_are_unhealthy_until_their_stream_is_up_and_again_when_it_drops() {
    let fleet = fleet(1);
    let pod = &fleet.pods()[0];
    let now = Instant::now();
    assert!(!pod.is_healthy(now));
    pod.apply_snapshot(snapshot("m", Vec::new()));
    assert!(pod.is_healthy(now));
    pod.connect_failed(now);
    assert!(!pod.is_healthy(now));
    assert!(pod.is_healthy(now + CONNECT_FAILURE_COOLDOWN));
    pod.stream_down();
    assert!(!pod.is_healthy(now + CONNECT_FAILURE_COOLDOWN));
}

#[test]
fn pools_gather_the_pods_of_a_model_or_adapter() {
    let fleet = fleet(3);
    fleet.pods()[0].apply_snapshot(snapshot("a", Vec::new()));
    fleet.pods()[1].apply_snapshot(snapshot("b", Vec::new()));
    let indices = |pool: Vec<Arc<Pod>>| pool.iter().map(|p| p.index).collect::<Vec<_>>();
    assert_eq!(indices(fleet.pool("a")), vec![0]);
    assert_eq!(indices(fleet.pool("b-lora")), vec![1]);
    // Nobody is known to serve `c`: the pod whose model is unknown may.
    assert_eq!(indices(fleet.pool("c")), vec![2]);
    // A declared adapter no pod reports yet goes to its base model's pods; once a pod reports
    // it, to that pod.
    fleet.set_declared_adapters(BTreeMap::from([
        ("sql".to_string(), "b".to_string()),
        ("a-lora".to_string(), "b".to_string()),
    ]));
    assert_eq!(indices(fleet.pool("sql")), vec![1]);
    assert_eq!(indices(fleet.pool("a-lora")), vec![0]);
}

#[test]
fn candidates_count_ready_skills_and_the_cached_prefix() {
    let fleet = fleet(2);
    let (a, b) = (&fleet.pods()[0], &fleet.pods()[1]);
    a.apply_snapshot(snapshot("m", vec![skill("sql", PlacementState::Ready, "")]));
    b.apply_snapshot(snapshot(
        "m",
        vec![skill("sql", PlacementState::Prefilling, "")],
    ));
    let tokens: Vec<u32> = (0..40).collect();
    let hashes = namespace().block_hashes(&tokens);
    for hash in &hashes {
        b.apply_event(AdminEvent::BlockStored {
            hash: *hash,
            parent: None,
        });
    }
    a.apply_event(AdminEvent::BlockStored {
        hash: hashes[1],
        parent: Some(hashes[0]),
    });
    let _guard = a.start_request();
    let pool = fleet.pool("m");
    let candidates = fleet.candidates(&pool, &["sql".to_string()], Some(&tokens), Instant::now());
    assert_eq!(candidates[0].skills_ready, 1);
    assert_eq!(candidates[1].skills_ready, 0);
    // Both know `sql` (b is still prefilling it); neither knows `etl`.
    assert!(candidates.iter().all(|c| c.knows_skills));
    let both = ["sql".to_string(), "etl".to_string()];
    let candidates = fleet.candidates(&pool, &both, Some(&tokens), Instant::now());
    assert!(candidates.iter().all(|c| !c.knows_skills));
    // Only a leading run counts: pod a holds block 1 but not block 0.
    assert_eq!(candidates[0].prefix_blocks, 0);
    assert_eq!(candidates[1].prefix_blocks, 2);
    assert_eq!(candidates[0].in_flight, 1);
    b.apply_event(AdminEvent::BlockEvicted { hash: hashes[0] });
    let candidates = fleet.candidates(&pool, &[], Some(&tokens), Instant::now());
    assert_eq!(candidates[1].prefix_blocks, 0);
    b.apply_event(AdminEvent::SkillState(skill(
        "sql",
        PlacementState::Ready,
        "",
    )));
    b.apply_event(AdminEvent::EventsMissed { count: 3 });
    let candidates = fleet.candidates(&pool, &["sql".to_string()], Some(&tokens), Instant::now());
    assert_eq!(candidates[1].skills_ready, 1);
    assert!(b.state().prefix.is_empty());
}

#[test]
fn an_unpinned_skill_counts_as_warm_where_its_kv_is_cached() {
    let fleet = fleet(2);
    let skill_tokens: Vec<u32> = (100..150).collect();
    let skill_blocks = namespace().block_hashes(&skill_tokens);
    let unpinned = SkillState {
        last_block: skill_blocks.last().copied(),
        ..skill("etl", PlacementState::Unpinned, "")
    };
    for pod in fleet.pods().iter() {
        pod.apply_snapshot(snapshot("m", vec![unpinned.clone()]));
    }
    let (a, b) = (&fleet.pods()[0], &fleet.pods()[1]);
    // Pod b prefilled the skill for an earlier request; pod a holds only its first block.
    for (i, hash) in skill_blocks.iter().enumerate() {
        b.apply_event(AdminEvent::BlockStored {
            hash: *hash,
            parent: i.checked_sub(1).map(|p| skill_blocks[p]),
        });
    }
    a.apply_event(AdminEvent::BlockStored {
        hash: skill_blocks[0],
        parent: None,
    });
    let pool = fleet.pool("m");
    let etl = ["etl".to_string()];
    let ready = |fleet: &Fleet| -> Vec<usize> {
        fleet
            .candidates(&pool, &etl, None, Instant::now())
            .iter()
            .map(|c| c.skills_ready)
            .collect()
    };
    assert_eq!(ready(&fleet), vec![0, 1]);
    // Evicted on b: warm nowhere.
    b.apply_event(AdminEvent::BlockEvicted {
        hash: *skill_blocks.last().expect("blocks"),
    });
    assert_eq!(ready(&fleet), vec![0, 0]);
}

#[test]
fn the_prefix_index_fits_the_pool_and_keeps_a_skill_in_use() {
    let fleet = fleet(1);
    let pod = &fleet.pods()[0];
    let skill_blocks = namespace().block_hashes(&(100..132).collect::<Vec<u32>>());
    let etl = SkillState {
        last_block: skill_blocks.last().copied(),
        ..skill("etl", PlacementState::Unpinned, "")
    };
    let mut small_pool = snapshot("m", vec![etl]);
    small_pool.kv_budget.total_blocks = 4;
    pod.apply_snapshot(small_pool);
    assert_eq!(
        pod.state().prefix.capacity(),
        4,
        "the pool, under the limit of 128"
    );
    let store = |hash: BlockHash, parent: Option<BlockHash>| {
        pod.apply_event(AdminEvent::BlockStored { hash, parent });
    };
    store(skill_blocks[0], None);
    store(skill_blocks[1], Some(skill_blocks[0]));
    let others = namespace().block_hashes(&(500..564).collect::<Vec<u32>>());
    let pool = fleet.pool("m");
    let names = ["etl".to_string()];
    let etl_ready = || fleet.candidates(&pool, &names, None, Instant::now())[0].skills_ready;
    for (i, other) in others.iter().enumerate() {
        // Each request for the skill refreshes its last block, as the daemon's LRU does.
        pod.note_routed(&names);
        store(*other, i.checked_sub(1).map(|p| others[p]));
        assert_eq!(etl_ready(), 1, "still warm after {} other blocks", i + 1);
    }
    // Without requests for it, newer blocks push it out of the index.
    for (i, other) in others.iter().enumerate().take(3) {
        store(*other, i.checked_sub(1).map(|p| others[p]));
    }
    assert_eq!(etl_ready(), 0);
}

#[test]
fn the_detector_follows_skill_changes() {
    let fleet = fleet(1);
    let pod = &fleet.pods()[0];
    assert!(
        fleet
            .detector(&fleet.pods())
            .detect("postgres sql query")
            .is_empty()
    );
    pod.apply_event(AdminEvent::SkillState(skill(
        "cooking",
        PlacementState::Ready,
        "Recipes for pasta and bread.",
    )));
    pod.apply_event(AdminEvent::SkillState(skill(
        "sql",
        PlacementState::Ready,
        "Writing SQL queries for Postgres databases.",
    )));
    let found: Vec<String> = fleet
        .detector(&fleet.pods())
        .detect("write a postgres sql query")
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(found, ["sql"]);
    // A phase change keeps the detector; a new description rebuilds it.
    let built = fleet.detector(&fleet.pods());
    pod.apply_event(AdminEvent::SkillState(skill(
        "sql",
        PlacementState::Prefilling,
        "Writing SQL queries for Postgres databases.",
    )));
    assert!(Arc::ptr_eq(&built, &fleet.detector(&fleet.pods())));
    pod.apply_event(AdminEvent::SkillState(skill(
        "sql",
        PlacementState::Ready,
        "Tuning slow SQL queries in Postgres.",
    )));
    assert!(!Arc::ptr_eq(&built, &fleet.detector(&fleet.pods())));
    pod.apply_event(AdminEvent::SkillRemoved {
        name: "sql".to_string(),
    });
    assert!(
        fleet
            .detector(&fleet.pods())
            .detect("write a postgres sql query")
            .is_empty()
    );
}

#[test]
fn each_pool_detects_only_the_skills_of_its_own_pods() {
    let fleet = fleet(2);
    let pods = fleet.pods();
    let sql = skill(
        "sql",
        PlacementState::Ready,
        "Writing SQL queries for Postgres databases.",
    );
    let cooking = skill(
        "cooking",
        PlacementState::Ready,
        "Recipes for pasta and bread.",
    );
    pods[0].apply_snapshot(snapshot("coder", vec![sql]));
    pods[1].apply_snapshot(snapshot("chef", vec![cooking]));
    let detect = |model: &str, text: &str| -> Vec<String> {
        fleet
            .detector(&fleet.pool(model))
            .detect(text)
            .into_iter()
            .map(|d| d.name)
            .collect()
    };
    assert_eq!(detect("coder", "write a postgres sql query"), ["sql"]);
    assert!(detect("chef", "write a postgres sql query").is_empty());
    assert_eq!(
        detect("chef", "bake bread with a pasta recipe"),
        ["cooking"]
    );
    assert!(detect("coder", "bake bread with a pasta recipe").is_empty());
    // Each pool keeps its detector until skills change.
    let coder = fleet.detector(&fleet.pool("coder"));
    assert!(Arc::ptr_eq(&coder, &fleet.detector(&fleet.pool("coder"))));
    assert!(!Arc::ptr_eq(&coder, &fleet.detector(&fleet.pool("chef"))));
    // The chef pod switches to the coder model: its skill is detected for coder requests.
    pods[1].apply_snapshot(snapshot(
        "coder",
        vec![skill(
            "cooking",
            PlacementState::Ready,
            "Recipes for pasta and bread.",
        )],
    ));
    assert_eq!(
        detect("coder", "bake bread with a pasta recipe"),
        ["cooking"]
    );
    // ... and no longer for chef requests, whose pool it left.
    assert!(detect("chef", "bake bread with a pasta recipe").is_empty());
}
