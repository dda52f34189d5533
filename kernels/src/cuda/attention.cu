// Causal grouped-query attention over the paged KV pool, online softmax (running max and sum,
// one rescale per KV block). One thread block per (query row, query head); blockDim is
// head_dim rounded up to a multiple of 32, at most 256 (so 16 <= 16 * groups and each thread
// owns at most one output dimension). The 16 scores of a KV block are computed by
// blockDim / 16 groups of 16 threads (consecutive threads read consecutive K slots of the
// transposed K layout), then summed across groups. Query head h reads KV head
// h / (n_heads / n_kv_heads). Semantics: reference::attention.

#define SKV_MAX_THREADS 256

// Attention of one query head row `q` (head_dim floats, unscaled) over the first `visible`
// positions of the sequence whose blocks are `table`; writes head_dim floats to `out`.
__device__ void skv_attend_row(const float* __restrict__ q, const float* __restrict__ k_pool,
                               const float* __restrict__ v_pool,
                               const unsigned int* __restrict__ table, int visible, int kv_head,
                               int n_kv_heads, int head_dim, float scale,
                               float* __restrict__ out) {
    __shared__ float scaled_q[SKV_MAX_THREADS];
    __shared__ float partial[SKV_MAX_THREADS];
    __shared__ float scores[SKV_BLOCK_SIZE];
    const int t = threadIdx.x;
    const int slot = t % SKV_BLOCK_SIZE;
    const int group = t / SKV_BLOCK_SIZE;
    const int groups = blockDim.x / SKV_BLOCK_SIZE;
    if (t < head_dim) {
        scaled_q[t] = q[t] * scale;
    }
    __syncthreads();
    const size_t block_floats = (size_t)n_kv_heads * head_dim * SKV_BLOCK_SIZE;
    const size_t head_offset = (size_t)kv_head * head_dim * SKV_BLOCK_SIZE;
    float acc = 0.0f;
    float running_max = skv_neg_inf();
    float running_sum = 0.0f;
    const int blocks = (visible + SKV_BLOCK_SIZE - 1) / SKV_BLOCK_SIZE;
    for (int b = 0; b < blocks; ++b) {
        const size_t base = (size_t)table[b] * block_floats + head_offset;
        const float* keys = k_pool + base;
        const float* values = v_pool + base;
        const int valid = min(SKV_BLOCK_SIZE, visible - b * SKV_BLOCK_SIZE);
        float dot = 0.0f;
        for (int d = group; d < head_dim; d += groups) {
            dot = fmaf(scaled_q[d], keys[d * SKV_BLOCK_SIZE + slot], dot);
        }
        partial[t] = dot;
        __syncthreads();
        if (t < SKV_BLOCK_SIZE) {
            float score = 0.0f;
            for (int g = 0; g < groups; ++g) {
                score += partial[g * SKV_BLOCK_SIZE + t];
            }
            scores[t] = t < valid ? score : skv_neg_inf();
        }
        __syncthreads();
        float block_max = skv_neg_inf();
        for (int s = 0; s < valid; ++s) {
            block_max = fmaxf(block_max, scores[s]);
        }
        const float new_max = fmaxf(running_max, block_max);
        const float correction = expf(running_max - new_max);
        float weight_sum = 0.0f;
        float contribution = 0.0f;
        for (int s = 0; s < valid; ++s) {
            const float weight = expf(scores[s] - new_max);
            weight_sum += weight;
            if (t < head_dim) {
                contribution = fmaf(weight, values[s * head_dim + t], contribution);
            }
        }
        running_sum = running_sum * correction + weight_sum;
        acc = acc * correction + contribution;
        running_max = new_max;
        // `scores` and `partial` are rewritten by the next block.
        __syncthreads();
    }
    if (t < head_dim) {
        out[t] = acc / running_sum;
    }
}

// Decode: one query row per sequence. q and out are [n_seqs][n_heads * head_dim]; block_tables
// is [n_seqs][max_blocks]; seq_lens[i] counts the positions sequence i attends to, its new
// token included (its K/V already written). Grid: (n_seqs, n_heads).
extern "C" __global__ void paged_attention_decode_f32(
    const float* __restrict__ q, const float* __restrict__ k_pool,
    const float* __restrict__ v_pool, const unsigned int* __restrict__ block_tables,
    const unsigned int* __restrict__ seq_lens, float* __restrict__ out, int n_seqs,
    int max_blocks, int n_heads, int n_kv_heads, int head_dim, float scale) {
    const int seq = blockIdx.x;
    const int head = blockIdx.y;
    if (seq >= n_seqs || head >= n_heads) {
        return;
    }
    const size_t row = (size_t)seq * n_heads * head_dim + (size_t)head * head_dim;
    skv_attend_row(q + row, k_pool, v_pool, block_tables + (size_t)seq * max_blocks,
                   (int)seq_lens[seq], head / (n_heads / n_kv_heads), n_kv_heads, head_dim,
                   scale, out + row);
}

// Prefill: chunks of consecutive tokens; token t of chunk c is batch row
// chunk_first_row[c] + t at position chunk_start_pos[c] + t and attends to every position up
// to its own (the cached prefix and the chunk causally). q and out are
// [rows][n_heads * head_dim]; block_tables is [n_chunks][max_blocks]. Rows outside every chunk
// are left untouched. Grid: (longest chunk, n_heads, n_chunks).
extern "C" __global__ void paged_attention_prefill_f32(
    const float* __restrict__ q, const float* __restrict__ k_pool,
    const float* __restrict__ v_pool, const unsigned int* __restrict__ block_tables,
    const unsigned int* __restrict__ chunk_first_row, const unsigned int* __restrict__ chunk_len,
    const unsigned int* __restrict__ chunk_start_pos, float* __restrict__ out, int n_chunks,
    int max_blocks, int n_heads, int n_kv_heads, int head_dim, float scale) {
    const int token = blockIdx.x;
    const int head = blockIdx.y;
    const int chunk = blockIdx.z;
    if (chunk >= n_chunks || head >= n_heads || token >= (int)chunk_len[chunk]) {
        return;
    }
    const size_t row = (size_t)chunk_first_row[chunk] + token;
    const size_t offset = row * n_heads * head_dim + (size_t)head * head_dim;
    const int visible = (int)chunk_start_pos[chunk] + token + 1;
    skv_attend_row(q + offset, k_pool, v_pool, block_tables + (size_t)chunk * max_blocks,
                   visible, head / (n_heads / n_kv_heads), n_kv_heads, head_dim, scale,
                   out + offset);
}
