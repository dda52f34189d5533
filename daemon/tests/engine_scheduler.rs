//! Scheduler and engine-API mechanics with a deterministic fake model that reads its history
//! back from the paged KV pool: batching equals sequential, reuse equals recompute, chunked
//! prefill under the token budget, preemption, cancellation, overload, pinning, events,
//! request validation, and a device pool's failed copy failing only its request.

mod engine_support;

use std::sync::Arc;

use engine_support::{FAKE_VOCAB, FakeModel, collect, greedy, prompt};
use skillkv_api::block_hash::BLOCK_TOKENS;
use skillkv_daemon::engine::handle::{
    Engine, EngineConfig, EngineHandle, FinishReason, KvCacheSize, PinRequest, SubmitError,
    ValidateRequestError,
};
use skillkv_daemon::engine::radix::CacheEvent;

fn config(blocks: usize) -> EngineConfig {
    EngineConfig {
        kv_cache: KvCacheSize::Blocks(blocks),
        ..EngineConfig::default()
    }
}

fn start(model: FakeModel, config: EngineConfig) -> (EngineHandle, Arc<FakeModel>) {
    let model = Arc::new(model);
    let engine = Engine::start(model.clone(), None, config).expect("engine starts");
    (engine, model)
}

/// Every block is free, cached or pinned, and none is in use.
async fn assert_idle(engine: &EngineHandle) {
    let stats = engine.stats().await.expect("engine running");
    assert_eq!(stats.running + stats.waiting, 0, "{stats:?}");
    assert_eq!(stats.kv.used, 0, "{stats:?}");
    assert_eq!(
        stats.kv.free + stats.kv.cached + stats.kv.pinned,
        stats.kv.total,
        "{stats:?}"
    );
}

/// Greedy tokens of `prompt` on a fresh engine (nothing cached, nothing else running).
async fn alone(prompt: Vec<u32>, max_tokens: usize) -> Vec<u32> {
    let (engine, _) = start(FakeModel::new(), config(256));
    let out = collect(
        engine
            .submit(greedy("alone", prompt, max_tokens))
            .expect("submit"),
    )
    .await;
    assert_eq!(out.reason, Some(FinishReason::Length), "{out:?}");
    out.tokens
}

fn eight_prompts() -> Vec<(Vec<u32>, usize)> {
    (0..8u32)
        .map(|i| {
            (
                prompt(5 + 13 * i as usize, i, FAKE_VOCAB),
                3 + 7 * i as usize,
            )
        })
        .collect()
}

#[tokio::test]
async fn batching_equals_sequential() {
    let mut expected = Vec::new();
    for (prompt, max_tokens) in eight_prompts() {
        expected.push(alone(prompt, max_tokens).await);
    }
    let config = EngineConfig {
        max_batch_tokens: 64,
        max_seqs: 5,
        ..config(256)
    };
    // Gated until all eight are queued, so they batch however the threads are scheduled.
    let (gated, permits) = FakeModel::gated();
    let (engine, model) = start(gated, config);
    // All at once: five run, three join as others leave (different max_tokens).
    let streams: Vec<_> = eight_prompts()
        .into_iter()
        .enumerate()
        .map(|(i, (prompt, max_tokens))| {
            engine
                .submit(greedy(&format!("r{i}"), prompt, max_tokens))
                .expect("submit")
        })
        .collect();
    drop(permits);
    let mut handles = Vec::new();
    for stream in streams {
        handles.push(tokio::spawn(collect(stream)));
    }
    for (handle, expected) in handles.into_iter().zip(expected) {
        let out = handle.await.expect("collector");
        assert_eq!(out.tokens, expected);
    }
    assert!(
        model
            .batch_sizes
            .lock()
            .expect("lock")
            .iter()
            .all(|&size| size <= 64)
    );
    assert_idle(&engine).await;
}

