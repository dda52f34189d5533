//! Maintenance of a paged KV pool kept where the kernels run, behind [`PoolOps`]: copying whole
//! blocks (copy-on-write of a shared prefix block), copying single token rows and turning their
//! K by a position delta (modular skill assembly), and moving one block's values to and from
//! the host (the node's skill store). The forward pass's own writes are
//! [`KernelOps::kv_write`].
//!
//! As in [`KernelOps`], the provided methods check every argument (buffer lengths, index
//! bounds, ranges) and then call the implementation's `exec_*` method.

use std::ops::Range;

use crate::ops::{Buffer, Indices, KernelOpError, KernelOps, expect_len, expect_within, product};
use crate::reference::kv::KvShape;
use crate::reference::rope::PairRotation;
use crate::registry::BLOCK_SIZE;

/// A rotation by a position delta ([`PairRotation`]: one angle per pair of a head) uploaded.
#[derive(Debug)]
pub struct DeviceRotation<F> {
    pub(crate) cos: F,
    pub(crate) sin: F,
    pub(crate) pairs: usize,
}

impl<F> DeviceRotation<F> {
    /// The cosines, one per pair.
    pub fn cos(&self) -> &F {
        &self.cos
    }

    /// The sines, one per pair.
    pub fn sin(&self) -> &F {
        &self.sin
    }

    /// Pairs per head.
    pub fn pairs(&self) -> usize {
        self.pairs
    }
}

/// The blocks of one layer's pool (`k_pool`, `v_pool`) of `block_floats`-float blocks, after
/// checking both hold the same whole number of blocks and that every flat slot
/// (`block * 16 + slot`) fits the kernels' u32. The kernels address the pool with 64-bit
/// offsets, so a pool may be larger than an `int` can count.
pub(crate) fn pool_blocks(
    op: &'static str,
    k_len: usize,
    v_len: usize,
    block_floats: usize,
) -> Result<usize, KernelOpError> {
    expect_len(op, "V pool", v_len, k_len)?;
    let blocks = k_len.checked_div(block_floats).unwrap_or(0);
    expect_len(op, "K pool", k_len, blocks.saturating_mul(block_floats))?;
    expect_within(op, "pool slots", blocks.saturating_mul(BLOCK_SIZE), 1 << 32)?;
    Ok(blocks)
}

/// Operations on a paged KV pool (one layer's K and V buffers, laid out as
/// [`crate::reference::kv`] says) beside the forward pass's.
pub trait PoolOps: KernelOps {
    /// Runs a checked [`kv_copy_blocks`](Self::kv_copy_blocks).
    fn exec_kv_copy_blocks(
        &self,
        pool: (&mut Self::F32, &mut Self::F32),
        src_blocks: &Indices<Self::U32>,
        dst_blocks: &Indices<Self::U32>,
        block_floats: usize,
    ) -> Result<(), KernelOpError>;

    /// Runs a checked [`kv_copy_rows`](Self::kv_copy_rows).
    fn exec_kv_copy_rows(
        &self,
        pool: (&mut Self::F32, &mut Self::F32),
        src_slots: &Indices<Self::U32>,
        dst_slots: &Indices<Self::U32>,
        shape: KvShape,
    ) -> Result<(), KernelOpError>;

    /// Runs a checked [`rope_rerotate_k`](Self::rope_rerotate_k).
    fn exec_rope_rerotate_k(
        &self,
        k_pool: &mut Self::F32,
        block_table: &Indices<Self::U32>,
        positions: Range<usize>,
        rotation: &DeviceRotation<Self::F32>,
        shape: KvShape,
    ) -> Result<(), KernelOpError>;

    /// Runs a checked [`download_range`](Self::download_range).
    fn exec_download_range(
        &self,
        buffer: &Self::F32,
        range: Range<usize>,
    ) -> Result<Vec<f32>, KernelOpError>;

    /// Runs a checked [`upload_range`](Self::upload_range).
    fn exec_upload_range(
        &self,
        buffer: &mut Self::F32,
        offset: usize,
        values: &[f32],
    ) -> Result<(), KernelOpError>;

    /// Uploads a rotation by a position delta.
    fn upload_rotation(
        &self,
        rotation: &PairRotation,
    ) -> Result<DeviceRotation<Self::F32>, KernelOpError> {
        expect_len(
            "upload rotation",
            "sines",
            rotation.sin.len(),
            rotation.cos.len(),
        )?;
        Ok(DeviceRotation {
            cos: self.upload_f32(&rotation.cos)?,
            sin: self.upload_f32(&rotation.sin)?,
            pairs: rotation.cos.len(),
        })
    }

