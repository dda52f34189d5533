//! [`KernelOps`] on the host through the references of [`crate::reference`]: buffers are
//! `Vec`s, each operation is the reference that defines its kernel. It runs the device
//! forward pass's orchestration where no GPU is (tests), and is the standard the CUDA
//! implementation is compared with.

use std::ops::Range;

use crate::ops::{
    ColumnRange, DeviceChunks, DeviceRope, DeviceRotation, HeadRange, Indices, KernelOpError,
    KernelOps, PoolOps,
};
use crate::reference::attention::{AttentionShape, ChunkRows, paged_attention};
use crate::reference::kv::{self, KvShape, RowLayout, write_kv};
use crate::reference::rope::PairRotation;
use crate::reference::{elementwise, rope};

/// The references as a [`KernelOps`] implementation.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostOps;

/// A dense row-major `[outputs][inputs]` matrix in host memory.
#[derive(Debug, Clone)]
pub struct HostMatrix {
    weights: Vec<f32>,
    outputs: usize,
    inputs: usize,
}

impl KernelOps for HostOps {
    type F32 = Vec<f32>;
    type U32 = Vec<u32>;
    type Matrix = HostMatrix;

    fn name(&self) -> &'static str {
        "host"
    }

    fn upload_f32(&self, host: &[f32]) -> Result<Vec<f32>, KernelOpError> {
        Ok(host.to_vec())
    }

    fn upload_u32(&self, host: &[u32]) -> Result<Vec<u32>, KernelOpError> {
        Ok(host.to_vec())
    }

    fn zeros_f32(&self, len: usize) -> Result<Vec<f32>, KernelOpError> {
        Ok(vec![0.0; len])
    }

    fn download_f32(&self, buffer: &Vec<f32>) -> Result<Vec<f32>, KernelOpError> {
        Ok(buffer.clone())
    }

    fn upload_matrix(
        &self,
        weights: &[f32],
        outputs: usize,
        inputs: usize,
    ) -> Result<HostMatrix, KernelOpError> {
        let expected = outputs.saturating_mul(inputs);
        if weights.len() != expected {
            return Err(KernelOpError::Length {
                op: "upload matrix",
                what: "weights",
                expected,
                actual: weights.len(),
            });
        }
        Ok(HostMatrix {
            weights: weights.to_vec(),
            outputs,
            inputs,
        })
    }

    fn matrix_shape(&self, matrix: &HostMatrix) -> (usize, usize) {
        (matrix.outputs, matrix.inputs)
    }

    fn exec_matmul(
        &self,
        weight: &HostMatrix,
        input: &Vec<f32>,
        _rows: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), KernelOpError> {
        for (x, y) in input
            .chunks_exact(weight.inputs)
            .zip(out.chunks_exact_mut(weight.outputs))
        {
            for (w, y) in weight.weights.chunks_exact(weight.inputs).zip(y) {
                *y = w.iter().zip(x).map(|(w, x)| w * x).sum();
            }
        }
        Ok(())
    }

    fn exec_embedding_gather(
        &self,
        table: &Vec<f32>,
        tokens: &Indices<Vec<u32>>,
        hidden: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), KernelOpError> {
        *out = elementwise::embedding_gather(table, hidden, tokens.buffer());
        Ok(())
    }

    fn exec_rms_norm(
        &self,
        input: &Vec<f32>,
        weight: &Vec<f32>,
        _rows: usize,
        eps: f32,
        out: &mut Vec<f32>,
    ) -> Result<(), KernelOpError> {
        *out = elementwise::rms_norm(input, weight, eps);
        Ok(())
    }

    fn exec_silu_mul(
        &self,
        gate_up: &Vec<f32>,
        _rows: usize,
        width: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), KernelOpError> {
        *out = elementwise::silu_mul(gate_up, width);
        Ok(())
    }

    fn exec_add_in_place(
        &self,
        residual: &mut Vec<f32>,
        delta: &Vec<f32>,
    ) -> Result<(), KernelOpError> {
        elementwise::add_in_place(residual, delta);
        Ok(())
    }

    fn exec_gather_columns(
        &self,
        src: &Vec<f32>,
        columns: ColumnRange,
        out: &mut Vec<f32>,
    ) -> Result<(), KernelOpError> {
        *out = elementwise::gather_columns(
            src,
            columns.rows,
            columns.stride,
            columns.col_offset,
            columns.width,
        );
        Ok(())
    }

    fn exec_rope_apply(
        &self,
        x: &mut Vec<f32>,
        positions: &Indices<Vec<u32>>,
        rope: &DeviceRope<Vec<f32>>,
        heads: HeadRange,
    ) -> Result<(), KernelOpError> {
        rope::apply_with_tables(
            x,
            positions.buffer(),
            (rope.cos(), rope.sin()),
            rope.pairs(),
            heads.row_stride,
            heads.col_offset,
            heads.n_heads,
        );
        Ok(())
    }

    fn exec_kv_write(
        &self,
        (k_pool, v_pool): (&mut Vec<f32>, &mut Vec<f32>),
        src: &Vec<f32>,
        slots: &Indices<Vec<u32>>,
        layout: RowLayout,
        shape: KvShape,
    ) -> Result<(), KernelOpError> {
        write_kv(k_pool, v_pool, src, slots.buffer(), layout, shape);
        Ok(())
    }

    fn exec_paged_attention(
        &self,
        queries: &Vec<f32>,
        (k_pool, v_pool): (&Vec<f32>, &Vec<f32>),
        chunks: &DeviceChunks<Vec<u32>>,
        shape: AttentionShape,
        out: &mut Vec<f32>,
    ) -> Result<(), KernelOpError> {
        let rows: Vec<ChunkRows<'_>> = (0..chunks.n_chunks()).map(|i| chunks.chunk(i)).collect();
        let attended = paged_attention(shape, queries, &rows, k_pool, v_pool);
        let width = shape.row_width();
        for chunk in &rows {
            let range = chunk.first_row * width..(chunk.first_row + chunk.len) * width;
            out[range.clone()].copy_from_slice(&attended[range]);
        }
        Ok(())
    }
}

