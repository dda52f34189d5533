//! Model mechanics on a tiny synthetic GGUF: loading, typed load errors, chunked prefill equal to
//! one-shot prefill, paging independent of which blocks are used, mixed batches equal to each
//! sequence alone, and rejected batches.

mod model_support;

use candle_core::quantized::GgmlDType;
use skillkv_daemon::engine::batch::{BLOCK_SIZE, ForwardBatch, SeqChunk};
use skillkv_daemon::engine::gguf::LoadModelError;
use skillkv_daemon::engine::kv_pool::KvPool;
use skillkv_daemon::engine::model::{ForwardError, LlamaModel, LoadOptions, LoadedModel};
use skillkv_daemon::engine::testing::{TinyModelSpec, write_tiny_gguf};

use model_support::{contiguous_blocks, greedy, max_abs_diff, prefill_in_chunks};

fn temp_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "skillkv-model-tiny-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

fn load_tiny(spec: &TinyModelSpec) -> LoadedModel {
    let path = temp_dir().join("tiny.gguf");
    write_tiny_gguf(&path, spec).expect("write tiny gguf");
    LlamaModel::load(&path, &LoadOptions::default()).expect("load tiny model")
}

fn prompt(len: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 37 + 11) % vocab) as u32).collect()
}

#[test]
fn tiny_model_loads_with_its_hyperparameters_and_digest() {
    let spec = TinyModelSpec::default();
    let loaded = load_tiny(&spec);
    let config = loaded.model.config();
    assert_eq!(config.n_layers, spec.n_layers);
    assert_eq!(config.hidden, spec.hidden);
    assert_eq!(config.ffn, spec.ffn);
    assert_eq!(config.n_heads, spec.n_heads);
    assert_eq!(config.n_kv_heads, spec.n_kv_heads);
    assert_eq!(config.head_dim, spec.hidden / spec.n_heads);
    assert_eq!(config.vocab, spec.vocab);
    assert_eq!(config.context_length, spec.context_length);
    assert_eq!(&loaded.config, config);
    assert_eq!(loaded.model_digest.len(), 64);
    assert!(loaded.model_digest.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(
        loaded.gguf.metadata["general.architecture"]
            .to_string()
            .expect("string"),
        "llama"
    );

    let mut pool = KvPool::new(config, 8);
    let tokens = prompt(20, spec.vocab);
    let blocks = contiguous_blocks(0, tokens.len());
    let logits = prefill_in_chunks(&loaded.model, &mut pool, &tokens, &[20], &blocks);
    assert_eq!(logits.len(), spec.vocab);
    assert!(logits.iter().all(|x| x.is_finite()));
    let spread = logits.iter().copied().fold(f32::MIN, f32::max)
        - logits.iter().copied().fold(f32::MAX, f32::min);
    assert!(spread > 0.1, "logits are degenerate (spread {spread})");
}

#[test]
fn different_files_have_different_digests() {
    let a = load_tiny(&TinyModelSpec::default());
    let b = load_tiny(&TinyModelSpec {
        seed: 8,
        ..TinyModelSpec::default()
    });
    assert_ne!(a.model_digest, b.model_digest);
}

#[test]
fn chunked_prefill_and_decode_equal_one_shot_prefill() {
    for weight_dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
        let spec = TinyModelSpec {
            weight_dtype,
            separate_output: weight_dtype == GgmlDType::Q4_1,
            ..TinyModelSpec::default()
        };
        let loaded = load_tiny(&spec);
        let tokens = prompt(70, spec.vocab);
        let blocks = contiguous_blocks(0, tokens.len());
        let mut pool = KvPool::new(&loaded.config, blocks.len());
        let one_shot = prefill_in_chunks(&loaded.model, &mut pool, &tokens, &[70], &blocks);
        let chunkings: [&[usize]; 4] = [
            &[16, 16, 16, 22],  // block boundaries
            &[7, 20, 3, 33, 7], // mid-block boundaries
            &[69],              // prefix then one decode step
            &[1; 70],           // token by token
        ];
        for chunking in chunkings {
            let mut pool = KvPool::new(&loaded.config, blocks.len());
            let chunked = prefill_in_chunks(&loaded.model, &mut pool, &tokens, chunking, &blocks);
            let diff = max_abs_diff(&one_shot, &chunked);
            assert!(
                diff <= 1e-4,
                "{weight_dtype:?} chunking {chunking:?}: logits differ by {diff}"
            );
        }
    }
}

