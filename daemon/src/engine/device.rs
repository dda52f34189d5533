//! Which hardware the engine runs on: the `--device auto|cpu|cuda[:N]` request, the choice
//! made from it and why. `auto` takes CUDA device 0 when the driver, NVRTC and cuBLAS load and
//! the device exists (and the binary was built with the `cuda` feature), else the CPU; an
//! explicit `cuda:N` that cannot be used is a typed error, never a silent fallback. The choice
//! and its reason are logged and reported in `/admin/v1/state` ([`DeviceInfo`]).

use std::fmt;
use std::str::FromStr;
#[cfg(feature = "cuda")]
use std::sync::Arc;

use skillkv_api::admin::{DeviceInfo, DeviceKind};

/// What `--device` asked for. The library default is the CPU (deterministic, what tests
/// expect); the CLI's default is `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// The GPU when one is usable, else the CPU.
    Auto,
    /// The CPU.
    #[default]
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

/// A `--device` value that is none of `auto`, `cpu`, `cuda`, `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a device: use auto, cpu, cuda or cuda:N (N the device ordinal)")]
pub struct ParseDeviceError(String);

impl FromStr for DeviceRequest {
    type Err = ParseDeviceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || ParseDeviceError(text.to_string());
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|ordinal| ordinal.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(invalid),
        }
    }
}

/// Why the requested device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SelectDeviceError {
    /// `cuda:N` on a binary built without the `cuda` feature.
    #[error(
        "--device {request} needs a daemon built with the `cuda` feature; this one runs on the \
         CPU only (use --device cpu or auto)"
    )]
    NotBuilt {
        /// The request.
        request: DeviceRequest,
    },
    /// The device, a library or NVRTC is missing or failed.
    #[cfg(feature = "cuda")]
    #[error("--device cuda:{ordinal} cannot be used")]
    Unavailable {
        /// The device asked for.
        ordinal: usize,
        /// What is missing.
        #[source]
        source: skillkv_kernels::gemm::OpenGpuError,
    },
}

/// The device the model is loaded onto.
#[derive(Debug, Clone, Default)]
pub enum EngineDevice {
    /// The CPU backend.
    #[default]
    Cpu,
    /// The GPU's code path on the host: the resident forward pass and device pool through
    /// the kernels' Rust references. Slow (no SIMD, dense f32 weights); it lets tests run the
    /// whole engine — pool, copies, store — as on a GPU where no GPU is. Not a `--device`.
    HostKernels,
    /// The CUDA backend on this open device.
    #[cfg(feature = "cuda")]
    Cuda(Arc<skillkv_kernels::gemm::GpuDevice>),
}

impl EngineDevice {
    /// Free memory of the GPU now, bytes (the driver's `cuMemGetInfo` for this device); `None`
    /// on the host, an error when the driver cannot say.
    ///
    /// The driver's figure rather than NVML's: NVML numbers devices in PCI order whatever
    /// `CUDA_VISIBLE_DEVICES` says, so its device `N` need not be `cuda:N`; the driver's is the
    /// device the pool is allocated on.
    pub fn free_memory_bytes(&self) -> Result<Option<u64>, ReadDeviceMemoryError> {
        match self {
            Self::Cpu | Self::HostKernels => Ok(None),
            #[cfg(feature = "cuda")]
            Self::Cuda(device) => device
                .memory()
                .map(|memory| Some(memory.free as u64))
                .map_err(|source| ReadDeviceMemoryError(Box::new(source))),
        }
    }
}

/// The GPU could not say how much memory is free.
#[derive(Debug, thiserror::Error)]
#[error("reading the GPU's free memory failed")]
pub struct ReadDeviceMemoryError(#[source] Box<dyn std::error::Error + Send + Sync>);

/// The outcome of [`select_device`]: the device and what to report about it.
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    /// Where the model runs.
    pub device: EngineDevice,
    /// Kind, name, memory and the reason, for the log and `/admin/v1/state`.
    pub info: DeviceInfo,
}

impl SelectedDevice {
    /// The CPU, for `reason`.
    fn cpu(reason: String) -> Self {
        Self {
            device: EngineDevice::Cpu,
            info: DeviceInfo {
                kind: DeviceKind::Cpu,
                ordinal: None,
                name: None,
                memory_total_bytes: None,
                memory_free_bytes: None,
                memory_free_after_weights_bytes: None,
                reason,
            },
        }
    }
}

