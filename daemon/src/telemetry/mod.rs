//! GPU telemetry through NVML. When NVML cannot be initialised (no driver, no GPU, a CPU-only
//! node) the daemon is in the "no GPU" state: [`GpuTelemetry::sample`] reports no devices and
//! the metrics say `skillkv_gpu_present 0`. Figures a device does not report are `None`.
//!
//! Critical XID errors (the driver's reports of GPU faults) arrive as NVML events: a watcher
//! thread waits on an event set registered for every device and counts them per device.

pub mod memory;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::error::NvmlError;

/// How long one wait for NVML events blocks before the watcher checks again.
const XID_WAIT_MS: u32 = 5_000;

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
    /// Critical XID errors seen since the daemon started (`None` when the device does not
    /// deliver XID events).
    pub xid_errors: Option<u64>,
}

/// Access to NVML, or the knowledge that there is none.
#[derive(Debug)]
pub struct GpuTelemetry {
    nvml: Option<Arc<Nvml>>,
    /// XID errors per device index, for devices whose events are watched.
    xid_errors: Arc<Mutex<BTreeMap<u32, u64>>>,
}

impl GpuTelemetry {
    /// Initialises NVML; failure means "no GPU" and is logged, not returned.
    pub fn init() -> Self {
        match Nvml::init() {
            Ok(nvml) => {
                tracing::info!("NVML initialised; GPU telemetry on");
                let nvml = Arc::new(nvml);
                let xid_errors = Arc::new(Mutex::new(BTreeMap::new()));
                watch_xid_errors(nvml.clone(), xid_errors.clone());
                Self {
                    nvml: Some(nvml),
                    xid_errors,
                }
            }
            Err(error) => {
                tracing::info!(%error, "NVML unavailable; no GPU telemetry");
                Self::absent()
            }
        }
    }

    /// The "no GPU" state.
    pub fn absent() -> Self {
        Self {
            nvml: None,
            xid_errors: Arc::default(),
        }
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
        let xids = self
            .xid_errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
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
                    xid_errors: xids.get(&index).copied(),
                })
            })
            .collect()
    }
}

/// Starts the thread that counts critical XID errors of every device that delivers them.
fn watch_xid_errors(nvml: Arc<Nvml>, counts: Arc<Mutex<BTreeMap<u32, u64>>>) {
    let spawned = std::thread::Builder::new()
        .name("skillkv-nvml-xid".to_string())
        .spawn(move || {
            let Ok(mut set) = nvml.create_event_set() else {
                tracing::info!("NVML event sets unavailable; XID errors are not counted");
                return;
            };
            let count = nvml.device_count().unwrap_or(0);
            for index in 0..count {
                let Ok(device) = nvml.device_by_index(index) else {
                    continue;
                };
                match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                    Ok(registered) => {
                        set = registered;
                        counts
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .insert(index, 0);
                    }
                    Err(error) => {
                        tracing::info!(gpu = index, error = %error.error, "XID events unavailable");
                        // A failed registration frees the set; start a new one for the rest.
                        match nvml.create_event_set() {
                            Ok(fresh) => set = fresh,
                            Err(_) => return,
                        }
                    }
                }
            }
            loop {
                match set.wait(XID_WAIT_MS) {
                    Ok(event) => {
                        let index = event.device.index().unwrap_or(u32::MAX);
                        tracing::error!(gpu = index, xid = ?event.event_data, "GPU reported a critical XID error");
                        *counts
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .entry(index)
                            .or_insert(0) += 1;
                    }
                    Err(NvmlError::Timeout) => {}
                    Err(error) => {
                        tracing::warn!(%error, "waiting for NVML events failed; XID watcher stops");
                        return;
                    }
                }
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start the XID watcher");
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
