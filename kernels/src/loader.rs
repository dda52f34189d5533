//! Loading the registry's kernels into a CUDA context: each source is compiled once for the
//! context's compute capability (through a [`PtxCache`]) and loaded once as a module; functions
//! are looked up by entry point name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, DriverError};

use crate::nvrtc::{CompileKernelError, ComputeCapability, PtxCache};
use crate::registry;

/// Why a kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadKernelError {
    /// No registered source defines the entry point.
    #[error("no kernel source defines the entry point {entry_point}")]
    UnknownEntryPoint {
        /// The name asked for.
        entry_point: String,
    },
    /// The source did not compile.
    #[error(transparent)]
    Compile(#[from] CompileKernelError),
    /// The driver refused an operation.
    #[error("the CUDA driver failed to {action}")]
    Driver {
        /// What was being done.
        action: String,
        /// The driver's error.
        #[source]
        source: DriverError,
    },
}

/// Compiled and loaded kernels of one CUDA context.
#[derive(Debug)]
pub struct KernelLoader {
    ctx: Arc<CudaContext>,
    capability: ComputeCapability,
    cache: PtxCache,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
}

impl KernelLoader {
    /// A loader for `ctx`, targeting its device's compute capability.
    pub fn new(ctx: Arc<CudaContext>) -> Result<Self, LoadKernelError> {
        let (major, minor) =
            ctx.compute_capability()
                .map_err(|source| LoadKernelError::Driver {
                    action: "read the compute capability".to_string(),
                    source,
                })?;
        let capability = ComputeCapability {
            major: major.unsigned_abs(),
            minor: minor.unsigned_abs(),
        };
        Ok(Self {
            ctx,
            capability,
            cache: PtxCache::new(),
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// The device's compute capability.
    pub fn capability(&self) -> ComputeCapability {
        self.capability
    }

    /// The context the kernels are loaded into.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The kernel `entry_point`, compiling and loading its source on first use.
    pub fn function(&self, entry_point: &str) -> Result<CudaFunction, LoadKernelError> {
        let kernel =
            registry::find(entry_point).ok_or_else(|| LoadKernelError::UnknownEntryPoint {
                entry_point: entry_point.to_string(),
            })?;
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
            match modules.get(kernel.name) {
                Some(module) => module.clone(),
                None => {
                    let compiled = self.cache.get_or_compile(kernel, self.capability)?;
                    let module = self.ctx.load_module(compiled.to_ptx()).map_err(|source| {
                        LoadKernelError::Driver {
                            action: format!("load the module {}", kernel.file_name()),
                            source,
                        }
                    })?;
                    tracing::debug!(kernel = kernel.name, capability = %self.capability, "loaded kernel module");
                    modules.insert(kernel.name, module.clone());
                    module
                }
            }
        };
        module
            .load_function(entry_point)
            .map_err(|source| LoadKernelError::Driver {
                action: format!("find {entry_point} in {}", kernel.file_name()),
                source,
            })
    }
}
