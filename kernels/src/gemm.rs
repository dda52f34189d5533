//! One CUDA device for the engine's projections: opening it (after the [`probe`](crate::probe)
//! checks, so a missing library is an error, never a panic), uploading dense f32 weight matrices
//! once, and multiplying host activation rows by them with cuBLAS SGEMM. A safe API over the
//! few `unsafe` cuBLAS calls, so the daemon (which forbids `unsafe`) can use it.
//!
//! Numerics: SGEMM in f32 with cuBLAS's default math mode (no TF32 unless the process sets
//! `NVIDIA_TF32_OVERRIDE`); the summation order is cuBLAS's and may depend on the number of
//! rows, so results match the CPU kernels within float rounding, not bit for bit.

use std::sync::Arc;

use cudarc::cublas::result::CublasError;
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DriverError};

use crate::probe::{self, ProbeError};

/// Why a CUDA device could not be opened for the engine.
#[derive(Debug, thiserror::Error)]
pub enum OpenGpuError {
    /// A library or the device is missing (see [`ProbeError`]).
    #[error(transparent)]
    Unavailable(#[from] ProbeError),
    /// The driver could not create a context on the device.
    #[error("the CUDA driver could not open device {ordinal}")]
    Context {
        /// The device asked for.
        ordinal: usize,
        /// The driver's error.
        #[source]
        source: DriverError,
    },
    /// The driver could not report the device's name or memory.
    #[error("the CUDA driver could not {action} of device {ordinal}")]
    Query {
        /// What was asked.
        action: &'static str,
        /// The device.
        ordinal: usize,
        /// The driver's error.
        #[source]
        source: DriverError,
    },
    /// cuBLAS could not create a handle on the device's stream.
    #[error("cuBLAS could not create a handle on device {ordinal}")]
    Cublas {
        /// The device.
        ordinal: usize,
        /// cuBLAS's error.
        #[source]
        source: CublasError,
    },
}

/// Why an operation on an open device failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuOpError {
    /// The driver refused a copy or an allocation.
    #[error("the CUDA driver failed to {action}")]
    Driver {
        /// What was being done.
        action: &'static str,
        /// The driver's error.
        #[source]
        source: DriverError,
    },
    /// cuBLAS SGEMM failed.
    #[error("cuBLAS SGEMM failed")]
    Gemm(#[source] CublasError),
    /// The values given do not make the shape given.
    #[error("{values} values are not {rows} rows of {width}")]
    Shape {
        /// Values given.
        values: usize,
        /// Rows claimed.
        rows: usize,
        /// Values per row.
        width: usize,
    },
    /// A dimension does not fit cuBLAS's 32-bit integers.
    #[error("dimension {value} exceeds cuBLAS's 32-bit limit")]
    TooLarge {
        /// The dimension.
        value: usize,
    },
    /// A buffer belongs to another device's context.
    #[error("a buffer of device {buffer_device} was given to device {device}")]
    ForeignBuffer {
        /// The device the buffer belongs to.
        buffer_device: usize,
        /// The device asked to use it.
        device: usize,
    },
}

/// Free and total memory of a device, bytes (the driver's `cuMemGetInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes free now.
    pub free: usize,
    /// Bytes on the device.
    pub total: usize,
}

/// An open CUDA device with a stream and a cuBLAS handle on it.
pub struct GpuDevice {
    ordinal: usize,
    name: String,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
}

impl std::fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDevice")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A dense `[outputs][inputs]` f32 weight matrix resident on a device.
pub struct DeviceMatrix {
    weights: CudaSlice<f32>,
    outputs: usize,
    inputs: usize,
}

impl std::fmt::Debug for DeviceMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMatrix")
            .field("outputs", &self.outputs)
            .field("inputs", &self.inputs)
            .finish_non_exhaustive()
    }
}

impl DeviceMatrix {
    /// Output features (rows of the weight).
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Input features (columns of the weight).
    pub fn inputs(&self) -> usize {
        self.inputs
    }
}

fn cublas_int(value: usize) -> Result<i32, GpuOpError> {
    i32::try_from(value).map_err(|_| GpuOpError::TooLarge { value })
}

fn check_shape(values: usize, rows: usize, width: usize) -> Result<(), GpuOpError> {
    if rows.checked_mul(width) == Some(values) {
        Ok(())
    } else {
        Err(GpuOpError::Shape {
            values,
            rows,
            width,
        })
    }
}