#[test]
fn results_do_not_depend_on_which_blocks_hold_the_sequence() {
    let spec = TinyModelSpec::default();
    let loaded = load_tiny(&spec);
    let tokens = prompt(50, spec.vocab);
    let mut pool = KvPool::new(&loaded.config, 12);
    let in_order = greedy(&loaded.model, &mut pool, &tokens, 8, &[0, 1, 2, 3]);
    let mut pool = KvPool::new(&loaded.config, 12);
    let scattered = greedy(&loaded.model, &mut pool, &tokens, 8, &[11, 3, 7, 5]);
    assert_eq!(in_order, scattered);
}

#[test]
fn mixed_batch_gives_each_sequence_the_logits_it_gets_alone() {
    let spec = TinyModelSpec::default();
    let loaded = load_tiny(&spec);
    let model = &loaded.model;
    let prompt_a = prompt(40, spec.vocab);
    let prompt_b: Vec<u32> = prompt(23, spec.vocab)
        .iter()
        .map(|t| (t * 3) % 320)
        .collect();
    let blocks_a = contiguous_blocks(0, 40);
    let blocks_b = contiguous_blocks(4, 24);

    // Alone: A prefills 25 tokens then a 15-token chunk; B prefills 23 then decodes one token.
    let mut pool = KvPool::new(&loaded.config, 8);
    prefill_in_chunks(model, &mut pool, &prompt_a[..25], &[25], &blocks_a);
    let alone_a = prefill_in_chunks_from(model, &mut pool, &prompt_a, 25, &blocks_a);
    prefill_in_chunks(model, &mut pool, &prompt_b[..22], &[22], &blocks_b);
    let alone_b = prefill_in_chunks_from(model, &mut pool, &prompt_b, 22, &blocks_b);

    // Together: the same prefixes, then A's chunk and B's decode step in one batch.
    let mut pool = KvPool::new(&loaded.config, 8);
    prefill_in_chunks(model, &mut pool, &prompt_a[..25], &[25], &blocks_a);
    prefill_in_chunks(model, &mut pool, &prompt_b[..22], &[22], &blocks_b);
    let batch = ForwardBatch {
        chunks: vec![
            SeqChunk {
                tokens: &prompt_a[25..],
                start_pos: 25,
                block_table: &blocks_a,
                want_logits: true,
            },
            SeqChunk {
                tokens: &prompt_b[22..],
                start_pos: 22,
                block_table: &blocks_b,
                want_logits: true,
            },
        ],
    };
    let together = model.forward(&batch, &mut pool).expect("mixed batch");
    assert_eq!(together.logits.len(), 2);
    assert_eq!(together.logits[0], alone_a, "sequence A changed in a batch");
    assert_eq!(together.logits[1], alone_b, "sequence B changed in a batch");
}

/// Runs `tokens[start..]` as one chunk and returns its last logits.
fn prefill_in_chunks_from(
    model: &LlamaModel,
    pool: &mut KvPool,
    tokens: &[u32],
    start: usize,
    blocks: &[u32],
) -> Vec<f32> {
    let batch = ForwardBatch {
        chunks: vec![SeqChunk {
            tokens: &tokens[start..],
            start_pos: start,
            block_table: blocks,
            want_logits: true,
        }],
    };
    model
        .forward(&batch, pool)
        .expect("forward")
        .logits
        .remove(0)
}

