//! Test support: a tiny synthetic Llama GGUF (random weights from a seed) that loads and runs in
//! milliseconds, for tests of the model mechanics, the scheduler and the server. When the
//! vocabulary has room (at least 259 tokens) the file also carries a byte-level BPE tokenizer
//! (three ChatML control tokens, the 256 bytes, then merges of common letter pairs) and a
//! ChatML chat template, so a daemon can serve chat requests on it. The spec can also make
//! files the loader must reject (another architecture, an unusable tensor type).

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::engine::chat_template::ChatTemplate;
use crate::engine::tokenizer::GgufTokenizer;

/// Shape and contents of a synthetic model.
#[derive(Debug, Clone)]
pub struct TinyModelSpec {
    /// `general.architecture`.
    pub architecture: String,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Embedding width.
    pub hidden: usize,
    /// Feed-forward width.
    pub ffn: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Context length in the metadata.
    pub context_length: usize,
    /// RoPE base.
    pub rope_theta: f32,
    /// Type of the 2-D projection weights.
    pub weight_dtype: GgmlDType,
    /// Whether to write a separate `output.weight` instead of tying it to `token_embd`.
    pub separate_output: bool,
    /// Seed of the random weights.
    pub seed: u64,
}

impl Default for TinyModelSpec {
    fn default() -> Self {
        Self {
            architecture: "llama".to_string(),
            n_layers: 2,
            hidden: 64,
            ffn: 128,
            n_heads: 4,
            n_kv_heads: 2,
            vocab: 320,
            context_length: 1024,
            rope_theta: 10_000.0,
            weight_dtype: GgmlDType::Q8_0,
            separate_output: false,
            seed: 7,
        }
    }
}

/// The tiny model's control tokens, at ids 0, 1 and 2 (as in SmolLM2).
pub const TINY_CONTROL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// The tiny model's chat template (ChatML, like SmolLM2's).
pub const TINY_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Letters paired into merges, most common English bigrams first.
const TINY_MERGE_LETTERS: &str =
    "thheinerandreontesatenndtiesngofedtoitisarhasouleoetnrseacomromaseliveteraiaeme";

/// Vocabulary, token types and merges of the tiny tokenizer for a vocabulary of `vocab` tokens
/// (`None` when it is smaller than the control tokens plus the 256 bytes).
fn tiny_tokenizer_metadata(vocab: usize) -> Option<(Vec<String>, Vec<i32>, Vec<String>)> {
    let byte_chars: Vec<(u8, char)> = {
        let mut pairs: Vec<(u8, char)> = crate::engine::tokenizer::byte_level_char_to_byte()
            .into_iter()
            .map(|(c, byte)| (byte, c))
            .collect();
        pairs.sort_unstable();
        pairs
    };
    let base = TINY_CONTROL_TOKENS.len() + byte_chars.len();
    if vocab < base {
        return None;
    }
    let mut tokens: Vec<String> = TINY_CONTROL_TOKENS.iter().map(|t| t.to_string()).collect();
    let mut types = vec![3; TINY_CONTROL_TOKENS.len()];
    tokens.extend(byte_chars.iter().map(|(_, c)| c.to_string()));
    types.extend(std::iter::repeat_n(1, byte_chars.len()));
    let letters: Vec<char> = TINY_MERGE_LETTERS.chars().collect();
    let mut merges = Vec::new();
    for pair in letters.chunks_exact(2) {
        let merged: String = pair.iter().collect();
        if tokens.len() == vocab {
            break;
        }
        if !tokens.contains(&merged) {
            merges.push(format!("{} {}", pair[0], pair[1]));
            tokens.push(merged);
            types.push(1);
        }
    }
    // Pad with unused normal tokens so the vocabulary matches the embedding rows.
    while tokens.len() < vocab {
        tokens.push(format!("<unused{}>", tokens.len()));
        types.push(1);
    }
    Some((tokens, types, merges))
}