/// The error and its sources as one line (`a: b: c`), for reasons and logs.
#[cfg(any(feature = "cuda", test))]
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Opens CUDA device `ordinal` for the engine: the driver, the device, cuBLAS and NVRTC (for
/// the kernels) must all be there; the first one missing is the error.
#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize, reason: &str) -> Result<SelectedDevice, SelectDeviceError> {
    use skillkv_kernels::gemm::{GpuDevice, OpenGpuError};
    let unavailable = |source| SelectDeviceError::Unavailable { ordinal, source };
    let device = GpuDevice::open(ordinal).map_err(unavailable)?;
    skillkv_kernels::probe::nvrtc().map_err(|probe| unavailable(OpenGpuError::from(probe)))?;
    let memory = device.memory().ok();
    let info = DeviceInfo {
        kind: DeviceKind::Cuda,
        ordinal: Some(ordinal),
        name: Some(device.name().to_string()),
        memory_total_bytes: memory.map(|m| m.total as u64),
        memory_free_bytes: memory.map(|m| m.free as u64),
        memory_free_after_weights_bytes: None,
        reason: reason.to_string(),
    };
    Ok(SelectedDevice {
        device: EngineDevice::Cuda(Arc::new(device)),
        info,
    })
}

/// Chooses the device for `request` (see the module docs) and logs the choice.
pub fn select_device(request: DeviceRequest) -> Result<SelectedDevice, SelectDeviceError> {
    let selected = match request {
        DeviceRequest::Cpu => SelectedDevice::cpu("requested with --device cpu".to_string()),
        #[cfg(not(feature = "cuda"))]
        DeviceRequest::Cuda(_) => return Err(SelectDeviceError::NotBuilt { request }),
        #[cfg(not(feature = "cuda"))]
        DeviceRequest::Auto => SelectedDevice::cpu(
            "--device auto: this daemon was built without the `cuda` feature".to_string(),
        ),
        #[cfg(feature = "cuda")]
        DeviceRequest::Cuda(ordinal) => {
            open_cuda(ordinal, &format!("requested with --device cuda:{ordinal}"))?
        }
        #[cfg(feature = "cuda")]
        DeviceRequest::Auto => match open_cuda(
            0,
            "--device auto: the CUDA driver, NVRTC and cuBLAS loaded and device 0 exists",
        ) {
            Ok(selected) => selected,
            Err(error) => {
                SelectedDevice::cpu(format!("--device auto: no usable GPU ({})", chain(&error)))
            }
        },
    };
    let info = &selected.info;
    tracing::info!(
        device = ?info.kind,
        ordinal = info.ordinal,
        name = info.name.as_deref(),
        memory_total_bytes = info.memory_total_bytes,
        reason = %info.reason,
        "engine device selected"
    );
    Ok(selected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_requests_parse_and_print_back() {
        for (text, request) in [
            ("auto", DeviceRequest::Auto),
            ("cpu", DeviceRequest::Cpu),
            ("CPU", DeviceRequest::Cpu),
            ("cuda", DeviceRequest::Cuda(0)),
            ("cuda:3", DeviceRequest::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceRequest>(), Ok(request), "{text}");
        }
        assert_eq!(DeviceRequest::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "metal", ""] {
            let error = bad.parse::<DeviceRequest>().unwrap_err();
            assert!(
                error.to_string().contains("auto, cpu, cuda"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn cpu_is_chosen_when_asked_for() {
        let selected = select_device(DeviceRequest::Cpu).expect("the CPU is always there");
        assert!(matches!(selected.device, EngineDevice::Cpu));
        assert_eq!(selected.info.kind, DeviceKind::Cpu);
        assert!(selected.info.reason.contains("--device cpu"));
    }

    #[test]
    fn auto_says_why_it_chose_what_it_chose() {
        let selected = select_device(DeviceRequest::Auto).expect("auto never fails");
        match selected.info.kind {
            DeviceKind::Cpu => {
                assert!(matches!(selected.device, EngineDevice::Cpu));
                // Without a GPU the reason names what is missing.
                assert!(
                    selected.info.reason.contains("cuda") || selected.info.reason.contains("GPU"),
                    "{}",
                    selected.info.reason
                );
            }
            DeviceKind::Cuda => {
                assert_eq!(selected.info.ordinal, Some(0));
                assert!(selected.info.name.is_some());
            }
        }
    }

    #[test]
    fn an_unusable_cuda_device_is_a_typed_error() {
        // Device 4096 exists nowhere; without the feature, any CUDA request is refused.
        let error = select_device(DeviceRequest::Cuda(4096)).unwrap_err();
        let text = chain(&error);
        assert!(text.contains("cuda:4096"), "{text}");
        #[cfg(not(feature = "cuda"))]
        assert!(matches!(error, SelectDeviceError::NotBuilt { .. }));
        #[cfg(feature = "cuda")]
        assert!(matches!(
            error,
            SelectDeviceError::Unavailable { ordinal: 4096, .. }
        ));
    }
}
