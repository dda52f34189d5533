//! The resident forward pass on the host (`HostOps`, the kernels' references) against the host
//! forward pass on the same f32 weights, and its own invariants: chunking and batching never
//! change a row's logits, and bad batches are errors.

use std::path::Path;
use std::sync::Arc;

use skillkv_kernels::ops::host::HostOps;

use super::*;
use crate::engine::batch::SeqChunk;
use crate::engine::kv_pool::KvPool;
use crate::engine::testing::{TinyModelSpec, write_tiny_gguf};

struct Models {
    host: Llama<OpsBackend<HostOps>>,
    resident: ResidentLlama<HostOps>,
}

fn open(path: &Path) -> (GgufFile, ModelConfig) {
    let file = GgufFile::open(path).expect("opens");
    file.check_supported().expect("supported");
    let config = ModelConfig::from_gguf(&file.content).expect("config");
    (file, config)
}

fn models() -> Models {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, &TinyModelSpec::default()).expect("tiny model");
    let ops = Arc::new(HostOps);
    let (mut file, config) = open(&path);
    let host = Llama::load(OpsBackend::new(ops.clone()), config, &mut file).expect("host load");
    let (mut file, config) = open(&path);
    let resident = ResidentLlama::load(ops, config, &mut file).expect("resident load");
    Models { host, resident }
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 37 + salt * 11) % 300 + 5)
        .collect()
}

fn chunk<'a>(tokens: &'a [u32], start_pos: usize, table: &'a [u32]) -> SeqChunk<'a> {
    SeqChunk {
        tokens,
        start_pos,
        block_table: table,
        want_logits: true,
    }
}

fn batch(chunks: Vec<SeqChunk<'_>>) -> ForwardBatch<'_> {
    ForwardBatch { chunks }
}

fn argmax(logits: &[f32]) -> u32 {
    skillkv_kernels::reference::elementwise::argmax(logits, logits.len())[0]
}

fn assert_close(what: &str, got: &[f32], expected: &[f32]) {
    assert_eq!(got.len(), expected.len(), "{what}: vocabulary");
    let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1.0);
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!(
            (g - e).abs() <= 1e-4 * scale,
            "{what}: logit {i} is {g} resident, {e} on the host"
        );
    }
}

#[test]
fn resident_forward_equals_the_host_forward_pass_on_the_same_weights() {
    let Models { host, resident } = models();
    let config = resident.config().clone();
    let table: Vec<u32> = (0..6).rev().collect();
    let mut host_pool = KvPool::new(&config, 6);
    let mut pool = resident.new_pool(6).expect("pool");
    let mut tokens = prompt(40, 1);
    // Prefill in two chunks, then greedy decode steps, both ways side by side.
    let (mut start, mut steps) = (0, vec![7, 33]);
    steps.extend([1; 6]);
    for len in steps {
        let run = &tokens[start..start + len];
        let expected = host
            .forward(&batch(vec![chunk(run, start, &table)]), &mut host_pool)
            .expect("host forward");
        let got = resident
            .forward(&batch(vec![chunk(run, start, &table)]), &mut pool)
            .expect("resident forward");
        assert_close(
            &format!("after {} tokens", start + len),
            &got.logits[0],
            &expected.logits[0],
        );
        start += len;
        if start >= 40 {
            let next = argmax(&got.logits[0]);
            assert_eq!(next, argmax(&expected.logits[0]), "greedy token at {start}");
            tokens.push(next);
        }
    }
    // The 40-token prompt, the token after it and one more per decode step.
    assert_eq!(tokens.len(), 47);
}

#[test]
fn chunking_and_batching_leave_each_rows_logits_unchanged() {
    let Models { resident, .. } = models();
    let (a, b) = (prompt(35, 2), prompt(20, 3));
    let (table_a, table_b): (Vec<u32>, Vec<u32>) = ((0..3).collect(), vec![7, 4]);

    // Alone and in one chunk each.
    let mut pool = resident.new_pool(8).expect("pool");
    let whole_a = resident
        .forward(&batch(vec![chunk(&a, 0, &table_a)]), &mut pool)
        .expect("a");
    let whole_b = resident
        .forward(&batch(vec![chunk(&b, 0, &table_b)]), &mut pool)
        .expect("b");

    // Together in one batch, A in pieces across block boundaries and B token by token.
    let mut pool = resident.new_pool(8).expect("pool");
    let mut start_b = 0;
    let mut last_b = Vec::new();
    for (from, to) in [(0, 15), (15, 17), (17, 35)] {
        let mut chunks = vec![chunk(&a[from..to], from, &table_a)];
        chunks[0].want_logits = to == 35;
        let b_part = &b[start_b..start_b + 1];
        chunks.push(chunk(b_part, start_b, &table_b));
        let out = resident.forward(&batch(chunks), &mut pool).expect("batch");
        start_b += 1;
        last_b = out.logits.last().expect("b's logits").clone();
        if to == 35 {
            assert_eq!(out.logits[0], whole_a.logits[0], "A chunked and batched");
        }
    }
    while start_b < b.len() {
        let out = resident
            .forward(
                &batch(vec![chunk(&b[start_b..start_b + 1], start_b, &table_b)]),
                &mut pool,
            )
            .expect("b step");
        last_b = out.logits[0].clone();
        start_b += 1;
    }
    assert_eq!(last_b, whole_b.logits[0], "B token by token");
}

#[test]
fn bad_batches_are_errors_before_any_kernel_runs() {
    let Models { resident, .. } = models();
    let mut pool = resident.new_pool(2).expect("pool");
    let table = [0u32, 1];
    let out_of_vocab = [5u32, 100_000];
    assert!(matches!(
        resident.forward(&batch(vec![chunk(&out_of_vocab, 0, &table)]), &mut pool),
        Err(ForwardError::TokenOutOfRange { token: 100_000, .. })
    ));
    let foreign = [0u32, 9];
    let tokens = prompt(20, 4);
    assert!(matches!(
        resident.forward(&batch(vec![chunk(&tokens, 0, &foreign)]), &mut pool),
        Err(ForwardError::BlockOutOfRange { block: 9, .. })
    ));
    let long = prompt(40, 5);
    assert!(matches!(
        resident.forward(&batch(vec![chunk(&long, 0, &table)]), &mut pool),
        Err(ForwardError::BlockTableTooShort { needed: 3, .. })
    ));
    assert_eq!(
        resident
            .forward(&batch(Vec::new()), &mut pool)
            .expect("empty batch")
            .logits
            .len(),
        0
    );
}
