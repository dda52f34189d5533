//! The forward pass on the real default model: greedy tokens equal candle-transformers'
//! independent `quantized_llama` implementation, and prefix reuse (chunked prefill, decoding
//! from pooled KV) equals recomputation.
//!
//! The engine requantizes every projection weight to Q8_0 at load time (see
//! `engine::model::cpu`) and multiplies f32 activations by the exactly dequantized weights. To
//! compare implementations rather than weight formats, the reference runs the same arithmetic:
//! the test writes a copy of the model with the same Q8_0 requantization (candle's
//! `QTensor::quantize`) for the engine, and that copy dequantized to f32 for
//! `quantized_llama`, whose f32 weights take candle's dense f32 matmul.

mod model_support;

use std::io::BufReader;

use candle_core::quantized::gguf_file::{self, Content};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use skillkv_daemon::engine::batch::{ForwardBatch, SeqChunk};
use skillkv_daemon::engine::kv_pool::KvPool;
use skillkv_daemon::engine::model::{LlamaModel, LoadOptions};

use model_support::{
    argmax, contiguous_blocks, greedy, max_abs_diff, prefill_in_chunks, real_model_path,
};

const GREEDY_STEPS: usize = 16;
/// Largest logit difference to the reference allowed at any step (f32 rounding over 30 layers).
const MAX_LOGIT_DIFFERENCE: f32 = 0.05;
/// A reference logit gap small enough that either token is a faithful greedy choice.
const NEAR_TIE: f32 = 0.5;

/// Token ids of `pieces` looked up in the model's own vocabulary (`tokenizer.ggml.tokens`).
fn ids_of(content: &Content, pieces: &[&str]) -> Vec<u32> {
    let vocab = content.metadata["tokenizer.ggml.tokens"]
        .to_vec()
        .expect("token list");
    pieces
        .iter()
        .map(|piece| {
            vocab
                .iter()
                .position(|v| v.to_string().is_ok_and(|s| s == piece))
                .unwrap_or_else(|| panic!("{piece:?} is not in the vocabulary")) as u32
        })
        .collect()
}

fn prompts(content: &Content) -> Vec<Vec<u32>> {
    vec![
        ids_of(
            content,
            &[
                "<|im_start|>",
                "user",
                "Ċ",
                "What",
                "Ġis",
                "Ġthe",
                "Ġcapital",
                "Ġof",
                "ĠFrance",
                "?",
                "<|im_end|>",
                "Ċ",
                "<|im_start|>",
                "system",
                "Ċ",
            ],
        ),
        ids_of(content, &["The", "Ġquick", "Ġbrown", "Ġfox"]),
        ids_of(
            content,
            &[
                "def", "Ġadd", "(", "a", ",", "Ġb", "):", "Ċ", "ĠĠĠ", "Ġreturn",
            ],
        ),
    ]
}