    /// Copies block `src_blocks[i]` onto block `dst_blocks[i]` of one layer's K and V.
    /// Destinations must be distinct and none may be a source (the caller's duty: the values
    /// are on the device; a violation gives wrong values, never an access outside the pool).
    fn kv_copy_blocks(
        &self,
        pool: (&mut Self::F32, &mut Self::F32),
        src_blocks: &Indices<Self::U32>,
        dst_blocks: &Indices<Self::U32>,
        block_floats: usize,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "kv copy blocks";
        let (k_pool, v_pool) = pool;
        let blocks = pool_blocks(OP, k_pool.len(), v_pool.len(), block_floats)?;
        expect_len(OP, "destinations", dst_blocks.len(), src_blocks.len())?;
        expect_within(OP, "source block bound", src_blocks.bound(), blocks)?;
        expect_within(OP, "destination block bound", dst_blocks.bound(), blocks)?;
        product(OP, src_blocks.len(), block_floats)?;
        if src_blocks.is_empty() || block_floats == 0 {
            return Ok(());
        }
        self.exec_kv_copy_blocks((k_pool, v_pool), src_blocks, dst_blocks, block_floats)
    }

    /// Copies the K and V of flat slot `src_slots[r]` (`block * 16 + slot`) onto flat slot
    /// `dst_slots[r]` of one layer. Destinations must be distinct and none may be a source
    /// (as for [`kv_copy_blocks`](Self::kv_copy_blocks)).
    fn kv_copy_rows(
        &self,
        pool: (&mut Self::F32, &mut Self::F32),
        src_slots: &Indices<Self::U32>,
        dst_slots: &Indices<Self::U32>,
        shape: KvShape,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "kv copy rows";
        let (k_pool, v_pool) = pool;
        let blocks = pool_blocks(OP, k_pool.len(), v_pool.len(), shape.block_floats())?;
        expect_len(OP, "destinations", dst_slots.len(), src_slots.len())?;
        // Below 2^32: `pool_blocks` checked.
        let slots = blocks * BLOCK_SIZE;
        expect_within(OP, "source slot bound", src_slots.bound(), slots)?;
        expect_within(OP, "destination slot bound", dst_slots.bound(), slots)?;
        product(OP, src_slots.len(), shape.width())?;
        if src_slots.is_empty() || shape.width() == 0 {
            return Ok(());
        }
        self.exec_kv_copy_rows((k_pool, v_pool), src_slots, dst_slots, shape)
    }

    /// Turns the cached K of `positions` of the sequence with `block_table` by `rotation`, in
    /// place in one layer's K pool.
    fn rope_rerotate_k(
        &self,
        k_pool: &mut Self::F32,
        block_table: &Indices<Self::U32>,
        positions: Range<usize>,
        rotation: &DeviceRotation<Self::F32>,
        shape: KvShape,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "rope rerotate k";
        let blocks = pool_blocks(OP, k_pool.len(), k_pool.len(), shape.block_floats())?;
        expect_len(OP, "rotation pairs", 2 * rotation.pairs, shape.head_dim)?;
        expect_within(OP, "table block bound", block_table.bound(), blocks)?;
        expect_within(
            OP,
            "end position",
            positions.end,
            product(OP, block_table.len(), BLOCK_SIZE)?,
        )?;
        product(OP, positions.len(), shape.width())?;
        if positions.is_empty() || shape.width() == 0 {
            return Ok(());
        }
        self.exec_rope_rerotate_k(k_pool, block_table, positions, rotation, shape)
    }

    /// Copies `range` of `buffer` to the host.
    fn download_range(
        &self,
        buffer: &Self::F32,
        range: Range<usize>,
    ) -> Result<Vec<f32>, KernelOpError> {
        expect_within("download range", "end", range.end, buffer.len())?;
        expect_within("download range", "start", range.start, range.end)?;
        if range.is_empty() {
            return Ok(Vec::new());
        }
        self.exec_download_range(buffer, range)
    }

    /// Overwrites `buffer` from `offset` with `values`.
    fn upload_range(
        &self,
        buffer: &mut Self::F32,
        offset: usize,
        values: &[f32],
    ) -> Result<(), KernelOpError> {
        expect_within(
            "upload range",
            "end",
            offset.saturating_add(values.len()),
            buffer.len(),
        )?;
        if values.is_empty() {
            return Ok(());
        }
        self.exec_upload_range(buffer, offset, values)
    }
}
