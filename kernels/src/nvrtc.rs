//! Run-time compilation of the registry's kernels with NVRTC for one compute capability, and
//! an in-process cache of the resulting PTX. The NVRTC log is read after every compilation,
//! successful or not, so [`check`] can treat any diagnostic (warnings included) as a failure;
//! cudarc's safe `compile_ptx` drops the log of a successful compilation, hence the direct,
//! `unsafe` calls into `cudarc::nvrtc::result` below (FFI, each justified in place).

use std::collections::HashMap;
use std::ffi::{CString, c_char};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::nvrtc::result::{self as nvrtc, NvrtcError};
use cudarc::nvrtc::{Ptx, sys::nvrtcProgram};

use crate::probe::{self, ProbeError};
use crate::registry::KernelSource;

/// A CUDA compute capability, e.g. 8.0 for A100, 9.0 for H100/H200.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ComputeCapability {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

impl ComputeCapability {
    /// Ampere data centre GPUs (A100, A30).
    pub const SM_80: Self = Self { major: 8, minor: 0 };
    /// Hopper (H100, H200).
    pub const SM_90: Self = Self { major: 9, minor: 0 };
}

impl fmt::Display for ComputeCapability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm_{}{}", self.major, self.minor)
    }
}

/// The NVRTC options every kernel is compiled with: PTX for the virtual architecture of
/// `capability` (the driver JIT-compiles it for the device), functions `__device__` by
/// default, C++17.
pub fn compile_options(capability: ComputeCapability) -> Vec<String> {
    vec![
        format!(
            "--gpu-architecture=compute_{}{}",
            capability.major, capability.minor
        ),
        "-default-device".to_string(),
        "-std=c++17".to_string(),
    ]
}

/// Why compiling a kernel source failed.
#[derive(Debug, thiserror::Error)]
pub enum CompileKernelError {
    /// NVRTC cannot be loaded.
    #[error("cannot compile kernels")]
    Unavailable(#[from] ProbeError),
    /// The source contains a NUL byte.
    #[error("the source of {file} contains a NUL byte")]
    NulInSource {
        /// The source's file name.
        file: String,
    },
    /// NVRTC refused to create the program.
    #[error("NVRTC could not create the program {file}")]
    Create {
        /// The source's file name.
        file: String,
        /// NVRTC's error.
        #[source]
        source: NvrtcError,
    },
    /// The source did not compile.
    #[error("NVRTC failed to compile {file} for {capability} ({source}):\n{log}")]
    Compile {
        /// The source's file name.
        file: String,
        /// The target.
        capability: ComputeCapability,
        /// NVRTC's error.
        #[source]
        source: NvrtcError,
        /// NVRTC's log.
        log: String,
    },
    /// The source compiled, with diagnostics ([`check`] only).
    #[error(
        "NVRTC compiled {file} for {capability} with diagnostics (warnings fail the check):\n{log}"
    )]
    Warnings {
        /// The source's file name.
        file: String,
        /// The target.
        capability: ComputeCapability,
        /// NVRTC's log.
        log: String,
    },
    /// NVRTC failed to hand out the log or the PTX.
    #[error("NVRTC failed to return the {what} of {file}")]
    Output {
        /// "log" or "PTX".
        what: &'static str,
        /// The source's file name.
        file: String,
        /// NVRTC's error.
        #[source]
        source: NvrtcError,
    },
}

/// A kernel source compiled for one compute capability.
#[derive(Debug, Clone)]
pub struct CompiledKernel {
    /// The source.
    pub kernel: &'static KernelSource,
    /// The target.
    pub capability: ComputeCapability,
    /// The PTX text.
    pub ptx: String,
    /// NVRTC's log (empty when clean).
    pub log: String,
}

impl CompiledKernel {
    /// The PTX in the form cudarc's `CudaContext::load_module` takes.
    pub fn to_ptx(&self) -> Ptx {
        Ptx::from_src(self.ptx.clone())
    }
}

/// An NVRTC program, destroyed on drop.
struct Program(nvrtcProgram);

impl Drop for Program {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: FFI: the program came from `create_program` and is destroyed only here. A
        // failure to free it cannot be acted on.
        let _ = unsafe { nvrtc::destroy_program(self.0) };
    }
}