impl PoolOps for HostOps {
    fn exec_kv_copy_blocks(
        &self,
        (k_pool, v_pool): (&mut Vec<f32>, &mut Vec<f32>),
        src_blocks: &Indices<Vec<u32>>,
        dst_blocks: &Indices<Vec<u32>>,
        block_floats: usize,
    ) -> Result<(), KernelOpError> {
        for pool in [k_pool, v_pool] {
            kv::copy_blocks(pool, src_blocks.buffer(), dst_blocks.buffer(), block_floats);
        }
        Ok(())
    }

    fn exec_kv_copy_rows(
        &self,
        (k_pool, v_pool): (&mut Vec<f32>, &mut Vec<f32>),
        src_slots: &Indices<Vec<u32>>,
        dst_slots: &Indices<Vec<u32>>,
        shape: KvShape,
    ) -> Result<(), KernelOpError> {
        kv::copy_rows(
            k_pool,
            v_pool,
            src_slots.buffer(),
            dst_slots.buffer(),
            shape,
        );
        Ok(())
    }

    fn exec_rope_rerotate_k(
        &self,
        k_pool: &mut Vec<f32>,
        block_table: &Indices<Vec<u32>>,
        positions: Range<usize>,
        rotation: &DeviceRotation<Vec<f32>>,
        shape: KvShape,
    ) -> Result<(), KernelOpError> {
        let rotation = PairRotation {
            cos: rotation.cos().clone(),
            sin: rotation.sin().clone(),
        };
        rope::rerotate_k(
            k_pool,
            block_table.buffer(),
            positions.start,
            positions.len(),
            shape,
            &rotation,
        );
        Ok(())
    }

    fn exec_download_range(
        &self,
        buffer: &Vec<f32>,
        range: Range<usize>,
    ) -> Result<Vec<f32>, KernelOpError> {
        Ok(buffer[range].to_vec())
    }

    fn exec_upload_range(
        &self,
        buffer: &mut Vec<f32>,
        offset: usize,
        values: &[f32],
    ) -> Result<(), KernelOpError> {
        buffer[offset..offset + values.len()].copy_from_slice(values);
        Ok(())
    }
}
