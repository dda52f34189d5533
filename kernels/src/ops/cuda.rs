//! [`KernelOps`] (and, in `pool`, [`PoolOps`](crate::ops::PoolOps)) on one CUDA device: buffers are `CudaSlice`s on the device's stream, the
//! operations are the kernels of `cuda/` (compiled by NVRTC for the device, through a
//! [`KernelLoader`]) and cuBLAS SGEMM ([`GpuDevice::matmul_resident`]). Operations are only
//! queued: nothing synchronises until a download.
//!
//! Arguments reach here checked by the trait's provided methods (lengths, index bounds,
//! supported shapes); this module adds the two checks only the device can make — every
//! buffer belongs to this device's context, every size fits the kernels' `int` — and holds
//! the crate's kernel-launch `unsafe`, one audited function.

mod pool;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::{
    CudaFunction, CudaSlice, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};

use crate::gemm::{DeviceMatrix, GpuDevice, GpuOpError};
use crate::loader::KernelLoader;
use crate::ops::{
    Buffer, ColumnRange, DeviceChunks, DeviceRope, HeadRange, Indices, KernelOpError, KernelOps,
};
use crate::reference::attention::AttentionShape;
use crate::reference::kv::{KvShape, RowLayout};
use crate::registry;

impl<T> Buffer for CudaSlice<T> {
    fn len(&self) -> usize {
        CudaSlice::len(self)
    }
}

/// The kernels and cuBLAS on one open device.
#[derive(Debug)]
pub struct CudaOps {
    device: Arc<GpuDevice>,
    loader: KernelLoader,
    /// Functions already looked up, by entry point (a decode step launches ~15 per layer).
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
}

impl CudaOps {
    /// Operations on `device`, with every kernel of the registry compiled for its compute
    /// capability and loaded now: a kernel that does not compile stops the start, not a
    /// request, and the modules' memory is taken before the KV pool is sized from what is free.
    pub fn new(device: Arc<GpuDevice>) -> Result<Self, KernelOpError> {
        let loader = KernelLoader::new(device.context().clone()).map_err(|source| {
            KernelOpError::Device {
                op: "load kernels",
                backend: "cuda",
                source: Box::new(source),
            }
        })?;
        let ops = Self {
            device,
            loader,
            functions: Mutex::new(HashMap::new()),
        };
        for kernel in registry::KERNELS {
            for entry_point in kernel.entry_points {
                ops.function("load kernels", entry_point)?;
            }
        }
        Ok(ops)
    }

    /// The device.
    pub fn device(&self) -> &Arc<GpuDevice> {
        &self.device
    }

    /// The kernel `entry_point`, compiled and loaded on first use, then kept.
    fn function(
        &self,
        op: &'static str,
        entry_point: &'static str,
    ) -> Result<CudaFunction, KernelOpError> {
        let mut functions = self
            .functions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(function) = functions.get(entry_point) {
            return Ok(function.clone());
        }
        let function = self
            .loader
            .function(entry_point)
            .map_err(|source| device_error(op, source))?;
        functions.insert(entry_point, function.clone());
        Ok(function)
    }

    /// Checks that every buffer is this device's.
    fn on_device<T>(
        &self,
        op: &'static str,
        buffers: &[&CudaSlice<T>],
    ) -> Result<(), KernelOpError> {
        buffers.iter().try_for_each(|buffer| {
            self.device
                .check_context(buffer.context())
                .map_err(|source| device_error(op, source))
        })
    }

    fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, KernelOpError> {
        self.device
            .stream()
            .clone_htod(host)
            .map_err(|source| device_error("upload", source))
    }
}

fn device_error(
    op: &'static str,
    source: impl std::error::Error + Send + Sync + 'static,
) -> KernelOpError {
    KernelOpError::Device {
        op,
        backend: "cuda",
        source: Box::new(source),
    }
}

/// A size as the kernels' `int`.
fn int(op: &'static str, what: &'static str, value: usize) -> Result<i32, KernelOpError> {
    i32::try_from(value).map_err(|_| KernelOpError::OutOfRange {
        op,
        what,
        value,
        limit: i32::MAX as usize,
    })
}

/// One thread per element.
fn per_element(op: &'static str, n: usize) -> Result<LaunchConfig, KernelOpError> {
    let n = u32::try_from(n).map_err(|_| KernelOpError::OutOfRange {
        op,
        what: "elements",
        value: n,
        limit: u32::MAX as usize,
    })?;
    Ok(LaunchConfig::for_num_elems(n))
}