/// Text of a NUL-terminated buffer NVRTC filled.
fn text(buffer: &[c_char]) -> String {
    let bytes: Vec<u8> = buffer
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles `kernel` for `capability`; the result carries NVRTC's log, which may hold warnings.
#[allow(unsafe_code)]
pub fn compile(
    kernel: &'static KernelSource,
    capability: ComputeCapability,
) -> Result<CompiledKernel, CompileKernelError> {
    probe::nvrtc()?;
    let file = kernel.file_name();
    let source = CString::new(kernel.full_source())
        .map_err(|_| CompileKernelError::NulInSource { file: file.clone() })?;
    let name = CString::new(file.clone())
        .map_err(|_| CompileKernelError::NulInSource { file: file.clone() })?;
    let program = nvrtc::create_program(&source, Some(&name))
        .map(Program)
        .map_err(|source| CompileKernelError::Create {
            file: file.clone(),
            source,
        })?;
    let options = compile_options(capability);
    // SAFETY: FFI: `program` is live (created above, destroyed on drop after these calls), and
    // `source`/`name` outlive it.
    let compiled = unsafe { nvrtc::compile_program(program.0, &options) };
    // SAFETY: as above.
    let log = unsafe { nvrtc::get_program_log(program.0) }
        .map(|buffer| text(&buffer))
        .map_err(|source| CompileKernelError::Output {
            what: "log",
            file: file.clone(),
            source,
        })?;
    if let Err(source) = compiled {
        return Err(CompileKernelError::Compile {
            file,
            capability,
            source,
            log,
        });
    }
    // SAFETY: as above; the program compiled.
    let ptx = unsafe { nvrtc::get_ptx(program.0) }
        .map(|buffer| text(&buffer))
        .map_err(|source| CompileKernelError::Output {
            what: "PTX",
            file: file.clone(),
            source,
        })?;
    tracing::debug!(kernel = kernel.name, %capability, ptx_bytes = ptx.len(), "compiled kernel");
    Ok(CompiledKernel {
        kernel,
        capability,
        ptx,
        log,
    })
}

/// [`compile`], failing on any diagnostic in NVRTC's log (the CI check).
pub fn check(
    kernel: &'static KernelSource,
    capability: ComputeCapability,
) -> Result<CompiledKernel, CompileKernelError> {
    let compiled = compile(kernel, capability)?;
    if compiled.log.trim().is_empty() {
        Ok(compiled)
    } else {
        Err(CompileKernelError::Warnings {
            file: kernel.file_name(),
            capability,
            log: compiled.log,
        })
    }
}

/// Compiled kernels by (source, capability), compiled on first use and kept for the process.
#[derive(Debug, Default)]
pub struct PtxCache {
    entries: Mutex<HashMap<(&'static str, ComputeCapability), Arc<CompiledKernel>>>,
}

impl PtxCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The compiled `kernel` for `capability`, compiling it (with [`compile`]) when absent.
    pub fn get_or_compile(
        &self,
        kernel: &'static KernelSource,
        capability: ComputeCapability,
    ) -> Result<Arc<CompiledKernel>, CompileKernelError> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(compiled) = entries.get(&(kernel.name, capability)) {
            return Ok(compiled.clone());
        }
        let compiled = Arc::new(compile(kernel, capability)?);
        if !compiled.log.trim().is_empty() {
            tracing::warn!(kernel = kernel.name, %capability, log = %compiled.log, "NVRTC diagnostics");
        }
        entries.insert((kernel.name, capability), compiled.clone());
        Ok(compiled)
    }

    /// Number of compiled entries.
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether nothing was compiled yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_target_the_virtual_architecture_with_cpp17() {
        assert_eq!(
            compile_options(ComputeCapability::SM_90),
            vec![
                "--gpu-architecture=compute_90",
                "-default-device",
                "-std=c++17"
            ]
        );
        assert_eq!(ComputeCapability::SM_80.to_string(), "sm_80");
    }

    #[test]
    fn without_nvrtc_compiling_is_a_typed_error_not_a_panic() {
        if probe::nvrtc().is_ok() {
            println!("skipped: libnvrtc is present (tests/nvrtc_compile.rs covers compiling)");
            return;
        }
        let error = compile(&crate::registry::ROPE, ComputeCapability::SM_80).unwrap_err();
        assert!(matches!(
            error,
            CompileKernelError::Unavailable(ProbeError::NvrtcMissing)
        ));
        let cache = PtxCache::new();
        assert!(
            cache
                .get_or_compile(&crate::registry::ROPE, ComputeCapability::SM_80)
                .is_err()
        );
        assert!(cache.is_empty());
    }
}