/// Writes `target` with every tensor of `source` passed through `convert`.
fn write_converted(
    source: &std::path::Path,
    target: &std::path::Path,
    convert: impl Fn(QTensor) -> QTensor,
) {
    let mut reader = BufReader::new(std::fs::File::open(source).expect("open model"));
    let content = Content::read(&mut reader).expect("read gguf");
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::new();
    for name in names {
        let tensor = content
            .tensor(&mut reader, name, &Device::Cpu)
            .expect("read tensor");
        tensors.push((name.as_str(), convert(tensor)));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    let mut writer = std::io::BufWriter::new(std::fs::File::create(target).expect("create"));
    gguf_file::write(&mut writer, &metadata, &tensor_refs).expect("write gguf");
}

/// Every quantized weight requantized to Q8_0, as the engine does.
fn to_q8_0(tensor: QTensor) -> QTensor {
    match tensor.dtype() {
        GgmlDType::F32 | GgmlDType::Q8_0 => tensor,
        _ => {
            let dense: Tensor = tensor.dequantize(&Device::Cpu).expect("dequantize");
            QTensor::quantize(&dense, GgmlDType::Q8_0).expect("quantize")
        }
    }
}

/// Every weight dequantized to f32.
fn to_f32(tensor: QTensor) -> QTensor {
    if tensor.dtype() == GgmlDType::F32 {
        return tensor;
    }
    let dense: Tensor = tensor.dequantize(&Device::Cpu).expect("dequantize");
    QTensor::quantize(&dense, GgmlDType::F32).expect("to f32")
}

/// The reference's greedy continuation: its tokens and the logits it chose each one from.
fn reference_greedy(
    model: &mut ModelWeights,
    prompt: &[u32],
    steps: usize,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    model.clear_kv_cache();
    let input = Tensor::new(prompt, &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("input");
    let mut logits = model.forward(&input, 0).expect("reference prefill");
    let mut tokens = Vec::new();
    let mut rows = Vec::new();
    for step in 0..steps {
        let row: Vec<f32> = logits
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("logits");
        let token = argmax(&row);
        tokens.push(token);
        rows.push(row);
        if step + 1 == steps {
            break;
        }
        let input = Tensor::new(&[token], &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("input");
        logits = model
            .forward(&input, prompt.len() + step)
            .expect("reference decode");
    }
    (tokens, rows)
}

/// Our logits for each step when fed the reference's tokens (teacher forcing).
fn our_logits_along(
    model: &LlamaModel,
    pool: &mut KvPool,
    prompt: &[u32],
    continuation: &[u32],
    blocks: &[u32],
) -> Vec<Vec<f32>> {
    let mut rows = vec![prefill_in_chunks(
        model,
        pool,
        prompt,
        &[prompt.len()],
        blocks,
    )];
    for (step, token) in continuation[..continuation.len() - 1].iter().enumerate() {
        let batch = ForwardBatch {
            chunks: vec![SeqChunk {
                tokens: std::slice::from_ref(token),
                start_pos: prompt.len() + step,
                block_table: blocks,
                want_logits: true,
            }],
        };
        rows.push(
            model
                .forward(&batch, pool)
                .expect("decode")
                .logits
                .remove(0),
        );
    }
    rows
}

#[test]
fn greedy_tokens_equal_candle_quantized_llama_on_the_real_model() {
    let model_path = real_model_path();
    let dir = std::env::temp_dir().join(format!("skillkv-model-reference-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let q8_copy = dir.join("q8_0.gguf");
    let f32_copy = dir.join("f32.gguf");
    write_converted(&model_path, &q8_copy, to_q8_0);
    write_converted(&q8_copy, &f32_copy, to_f32);
    let loaded = LlamaModel::load(&q8_copy, &LoadOptions::default()).expect("load model");
    let mut reader = BufReader::new(std::fs::File::open(&f32_copy).expect("open copy"));
    let content = Content::read(&mut reader).expect("read copy");
    let mut reference =
        ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).expect("reference model");
    let _ = std::fs::remove_dir_all(&dir);

    for prompt in prompts(&loaded.gguf) {
        let blocks = contiguous_blocks(0, prompt.len() + GREEDY_STEPS);
        let (theirs, their_logits) = reference_greedy(&mut reference, &prompt, GREEDY_STEPS);
        let mut pool = KvPool::new(&loaded.config, blocks.len());
        let our_logits = our_logits_along(&loaded.model, &mut pool, &prompt, &theirs, &blocks);
        for (step, (ours_row, theirs_row)) in our_logits.iter().zip(&their_logits).enumerate() {
            // Same weights, same f32 arithmetic up to summation order (and our vectorised exp):
            // the logits agree closely, not bit for bit.
            let diff = max_abs_diff(ours_row, theirs_row);
            eprintln!("step {step}: max logit difference {diff}");
            assert!(
                diff <= MAX_LOGIT_DIFFERENCE,
                "prompt {prompt:?} step {step}: logits differ by {diff} from the reference"
            );
            // The same greedy choice, unless the reference itself had a near tie.
            let ours = argmax(ours_row);
            let margin = theirs_row[theirs[step] as usize] - theirs_row[ours as usize];
            assert!(
                ours == theirs[step] || margin <= NEAR_TIE,
                "prompt {prompt:?} step {step}: we pick {ours}, the reference {} (margin {margin})",
                theirs[step]
            );
        }
        // Free-running greedy decoding from our own pooled KV agrees too, up to the first
        // near tie (where either choice is a faithful greedy decode).
        let mut pool = KvPool::new(&loaded.config, blocks.len());
        let ours = greedy(&loaded.model, &mut pool, &prompt, GREEDY_STEPS, &blocks);
        let agreeing = ours.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
        if agreeing < GREEDY_STEPS {
            let row = &their_logits[agreeing];
            let margin = row[theirs[agreeing] as usize] - row[ours[agreeing] as usize];
            assert!(
                margin <= NEAR_TIE,
                "prompt {prompt:?}: greedy tokens diverge at step {agreeing} without a near tie \
                 (margin {margin}): ours {ours:?}, reference {theirs:?}"
            );
        }
        eprintln!("prompt {prompt:?}: {agreeing}/{GREEDY_STEPS} greedy tokens identical");
    }
}

#[test]
fn reuse_equals_recompute_on_the_real_model() {
    let loaded = LlamaModel::load(&real_model_path(), &LoadOptions::default()).expect("load");
    let tokens: Vec<u32> = prompts(&loaded.gguf).concat().repeat(4)[..100].to_vec();
    let blocks = contiguous_blocks(0, tokens.len());
    let mut pool = KvPool::new(&loaded.config, blocks.len());
    let one_shot = prefill_in_chunks(&loaded.model, &mut pool, &tokens, &[100], &blocks);
    let chunkings: [&[usize]; 3] = [&[32, 32, 36], &[37, 27, 35], &[99]];
    for chunking in chunkings {
        let mut pool = KvPool::new(&loaded.config, blocks.len());
        let chunked = prefill_in_chunks(&loaded.model, &mut pool, &tokens, chunking, &blocks);
        let diff = max_abs_diff(&one_shot, &chunked);
        assert!(
            diff <= 1e-4,
            "chunking {chunking:?}: logits differ by {diff}"
        );
    }
}
