//! Opening a GGUF model file: typed errors for every way a file can be unusable (missing, not
//! GGUF, another architecture, an unsupported tensor type, missing metadata or tensors), the
//! Llama hyperparameters as a [`ModelConfig`], and the file's SHA-256 digest.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, Value};
use sha2::{Digest, Sha256};

/// Architectures (`general.architecture`) whose tensors follow the Llama layout.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// Tensor types the loader can dequantize. `Q8_1` and `Q8_K` exist only as activation formats
/// inside ggml and never hold model weights.
pub fn is_supported_weight_type(dtype: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::Q8_1 | GgmlDType::Q8K)
}

/// Hyperparameters of a Llama-family model, read from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Embedding (residual stream) width.
    pub hidden: usize,
    /// Width of the feed-forward (SwiGLU) layer.
    pub ffn: usize,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the token embedding).
    pub vocab: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Epsilon of the RMS norms.
    pub rms_eps: f32,
    /// Longest sequence the model supports, in tokens.
    pub context_length: usize,
}

/// Why a model file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadModelError {
    /// No file at the path.
    #[error("model file {path} not found (run `make model` to fetch the default model)")]
    NotFound {
        /// The path that was tried.
        path: PathBuf,
    },
    /// The file exists but could not be read.
    #[error("cannot read model file {path}")]
    Read {
        /// The model file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a readable GGUF file.
    #[error("{path} is not a GGUF file")]
    NotGguf {
        /// The model file.
        path: PathBuf,
        /// What the GGUF parser reported.
        #[source]
        source: Box<candle_core::Error>,
    },
    /// The model's architecture is not one this engine runs.
    #[error("unsupported model architecture {found:?} (supported: {SUPPORTED_ARCHITECTURES:?})")]
    UnsupportedArchitecture {
        /// `general.architecture` of the file.
        found: String,
    },
    /// A tensor is stored in a type the engine cannot use.
    #[error("tensor {tensor} has unsupported quantization type {dtype}")]
    UnsupportedQuantization {
        /// The tensor's name.
        tensor: String,
        /// The tensor's ggml type.
        dtype: String,
    },
    /// A required metadata key is absent or has the wrong type.
    #[error("GGUF metadata key {key} is missing or not a {expected}")]
    MissingMetadata {
        /// The key.
        key: String,
        /// The type that was expected.
        expected: &'static str,
    },
    /// The hyperparameters contradict each other.
    #[error("invalid model hyperparameters: {reason}")]
    InvalidConfig {
        /// What is inconsistent.
        reason: String,
    },
    /// A required tensor is absent.
    #[error("tensor {tensor} is missing from the model file")]
    MissingTensor {
        /// The tensor's name.
        tensor: String,
    },
    /// A tensor has a shape that does not match the hyperparameters.
    #[error("tensor {tensor} has shape {found:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor's name.
        tensor: String,
        /// Its shape in the file (candle order: rows first).
        found: Vec<usize>,
        /// The shape the hyperparameters imply.
        expected: Vec<usize>,
    },
    /// Reading or converting a tensor failed.
    #[error("cannot read tensor {tensor}")]
    Tensor {
        /// The tensor's name.
        tensor: String,
        /// candle's error.
        #[source]
        source: Box<candle_core::Error>,
    },
    /// The device's kernels could not be compiled or loaded.
    #[error("preparing the device's kernels failed")]
    Kernels(#[source] skillkv_kernels::ops::KernelOpError),
}

/// An open GGUF file: its parsed header and a reader for its tensor data.
#[derive(Debug)]
pub struct GgufFile {
    /// Where the file lives.
    pub path: PathBuf,
    /// Metadata and tensor directory.
    pub content: Content,
    /// Reader positioned anywhere; tensor reads seek.
    pub reader: BufReader<File>,
}

impl GgufFile {
    /// Opens and parses the header of a GGUF file.
    pub fn open(path: &Path) -> Result<Self, LoadModelError> {
        let file = File::open(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => LoadModelError::NotFound {
                path: path.to_path_buf(),
            },
            _ => LoadModelError::Read {
                path: path.to_path_buf(),
                source,
            },
        })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|source| LoadModelError::NotGguf {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    /// Checks that the architecture is supported and every tensor's type can be loaded.
    pub fn check_supported(&self) -> Result<(), LoadModelError> {
        let architecture = metadata_string(&self.content, "general.architecture")?;
        if !SUPPORTED_ARCHITECTURES.contains(&architecture) {
            return Err(LoadModelError::UnsupportedArchitecture {
                found: architecture.to_string(),
            });
        }
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let dtype = self.content.tensor_infos[name].ggml_dtype;
            if !is_supported_weight_type(dtype) {
                return Err(LoadModelError::UnsupportedQuantization {
                    tensor: name.clone(),
                    dtype: format!("{dtype:?}"),
                });
            }
        }
        Ok(())
    }

