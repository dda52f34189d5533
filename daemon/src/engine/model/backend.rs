//! The boundary between the Llama forward pass and the hardware it runs on. A backend prepares
//! weight matrices once at load time and runs the two heavy operations of every layer: the
//! linear projections and the paged attention. The forward pass in
//! [`llama`](super::llama) is written against this trait only, so a GPU backend slots in beside
//! [`CpuBackend`](super::cpu::CpuBackend) without the scheduler noticing.

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use crate::engine::model::attention::{AttentionShape, ChunkRows, LayerKv, paged_attention};

/// Why preparing a weight for a backend failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot prepare weight {tensor} for the {backend} backend")]
pub struct PrepareWeightError {
    /// The (first) tensor being prepared.
    pub tensor: String,
    /// The backend's name.
    pub backend: &'static str,
    /// What failed.
    #[source]
    pub source: Box<candle_core::Error>,
}

impl PrepareWeightError {
    /// Wraps a failure to prepare tensor `tensor` on `backend` (for `map_err`).
    pub fn for_tensor<'a>(
        tensor: &'a str,
        backend: &'static str,
    ) -> impl Fn(candle_core::Error) -> Self + Copy + 'a {
        move |source| Self {
            tensor: tensor.to_string(),
            backend,
            source: Box::new(source),
        }
    }
}

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
#[error("{backend} backend failed in {operation}")]
pub struct BackendOpError {
    /// The backend's name.
    pub backend: &'static str,
    /// The operation that failed.
    pub operation: &'static str,
    /// What failed.
    #[source]
    pub source: Box<candle_core::Error>,
}

/// Compute operations of a Llama forward pass.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// A weight matrix in the backend's preferred layout.
    type Linear: Send + Sync + std::fmt::Debug;

    /// Short name for logs and errors.
    fn name(&self) -> &'static str;

    /// Prepares the `[out, in]` weight made of `parts` stacked along the output dimension
    /// (fused projections such as Q|K|V). `name` labels errors.
    fn prepare_linear(
        &self,
        name: &str,
        parts: Vec<QTensor>,
    ) -> Result<Self::Linear, PrepareWeightError>;

    /// `input [rows, in] · weightᵀ` → `[rows, out]`. Each output row depends only on its input
    /// row; on the CPU bit for bit whatever the other rows are, on CUDA within float rounding
    /// (cuBLAS picks its summation order by shape).
    fn linear(
        &self,
        weight: &Self::Linear,
        input: Vec<f32>,
        rows: usize,
    ) -> Result<Vec<f32>, BackendOpError>;

    /// Causal attention of the chunks' RoPE'd queries over the KV pool layer. Both backends
    /// keep the pool in host memory today, so the default is the host's paged attention.
    fn attention(
        &self,
        shape: AttentionShape,
        queries: &[f32],
        chunks: &[ChunkRows<'_>],
        kv: LayerKv<'_>,
    ) -> Vec<f32> {
        paged_attention(shape, queries, chunks, kv)
    }
}

/// [`dequantize_stacked`] as row-major values with `(outputs, inputs)`, for backends that
/// upload dense matrices.
pub fn dequantize_stacked_rows(parts: &[QTensor]) -> candle_core::Result<(Vec<f32>, usize, usize)> {
    let stacked = dequantize_stacked(parts)?;
    let (outputs, inputs) = stacked.dims2()?;
    Ok((stacked.flatten_all()?.to_vec1()?, outputs, inputs))
}

/// The `[Σ outputs, inputs]` f32 matrix of `parts` dequantized and stacked along the output
/// dimension (fused projections), for backends that keep dense weights.
pub fn dequantize_stacked(parts: &[QTensor]) -> candle_core::Result<Tensor> {
    let dense = parts
        .iter()
        .map(|part| part.dequantize(&Device::Cpu))
        .collect::<candle_core::Result<Vec<Tensor>>>()?;
    Tensor::cat(&dense, 0)
}
