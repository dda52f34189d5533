//! The CPU backend: weights kept in their GGUF block format when it is Q8_0 or Q4_1 (other
//! formats requantized to Q8_0 at load time) and multiplied by the kernel of
//! [`matmul`](super::matmul) (activations rounded to 8-bit codes per block of 32, integer dot
//! products, one kernel for every batch shape), and the paged attention of
//! [`attention`](super::attention).
//!
//! A row's numerics are independent of the batch it runs in (reuse equals recompute, batching
//! equals sequential). Keeping Q4_1 as loaded is exact (the file's values) and reads 20 bytes
//! per 32 weights, as llama.cpp does.

use candle_core::quantized::{GgmlDType, QTensor};

use crate::engine::model::backend::{
    Backend, BackendOpError, PrepareWeightError, dequantize_stacked,
};
use crate::engine::model::matmul::{Q8_BLOCK, QuantMatrix};

/// Runs the model on the CPU.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

/// A CPU weight: Q8_0 or Q4_1 when the input width allows it, dense f32 otherwise.
#[derive(Debug)]
pub enum CpuLinear {
    /// Quantized codes and scales, see [`QuantMatrix`].
    Quant(QuantMatrix),
    /// Dense `[outputs][inputs]` weights for input widths that are not a multiple of 32.
    Dense {
        /// The weights.
        weights: Vec<f32>,
        /// Output features.
        outputs: usize,
        /// Input features.
        inputs: usize,
    },
}

impl CpuLinear {
    /// Output features (rows of the weight).
    pub fn out_features(&self) -> usize {
        match self {
            Self::Quant(matrix) => matrix.outputs(),
            Self::Dense { outputs, .. } => *outputs,
        }
    }
}

/// `input [rows][inputs] · weightsᵀ`, one sequential dot product per output element.
fn dense_matmul(weights: &[f32], inputs: usize, input: &[f32]) -> Vec<f32> {
    let mut output =
        Vec::with_capacity(input.len() / inputs.max(1) * (weights.len() / inputs.max(1)));
    for row in input.chunks_exact(inputs) {
        for weight in weights.chunks_exact(inputs) {
            output.push(
                row.iter()
                    .zip(weight)
                    .fold(0.0f32, |acc, (x, w)| x.mul_add(*w, acc)),
            );
        }
    }
    output
}

impl Backend for CpuBackend {
    type Linear = CpuLinear;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn prepare_linear(
        &self,
        name: &str,
        parts: Vec<QTensor>,
    ) -> Result<CpuLinear, PrepareWeightError> {
        let error = PrepareWeightError::for_tensor(name, "cpu");
        let inputs = parts
            .first()
            .and_then(|part| part.shape().dims().get(1).copied())
            .unwrap_or(0);
        let outputs = parts
            .iter()
            .map(|part| part.shape().dims().first().copied().unwrap_or(0))
            .sum();
        // Parts of one kept format are stacked by concatenating their row-major blocks.
        let kept = parts
            .first()
            .map(QTensor::dtype)
            .filter(|dtype| matches!(dtype, GgmlDType::Q8_0 | GgmlDType::Q4_1))
            .filter(|&dtype| parts.iter().all(|part| part.dtype() == dtype));
        let (dtype, bytes) = if let Some(dtype) = kept {
            let mut bytes = Vec::new();
            for part in &parts {
                bytes.extend_from_slice(&part.data().map_err(error)?);
            }
            (dtype, bytes)
        } else {
            let stacked = dequantize_stacked(&parts).map_err(error)?;
            if !inputs.is_multiple_of(Q8_BLOCK) {
                let weights = stacked
                    .flatten_all()
                    .and_then(|t| t.to_vec1())
                    .map_err(error)?;
                return Ok(CpuLinear::Dense {
                    weights,
                    outputs,
                    inputs,
                });
            }
            let quantized = QTensor::quantize(&stacked, GgmlDType::Q8_0).map_err(error)?;
            let bytes = quantized.data().map_err(error)?.into_owned();
            (GgmlDType::Q8_0, bytes)
        };
        let matrix = if dtype == GgmlDType::Q4_1 {
            QuantMatrix::from_q4_1_bytes(&bytes, outputs, inputs)
        } else {
            QuantMatrix::from_q8_0_bytes(&bytes, outputs, inputs)
        };
        matrix
            .map(CpuLinear::Quant)
            .map_err(|source| error(candle_core::Error::wrap(source)))
    }

    fn linear(
        &self,
        weight: &CpuLinear,
        input: Vec<f32>,
        rows: usize,
    ) -> Result<Vec<f32>, BackendOpError> {
        let expected = match weight {
            CpuLinear::Quant(matrix) => matrix.inputs(),
            CpuLinear::Dense { inputs, .. } => *inputs,
        };
        if input.len() != rows * expected {
            return Err(BackendOpError {
                backend: "cpu",
                operation: "linear",
                source: Box::new(candle_core::Error::Msg(format!(
                    "input of {} values is not {rows} rows of {expected}",
                    input.len()
                ))),
            });
        }
        Ok(match weight {
            CpuLinear::Quant(matrix) => matrix.matmul(&input, rows),
            CpuLinear::Dense {
                weights, inputs, ..
            } => dense_matmul(weights, *inputs, &input),
        })
    }
}
