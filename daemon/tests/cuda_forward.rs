//! The CUDA backend's whole forward pass against the CPU backend on the real default model:
//! the same greedy tokens for three prompts and close first-step logits. Runs wherever the
//! daemon is built with `cuda` and a GPU is usable; prints "skipped: no GPU" otherwise.
#![cfg(feature = "cuda")]

mod model_support;

use skillkv_daemon::engine::device::{DeviceRequest, select_device};
use skillkv_daemon::engine::kv_pool::KvPool;
use skillkv_daemon::engine::model::{LlamaModel, LoadOptions};
use skillkv_daemon::engine::tokenizer::GgufTokenizer;

use model_support::{contiguous_blocks, greedy, max_abs_diff, prefill_in_chunks, real_model_path};

const STEPS: usize = 32;
/// Largest first-step logit difference between cuBLAS SGEMM and the CPU kernels (f32, 30
/// layers, different summation orders).
const MAX_LOGIT_DIFFERENCE: f32 = 0.05;

#[test]
fn cuda_forward_gives_the_cpu_greedy_tokens() {
    let selected = match select_device(DeviceRequest::Cuda(0)) {
        Ok(selected) => selected,
        Err(error) => return println!("skipped: no GPU ({error})"),
    };
    println!("device: {:?}", selected.info);
    let path = real_model_path();
    let cpu = LlamaModel::load(&path, &LoadOptions::default()).expect("CPU load");
    let gpu = LlamaModel::load(
        &path,
        &LoadOptions {
            device: selected.device,
            ..LoadOptions::default()
        },
    )
    .expect("CUDA load");
    assert_eq!(gpu.model.backend_name(), "cuda");
    let tokenizer = GgufTokenizer::from_gguf(&cpu.gguf).expect("tokenizer");
    for text in [
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "The quick brown fox",
        "def add(a, b):\n    return",
    ] {
        let prompt = tokenizer.encode(text).expect("encode");
        let blocks = contiguous_blocks(0, prompt.len() + STEPS);
        let mut cpu_pool = KvPool::new(&cpu.config, blocks.len());
        let mut gpu_pool = KvPool::new(&gpu.config, blocks.len());
        let cpu_logits = prefill_in_chunks(&cpu.model, &mut cpu_pool, &prompt, &[7], &blocks);
        let gpu_logits = prefill_in_chunks(&gpu.model, &mut gpu_pool, &prompt, &[7], &blocks);
        let difference = max_abs_diff(&cpu_logits, &gpu_logits);
        assert!(
            difference < MAX_LOGIT_DIFFERENCE,
            "{text:?}: first-step logits differ by {difference}"
        );
        let mut cpu_pool = KvPool::new(&cpu.config, blocks.len());
        let mut gpu_pool = KvPool::new(&gpu.config, blocks.len());
        let ours = greedy(&gpu.model, &mut gpu_pool, &prompt, STEPS, &blocks);
        let theirs = greedy(&cpu.model, &mut cpu_pool, &prompt, STEPS, &blocks);
        assert_eq!(ours, theirs, "{text:?}: greedy tokens differ");
        println!("{text:?}: {STEPS} greedy tokens equal, logit difference {difference:.2e}");
    }
}