#[test]
fn only_chunks_that_want_logits_get_them() {
    let spec = TinyModelSpec::default();
    let loaded = load_tiny(&spec);
    let tokens = prompt(10, spec.vocab);
    let mut pool = KvPool::new(&loaded.config, 4);
    let batch = ForwardBatch {
        chunks: vec![
            SeqChunk {
                tokens: &tokens,
                start_pos: 0,
                block_table: &[0],
                want_logits: false,
            },
            SeqChunk {
                tokens: &tokens[..3],
                start_pos: 0,
                block_table: &[1],
                want_logits: true,
            },
        ],
    };
    let output = loaded.model.forward(&batch, &mut pool).expect("forward");
    assert_eq!(output.logits.len(), 1);
    let mut fresh = KvPool::new(&loaded.config, 4);
    let alone = prefill_in_chunks(&loaded.model, &mut fresh, &tokens[..3], &[3], &[2]);
    assert_eq!(output.logits[0], alone);
}

#[test]
fn invalid_batches_are_rejected_with_typed_errors() {
    let spec = TinyModelSpec::default();
    let loaded = load_tiny(&spec);
    let mut pool = KvPool::new(&loaded.config, 2);
    let run = |tokens: &[u32], start_pos: usize, table: &[u32], pool: &mut KvPool| {
        let batch = ForwardBatch {
            chunks: vec![SeqChunk {
                tokens,
                start_pos,
                block_table: table,
                want_logits: true,
            }],
        };
        loaded.model.forward(&batch, pool)
    };
    assert!(matches!(
        run(&[], 0, &[0], &mut pool),
        Err(ForwardError::EmptyChunk { chunk: 0 })
    ));
    assert!(matches!(
        run(&[320], 0, &[0], &mut pool),
        Err(ForwardError::TokenOutOfRange { token: 320, .. })
    ));
    let long = vec![1u32; BLOCK_SIZE + 1];
    assert!(matches!(
        run(&long, 0, &[0], &mut pool),
        Err(ForwardError::BlockTableTooShort {
            needed: 2,
            available: 1,
            ..
        })
    ));
    assert!(matches!(
        run(&[1], 0, &[5], &mut pool),
        Err(ForwardError::BlockOutOfRange { block: 5, .. })
    ));
    assert!(matches!(
        run(&[1], spec.context_length, &[0; 65], &mut pool),
        Err(ForwardError::ContextOverflow { .. })
    ));
}

#[test]
fn missing_file_is_not_found() {
    let path = temp_dir().join("does-not-exist.gguf");
    let error = LlamaModel::load(&path, &LoadOptions::default()).expect_err("must fail");
    assert!(matches!(&error, LoadModelError::NotFound { path: p } if *p == path));
    assert!(error.to_string().contains("make model"));
}

#[test]
fn a_file_that_is_not_gguf_is_rejected() {
    let path = temp_dir().join("not-a-model.gguf");
    std::fs::write(&path, b"this is a text file, not a model").expect("write");
    let error = LlamaModel::load(&path, &LoadOptions::default()).expect_err("must fail");
    assert!(matches!(error, LoadModelError::NotGguf { .. }), "{error:?}");
}

#[test]
fn another_architecture_is_rejected() {
    let path = temp_dir().join("gpt2.gguf");
    let spec = TinyModelSpec {
        architecture: "gpt2".to_string(),
        ..TinyModelSpec::default()
    };
    write_tiny_gguf(&path, &spec).expect("write");
    let error = LlamaModel::load(&path, &LoadOptions::default()).expect_err("must fail");
    assert!(
        matches!(&error, LoadModelError::UnsupportedArchitecture { found } if found == "gpt2"),
        "{error:?}"
    );
}

#[test]
fn an_unsupported_quantization_type_is_rejected() {
    let path = temp_dir().join("q8_1.gguf");
    let spec = TinyModelSpec {
        weight_dtype: GgmlDType::Q8_1,
        ..TinyModelSpec::default()
    };
    write_tiny_gguf(&path, &spec).expect("write");
    let error = LlamaModel::load(&path, &LoadOptions::default()).expect_err("must fail");
    assert!(
        matches!(&error, LoadModelError::UnsupportedQuantization { tensor, dtype }
            if tensor.starts_with("blk.0.") && dtype == "Q8_1"),
        "{error:?}"
    );
}
