//! The CPU backend on candle-core: weights requantized to Q8_0 at load time and multiplied with
//! candle's quantized matmul (activations quantized per row to Q8_0, SIMD integer dot products,
//! candle's thread pool), and the paged attention of [`attention`](super::attention).
//!
//! Why Q8_0 for every weight: one weight format for prefill and decode keeps a row's numerics
//! independent of the batch it runs in (reuse equals recompute, batching equals sequential), and
//! Q8_0 is both the fastest of candle's x86 kernels and accurate (8 bits per weight, so
//! requantizing Q4_1 weights is lossless up to rounding of the block scale).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::engine::model::attention::{AttentionShape, ChunkRows, LayerKv, paged_attention};
use crate::engine::model::backend::{Backend, BackendOpError, PrepareWeightError};

/// Elements per Q8_0 block: input widths must be a multiple of it to use Q8_0.
const Q8_0_BLOCK: usize = 32;

/// Runs the model on the CPU.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

/// A CPU weight: Q8_0 when the input width allows it, dense f32 otherwise.
#[derive(Debug)]
pub struct CpuLinear {
    matmul: QMatMul,
    out_features: usize,
}

impl CpuLinear {
    /// Output features (rows of the weight).
    pub fn out_features(&self) -> usize {
        self.out_features
    }
}

impl Backend for CpuBackend {
    type Linear = CpuLinear;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn prepare_linear(
        &self,
        name: &str,
        mut parts: Vec<QTensor>,
    ) -> Result<CpuLinear, PrepareWeightError> {
        let error = |source| PrepareWeightError {
            tensor: name.to_string(),
            backend: "cpu",
            source: Box::new(source),
        };
        let in_features = parts
            .first()
            .and_then(|part| part.shape().dims().get(1).copied())
            .unwrap_or(0);
        let out_features = parts
            .iter()
            .map(|part| part.shape().dims().first().copied().unwrap_or(0))
            .sum();
        let quantizable = in_features.is_multiple_of(Q8_0_BLOCK);
        let already_q8_0 = parts.len() == 1 && parts[0].dtype() == GgmlDType::Q8_0;
        let matmul = match parts.pop() {
            Some(single) if already_q8_0 => QMatMul::from_qtensor(single).map_err(error)?,
            last => {
                parts.extend(last);
                let dense = parts
                    .iter()
                    .map(|part| part.dequantize(&Device::Cpu))
                    .collect::<candle_core::Result<Vec<Tensor>>>()
                    .map_err(error)?;
                let stacked = Tensor::cat(&dense, 0).map_err(error)?;
                if quantizable {
                    let quantized = QTensor::quantize(&stacked, GgmlDType::Q8_0).map_err(error)?;
                    QMatMul::from_qtensor(quantized).map_err(error)?
                } else {
                    QMatMul::Tensor(stacked)
                }
            }
        };
        Ok(CpuLinear {
            matmul,
            out_features,
        })
    }

    fn linear(
        &self,
        weight: &CpuLinear,
        input: Vec<f32>,
        rows: usize,
    ) -> Result<Vec<f32>, BackendOpError> {
        let error = |source| BackendOpError {
            backend: "cpu",
            operation: "linear",
            source: Box::new(source),
        };
        let in_features = input.len() / rows.max(1);
        let input = Tensor::from_vec(input, (rows, in_features), &Device::Cpu).map_err(error)?;
        let output = weight.matmul.forward(&input).map_err(error)?;
        output
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(error)
    }

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