#[tokio::test]
async fn reuse_equals_recompute_mid_block_on_boundary_and_full_hit() {
    let base = prompt(3 * BLOCK_TOKENS, 42, FAKE_VOCAB);
    // (cached prefix the second prompt shares, second prompt)
    let cases = [
        ("mid-block", {
            let mut p = base.clone();
            p.truncate(2 * BLOCK_TOKENS + 5);
            p.extend(prompt(20, 7, FAKE_VOCAB));
            p
        }),
        ("block boundary", {
            let mut p = base[..2 * BLOCK_TOKENS].to_vec();
            p.extend(prompt(9, 8, FAKE_VOCAB));
            p
        }),
        ("full hit", base.clone()),
    ];
    for (name, second) in cases {
        let cold = alone(second.clone(), 64).await;
        let (engine, _) = start(FakeModel::new(), config(256));
        collect(
            engine
                .submit(greedy("warm-up", base.clone(), 4))
                .expect("submit"),
        )
        .await;
        let warm = collect(
            engine
                .submit(greedy("warm", second.clone(), 64))
                .expect("submit"),
        )
        .await;
        let shared = base.iter().zip(&second).take_while(|(a, b)| a == b).count();
        let expected_cached = (shared / BLOCK_TOKENS * BLOCK_TOKENS).min(second.len() - 1);
        assert_eq!(warm.cached_tokens, Some(expected_cached), "{name}");
        assert_eq!(warm.tokens, cold, "{name}: reuse differs from recompute");
        assert_idle(&engine).await;
    }
}

#[tokio::test]
async fn long_prompts_are_prefilled_in_chunks_within_the_token_budget() {
    let long = prompt(200, 3, FAKE_VOCAB);
    let expected = alone(long.clone(), 10).await;
    let config = EngineConfig {
        max_batch_tokens: 24,
        max_seqs: 4,
        ..config(64)
    };
    let (engine, model) = start(FakeModel::new(), config);
    let short = engine
        .submit(greedy("short", prompt(7, 4, FAKE_VOCAB), 30))
        .expect("submit");
    let out = collect(engine.submit(greedy("long", long, 10)).expect("submit")).await;
    collect(short).await;
    assert_eq!(out.tokens, expected);
    let sizes = model.batch_sizes.lock().expect("lock").clone();
    assert!(sizes.iter().all(|&size| size <= 24), "{sizes:?}");
    assert!(sizes.len() >= 200 / 24, "{sizes:?}");
}

#[tokio::test]
async fn preemption_under_a_tiny_pool_keeps_outputs_identical() {
    let requests: Vec<(Vec<u32>, usize)> = (0..4u32)
        .map(|i| (prompt(40 + i as usize, 100 + i, FAKE_VOCAB), 40))
        .collect();
    let mut expected = Vec::new();
    for (prompt, max_tokens) in &requests {
        expected.push(alone(prompt.clone(), *max_tokens).await);
    }
    // Each sequence ends at ~80 tokens = 6 blocks; 4 of them need 24 but only 12 exist. The
    // model is gated until all four are queued, so none can finish before the others start.
    let (gated, permits) = FakeModel::gated();
    let (engine, _) = start(gated, config(12));
    let streams: Vec<_> = requests
        .iter()
        .enumerate()
        .map(|(i, (p, n))| {
            engine
                .submit(greedy(&format!("p{i}"), p.clone(), *n))
                .expect("submit")
        })
        .collect();
    drop(permits);
    let mut handles = Vec::new();
    for stream in streams {
        handles.push(tokio::spawn(collect(stream)));
    }
    for (handle, expected) in handles.into_iter().zip(expected) {
        assert_eq!(handle.await.expect("collector").tokens, expected);
    }
    let stats = engine.stats().await.expect("running");
    assert!(
        stats.preemptions > 0,
        "the pool was meant to force preemption: {stats:?}"
    );
    assert_idle(&engine).await;
}