/// `blocks` thread blocks of `threads` threads.
fn grid(blocks: (usize, usize, usize), threads: u32) -> Result<LaunchConfig, KernelOpError> {
    let dim = |value: usize| {
        u32::try_from(value).map_err(|_| KernelOpError::OutOfRange {
            op: "launch",
            what: "grid dimension",
            value,
            limit: u32::MAX as usize,
        })
    };
    Ok(LaunchConfig {
        grid_dim: (dim(blocks.0)?, dim(blocks.1)?, dim(blocks.2)?),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Launches a kernel whose arguments `args` holds.
#[allow(unsafe_code)]
fn launch(
    op: &'static str,
    args: &mut LaunchArgs<'_>,
    config: LaunchConfig,
) -> Result<(), KernelOpError> {
    // SAFETY: FFI kernel launch. Every caller in this module pushes exactly the arguments of
    // the kernel's C signature (see the .cu sources, in order), with buffers of this device
    // (`on_device`) whose lengths the provided `KernelOps` method checked against the shape
    // passed alongside, index buffers whose values were checked on the host against the
    // buffers they index (`Indices`, `DeviceChunks`), and sizes that fit an `int` (`int`).
    unsafe { args.launch(config) }
        .map(|_| ())
        .map_err(|source| device_error(op, source))
}

impl KernelOps for CudaOps {
    type F32 = CudaSlice<f32>;
    type U32 = CudaSlice<u32>;
    type Matrix = DeviceMatrix;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn upload_f32(&self, host: &[f32]) -> Result<CudaSlice<f32>, KernelOpError> {
        self.upload(host)
    }

    fn upload_u32(&self, host: &[u32]) -> Result<CudaSlice<u32>, KernelOpError> {
        self.upload(host)
    }

    fn zeros_f32(&self, len: usize) -> Result<CudaSlice<f32>, KernelOpError> {
        self.device
            .stream()
            .alloc_zeros::<f32>(len)
            .map_err(|source| device_error("allocate", source))
    }

    fn download_f32(&self, buffer: &CudaSlice<f32>) -> Result<Vec<f32>, KernelOpError> {
        self.on_device("download", &[buffer])?;
        self.device
            .stream()
            .clone_dtoh(buffer)
            .map_err(|source| device_error("download", source))
    }

    fn upload_matrix(
        &self,
        weights: &[f32],
        outputs: usize,
        inputs: usize,
    ) -> Result<DeviceMatrix, KernelOpError> {
        self.device
            .upload_matrix(weights, outputs, inputs)
            .map_err(|source| device_error("upload matrix", source))
    }

    fn matrix_shape(&self, matrix: &DeviceMatrix) -> (usize, usize) {
        (matrix.outputs(), matrix.inputs())
    }

    fn exec_matmul(
        &self,
        weight: &DeviceMatrix,
        input: &CudaSlice<f32>,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), KernelOpError> {
        self.device
            .matmul_resident(weight, input, rows, out)
            .map_err(|source: GpuOpError| device_error("matmul", source))
    }

    fn exec_embedding_gather(
        &self,
        table: &CudaSlice<f32>,
        tokens: &Indices<CudaSlice<u32>>,
        hidden: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "embedding gather";
        self.on_device(OP, &[table, out])?;
        self.on_device(OP, &[tokens.buffer()])?;
        let (rows, width) = (int(OP, "rows", tokens.len())?, int(OP, "hidden", hidden)?);
        let f = self.function(OP, "embedding_gather_f32")?;
        let mut args = self.device.stream().launch_builder(&f);
        args.arg(table).arg(tokens.buffer()).arg(out);
        args.arg(&rows).arg(&width);
        launch(OP, &mut args, grid((tokens.len(), 1, 1), 128)?)
    }

    fn exec_rms_norm(
        &self,
        input: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        rows: usize,
        eps: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "rms norm";
        self.on_device(OP, &[input, weight, out])?;
        let (rows_i, width) = (int(OP, "rows", rows)?, int(OP, "width", weight.len())?);
        let f = self.function(OP, "rms_norm_f32")?;
        let mut args = self.device.stream().launch_builder(&f);
        args.arg(input).arg(weight).arg(out);
        args.arg(&rows_i).arg(&width).arg(&eps);
        launch(OP, &mut args, grid((rows, 1, 1), 256)?)
    }

    fn exec_silu_mul(
        &self,
        gate_up: &CudaSlice<f32>,
        rows: usize,
        width: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "silu mul";
        self.on_device(OP, &[gate_up, out])?;
        let (rows_i, width_i) = (int(OP, "rows", rows)?, int(OP, "width", width)?);
        let f = self.function(OP, "silu_mul_f32")?;
        let mut args = self.device.stream().launch_builder(&f);
        args.arg(gate_up).arg(out).arg(&rows_i).arg(&width_i);
        launch(OP, &mut args, per_element(OP, rows * width)?)
    }

    fn exec_add_in_place(
        &self,
        residual: &mut CudaSlice<f32>,
        delta: &CudaSlice<f32>,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "add in place";
        self.on_device(OP, &[residual, delta])?;
        let n = residual.len();
        let n_i = int(OP, "values", n)?;
        let f = self.function(OP, "add_in_place_f32")?;
        let mut args = self.device.stream().launch_builder(&f);
        args.arg(residual).arg(delta).arg(&n_i);
        launch(OP, &mut args, per_element(OP, n)?)
    }

    fn exec_gather_columns(
        &self,
        src: &CudaSlice<f32>,
        columns: ColumnRange,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "gather columns";
        self.on_device(OP, &[src, out])?;
        let ints = [
            int(OP, "rows", columns.rows)?,
            int(OP, "stride", columns.stride)?,
            int(OP, "column offset", columns.col_offset)?,
            int(OP, "width", columns.width)?,
        ];
        let f = self.function(OP, "gather_columns_f32")?;
        let mut args = self.device.stream().launch_builder(&f);
        args.arg(src).arg(out);
        for value in &ints {
            args.arg(value);
        }
        launch(
            OP,
            &mut args,
            per_element(OP, columns.rows * columns.width)?,
        )
    }

    fn exec_rope_apply(
        &self,
        x: &mut CudaSlice<f32>,
        positions: &Indices<CudaSlice<u32>>,
        rope: &DeviceRope<CudaSlice<f32>>,
        heads: HeadRange,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "rope apply";
        self.on_device(OP, &[x, rope.cos(), rope.sin()])?;
        self.on_device(OP, &[positions.buffer()])?;
        let ints = [
            int(OP, "rows", positions.len())?,
            int(OP, "row stride", heads.row_stride)?,
            int(OP, "column offset", heads.col_offset)?,
            int(OP, "heads", heads.n_heads)?,
            int(OP, "head_dim", 2 * rope.pairs())?,
        ];
        let f = self.function(OP, "rope_apply_f32")?;
        let mut args = self.device.stream().launch_builder(&f);
        args.arg(x)
            .arg(positions.buffer())
            .arg(rope.cos())
            .arg(rope.sin());
        for value in &ints {
            args.arg(value);
        }
        let pairs = positions.len() * heads.n_heads * rope.pairs();
        launch(OP, &mut args, per_element(OP, pairs)?)
    }

    fn exec_kv_write(
        &self,
        (k_pool, v_pool): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        src: &CudaSlice<f32>,
        slots: &Indices<CudaSlice<u32>>,
        layout: RowLayout,
        shape: KvShape,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "kv write";
        self.on_device(OP, &[k_pool, v_pool, src])?;
        self.on_device(OP, &[slots.buffer()])?;
        let ints = [
            int(OP, "rows", slots.len())?,
            int(OP, "stride", layout.stride)?,
            int(OP, "K offset", layout.k_offset)?,
            int(OP, "V offset", layout.v_offset)?,
            int(OP, "KV heads", shape.n_kv_heads)?,
            int(OP, "head_dim", shape.head_dim)?,
        ];
        let f = self.function(OP, "kv_write_f32")?;
        let mut args = self.device.stream().launch_builder(&f);
        args.arg(k_pool).arg(v_pool).arg(src).arg(slots.buffer());
        for value in &ints {
            args.arg(value);
        }
        launch(OP, &mut args, per_element(OP, slots.len() * shape.width())?)
    }

    fn exec_paged_attention(
        &self,
        queries: &CudaSlice<f32>,
        (k_pool, v_pool): (&CudaSlice<f32>, &CudaSlice<f32>),
        chunks: &DeviceChunks<CudaSlice<u32>>,
        shape: AttentionShape,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "paged attention";
        self.on_device(OP, &[queries, k_pool, v_pool, out])?;
        self.on_device(
            OP,
            &[
                chunks.tables(),
                chunks.first_row(),
                chunks.len(),
                chunks.start_pos(),
            ],
        )?;
        let threads =
            registry::attention_threads(shape.head_dim).ok_or(KernelOpError::OutOfRange {
                op: OP,
                what: "head_dim",
                value: shape.head_dim,
                limit: registry::MAX_HEAD_DIM,
            })?;
        let ints = [
            int(OP, "chunks", chunks.n_chunks())?,
            int(OP, "table width", chunks.max_blocks())?,
            int(OP, "heads", shape.n_heads)?,
            int(OP, "KV heads", shape.n_kv_heads)?,
            int(OP, "head_dim", shape.head_dim)?,
        ];
        let scale = shape.scale();
        let f = self.function(OP, "paged_attention_prefill_f32")?;
        let mut args = self.device.stream().launch_builder(&f);
        args.arg(queries)
            .arg(k_pool)
            .arg(v_pool)
            .arg(chunks.tables())
            .arg(chunks.first_row())
            .arg(chunks.len())
            .arg(chunks.start_pos())
            .arg(out);
        for value in &ints {
            args.arg(value);
        }
        args.arg(&scale);
        let blocks = (chunks.max_len(), shape.n_heads, chunks.n_chunks());
        launch(OP, &mut args, grid(blocks, threads)?)
    }
}
