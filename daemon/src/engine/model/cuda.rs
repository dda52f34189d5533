//! The first CUDA backend (feature `cuda`), kept as the baseline the resident forward pass
//! (`resident.rs`, what `--device cuda` runs) is tested against on a GPU: every projection's
//! weight is dequantized once at load time and kept on the GPU as a dense f32 matrix; each
//! linear uploads its activation rows, runs cuBLAS SGEMM and downloads the result
//! (`skillkv_kernels::gemm`). Attention, norms, RoPE and the paged KV pool stay on the host,
//! through the same code as the CPU backend.
//!
//! Numerics: cuBLAS sums in its own order (which may depend on the number of rows), so logits
//! match the CPU backend within float rounding and greedy tokens agree, but a row's result is
//! not bit-identical across batch shapes as it is on the CPU.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use skillkv_kernels::gemm::{DeviceMatrix, GpuDevice};

use crate::engine::model::backend::{
    Backend, BackendOpError, PrepareWeightError, dequantize_stacked_rows,
};

/// Runs the projections on one CUDA device.
#[derive(Debug, Clone)]
pub struct CudaBackend {
    device: Arc<GpuDevice>,
}

impl CudaBackend {
    /// A backend on the open `device`.
    pub fn new(device: Arc<GpuDevice>) -> Self {
        Self { device }
    }
}

impl Backend for CudaBackend {
    type Linear = DeviceMatrix;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn prepare_linear(
        &self,
        name: &str,
        parts: Vec<QTensor>,
    ) -> Result<DeviceMatrix, PrepareWeightError> {
        let error = PrepareWeightError::for_tensor(name, "cuda");
        let (weights, outputs, inputs) = dequantize_stacked_rows(&parts).map_err(error)?;
        self.device
            .upload_matrix(&weights, outputs, inputs)
            .map_err(|source| error(candle_core::Error::wrap(source)))
    }

    fn linear(
        &self,
        weight: &DeviceMatrix,
        input: Vec<f32>,
        rows: usize,
    ) -> Result<Vec<f32>, BackendOpError> {
        self.device
            .matmul(weight, &input, rows)
            .map_err(|source| BackendOpError {
                backend: "cuda",
                operation: "linear",
                source: Box::new(candle_core::Error::wrap(source)),
            })
    }
}
