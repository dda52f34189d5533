// Rotary position embedding, GGUF/llama.cpp "normal" style: the adjacent pairs (x[2i], x[2i+1])
// of each head turn by position * theta^(-2i/head_dim). Angles come from host tables
// (reference::rope::RopeTable) so the GPU and the CPU rotate by the very same cos/sin, and the
// products are rounded separately (no FMA contraction) to match the CPU bit for bit.
// Semantics: reference::rope.

__device__ __forceinline__ void skv_rotate_pair(float* x0p, float* x1p, float c, float s) {
    const float x0 = *x0p;
    const float x1 = *x1p;
    *x0p = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
    *x1p = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
}

// Rotates `n_heads` heads starting at column `col_offset` of each of `rows` rows (row stride
// `row_stride` floats) by the row's position. cos/sin tables: [position][head_dim / 2].
// One thread per (row, head, pair).
extern "C" __global__ void rope_apply_f32(float* __restrict__ x,
                                          const unsigned int* __restrict__ positions,
                                          const float* __restrict__ cos_table,
                                          const float* __restrict__ sin_table, int rows,
                                          int row_stride, int col_offset, int n_heads,
                                          int head_dim) {
    const int pairs = head_dim / 2;
    const size_t index = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= (size_t)rows * n_heads * pairs) {
        return;
    }
    const int pair = (int)(index % pairs);
    const int head = (int)((index / pairs) % n_heads);
    const size_t row = index / ((size_t)pairs * n_heads);
    const size_t angle = (size_t)positions[row] * pairs + pair;
    float* base = x + row * row_stride + col_offset + (size_t)head * head_dim + 2 * pair;
    skv_rotate_pair(base, base + 1, cos_table[angle], sin_table[angle]);
}

// Re-rotates the cached K of positions start_pos .. start_pos + count of one sequence (found
// through its block table) by a position delta, in place in one layer's pool: cos_delta and
// sin_delta ([head_dim / 2]) are the rotation by the delta. Used when a skill's cached KV is
// assembled at another offset than the one it was computed at. V is position-free.
// One thread per (position, kv_head, pair).
extern "C" __global__ void rope_rerotate_k_f32(float* __restrict__ k_pool,
                                               const unsigned int* __restrict__ block_table,
                                               const float* __restrict__ cos_delta,
                                               const float* __restrict__ sin_delta,
                                               int start_pos, int count, int n_kv_heads,
                                               int head_dim) {
    const int pairs = head_dim / 2;
    const size_t index = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= (size_t)count * n_kv_heads * pairs) {
        return;
    }
    const int pair = (int)(index % pairs);
    const int head = (int)((index / pairs) % n_kv_heads);
    const int position = start_pos + (int)(index / ((size_t)pairs * n_kv_heads));
    const size_t block = block_table[position / SKV_BLOCK_SIZE];
    const int slot = position % SKV_BLOCK_SIZE;
    float* head_base = k_pool + (block * n_kv_heads + head) * (size_t)head_dim * SKV_BLOCK_SIZE;
    float* x0 = head_base + (size_t)(2 * pair) * SKV_BLOCK_SIZE + slot;
    skv_rotate_pair(x0, x0 + SKV_BLOCK_SIZE, cos_delta[pair], sin_delta[pair]);
}
