// Dequantization of GGUF weight blocks of 32 values to f32 or f16 (IEEE half bits):
//   Q4_0 (18 bytes): f16 d, 16 bytes of nibbles;  x = (q - 8) * d
//   Q4_1 (20 bytes): f16 d, f16 m, 16 bytes;      x = q * d + m
//   Q8_0 (34 bytes): f16 d, 32 signed bytes;      x = q * d
// Value j < 16 is the low nibble of byte j, value j >= 16 the high nibble of byte j - 16.
// Products and sums are rounded separately (no FMA) so the results equal the CPU reference
// bit for bit; f16 outputs round the f32 value to nearest even. Semantics: reference::dequant.
// One thread per value: n_blocks * 32 threads.

__device__ __forceinline__ float skv_load_half(const unsigned char* p) {
    return skv_half_to_float((unsigned short)(p[0] | (p[1] << 8)));
}

__device__ __forceinline__ unsigned int skv_nibble(const unsigned char* qs, int j) {
    return j < 16 ? (qs[j] & 0x0fu) : (qs[j - 16] >> 4);
}

__device__ __forceinline__ float skv_q4_0(const unsigned char* blocks, size_t index) {
    const unsigned char* block = blocks + (index / 32) * 18;
    const int q = (int)skv_nibble(block + 2, (int)(index % 32)) - 8;
    return __fmul_rn((float)q, skv_load_half(block));
}

__device__ __forceinline__ float skv_q4_1(const unsigned char* blocks, size_t index) {
    const unsigned char* block = blocks + (index / 32) * 20;
    const unsigned int q = skv_nibble(block + 4, (int)(index % 32));
    return __fadd_rn(__fmul_rn((float)q, skv_load_half(block)), skv_load_half(block + 2));
}

__device__ __forceinline__ float skv_q8_0(const unsigned char* blocks, size_t index) {
    const unsigned char* block = blocks + (index / 32) * 34;
    const int q = (int)(signed char)block[2 + index % 32];
    return __fmul_rn((float)q, skv_load_half(block));
}


extern "C" __global__ void dequant_q4_0_f32(const unsigned char* __restrict__ blocks,
                                           float* __restrict__ out, int n_blocks) {
    const size_t index = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (index < (size_t)n_blocks * 32) {
        out[index] = skv_q4_0(blocks, index);
    }
}

extern "C" __global__ void dequant_q4_0_f16(const unsigned char* __restrict__ blocks,
                                           unsigned short* __restrict__ out, int n_blocks) {
    const size_t index = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (index < (size_t)n_blocks * 32) {
        out[index] = skv_float_to_half(skv_q4_0(blocks, index));
    }
}

extern "C" __global__ void dequant_q4_1_f32(const unsigned char* __restrict__ blocks,
                                           float* __restrict__ out, int n_blocks) {
    const size_t index = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (index < (size_t)n_blocks * 32) {
        out[index] = skv_q4_1(blocks, index);
    }
}

extern "C" __global__ void dequant_q4_1_f16(const unsigned char* __restrict__ blocks,
                                           unsigned short* __restrict__ out, int n_blocks) {
    const size_t index = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (index < (size_t)n_blocks * 32) {
        out[index] = skv_float_to_half(skv_q4_1(blocks, index));
    }
}

extern "C" __global__ void dequant_q8_0_f32(const unsigned char* __restrict__ blocks,
                                           float* __restrict__ out, int n_blocks) {
    const size_t index = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (index < (size_t)n_blocks * 32) {
        out[index] = skv_q8_0(blocks, index);
    }
}

extern "C" __global__ void dequant_q8_0_f16(const unsigned char* __restrict__ blocks,
                                           unsigned short* __restrict__ out, int n_blocks) {
    const size_t index = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (index < (size_t)n_blocks * 32) {
        out[index] = skv_float_to_half(skv_q8_0(blocks, index));
    }
}
