// Row-wise and element-wise operations of the Llama block: embedding gather, RMSNorm, SwiGLU
// (SiLU(gate) * up), residual add, greedy argmax. Semantics: reference::elementwise.

// out[row] = table[tokens[row]] for `rows` rows of `hidden` floats. The caller checks that every
// token id is inside the table. Grid: (rows); any blockDim.
extern "C" __global__ void embedding_gather_f32(const float* __restrict__ table,
                                                const unsigned int* __restrict__ tokens,
                                                float* __restrict__ out, int rows, int hidden) {
    const int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const float* src = table + (size_t)tokens[row] * hidden;
    float* dst = out + (size_t)row * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        dst[i] = src[i];
    }
}

// out = in * 1/sqrt(mean(in^2) + eps) * weight, per row of `width`. Grid: (rows);
// blockDim: a multiple of 32.
extern "C" __global__ void rms_norm_f32(const float* __restrict__ in,
                                        const float* __restrict__ weight,
                                        float* __restrict__ out, int rows, int width, float eps) {
    const int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const float* x = in + (size_t)row * width;
    float* y = out + (size_t)row * width;
    float sum_squares = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        sum_squares = fmaf(x[i], x[i], sum_squares);
    }
    sum_squares = skv_block_sum(sum_squares);
    const float scale = 1.0f / sqrtf(sum_squares / (float)width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        y[i] = x[i] * scale * weight[i];
    }
}

// Each input row is [gate (width) | up (width)]; out row = silu(gate) * up.
// One thread per output element.
extern "C" __global__ void silu_mul_f32(const float* __restrict__ gate_up,
                                        float* __restrict__ out, int rows, int width) {
    const size_t index = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= (size_t)rows * width) {
        return;
    }
    const size_t row = index / width;
    const size_t col = index % width;
    const float gate = gate_up[row * 2 * width + col];
    const float up = gate_up[row * 2 * width + width + col];
    out[index] = gate / (1.0f + expf(-gate)) * up;
}

// residual += delta, element-wise. One thread per element.
// Columns `col_offset .. col_offset + width` of each row of `src` (rows `src_stride` floats
// apart) into the contiguous `[rows][width]` output, e.g. the Q part of fused QKV rows.
extern "C" __global__ void gather_columns_f32(const float* __restrict__ src,
                                              float* __restrict__ out, int rows, int src_stride,
                                              int col_offset, int width) {
    const size_t index = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= (size_t)rows * width) {
        return;
    }
    const size_t row = index / width;
    const size_t col = index % width;
    out[index] = src[row * src_stride + col_offset + col];
}

extern "C" __global__ void add_in_place_f32(float* __restrict__ residual,
                                            const float* __restrict__ delta, int n) {
    const int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index < n) {
        residual[index] += delta[index];
    }
}

// Whether (value a, index ia) wins over (b, ib): larger value, lower index on ties; NaN never
// wins.
__device__ __forceinline__ bool skv_argmax_better(float a, unsigned int ia, float b,
                                                  unsigned int ib) {
    return a > b || (a == b && ia < ib);
}

// out[row] = index of the largest non-NaN logit of the row (lowest index on ties; 0 when every
// logit is NaN). Grid: (rows); blockDim: a multiple of 32.
extern "C" __global__ void argmax_f32(const float* __restrict__ logits,
                                      unsigned int* __restrict__ out, int rows, int vocab) {
    __shared__ float best_values[32];
    __shared__ unsigned int best_indices[32];
    const int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const float* x = logits + (size_t)row * vocab;
    float best = skv_neg_inf();
    unsigned int best_index = 0xffffffffu;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        if (skv_argmax_better(x[i], (unsigned int)i, best, best_index)) {
            best = x[i];
            best_index = (unsigned int)i;
        }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, best, offset);
        const unsigned int other_index = __shfl_xor_sync(0xffffffffu, best_index, offset);
        if (skv_argmax_better(other, other_index, best, best_index)) {
            best = other;
            best_index = other_index;
        }
    }
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) {
        best_values[warp] = best;
        best_indices[warp] = best_index;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        const int warps = (blockDim.x + 31) >> 5;
        for (int w = 1; w < warps; ++w) {
            if (skv_argmax_better(best_values[w], best_indices[w], best, best_index)) {
                best = best_values[w];
                best_index = best_indices[w];
            }
        }
        out[row] = best_index == 0xffffffffu ? 0u : best_index;
    }
}
