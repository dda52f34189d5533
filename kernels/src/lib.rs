//! CUDA kernels and their CPU reference implementations.
