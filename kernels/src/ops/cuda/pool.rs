//! [`PoolOps`] on one CUDA device: block and row copies and K re-rotation are the kernels of
//! `cuda/kv.cu` and `cuda/rope.cu`; ranged transfers are stream copies of a slice view.

use std::ops::Range;

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{CudaOps, device_error, int, launch, per_element};
use crate::ops::{DeviceRotation, Indices, KernelOpError, PoolOps};
use crate::reference::kv::KvShape;

impl PoolOps for CudaOps {
    fn exec_kv_copy_blocks(
        &self,
        (k_pool, v_pool): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        src_blocks: &Indices<CudaSlice<u32>>,
        dst_blocks: &Indices<CudaSlice<u32>>,
        block_floats: usize,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "kv copy blocks";
        self.on_device(OP, &[k_pool, v_pool])?;
        self.on_device(OP, &[src_blocks.buffer(), dst_blocks.buffer()])?;
        let pairs = int(OP, "blocks", src_blocks.len())?;
        let floats = int(OP, "block floats", block_floats)?;
        let f = self.function(OP, "kv_block_copy_f32")?;
        for pool in [k_pool, v_pool] {
            let mut args = self.device.stream().launch_builder(&f);
            args.arg(pool)
                .arg(src_blocks.buffer())
                .arg(dst_blocks.buffer())
                .arg(&pairs)
                .arg(&floats);
            launch(
                OP,
                &mut args,
                per_element(OP, src_blocks.len() * block_floats)?,
            )?;
        }
        Ok(())
    }

    fn exec_kv_copy_rows(
        &self,
        (k_pool, v_pool): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        src_slots: &Indices<CudaSlice<u32>>,
        dst_slots: &Indices<CudaSlice<u32>>,
        shape: KvShape,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "kv copy rows";
        self.on_device(OP, &[k_pool, v_pool])?;
        self.on_device(OP, &[src_slots.buffer(), dst_slots.buffer()])?;
        let ints = [
            int(OP, "rows", src_slots.len())?,
            int(OP, "KV heads", shape.n_kv_heads)?,
            int(OP, "head_dim", shape.head_dim)?,
        ];
        let f = self.function(OP, "kv_copy_rows_f32")?;
        let mut args = self.device.stream().launch_builder(&f);
        args.arg(k_pool)
            .arg(v_pool)
            .arg(src_slots.buffer())
            .arg(dst_slots.buffer());
        for value in &ints {
            args.arg(value);
        }
        launch(
            OP,
            &mut args,
            per_element(OP, src_slots.len() * shape.width())?,
        )
    }

    fn exec_rope_rerotate_k(
        &self,
        k_pool: &mut CudaSlice<f32>,
        block_table: &Indices<CudaSlice<u32>>,
        positions: Range<usize>,
        rotation: &DeviceRotation<CudaSlice<f32>>,
        shape: KvShape,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "rope rerotate k";
        self.on_device(OP, &[k_pool, rotation.cos(), rotation.sin()])?;
        self.on_device(OP, &[block_table.buffer()])?;
        let ints = [
            int(OP, "start position", positions.start)?,
            int(OP, "positions", positions.len())?,
            int(OP, "KV heads", shape.n_kv_heads)?,
            int(OP, "head_dim", shape.head_dim)?,
        ];
        let f = self.function(OP, "rope_rerotate_k_f32")?;
        let mut args = self.device.stream().launch_builder(&f);
        args.arg(k_pool)
            .arg(block_table.buffer())
            .arg(rotation.cos())
            .arg(rotation.sin());
        for value in &ints {
            args.arg(value);
        }
        let pairs = positions.len() * shape.n_kv_heads * rotation.pairs();
        launch(OP, &mut args, per_element(OP, pairs)?)
    }

    fn exec_download_range(
        &self,
        buffer: &CudaSlice<f32>,
        range: Range<usize>,
    ) -> Result<Vec<f32>, KernelOpError> {
        const OP: &str = "download range";
        self.on_device(OP, &[buffer])?;
        let view = buffer
            .try_slice(range.clone())
            .ok_or(KernelOpError::OutOfRange {
                op: OP,
                what: "end",
                value: range.end,
                limit: buffer.len(),
            })?;
        self.device
            .stream()
            .clone_dtoh(&view)
            .map_err(|source| device_error(OP, source))
    }

    fn exec_upload_range(
        &self,
        buffer: &mut CudaSlice<f32>,
        offset: usize,
        values: &[f32],
    ) -> Result<(), KernelOpError> {
        const OP: &str = "upload range";
        self.on_device(OP, &[buffer])?;
        let len = buffer.len();
        let end = offset + values.len();
        let mut view = buffer
            .try_slice_mut(offset..end)
            .ok_or(KernelOpError::OutOfRange {
                op: OP,
                what: "end",
                value: end,
                limit: len,
            })?;
        self.device
            .stream()
            .memcpy_htod(values, &mut view)
            .map_err(|source| device_error(OP, source))
    }
}