#[tokio::test]
async fn cancellation_frees_blocks_at_once() {
    // The gated model runs one forward pass per permit, so the sequence cannot finish on its
    // own while the test looks at it, however the threads are scheduled.
    let (model, permits) = FakeModel::gated();
    let (engine, _) = start(model, config(64));
    let baseline = engine.kv_stats().await.expect("running");
    let mut stream = engine
        .submit(greedy("c", prompt(50, 9, FAKE_VOCAB), 1000))
        .expect("submit");
    // Three passes: the prefill and two decode steps, one token each.
    for _ in 0..3 {
        permits.send(()).expect("engine holds the gate");
    }
    let mut tokens = 0;
    while tokens < 3 {
        if let Some(skillkv_daemon::engine::GenerationEvent::Token { .. }) = stream.recv().await {
            tokens += 1;
        }
    }
    // The engine is now held inside its fourth pass. Queue the stats request first, then let
    // that pass finish: the engine answers between passes, while the sequence still runs.
    let (running, _) = tokio::join!(engine.kv_stats(), async {
        permits.send(()).expect("engine holds the gate")
    });
    assert!(running.expect("running").used > 0);
    // Dropping the stream queues its cancellation ahead of the next stats request.
    drop(stream);
    let (after, _) = tokio::join!(engine.kv_stats(), async {
        permits.send(()).expect("engine holds the gate")
    });
    let after = after.expect("running");
    assert_eq!(after.used, 0, "{after:?}");
    assert_eq!(after.free + after.cached + after.pinned, baseline.total);
    assert_idle(&engine).await;

    // An explicit cancel answers with a Cancelled finish. The gate stays closed until the
    // cancel is queued, so the engine sees it after at most one pass (opening the gate first
    // would let a fast engine finish all 1000 tokens before the cancel arrives).
    let mut stream = engine
        .submit(greedy("c2", prompt(10, 10, FAKE_VOCAB), 1000))
        .expect("submit");
    stream.cancel();
    drop(permits);
    let out = collect(stream).await;
    assert_eq!(out.reason, Some(FinishReason::Cancelled), "{out:?}");
    assert!(out.tokens.len() < 1000);
    assert_idle(&engine).await;
}

#[tokio::test]
async fn a_full_waiting_queue_answers_overloaded_at_once() {
    let (model, permits) = FakeModel::gated();
    let config = EngineConfig {
        max_seqs: 1,
        max_waiting: 2,
        ..config(64)
    };
    let (engine, _) = start(model, config);
    let mut first = engine
        .submit(greedy("first", prompt(5, 1, FAKE_VOCAB), 3))
        .expect("submit");
    // Started is sent at admission, just before the (gated) forward pass.
    assert!(matches!(
        first.recv().await,
        Some(skillkv_daemon::engine::GenerationEvent::Started { .. })
    ));
    let second = engine
        .submit(greedy("second", prompt(5, 2, FAKE_VOCAB), 3))
        .expect("submit");
    let third = engine
        .submit(greedy("third", prompt(5, 3, FAKE_VOCAB), 3))
        .expect("submit");
    let refused = engine.submit(greedy("fourth", prompt(5, 4, FAKE_VOCAB), 3));
    assert!(
        matches!(refused, Err(SubmitError::Overloaded { max_waiting: 2 })),
        "{refused:?}"
    );
    drop(permits);
    for stream in [first, second, third] {
        assert_eq!(collect(stream).await.reason, Some(FinishReason::Length));
    }
    // Room again once the queue drained.
    let again = engine
        .submit(greedy("fifth", prompt(5, 5, FAKE_VOCAB), 3))
        .expect("submit");
    assert_eq!(collect(again).await.reason, Some(FinishReason::Length));
}