impl GpuDevice {
    /// Opens device `ordinal`: checks that the driver and cuBLAS load and the device exists
    /// (typed errors otherwise), creates a context, reads the device's name and makes a cuBLAS
    /// handle on its default stream.
    pub fn open(ordinal: usize) -> Result<Self, OpenGpuError> {
        probe::device(ordinal)?;
        probe::cublas()?;
        let ctx = CudaContext::new(ordinal)
            .map_err(|source| OpenGpuError::Context { ordinal, source })?;
        let name = ctx.name().map_err(|source| OpenGpuError::Query {
            action: "read the name",
            ordinal,
            source,
        })?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone())
            .map_err(|source| OpenGpuError::Cublas { ordinal, source })?;
        Ok(Self {
            ordinal,
            name,
            ctx,
            stream,
            blas,
        })
    }

    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Free and total device memory now.
    pub fn memory(&self) -> Result<DeviceMemory, GpuOpError> {
        self.ctx
            .mem_get_info()
            .map(|(free, total)| DeviceMemory { free, total })
            .map_err(|source| GpuOpError::Driver {
                action: "read the free memory",
                source,
            })
    }

    /// Uploads a dense row-major `[outputs][inputs]` matrix.
    pub fn upload_matrix(
        &self,
        weights: &[f32],
        outputs: usize,
        inputs: usize,
    ) -> Result<DeviceMatrix, GpuOpError> {
        check_shape(weights.len(), outputs, inputs)?;
        cublas_int(outputs)?;
        cublas_int(inputs)?;
        let weights = self
            .stream
            .clone_htod(weights)
            .map_err(|source| GpuOpError::Driver {
                action: "upload a weight matrix",
                source,
            })?;
        Ok(DeviceMatrix {
            weights,
            outputs,
            inputs,
        })
    }

    /// `input [rows][inputs] · matrixᵀ` → `[rows][outputs]`, on the device.
    pub fn matmul(
        &self,
        matrix: &DeviceMatrix,
        input: &[f32],
        rows: usize,
    ) -> Result<Vec<f32>, GpuOpError> {
        check_shape(input.len(), rows, matrix.inputs)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let driver = |action| move |source| GpuOpError::Driver { action, source };
        let x = self
            .stream
            .clone_htod(input)
            .map_err(driver("upload the input rows"))?;
        let mut y = self
            .stream
            .alloc_zeros::<f32>(rows * matrix.outputs)
            .map_err(driver("allocate the output rows"))?;
        self.matmul_resident(matrix, &x, rows, &mut y)?;
        let output = self
            .stream
            .clone_dtoh(&y)
            .map_err(driver("download the output rows"))?;
        self.stream
            .synchronize()
            .map_err(driver("synchronise the stream"))?;
        Ok(output)
    }

    /// `y [rows][outputs] = x [rows][inputs] · matrixᵀ` with both rows already on the device
    /// (queued on the device's stream; nothing is copied or synchronised).
    pub fn matmul_resident(
        &self,
        matrix: &DeviceMatrix,
        x: &CudaSlice<f32>,
        rows: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), GpuOpError> {
        check_shape(x.len(), rows, matrix.inputs)?;
        check_shape(y.len(), rows, matrix.outputs)?;
        for buffer in [matrix.weights.context(), x.context(), y.context()] {
            self.check_context(buffer)?;
        }
        if rows == 0 {
            return Ok(());
        }
        // cuBLAS is column-major: the row-major output [rows][outputs] is the column-major
        // [outputs][rows] matrix W·Xᵀ, where the row-major weight [outputs][inputs] is read
        // transposed (column-major [inputs][outputs]) and the row-major input [rows][inputs]
        // as it is (column-major [inputs][rows]).
        let config = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: cublas_int(matrix.outputs)?,
            n: cublas_int(rows)?,
            k: cublas_int(matrix.inputs)?,
            alpha: 1.0f32,
            lda: cublas_int(matrix.inputs)?,
            ldb: cublas_int(matrix.inputs)?,
            beta: 0.0f32,
            ldc: cublas_int(matrix.outputs)?,
        };
        #[allow(unsafe_code)]
        // SAFETY: FFI into cuBLAS SGEMM. The buffers live on this device and stream and are
        // exactly the sizes the configuration reads and writes: A is outputs×inputs, B is
        // rows×inputs and C is rows×outputs (both checked above); every dimension
        // fits an i32 (checked by `cublas_int`).
        unsafe { self.blas.gemm(config, &matrix.weights, x, y) }.map_err(GpuOpError::Gemm)
    }

    /// An error unless `context` is this device's.
    pub fn check_context(&self, context: &Arc<CudaContext>) -> Result<(), GpuOpError> {
        if Arc::ptr_eq(context, &self.ctx) {
            Ok(())
        } else {
            Err(GpuOpError::ForeignBuffer {
                buffer_device: context.ordinal(),
                device: self.ordinal,
            })
        }
    }

    /// The stream every operation of this device is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device's context (for loading kernels into it).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked_before_any_device_work() {
        assert!(check_shape(6, 2, 3).is_ok());
        assert!(matches!(
            check_shape(5, 2, 3),
            Err(GpuOpError::Shape {
                values: 5,
                rows: 2,
                width: 3
            })
        ));
        assert!(matches!(
            check_shape(0, usize::MAX, 2),
            Err(GpuOpError::Shape { .. })
        ));
        assert!(matches!(
            cublas_int(1 << 40),
            Err(GpuOpError::TooLarge { value }) if value == 1 << 40
        ));
    }

    #[test]
    fn opening_a_device_is_an_error_not_a_panic_without_one() {
        match GpuDevice::open(0) {
            Ok(device) => println!("device 0: {}", device.name()),
            Err(error) => {
                println!("skipped: no GPU ({error})");
                assert!(!error.to_string().is_empty());
            }
        }
    }
}
