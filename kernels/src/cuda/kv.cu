// KV pool maintenance: writing new tokens' K and V into their block slots, and copying whole
// blocks (copy-on-write of a shared block, compaction). One layer's K is
// [block][kv_head][head_dim][slot] (transposed) and V is [block][kv_head][slot][head_dim].
// Semantics: reference::kv.

// Writes the K and V of `rows` tokens. Row r's K is src[r * src_stride + k_offset ..] and its V
// src[r * src_stride + v_offset ..] (n_kv_heads * head_dim floats each, e.g. inside fused QKV
// rows); it goes to flat slot slots[r] = block * 16 + slot. One thread per (row, kv_head, dim).
extern "C" __global__ void kv_write_f32(float* __restrict__ k_pool, float* __restrict__ v_pool,
                                        const float* __restrict__ src,
                                        const unsigned int* __restrict__ slots, int rows,
                                        int src_stride, int k_offset, int v_offset,
                                        int n_kv_heads, int head_dim) {
    const int width = n_kv_heads * head_dim;
    const size_t index = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= (size_t)rows * width) {
        return;
    }
    const size_t row = index / width;
    const int column = (int)(index % width);
    const int head = column / head_dim;
    const int d = column % head_dim;
    const size_t block = slots[row] / SKV_BLOCK_SIZE;
    const int slot = (int)(slots[row] % SKV_BLOCK_SIZE);
    const size_t head_base = (block * n_kv_heads + head) * (size_t)head_dim * SKV_BLOCK_SIZE;
    const float* row_src = src + row * src_stride;
    k_pool[head_base + (size_t)d * SKV_BLOCK_SIZE + slot] = row_src[k_offset + column];
    v_pool[head_base + (size_t)slot * head_dim + d] = row_src[v_offset + column];
}

// Copies block src_blocks[i] to dst_blocks[i] for i < n_pairs inside one buffer of blocks of
// `block_floats` floats (one layer's K or V). Destinations must be distinct and no destination
// may also be a source. One thread per copied float.
extern "C" __global__ void kv_block_copy_f32(float* __restrict__ pool,
                                             const unsigned int* __restrict__ src_blocks,
                                             const unsigned int* __restrict__ dst_blocks,
                                             int n_pairs, int block_floats) {
    const size_t index = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= (size_t)n_pairs * block_floats) {
        return;
    }
    const size_t pair = index / block_floats;
    const size_t offset = index % block_floats;
    pool[(size_t)dst_blocks[pair] * block_floats + offset] =
        pool[(size_t)src_blocks[pair] * block_floats + offset];
}

// Copies the K and V of single tokens: flat slot src_slots[r] (block * 16 + slot) to flat slot
// dst_slots[r], for r < rows (modular skill assembly moves a segment's rows to another
// position). Destinations must be distinct and no destination may also be a source. One thread
// per (row, kv_head, dim).
extern "C" __global__ void kv_copy_rows_f32(float* __restrict__ k_pool, float* __restrict__ v_pool,
                                            const unsigned int* __restrict__ src_slots,
                                            const unsigned int* __restrict__ dst_slots, int rows,
                                            int n_kv_heads, int head_dim) {
    const int width = n_kv_heads * head_dim;
    const size_t index = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= (size_t)rows * width) {
        return;
    }
    const size_t row = index / width;
    const int column = (int)(index % width);
    const int head = column / head_dim;
    const int d = column % head_dim;
    const size_t src_block = src_slots[row] / SKV_BLOCK_SIZE;
    const int src_slot = (int)(src_slots[row] % SKV_BLOCK_SIZE);
    const size_t dst_block = dst_slots[row] / SKV_BLOCK_SIZE;
    const int dst_slot = (int)(dst_slots[row] % SKV_BLOCK_SIZE);
    const size_t src_head = (src_block * n_kv_heads + head) * (size_t)head_dim * SKV_BLOCK_SIZE;
    const size_t dst_head = (dst_block * n_kv_heads + head) * (size_t)head_dim * SKV_BLOCK_SIZE;
    k_pool[dst_head + (size_t)d * SKV_BLOCK_SIZE + dst_slot] =
        k_pool[src_head + (size_t)d * SKV_BLOCK_SIZE + src_slot];
    v_pool[dst_head + (size_t)dst_slot * head_dim + d] =
        v_pool[src_head + (size_t)src_slot * head_dim + d];
}