    /// Reads one tensor, with its shape checked against `expected` (rows first).
    pub fn tensor(
        &mut self,
        name: &str,
        expected: &[usize],
    ) -> Result<candle_core::quantized::QTensor, LoadModelError> {
        let info =
            self.content
                .tensor_infos
                .get(name)
                .ok_or_else(|| LoadModelError::MissingTensor {
                    tensor: name.to_string(),
                })?;
        if info.shape.dims() != expected {
            return Err(LoadModelError::TensorShape {
                tensor: name.to_string(),
                found: info.shape.dims().to_vec(),
                expected: expected.to_vec(),
            });
        }
        self.content
            .tensor(&mut self.reader, name, &candle_core::Device::Cpu)
            .map_err(|source| LoadModelError::Tensor {
                tensor: name.to_string(),
                source: Box::new(source),
            })
    }

    /// Whether the file holds a tensor of that name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }
}

impl ModelConfig {
    /// The head geometry of the KV pool (the kernels' [`KvShape`]).
    pub fn kv_shape(&self) -> skillkv_kernels::reference::kv::KvShape {
        skillkv_kernels::reference::kv::KvShape {
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// Reads the Llama hyperparameters from GGUF metadata (`{arch}.*` keys).
    pub fn from_gguf(content: &Content) -> Result<Self, LoadModelError> {
        let arch = metadata_string(content, "general.architecture")?;
        let key = |suffix: &str| format!("{arch}.{suffix}");
        let n_layers = metadata_usize(content, &key("block_count"))?;
        let hidden = metadata_usize(content, &key("embedding_length"))?;
        let ffn = metadata_usize(content, &key("feed_forward_length"))?;
        let n_heads = metadata_usize(content, &key("attention.head_count"))?;
        let n_kv_heads = match content.metadata.get(&key("attention.head_count_kv")) {
            Some(_) => metadata_usize(content, &key("attention.head_count_kv"))?,
            None => n_heads,
        };
        let rope_theta = match content.metadata.get(&key("rope.freq_base")) {
            Some(_) => metadata_f32(content, &key("rope.freq_base"))?,
            None => 10_000.0,
        };
        let rms_eps = metadata_f32(content, &key("attention.layer_norm_rms_epsilon"))?;
        let context_length = metadata_usize(content, &key("context_length"))?;
        let vocab = content
            .tensor_infos
            .get("token_embd.weight")
            .map(|info| info.shape.dims()[0])
            .ok_or_else(|| LoadModelError::MissingTensor {
                tensor: "token_embd.weight".to_string(),
            })?;
        if n_heads == 0
            || n_kv_heads == 0
            || !hidden.is_multiple_of(n_heads)
            || !n_heads.is_multiple_of(n_kv_heads)
        {
            return Err(LoadModelError::InvalidConfig {
                reason: format!(
                    "hidden {hidden} must split into {n_heads} heads, grouped over {n_kv_heads} KV heads"
                ),
            });
        }
        let head_dim = hidden / n_heads;
        if let Some(Value::U32(dims)) = content.metadata.get(&key("rope.dimension_count"))
            && *dims as usize != head_dim
        {
            return Err(LoadModelError::InvalidConfig {
                reason: format!("partial RoPE ({dims} of {head_dim} dims) is not supported"),
            });
        }
        if !head_dim.is_multiple_of(2) || n_layers == 0 || context_length == 0 {
            return Err(LoadModelError::InvalidConfig {
                reason: format!(
                    "head dim {head_dim} must be even, layers {n_layers} and context {context_length} non-zero"
                ),
            });
        }
        Ok(Self {
            n_layers,
            hidden,
            ffn,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab,
            rope_theta,
            rms_eps,
            context_length,
        })
    }
}

fn missing(key: &str, expected: &'static str) -> LoadModelError {
    LoadModelError::MissingMetadata {
        key: key.to_string(),
        expected,
    }
}

/// A string metadata value.
pub fn metadata_string<'a>(content: &'a Content, key: &str) -> Result<&'a str, LoadModelError> {
    content
        .metadata
        .get(key)
        .and_then(|value| value.to_string().ok())
        .map(String::as_str)
        .ok_or_else(|| missing(key, "string"))
}

/// An unsigned integer metadata value of any width.
pub fn metadata_usize(content: &Content, key: &str) -> Result<usize, LoadModelError> {
    let value = content
        .metadata
        .get(key)
        .ok_or_else(|| missing(key, "integer"))?;
    let number = match value {
        Value::U8(v) => Some(u64::from(*v)),
        Value::U16(v) => Some(u64::from(*v)),
        Value::U32(v) => Some(u64::from(*v)),
        Value::U64(v) => Some(*v),
        Value::I8(v) => u64::try_from(*v).ok(),
        Value::I16(v) => u64::try_from(*v).ok(),
        Value::I32(v) => u64::try_from(*v).ok(),
        Value::I64(v) => u64::try_from(*v).ok(),
        _ => None,
    };
    number
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| missing(key, "non-negative integer"))
}

/// A floating-point metadata value.
pub fn metadata_f32(content: &Content, key: &str) -> Result<f32, LoadModelError> {
    match content.metadata.get(key) {
        Some(Value::F32(v)) => Ok(*v),
        Some(Value::F64(v)) => Ok(*v as f32),
        _ => Err(missing(key, "float")),
    }
}

/// SHA-256 of the file's bytes, lower-case hex.
pub fn file_sha256(path: &Path) -> Result<String, LoadModelError> {
    let read_error = |source| LoadModelError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(read_error)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
}