#[tokio::test]
async fn pinned_prefixes_survive_cache_pressure_until_unpinned() {
    let (engine, _) = start(FakeModel::new(), config(16));
    let skill = prompt(4 * BLOCK_TOKENS + 3, 77, FAKE_VOCAB);
    let pinned = engine
        .pin(PinRequest {
            tokens: skill.clone(),
            adapter: None,
        })
        .await
        .expect("pin");
    assert_eq!(pinned.pinned_tokens, 4 * BLOCK_TOKENS);
    assert_eq!(engine.kv_stats().await.expect("running").pinned, 4);
    // Fill the rest of the pool many times over with unrelated prompts.
    for i in 0..6u32 {
        let out = collect(
            engine
                .submit(greedy("filler", prompt(100, 200 + i, FAKE_VOCAB), 5))
                .expect("submit"),
        )
        .await;
        assert_eq!(out.reason, Some(FinishReason::Length), "{out:?}");
    }
    let mut request = skill.clone();
    request.extend(prompt(5, 78, FAKE_VOCAB));
    let out = collect(
        engine
            .submit(greedy("uses-skill", request, 2))
            .expect("submit"),
    )
    .await;
    assert_eq!(out.cached_tokens, Some(4 * BLOCK_TOKENS));
    engine.unpin(pinned.id).await.expect("unpin");
    assert!(
        engine.unpin(pinned.id).await.is_err(),
        "a pin is removed once"
    );
    let stats = engine.kv_stats().await.expect("running");
    assert_eq!(stats.pinned, 0);
    assert_idle(&engine).await;
}

#[tokio::test]
async fn a_sequence_larger_than_the_pool_fails_instead_of_waiting_forever() {
    let (engine, _) = start(FakeModel::new(), config(4));
    let out = collect(
        engine
            .submit(greedy("huge", prompt(100, 1, FAKE_VOCAB), 2))
            .expect("submit"),
    )
    .await;
    assert!(
        out.failed
            .as_deref()
            .is_some_and(|e| e.contains("KV blocks")),
        "{out:?}"
    );
    // A sequence that outgrows the pool while decoding fails too, and frees everything.
    let out = collect(
        engine
            .submit(greedy("grows", prompt(10, 2, FAKE_VOCAB), 100))
            .expect("submit"),
    )
    .await;
    assert!(out.failed.is_some(), "{out:?}");
    assert_idle(&engine).await;
}

#[tokio::test]
async fn invalid_requests_are_refused_with_the_reason() {
    let (engine, _) = start(FakeModel::new(), config(16));
    let empty = engine.submit(greedy("empty", Vec::new(), 1));
    assert!(matches!(
        empty,
        Err(SubmitError::Invalid(ValidateRequestError::EmptyPrompt))
    ));
    let outside = engine.submit(greedy("outside", vec![FAKE_VOCAB as u32], 1));
    assert!(matches!(
        outside,
        Err(SubmitError::Invalid(
            ValidateRequestError::TokenOutOfVocabulary { .. }
        ))
    ));
    let long = engine.submit(greedy("long", vec![1; 10], 4096));
    assert!(matches!(
        long,
        Err(SubmitError::Invalid(
            ValidateRequestError::ContextTooLong { .. }
        ))
    ));
    let mut bad_sampling = greedy("bad", vec![1], 1);
    bad_sampling.sampling.temperature = -1.0;
    assert!(matches!(
        engine.submit(bad_sampling),
        Err(SubmitError::Invalid(ValidateRequestError::Sampling(_)))
    ));
}

#[tokio::test]
async fn stored_and_evicted_blocks_are_published_with_their_hashes() {
    let (engine, _) = start(FakeModel::new(), config(4));
    let mut events = engine.subscribe_cache_events();
    let first = prompt(2 * BLOCK_TOKENS + 1, 5, FAKE_VOCAB);
    collect(
        engine
            .submit(greedy("a", first.clone(), 1))
            .expect("submit"),
    )
    .await;
    let namespace = engine.config().cache_namespace.clone();
    let hashes = namespace.block_hashes(&first);
    for (index, hash) in hashes.iter().enumerate() {
        let event = events.recv().await.expect("an event");
        let parent = index.checked_sub(1).map(|p| hashes[p]);
        assert_eq!(
            event,
            CacheEvent::BlockStored {
                hash: *hash,
                parent
            }
        );
    }
    // A prompt needing all four blocks evicts both.
    collect(
        engine
            .submit(greedy("b", prompt(3 * BLOCK_TOKENS + 1, 6, FAKE_VOCAB), 1))
            .expect("submit"),
    )
    .await;
    let mut evicted = Vec::new();
    while evicted.len() < 2 {
        if let CacheEvent::BlockEvicted { hash } = events.recv().await.expect("an event") {
            evicted.push(hash);
        }
    }
    assert_eq!(evicted, vec![hashes[1], hashes[0]], "leaf first");
}

