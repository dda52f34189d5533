//! Shared helpers of the engine integration tests: a deterministic fake model that reads its
//! history back from the paged KV pool (so a wrong block table or a wrong cached block changes
//! its output), a gate to hold the engine inside a forward pass, and stream collectors.

#![allow(dead_code)]

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use skillkv_kernels::ops::KernelOpError;
use skillkv_kernels::reference::rope::PairRotation;

use skillkv_daemon::engine::ForwardModel;
use skillkv_daemon::engine::batch::{BLOCK_SIZE, ForwardBatch, ForwardOutput, SeqChunk};
use skillkv_daemon::engine::gguf::ModelConfig;
use skillkv_daemon::engine::handle::{
    FinishReason, GenerateRequest, GenerationEvent, GenerationStream,
};
use skillkv_daemon::engine::kv_pool::{DeviceKv, KvPool, KvPoolOpError};
use skillkv_daemon::engine::sampling::SamplingParams;

/// Vocabulary of the fake model.
pub const FAKE_VOCAB: usize = 97;

/// Why the fake forward pass failed.
#[derive(Debug, thiserror::Error)]
pub enum FakeForwardError {
    /// The pool slot of a position holds another position's KV: the block table is wrong.
    #[error("slot for position {expected} holds the KV of position {found}")]
    WrongPosition { expected: usize, found: f32 },
    /// A position beyond the block table.
    #[error("position {0} is not covered by the block table")]
    Uncovered(usize),
}

/// A model whose next token is a hash of every (token, position) it reads back from the pool.
#[derive(Debug)]
pub struct FakeModel {
    config: ModelConfig,
    /// Tokens of every batch it ran, in order.
    pub batch_sizes: Mutex<Vec<usize>>,
    /// While set, each forward pass first waits for a permit (or for the sender to drop).
    pub gate: Mutex<Option<mpsc::Receiver<()>>>,
    /// With a switch, the pool is a device pool ([`FlakyDeviceKv`]) whose copies fail while
    /// the switch is on.
    pub failing_copies: Option<Arc<AtomicBool>>,
}

/// A "device" pool over a host [`KvPool`] whose block and row copies fail while `fail` is on,
/// as a GPU's would after a device error.
#[derive(Debug)]
pub struct FlakyDeviceKv {
    inner: KvPool,
    fail: Arc<AtomicBool>,
}

impl FlakyDeviceKv {
    fn check(&self, operation: &'static str) -> Result<(), KvPoolOpError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(KvPoolOpError {
                operation,
                source: KernelOpError::Device {
                    op: operation,
                    backend: "flaky",
                    source: Box::new(std::io::Error::other("injected device failure")),
                },
            });
        }
        Ok(())
    }
}

