//! The kernel registry: every CUDA C source of the crate, the entry points it defines and the
//! launch rules shared by the loader, the NVRTC check and the GPU tests. Sources are embedded
//! at build time and compiled at run time, each with the common [`PRELUDE`] in front.

/// Tokens per KV block, as in the daemon's pool (`SKV_BLOCK_SIZE` in the CUDA sources).
pub const BLOCK_SIZE: usize = 16;

/// Largest head width the attention kernels support (threads per block).
pub const MAX_HEAD_DIM: usize = 256;

/// Definitions every kernel source starts with: half conversions, warp and block reductions,
/// the KV block size.
pub const PRELUDE: &str = include_str!("cuda/prelude.cuh");

/// One CUDA C translation unit and the `extern "C"` kernels it defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSource {
    /// Short name, used as the NVRTC program name (`<name>.cu`) and in errors.
    pub name: &'static str,
    /// The CUDA C source, without the prelude.
    pub source: &'static str,
    /// The `extern "C" __global__` functions the source defines.
    pub entry_points: &'static [&'static str],
}

impl KernelSource {
    /// The program NVRTC compiles: the prelude followed by the source.
    pub fn full_source(&self) -> String {
        format!("{PRELUDE}\n#line 1 \"{}.cu\"\n{}", self.name, self.source)
    }

    /// The file name NVRTC reports in its log.
    pub fn file_name(&self) -> String {
        format!("{}.cu", self.name)
    }
}

/// Embedding gather, RMSNorm, SwiGLU, residual add, column gather, argmax.
pub const ELEMENTWISE: KernelSource = KernelSource {
    name: "elementwise",
    source: include_str!("cuda/elementwise.cu"),
    entry_points: &[
        "embedding_gather_f32",
        "rms_norm_f32",
        "silu_mul_f32",
        "add_in_place_f32",
        "gather_columns_f32",
        "argmax_f32",
    ],
};

/// RoPE at positions, and re-rotation of cached K by a position delta.
pub const ROPE: KernelSource = KernelSource {
    name: "rope",
    source: include_str!("cuda/rope.cu"),
    entry_points: &["rope_apply_f32", "rope_rerotate_k_f32"],
};

/// Dequantization of GGUF Q4_0, Q4_1 and Q8_0 blocks to f32 and f16.
pub const DEQUANT: KernelSource = KernelSource {
    name: "dequant",
    source: include_str!("cuda/dequant.cu"),
    entry_points: &[
        "dequant_q4_0_f32",
        "dequant_q4_0_f16",
        "dequant_q4_1_f32",
        "dequant_q4_1_f16",
        "dequant_q8_0_f32",
        "dequant_q8_0_f16",
    ],
};

/// Paged attention for decode rows and prefill chunks.
pub const ATTENTION: KernelSource = KernelSource {
    name: "attention",
    source: include_str!("cuda/attention.cu"),
    entry_points: &["paged_attention_decode_f32", "paged_attention_prefill_f32"],
};

/// KV writes, block copies and token-row copies.
pub const KV: KernelSource = KernelSource {
    name: "kv",
    source: include_str!("cuda/kv.cu"),
    entry_points: &["kv_write_f32", "kv_block_copy_f32", "kv_copy_rows_f32"],
};

/// Every kernel source of the crate.
pub const KERNELS: &[KernelSource] = &[ELEMENTWISE, ROPE, DEQUANT, ATTENTION, KV];

/// The source defining `entry_point`, if any.
pub fn find(entry_point: &str) -> Option<&'static KernelSource> {
    KERNELS
        .iter()
        .find(|kernel| kernel.entry_points.contains(&entry_point))
}

/// Threads per block for the attention kernels: `head_dim` rounded up to a multiple of 32, or
/// `None` when the head is wider than [`MAX_HEAD_DIM`] or empty.
pub fn attention_threads(head_dim: usize) -> Option<u32> {
    if head_dim == 0 || head_dim > MAX_HEAD_DIM {
        return None;
    }
    u32::try_from(head_dim.div_ceil(32) * 32).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names of the `extern "C" __global__ void NAME(` definitions in `source`.
    fn defined_kernels(source: &str) -> Vec<String> {
        const MARKER: &str = "extern \"C\" __global__ void ";
        source
            .match_indices(MARKER)
            .map(|(at, _)| {
                let rest = &source[at + MARKER.len()..];
                rest[..rest.find('(').unwrap_or(rest.len())]
                    .trim()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn entry_points_are_exactly_the_kernels_each_source_defines() {
        for kernel in KERNELS {
            let mut defined = defined_kernels(kernel.source);
            defined.sort();
            let mut listed: Vec<String> =
                kernel.entry_points.iter().map(|s| s.to_string()).collect();
            listed.sort();
            assert_eq!(defined, listed, "{}", kernel.name);
        }
    }

    #[test]
    fn names_and_entry_points_are_unique() {
        let mut names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), KERNELS.len());
        let mut entry_points: Vec<&str> = KERNELS
            .iter()
            .flat_map(|k| k.entry_points.iter().copied())
            .collect();
        let total = entry_points.len();
        entry_points.sort_unstable();
        entry_points.dedup();
        assert_eq!(entry_points.len(), total);
        assert_eq!(find("argmax_f32"), Some(&ELEMENTWISE));
        assert_eq!(find("no_such_kernel"), None);
    }

    #[test]
    fn sources_include_nothing_nvrtc_lacks_and_agree_on_the_block_size() {
        for kernel in KERNELS {
            assert!(
                !kernel.source.contains("#include") && !PRELUDE.contains("#include"),
                "{} includes a header; NVRTC 12.8 has no cuda_fp16.h builtin",
                kernel.name
            );
            let full = kernel.full_source();
            assert!(full.starts_with(PRELUDE));
            assert!(full.ends_with(kernel.source));
        }
        assert!(PRELUDE.contains(&format!("#define SKV_BLOCK_SIZE {BLOCK_SIZE}\n")));
        assert!(
            ATTENTION
                .source
                .contains(&format!("#define SKV_MAX_THREADS {MAX_HEAD_DIM}\n"))
        );
    }

    #[test]
    fn attention_threads_cover_the_head_in_whole_warps() {
        assert_eq!(attention_threads(64), Some(64));
        assert_eq!(attention_threads(80), Some(96));
        assert_eq!(attention_threads(8), Some(32));
        assert_eq!(attention_threads(256), Some(256));
        assert_eq!(attention_threads(257), None);
        assert_eq!(attention_threads(0), None);
    }
}
