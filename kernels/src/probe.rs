//! Finding out, without panicking, whether the CUDA pieces are there: the NVRTC library, the
//! driver library, cuBLAS, and a device. cudarc loads each library lazily on first use and
//! panics when it is missing, so every entry point of this crate that touches a library asks
//! here first. The presence checks call cudarc's `is_culib_present`, which is an `unsafe fn`
//! only because loading a shared library runs its initialisers; that is the point of the
//! check and the library names are cudarc's fixed candidates.

use cudarc::driver::result::DriverError;
use cudarc::driver::sys::cudaError_enum;

/// Why a CUDA library or device is unavailable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// libnvrtc is not on the library path.
    #[error(
        "the NVRTC library (libnvrtc.so.12) was not found; put its directory on LD_LIBRARY_PATH \
         (e.g. the nvidia/cuda_nvrtc/lib directory of the nvidia-cuda-nvrtc-cu12 wheel)"
    )]
    NvrtcMissing,
    /// libcuda (the driver) is not on the library path: no NVIDIA driver.
    #[error("the CUDA driver library (libcuda.so) was not found: no NVIDIA driver is installed")]
    DriverMissing,
    /// libcublas is not on the library path.
    #[error("the cuBLAS library (libcublas.so.12) was not found")]
    CublasMissing,
    /// The driver is there but failed to initialise.
    #[error("the CUDA driver failed to initialise")]
    DriverInit(#[source] DriverError),
    /// The driver is there and reports no device.
    #[error("the CUDA driver reports no device")]
    NoDevice,
    /// The device asked for does not exist.
    #[error("there is no CUDA device {ordinal}: the driver reports {count}")]
    DeviceOutOfRange {
        /// The ordinal asked for.
        ordinal: usize,
        /// Devices the driver reports.
        count: usize,
    },
}

/// Whether the NVRTC library loads.
#[allow(unsafe_code)]
fn nvrtc_present() -> bool {
    // SAFETY: FFI: dlopen of cudarc's fixed libnvrtc candidates, nothing else is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the driver library loads.
#[allow(unsafe_code)]
fn driver_present() -> bool {
    // SAFETY: FFI: dlopen of cudarc's fixed libcuda candidates, nothing else is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether the cuBLAS library loads.
#[allow(unsafe_code)]
fn cublas_present() -> bool {
    // SAFETY: FFI: dlopen of cudarc's fixed libcublas candidates, nothing else is called.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// `Ok` when NVRTC can be used (kernels can be compiled).
pub fn nvrtc() -> Result<(), ProbeError> {
    if nvrtc_present() {
        Ok(())
    } else {
        Err(ProbeError::NvrtcMissing)
    }
}

/// `Ok` when cuBLAS can be used.
pub fn cublas() -> Result<(), ProbeError> {
    if cublas_present() {
        Ok(())
    } else {
        Err(ProbeError::CublasMissing)
    }
}

/// The number of CUDA devices (at least one), after initialising the driver.
pub fn devices() -> Result<usize, ProbeError> {
    if !driver_present() {
        return Err(ProbeError::DriverMissing);
    }
    match cudarc::driver::result::init() {
        Ok(()) => {}
        Err(DriverError(cudaError_enum::CUDA_ERROR_NO_DEVICE)) => return Err(ProbeError::NoDevice),
        Err(error) => return Err(ProbeError::DriverInit(error)),
    }
    let count = cudarc::driver::result::device::get_count().map_err(ProbeError::DriverInit)?;
    match usize::try_from(count) {
        Ok(0) | Err(_) => Err(ProbeError::NoDevice),
        Ok(count) => Ok(count),
    }
}

/// `Ok` when device `ordinal` exists (the driver loads and reports it).
pub fn device(ordinal: usize) -> Result<(), ProbeError> {
    let count = devices()?;
    if ordinal < count {
        Ok(())
    } else {
        Err(ProbeError::DeviceOutOfRange { ordinal, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_answer_without_panicking_whatever_is_installed() {
        // Whatever this machine has, each probe returns; the errors name what is missing.
        for result in [nvrtc(), cublas(), device(0).map(|_| ())] {
            if let Err(error) = result {
                assert!(!error.to_string().is_empty());
            }
        }
        if let Ok(count) = devices() {
            assert!(count >= 1);
            assert_eq!(
                device(count),
                Err(ProbeError::DeviceOutOfRange {
                    ordinal: count,
                    count
                })
            );
        }
    }
}