/// The tokenizer and chat template a tiny model with `spec` carries (for tests that need them
/// without loading the weights).
pub fn tiny_tokenizer_and_template(
    spec: &TinyModelSpec,
) -> Result<(GgufTokenizer, ChatTemplate), LoadTinyTokenizerError> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    // Unique per call: tests in one process run in parallel.
    let path = std::env::temp_dir().join(format!(
        "skillkv-tiny-tokenizer-{}-{}.gguf",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    write_tiny_gguf(&path, spec)?;
    let mut file = File::open(&path).map_err(|source| WriteTinyGgufError::Create {
        path: path.display().to_string(),
        source,
    })?;
    let content = gguf_file::Content::read(&mut file)?;
    let _ = std::fs::remove_file(&path);
    Ok((
        GgufTokenizer::from_gguf(&content)?,
        ChatTemplate::from_gguf(&content)?,
    ))
}

/// Why the tiny tokenizer and template could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LoadTinyTokenizerError {
    /// Writing or reading the file failed.
    #[error(transparent)]
    Write(#[from] WriteTinyGgufError),
    /// The GGUF could not be parsed.
    #[error("reading the tiny GGUF failed")]
    Read(#[from] candle_core::Error),
    /// The tokenizer could not be built (vocabulary too small?).
    #[error(transparent)]
    Tokenizer(#[from] crate::engine::tokenizer::BuildTokenizerError),
    /// The template could not be loaded.
    #[error(transparent)]
    Template(#[from] crate::engine::chat_template::LoadTemplateError),
}

/// Why writing the synthetic model failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteTinyGgufError {
    /// Creating the file failed.
    #[error("cannot create {path}")]
    Create {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Building or serialising a tensor failed.
    #[error("cannot build the synthetic model")]
    Build(#[from] candle_core::Error),
}

/// Deterministic uniform numbers in [-1, 1) (SplitMix64).
#[derive(Debug)]
struct SplitMix(u64);

impl SplitMix {
    fn next_unit(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn random_tensor(
    rng: &mut SplitMix,
    shape: &[usize],
    scale: f32,
    dtype: GgmlDType,
) -> candle_core::Result<QTensor> {
    let count = shape.iter().product();
    let values: Vec<f32> = (0..count).map(|_| rng.next_unit() * scale).collect();
    let tensor = Tensor::from_vec(values, shape, &Device::Cpu)?;
    QTensor::quantize(&tensor, dtype)
}

fn norm_tensor(rng: &mut SplitMix, width: usize) -> candle_core::Result<QTensor> {
    let values: Vec<f32> = (0..width).map(|_| 1.0 + 0.1 * rng.next_unit()).collect();
    QTensor::quantize(
        &Tensor::from_vec(values, width, &Device::Cpu)?,
        GgmlDType::F32,
    )
}

/// Writes a synthetic Llama GGUF described by `spec` to `path`.
pub fn write_tiny_gguf(path: &Path, spec: &TinyModelSpec) -> Result<(), WriteTinyGgufError> {
    let mut rng = SplitMix(spec.seed);
    let head_dim = spec.hidden / spec.n_heads.max(1);
    let kv_width = spec.n_kv_heads * head_dim;
    let hidden_scale = 1.0 / (spec.hidden as f32).sqrt();
    let ffn_scale = 1.0 / (spec.ffn as f32).sqrt();
    let dtype = spec.weight_dtype;
    let mut tensors: Vec<(String, QTensor)> = vec![(
        "token_embd.weight".to_string(),
        random_tensor(&mut rng, &[spec.vocab, spec.hidden], 1.0, GgmlDType::Q8_0)?,
    )];
    for i in 0..spec.n_layers {
        let name = |suffix: &str| format!("blk.{i}.{suffix}.weight");
        let h = spec.hidden;
        tensors.push((name("attn_norm"), norm_tensor(&mut rng, h)?));
        tensors.push((
            name("attn_q"),
            random_tensor(&mut rng, &[h, h], hidden_scale, dtype)?,
        ));
        tensors.push((
            name("attn_k"),
            random_tensor(&mut rng, &[kv_width, h], hidden_scale, dtype)?,
        ));
        tensors.push((
            name("attn_v"),
            random_tensor(&mut rng, &[kv_width, h], hidden_scale, dtype)?,
        ));
        tensors.push((
            name("attn_output"),
            random_tensor(&mut rng, &[h, h], hidden_scale, dtype)?,
        ));
        tensors.push((name("ffn_norm"), norm_tensor(&mut rng, h)?));
        tensors.push((
            name("ffn_gate"),
            random_tensor(&mut rng, &[spec.ffn, h], hidden_scale, dtype)?,
        ));
        tensors.push((
            name("ffn_up"),
            random_tensor(&mut rng, &[spec.ffn, h], hidden_scale, dtype)?,
        ));
        tensors.push((
            name("ffn_down"),
            random_tensor(&mut rng, &[h, spec.ffn], ffn_scale, dtype)?,
        ));
    }
    tensors.push((
        "output_norm.weight".to_string(),
        norm_tensor(&mut rng, spec.hidden)?,
    ));
    if spec.separate_output {
        tensors.push((
            "output.weight".to_string(),
            random_tensor(&mut rng, &[spec.vocab, spec.hidden], hidden_scale, dtype)?,
        ));
    }
    let arch = spec.architecture.as_str();
    let u32_value = |v: usize| Value::U32(u32::try_from(v).unwrap_or(u32::MAX));
    let mut metadata: Vec<(String, Value)> = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.to_string()),
        ),
        (
            "general.name".to_string(),
            Value::String("tiny-synthetic".to_string()),
        ),
        (format!("{arch}.block_count"), u32_value(spec.n_layers)),
        (format!("{arch}.embedding_length"), u32_value(spec.hidden)),
        (format!("{arch}.feed_forward_length"), u32_value(spec.ffn)),
        (
            format!("{arch}.attention.head_count"),
            u32_value(spec.n_heads),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            u32_value(spec.n_kv_heads),
        ),
        (
            format!("{arch}.context_length"),
            u32_value(spec.context_length),
        ),
        (format!("{arch}.rope.dimension_count"), u32_value(head_dim)),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(spec.rope_theta),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
    ];
    if let Some((tokens, types, merges)) = tiny_tokenizer_metadata(spec.vocab) {
        let strings =
            |items: Vec<String>| Value::Array(items.into_iter().map(Value::String).collect());
        metadata.extend([
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("gpt2".to_string()),
            ),
            (
                "tokenizer.ggml.pre".to_string(),
                Value::String("gpt2".to_string()),
            ),
            ("tokenizer.ggml.tokens".to_string(), strings(tokens)),
            (
                "tokenizer.ggml.token_type".to_string(),
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            ("tokenizer.ggml.merges".to_string(), strings(merges)),
            ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(2)),
            (
                "tokenizer.chat_template".to_string(),
                Value::String(TINY_CHAT_TEMPLATE.to_string()),
            ),
        ]);
    }
    let file = File::create(path).map_err(|source| WriteTinyGgufError::Create {
        path: path.display().to_string(),
        source,
    })?;
    let mut writer = BufWriter::new(file);
    let metadata_refs: Vec<(&str, &Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut writer, &metadata_refs, &tensor_refs)?;
    std::io::Write::flush(&mut writer).map_err(|source| WriteTinyGgufError::Create {
        path: path.display().to_string(),
        source,
    })?;
    Ok(())
}
