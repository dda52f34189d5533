//! The argument types of [`KernelOps`](super::KernelOps) that carry what was checked on the
//! host: index buffers with their bound, RoPE tables, a batch's packed chunks, and the column
//! and head ranges of strided rows.

use crate::ops::{Buffer, KernelOpError, expect_within};
use crate::reference::attention::ChunkRows;
use crate::registry::BLOCK_SIZE;

/// Index values uploaded after checking, on the host, that each is below `bound`.
#[derive(Debug)]
pub struct Indices<U> {
    pub(crate) buffer: U,
    pub(crate) bound: usize,
}

impl<U: Buffer> Indices<U> {
    /// The buffer.
    pub fn buffer(&self) -> &U {
        &self.buffer
    }

    /// Every value is below this.
    pub fn bound(&self) -> usize {
        self.bound
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.buffer.len()
    }

    /// Whether no value is held.
    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }
}

/// RoPE cosine and sine tables (`[position][pair]`) uploaded once.
#[derive(Debug)]
pub struct DeviceRope<F> {
    pub(crate) cos: F,
    pub(crate) sin: F,
    pub(crate) pairs: usize,
    pub(crate) positions: usize,
}

impl<F> DeviceRope<F> {
    /// The cosine table.
    pub fn cos(&self) -> &F {
        &self.cos
    }

    /// The sine table.
    pub fn sin(&self) -> &F {
        &self.sin
    }

    /// Rotated pairs per head.
    pub fn pairs(&self) -> usize {
        self.pairs
    }

    /// Positions covered.
    pub fn positions(&self) -> usize {
        self.positions
    }
}

/// A batch's chunks as the paged-attention kernel takes them: block tables padded to
/// `[n_chunks][max_blocks]` and each chunk's first row, length and start position, checked on
/// the host (rows inside the batch, tables long enough, blocks inside the pool).
#[derive(Debug)]
pub struct DeviceChunks<U> {
    pub(crate) tables: U,
    pub(crate) first_row: U,
    pub(crate) len: U,
    pub(crate) start_pos: U,
    pub(crate) n_chunks: usize,
    pub(crate) max_blocks: usize,
    pub(crate) max_len: usize,
    pub(crate) rows: usize,
    pub(crate) num_blocks: usize,
}

impl<U> DeviceChunks<U> {
    /// The padded block tables, `[n_chunks][max_blocks]`.
    pub fn tables(&self) -> &U {
        &self.tables
    }

    /// Each chunk's first batch row.
    pub fn first_row(&self) -> &U {
        &self.first_row
    }

    /// Each chunk's number of tokens.
    pub fn len(&self) -> &U {
        &self.len
    }

    /// Each chunk's first position.
    pub fn start_pos(&self) -> &U {
        &self.start_pos
    }

    /// Chunks.
    pub fn n_chunks(&self) -> usize {
        self.n_chunks
    }

    /// Width of the padded tables.
    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// The longest chunk.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Rows of the batch the chunks were checked against.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Blocks of the pool the tables were checked against.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
}

/// The host arrays of [`DeviceChunks`], before upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedChunks {
    /// Block tables padded with block 0 (never read) to `[chunks][max_blocks]`.
    pub tables: Vec<u32>,
    /// Each chunk's first batch row.
    pub first_row: Vec<u32>,
    /// Each chunk's number of tokens.
    pub len: Vec<u32>,
    /// Each chunk's first position.
    pub start_pos: Vec<u32>,
    /// Width of the padded tables.
    pub max_blocks: usize,
}

impl PackedChunks {
    /// Packs `chunks` of a batch of `rows` rows over a pool of `num_blocks` blocks, checking
    /// that each chunk's rows are in the batch, its table covers its positions and names only
    /// blocks of the pool. Only the blocks a chunk reads are kept.
    pub fn pack(
        chunks: &[ChunkRows<'_>],
        rows: usize,
        num_blocks: usize,
    ) -> Result<Self, KernelOpError> {
        const OP: &str = "pack chunks";
        let mut used = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let end_row = chunk.first_row.saturating_add(chunk.len);
            expect_within(OP, "a chunk's last row + 1", end_row, rows)?;
            let end = chunk.start_pos.saturating_add(chunk.len);
            expect_within(OP, "a chunk's end position", end, u32::MAX as usize)?;
            let needed = end.div_ceil(BLOCK_SIZE);
            expect_within(OP, "blocks a chunk needs", needed, chunk.block_table.len())?;
            let table = &chunk.block_table[..needed];
            if let Some(&block) = table.iter().find(|&&b| b as usize >= num_blocks) {
                return Err(KernelOpError::OutOfRange {
                    op: OP,
                    what: "a block of a chunk's table",
                    value: block as usize,
                    limit: num_blocks,
                });
            }
            used.push(table);
        }
        let max_blocks = used.iter().map(|t| t.len()).max().unwrap_or(0).max(1);
        let mut tables = Vec::with_capacity(chunks.len() * max_blocks);
        for table in &used {
            tables.extend_from_slice(table);
            tables.resize(tables.len() + max_blocks - table.len(), 0);
        }
        // Rows and positions fit u32: rows was bounded by the batch, positions checked above.
        let column = |f: fn(&ChunkRows<'_>) -> usize| chunks.iter().map(|c| f(c) as u32).collect();
        Ok(Self {
            tables,
            first_row: column(|c| c.first_row),
            len: column(|c| c.len),
            start_pos: column(|c| c.start_pos),
            max_blocks,
        })
    }

    /// Chunk `index` as the reference takes it (for host implementations).
    pub fn chunk(&self, index: usize) -> ChunkRows<'_> {
        unpack(
            [&self.tables, &self.first_row, &self.len, &self.start_pos],
            self.max_blocks,
            index,
        )
    }
}

impl DeviceChunks<Vec<u32>> {
    /// Chunk `index` as the reference takes it, from host buffers.
    pub fn chunk(&self, index: usize) -> ChunkRows<'_> {
        unpack(
            [&self.tables, &self.first_row, &self.len, &self.start_pos],
            self.max_blocks,
            index,
        )
    }
}

/// Chunk `index` of packed `[tables, first_row, len, start_pos]` arrays.
fn unpack<'a>(
    [tables, first_row, len, start_pos]: [&'a [u32]; 4],
    max_blocks: usize,
    index: usize,
) -> ChunkRows<'a> {
    ChunkRows {
        first_row: first_row[index] as usize,
        len: len[index] as usize,
        start_pos: start_pos[index] as usize,
        block_table: &tables[index * max_blocks..(index + 1) * max_blocks],
    }
}

/// A range of columns of each row: rows `stride` floats apart, `width` columns from
/// `col_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnRange {
    /// Rows.
    pub rows: usize,
    /// Floats from one row to the next.
    pub stride: usize,
    /// First column.
    pub col_offset: usize,
    /// Columns taken.
    pub width: usize,
}

/// Where RoPE applies in each row: `n_heads` heads from `col_offset`, rows `row_stride` apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadRange {
    /// Floats from one row to the next.
    pub row_stride: usize,
    /// First column of the first head.
    pub col_offset: usize,
    /// Heads rotated.
    pub n_heads: usize,
}