impl DeviceKv for FlakyDeviceKv {
    fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), KvPoolOpError> {
        self.check("copy block")?;
        self.inner.copy_block(src, dst)
    }

    fn copy_rows(
        &mut self,
        src: (&[u32], usize),
        dst: (&[u32], usize),
        count: usize,
        rotation: Option<&PairRotation>,
    ) -> Result<(), KvPoolOpError> {
        self.check("copy rows")?;
        self.inner.copy_rows(src, dst, count, rotation)
    }

    fn read_block(&self, layer: usize, block: u32) -> Result<(Vec<f32>, Vec<f32>), KvPoolOpError> {
        self.inner.read_block(layer, block)
    }

    fn write_block(
        &mut self,
        layer: usize,
        block: u32,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvPoolOpError> {
        self.inner.write_block(layer, block, k, v)
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl FakeModel {
    pub fn new() -> Self {
        Self {
            config: ModelConfig {
                n_layers: 1,
                hidden: 2,
                ffn: 2,
                n_heads: 1,
                n_kv_heads: 1,
                head_dim: 2,
                vocab: FAKE_VOCAB,
                rope_theta: 10_000.0,
                rms_eps: 1e-5,
                context_length: 4096,
            },
            batch_sizes: Mutex::new(Vec::new()),
            gate: Mutex::new(None),
            failing_copies: None,
        }
    }

    /// A fake model on a [`FlakyDeviceKv`] pool whose copies fail while `switch` is on.
    pub fn with_failing_copies(switch: Arc<AtomicBool>) -> Self {
        Self {
            failing_copies: Some(switch),
            ..Self::new()
        }
    }

    /// A fake model held at its next forward pass until the returned sender sends or drops.
    pub fn gated() -> (Self, mpsc::Sender<()>) {
        let model = Self::new();
        let (permits, gate) = mpsc::channel();
        *model.gate.lock().expect("gate lock") = Some(gate);
        (model, permits)
    }

    fn write(kv: &mut KvPool, chunk: &SeqChunk<'_>) -> Result<(), FakeForwardError> {
        for (offset, &token) in chunk.tokens.iter().enumerate() {
            let position = chunk.start_pos + offset;
            let block = *chunk
                .block_table
                .get(position / BLOCK_SIZE)
                .ok_or(FakeForwardError::Uncovered(position))?;
            let (mut k, mut v) = kv.read_block(0, block).expect("a host pool");
            let slot = (position % BLOCK_SIZE) * 2;
            k[slot] = token as f32;
            k[slot + 1] = position as f32;
            v[slot] = token as f32;
            v[slot + 1] = position as f32;
            kv.write_block(0, block, &k, &v).expect("a host pool");
        }
        Ok(())
    }

    fn logits(kv: &KvPool, chunk: &SeqChunk<'_>) -> Result<Vec<f32>, FakeForwardError> {
        let last = chunk.start_pos + chunk.tokens.len();
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for position in 0..last {
            let block = *chunk
                .block_table
                .get(position / BLOCK_SIZE)
                .ok_or(FakeForwardError::Uncovered(position))?;
            let slot = (position % BLOCK_SIZE) * 2;
            let (k, _) = kv.read_block(0, block).expect("a host pool");
            if k[slot + 1] != position as f32 {
                return Err(FakeForwardError::WrongPosition {
                    expected: position,
                    found: k[slot + 1],
                });
            }
            hash = (hash ^ (k[slot] as u64 + 1)).wrapping_mul(0x0100_0000_01b3);
        }
        let mut logits = vec![0.0; FAKE_VOCAB];
        logits[(hash % FAKE_VOCAB as u64) as usize] = 10.0;
        Ok(logits)
    }
}

impl ForwardModel for FakeModel {
    type Error = FakeForwardError;

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn new_pool(&self, num_blocks: usize) -> Result<KvPool, Self::Error> {
        let host = KvPool::new(self.config(), num_blocks);
        Ok(match &self.failing_copies {
            None => host,
            Some(fail) => KvPool::on_device(
                self.config(),
                num_blocks,
                Box::new(FlakyDeviceKv {
                    inner: host,
                    fail: fail.clone(),
                }),
            ),
        })
    }

    fn forward(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &mut KvPool,
    ) -> Result<ForwardOutput, FakeForwardError> {
        if let Some(gate) = self.gate.lock().expect("gate lock").as_ref() {
            // A dropped sender opens the gate for good.
            let _ = gate.recv();
        }
        let tokens = batch.chunks.iter().map(|chunk| chunk.tokens.len()).sum();
        self.batch_sizes
            .lock()
            .expect("batch sizes lock")
            .push(tokens);
        let mut logits = Vec::new();
        for chunk in &batch.chunks {
            Self::write(kv, chunk)?;
            if chunk.want_logits {
                logits.push(Self::logits(kv, chunk)?);
            }
        }
        Ok(ForwardOutput { logits })
    }
}

/// Everything a finished stream said.
#[derive(Debug, Clone, PartialEq)]
pub struct Collected {
    pub tokens: Vec<u32>,
    pub text: String,
    pub cached_tokens: Option<usize>,
    pub reason: Option<FinishReason>,
    pub completion_tokens: usize,
    pub failed: Option<String>,
    /// Each token's most likely alternatives with their log-probabilities (empty unless the
    /// request asked for logprobs).
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
}

/// Reads a stream to its end.
pub async fn collect(mut stream: GenerationStream) -> Collected {
    let mut out = Collected {
        tokens: Vec::new(),
        text: String::new(),
        cached_tokens: None,
        reason: None,
        completion_tokens: 0,
        failed: None,
        top_logprobs: Vec::new(),
    };
    while let Some(event) = stream.recv().await {
        match event {
            GenerationEvent::Started { cached_tokens, .. } => {
                out.cached_tokens = Some(cached_tokens)
            }
            GenerationEvent::Token {
                id,
                text,
                top_logprobs,
                ..
            } => {
                out.tokens.push(id);
                out.top_logprobs.push(top_logprobs);
                out.text.push_str(&text);
            }
            GenerationEvent::Finished {
                reason,
                completion_tokens,
                text,
                ..
            } => {
                out.reason = Some(reason);
                out.completion_tokens = completion_tokens;
                out.text.push_str(&text);
            }
            GenerationEvent::Failed(error) => out.failed = Some(format!("{error:#}")),
        }
    }
    out
}

/// A greedy request that never stops early on EOS.
pub fn greedy(request_id: &str, prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        request_id: request_id.to_string(),
        prompt_tokens: prompt,
        sampling: SamplingParams {
            max_tokens,
            ignore_eos: true,
            ..SamplingParams::greedy()
        },
        adapter: None,
    }
}

/// [`greedy`] that also reports each token's `count` most likely alternatives.
pub fn greedy_with_logprobs(
    request_id: &str,
    prompt: Vec<u32>,
    max_tokens: usize,
    count: usize,
) -> GenerateRequest {
    let mut request = greedy(request_id, prompt, max_tokens);
    request.sampling.logprobs = Some(count);
    request
}

/// Deterministic pseudo-random prompt of `len` tokens below `vocab`.
pub fn prompt(len: usize, seed: u32, vocab: usize) -> Vec<u32> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(12_345);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state % vocab as u32
        })
        .collect()
}

/// Shares a model between engines.
pub fn shared<M>(model: M) -> Arc<M> {
    Arc::new(model)
}
