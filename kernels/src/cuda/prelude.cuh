// skillkv kernel prelude: prepended to every kernel source by the registry (NVRTC sees one
// translation unit per kernel source; no header beyond NVRTC's builtins is included).
//
// Conventions shared by every kernel:
// - activations, norms weights and the KV pool are f32; sizes and counts are `int`;
//   token ids, positions, block ids and lengths are `unsigned int`;
// - the KV pool holds blocks of SKV_BLOCK_SIZE tokens; one layer's K is
//   [block][kv_head][head_dim][slot] and V is [block][kv_head][slot][head_dim];
// - kernels that reduce over a row expect blockDim.x to be a multiple of 32 (at most 1024).
// cuda_fp16.h is not among NVRTC 12.8's builtin headers, so half conversions use the PTX
// conversion instructions directly (the same instructions cuda_fp16.h emits).

#define SKV_BLOCK_SIZE 16

__device__ __forceinline__ float skv_neg_inf() { return __int_as_float(0xff800000); }

// IEEE half (bits) to float, exact.
__device__ __forceinline__ float skv_half_to_float(unsigned short h) {
    float f;
    asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h));
    return f;
}

// Float to IEEE half (bits), round to nearest even.
__device__ __forceinline__ unsigned short skv_float_to_half(float f) {
    unsigned short h;
    asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float skv_warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Sum of `v` over the thread block; every thread gets the result.
__device__ float skv_block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = skv_warp_sum(v);
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        float w = lane < warps ? partial[lane] : 0.0f;
        w = skv_warp_sum(w);
        if (lane == 0) {
            partial[0] = w;
        }
    }
    __syncthreads();
    const float total = partial[0];
    __syncthreads();
    return total;
}
