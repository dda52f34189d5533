//! What the GPU test binaries share: device 0 with its kernel loader (or "skipped: no GPU"),
//! launching, reproducible random inputs and a float comparison with bounds.
#![allow(dead_code)] // each test binary compiles this module and uses a different part of it

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchArgs, LaunchConfig,
};
use skillkv_kernels::loader::KernelLoader;
use skillkv_kernels::probe;

/// The device, a stream and the kernel loader.
pub struct Gpu {
    pub stream: Arc<CudaStream>,
    pub loader: KernelLoader,
}

impl Gpu {
    /// Device 0, or `None` (after printing why) when there is none or NVRTC is missing.
    pub fn open() -> Option<Self> {
        if let Err(error) = probe::device(0) {
            println!("skipped: no GPU ({error})");
            return None;
        }
        if let Err(error) = probe::nvrtc() {
            println!("skipped: no GPU kernels without NVRTC ({error})");
            return None;
        }
        let ctx = CudaContext::new(0).expect("open device 0");
        let loader = KernelLoader::new(ctx.clone()).expect("kernel loader");
        println!(
            "device: {} ({})",
            ctx.name().unwrap_or_default(),
            loader.capability()
        );
        Some(Self {
            stream: ctx.default_stream(),
            loader,
        })
    }

    pub fn function(&self, entry_point: &str) -> CudaFunction {
        self.loader
            .function(entry_point)
            .unwrap_or_else(|error| panic!("{entry_point}: {error}"))
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> CudaSlice<T> {
        self.stream.clone_htod(host).expect("upload")
    }

    pub fn download<T: DeviceRepr + Default + Clone>(&self, device: &CudaSlice<T>) -> Vec<T> {
        self.stream.clone_dtoh(device).expect("download")
    }
}

/// Launches the prepared kernel.
#[allow(unsafe_code)]
pub fn launch(args: &mut LaunchArgs<'_>, config: LaunchConfig) {
    // SAFETY: FFI kernel launch: each test pushes exactly the arguments of the kernel's C
    // signature (see the .cu sources), with device buffers sized for the grid it launches.
    unsafe { args.launch(config) }.expect("launch");
}

pub fn grid(blocks: (u32, u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: blocks,
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// SplitMix64: reproducible inputs without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-scale, scale).
    pub fn f32s(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
            .collect()
    }

    pub fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n)) as u32
    }
}

pub fn assert_close(what: &str, got: &[f32], expected: &[f32], relative: f32, absolute: f32) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        let bound = absolute + relative * e.abs();
        assert!((g - e).abs() <= bound, "{what}[{i}]: GPU {g}, CPU {e}");
    }
}
