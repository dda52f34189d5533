//! GPU telemetry through NVML. When NVML cannot be initialised (no driver, no GPU, a CPU-only
//! node) the daemon is in the "no GPU" state: [`GpuTelemetry::sample`] reports no devices and
//! the metrics say `skillkv_gpu_present 0`. Figures a device does not report are `None`.

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};

/// One GPU's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuSample {
    /// NVML device index.
    pub index: u32,
    /// Memory in use, bytes.
    pub memory_used_bytes: u64,
    /// Memory installed, bytes.
    pub memory_total_bytes: u64,
    /// Percent of the last sample period a kernel ran.
    pub utilization_percent: u32,
    /// Die temperature, °C.
    pub temperature_celsius: Option<u32>,
    /// Power draw, milliwatts.
    pub power_milliwatts: Option<u32>,
    /// Uncorrected ECC errors since the driver loaded.
    pub uncorrected_ecc_errors: Option<u64>,
}

/// Access to NVML, or the knowledge that there is none.
#[derive(Debug)]
pub struct GpuTelemetry {
    nvml: Option<Nvml>,
}

impl GpuTelemetry {
    /// Initialises NVML; failure means "no GPU" and is logged, not returned.
    pub fn init() -> Self {
        match Nvml::init() {
            Ok(nvml) => {
                tracing::info!("NVML initialised; GPU telemetry on");
                Self { nvml: Some(nvml) }
            }
            Err(error) => {
                tracing::info!(%error, "NVML unavailable; no GPU telemetry");
                Self::absent()
            }
        }
    }

    /// The "no GPU" state.
    pub fn absent() -> Self {
        Self { nvml: None }
    }

    /// Whether NVML is available.
    pub fn present(&self) -> bool {
        self.nvml.is_some()
    }

    /// Current figures of every GPU NVML can read (devices that fail to answer are skipped).
    pub fn sample(&self) -> Vec<GpuSample> {
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        let count = match nvml.device_count() {
            Ok(count) => count,
            Err(error) => {
                tracing::warn!(%error, "NVML device count failed");
                return Vec::new();
            }
        };
        (0..count)
            .filter_map(|index| {
                let device = nvml.device_by_index(index).ok()?;
                let memory = device.memory_info().ok()?;
                let utilization = device.utilization_rates().map(|u| u.gpu).unwrap_or(0);
                Some(GpuSample {
                    index,
                    memory_used_bytes: memory.used,
                    memory_total_bytes: memory.total,
                    utilization_percent: utilization,
                    temperature_celsius: device.temperature(TemperatureSensor::Gpu).ok(),
                    power_milliwatts: device.power_usage().ok(),
                    uncorrected_ecc_errors: device
                        .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                        .ok(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_nvml_reports_no_devices() {
        let telemetry = GpuTelemetry::absent();
        assert!(!telemetry.present());
        assert!(telemetry.sample().is_empty());
    }
}