/// The request failed because a copy inside the pool did.
fn assert_copy_failed(outcome: &engine_support::Collected) {
    let message = outcome
        .failed
        .as_deref()
        .expect("the copy fails the request");
    assert!(
        message.contains("copying KV inside the pool failed"),
        "{message}"
    );
}

#[tokio::test]
async fn a_failed_device_copy_fails_only_that_request_and_frees_its_blocks() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let switch = Arc::new(AtomicBool::new(false));
    let (engine, _) = start(FakeModel::with_failing_copies(switch.clone()), config(64));
    // Two full blocks: the second time every block is cached and the last one is copied
    // (copy-on-write) before its last token is recomputed.
    let tokens = prompt(2 * BLOCK_TOKENS, 7, FAKE_VOCAB);
    let run = |id: &'static str| {
        let stream = engine
            .submit(greedy(id, tokens.clone(), 5))
            .expect("submit");
        collect(stream)
    };
    let first = run("first").await;
    assert_eq!(first.reason, Some(FinishReason::Length), "{first:?}");

    switch.store(true, Ordering::SeqCst);
    let failed = run("failed").await;
    assert_copy_failed(&failed);
    assert!(failed.tokens.is_empty(), "{failed:?}");
    assert_idle(&engine).await;

    switch.store(false, Ordering::SeqCst);
    let again = run("again").await;
    assert_eq!(again.tokens, first.tokens);
    assert_eq!(again.cached_tokens, Some(2 * BLOCK_TOKENS - 1));
    assert_idle(&engine).await;
}

#[tokio::test]
async fn a_failed_modular_copy_fails_only_that_request_and_leaves_the_pins_alone() {
    use skillkv_daemon::engine::ModularSpan;
    use std::sync::atomic::{AtomicBool, Ordering};
    let switch = Arc::new(AtomicBool::new(false));
    let (engine, _) = start(FakeModel::with_failing_copies(switch.clone()), config(64));
    let first = prompt(20, 1, FAKE_VOCAB);
    let second = prompt(40, 2, FAKE_VOCAB);
    for skill in [&first, &second] {
        engine
            .pin(PinRequest {
                tokens: skill.clone(),
                adapter: None,
            })
            .await
            .expect("pins");
    }
    let pinned = engine.stats().await.expect("stats").kv.pinned;
    let tokens: Vec<u32> = [first.as_slice(), &second, &prompt(6, 3, FAKE_VOCAB)].concat();
    let span = ModularSpan {
        start: first.len(),
        len: second.len(),
        recompute: 0,
    };
    let run = |id: &'static str| {
        let stream = engine
            .submit_assembled(greedy(id, tokens.clone(), 4), vec![span])
            .expect("submit");
        collect(stream)
    };
    switch.store(true, Ordering::SeqCst);
    let failed = run("failed").await;
    assert_copy_failed(&failed);
    assert_idle(&engine).await;
    assert_eq!(engine.stats().await.expect("stats").kv.pinned, pinned);

    // The engine goes on serving (exactly: the fake model reads positions back from K, which
    // a rotated copy does not keep).
    switch.store(false, Ordering::SeqCst);
    let served = collect(
        engine
            .submit(greedy("served", tokens.clone(), 4))
            .expect("submit"),
    )
    .await;
    assert_eq!(served.reason, Some(FinishReason::Length), "{served:?}");
    assert_eq!(served.tokens.len(), 4);
    assert_idle(&engine).await;
}
