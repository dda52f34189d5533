//! The NVRTC compile check CI runs: every kernel source of the registry compiles for sm_80 and
//! sm_90 with no error and no warning. Needs libnvrtc (PyPI's nvidia-cuda-nvrtc-cu12, which
//! `make test` installs into .venv and puts on LD_LIBRARY_PATH), not a GPU. Without the library
//! it prints "skipped: libnvrtc not found" and passes, unless SKILLKV_REQUIRE_NVRTC=1 (set by
//! `make rust-test`), which turns a missing library into a failure.
#![cfg(feature = "cuda")]

use skillkv_kernels::nvrtc::{self, CompileKernelError, ComputeCapability};
use skillkv_kernels::probe;
use skillkv_kernels::registry::{KERNELS, KernelSource};

/// Whether NVRTC is there; panics when it is required and missing.
fn nvrtc_or_skip() -> bool {
    let required = std::env::var("SKILLKV_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    match probe::nvrtc() {
        Ok(()) => true,
        Err(error) if required => panic!("SKILLKV_REQUIRE_NVRTC=1 but {error}"),
        Err(_) => {
            println!("skipped: libnvrtc not found");
            false
        }
    }
}

#[test]
fn every_kernel_compiles_for_sm_80_and_sm_90_without_warnings() {
    if !nvrtc_or_skip() {
        return;
    }
    let mut failures = Vec::new();
    for capability in [ComputeCapability::SM_80, ComputeCapability::SM_90] {
        for kernel in KERNELS {
            match nvrtc::check(kernel, capability) {
                Ok(compiled) => {
                    for entry in kernel.entry_points {
                        assert!(
                            compiled.ptx.contains(&format!(".entry {entry}(")),
                            "{} for {capability}: no PTX entry {entry}",
                            kernel.name
                        );
                    }
                    assert!(
                        compiled.ptx.contains(&format!(
                            ".target sm_{}{}",
                            capability.major, capability.minor
                        )),
                        "{} for {capability}: wrong PTX target",
                        kernel.name
                    );
                }
                Err(error) => failures.push(error.to_string()),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn the_check_rejects_warnings_and_reports_errors_with_the_log() {
    if !nvrtc_or_skip() {
        return;
    }
    static WARNS: KernelSource = KernelSource {
        name: "warns",
        source: "extern \"C\" __global__ void warns(float* x) { int unused = 1; x[0] = 0.0f; }\n",
        entry_points: &["warns"],
    };
    static BROKEN: KernelSource = KernelSource {
        name: "broken",
        source: "extern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }\n",
        entry_points: &["broken"],
    };
    // A warning compiles, but fails the check, with NVRTC's log.
    let compiled = nvrtc::compile(&WARNS, ComputeCapability::SM_80).expect("compiles");
    assert!(compiled.log.contains("warning"), "{}", compiled.log);
    match nvrtc::check(&WARNS, ComputeCapability::SM_80) {
        Err(CompileKernelError::Warnings { file, log, .. }) => {
            assert_eq!(file, "warns.cu");
            assert!(log.contains("unused"), "{log}");
        }
        other => panic!("expected a warnings error, got {other:?}"),
    }
    // An error fails the compilation, with the line in the log.
    match nvrtc::compile(&BROKEN, ComputeCapability::SM_90) {
        Err(CompileKernelError::Compile { file, log, .. }) => {
            assert_eq!(file, "broken.cu");
            assert!(log.contains("undefined_name"), "{log}");
            assert!(log.contains("broken.cu(1)"), "{log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}

#[test]
fn the_cache_compiles_each_source_and_target_once() {
    if !nvrtc_or_skip() {
        return;
    }
    let cache = nvrtc::PtxCache::new();
    let first = cache
        .get_or_compile(&KERNELS[0], ComputeCapability::SM_90)
        .expect("compiles");
    let again = cache
        .get_or_compile(&KERNELS[0], ComputeCapability::SM_90)
        .expect("cached");
    assert!(std::sync::Arc::ptr_eq(&first, &again));
    cache
        .get_or_compile(&KERNELS[0], ComputeCapability::SM_80)
        .expect("compiles");
    assert_eq!(cache.len(), 2);
}
