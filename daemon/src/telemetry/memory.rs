//! Host memory the daemon may still use: the smaller of the kernel's `MemAvailable` and the
//! headroom under the container's cgroup memory limit. `skillkv serve --kv-cache-fraction`
//! sizes the CPU KV pool from it, measured after the weights are loaded, so a pod's KV pool
//! follows its `resources.limits.memory` instead of a fixed byte count. On a GPU the pool is
//! sized from the device's free memory after the weights instead ([`kv_cache_memory`]).

use std::path::{Path, PathBuf};

use skillkv_api::admin::KvPoolSizing;

/// Why the available memory could not be determined.
#[derive(Debug, thiserror::Error)]
pub enum ReadAvailableMemoryError {
    /// `/proc/meminfo` could not be read.
    #[error("reading {path} failed")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `/proc/meminfo` has no `MemAvailable` line (kernels before 3.14).
    #[error("{0} has no MemAvailable line")]
    NoMemAvailable(PathBuf),
}

/// Where the memory figures are read from: `/proc` and `/sys/fs/cgroup` on a real host, a
/// temporary folder in tests.
#[derive(Debug, Clone)]
pub struct MemorySources {
    /// The `meminfo` file.
    pub meminfo: PathBuf,
    /// The cgroup v2 folder of this process (`memory.max`, `memory.current`).
    pub cgroup_v2: PathBuf,
    /// The cgroup v1 memory controller folder (`memory.limit_in_bytes`, `memory.usage_in_bytes`).
    pub cgroup_v1: PathBuf,
}

impl Default for MemorySources {
    fn default() -> Self {
        Self {
            meminfo: PathBuf::from("/proc/meminfo"),
            cgroup_v2: PathBuf::from("/sys/fs/cgroup"),
            cgroup_v1: PathBuf::from("/sys/fs/cgroup/memory"),
        }
    }
}

/// Memory the process may still allocate, in bytes, with the figure that bounded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AvailableMemory {
    /// The bound, bytes.
    pub bytes: u64,
    /// Whether the cgroup limit (rather than the host's free memory) set it.
    pub cgroup_limited: bool,
}

/// `MemAvailable` from a `meminfo` text, in bytes.
fn parse_mem_available(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemAvailable:")?;
        let mut parts = rest.split_whitespace();
        let value: u64 = parts.next()?.parse().ok()?;
        match parts.next() {
            Some("kB") => Some(value.saturating_mul(1024)),
            None => Some(value),
            Some(_) => None,
        }
    })
}

/// A cgroup byte figure; `None` for "max", an absurdly large v1 "unlimited" or junk.
fn parse_cgroup_bytes(text: &str) -> Option<u64> {
    let value: u64 = text.trim().parse().ok()?;
    // cgroup v1 writes "unlimited" as a page-rounded i64::MAX.
    (value < (1 << 60)).then_some(value)
}

/// Headroom under a cgroup limit: limit minus usage, if both files exist and a limit is set.
fn cgroup_headroom(limit_file: &Path, usage_file: &Path) -> Option<u64> {
    let limit = parse_cgroup_bytes(&std::fs::read_to_string(limit_file).ok()?)?;
    let usage = parse_cgroup_bytes(&std::fs::read_to_string(usage_file).ok()?)?;
    Some(limit.saturating_sub(usage))
}

/// The memory this process may still use.
pub fn available_memory(
    sources: &MemorySources,
) -> Result<AvailableMemory, ReadAvailableMemoryError> {
    let meminfo = std::fs::read_to_string(&sources.meminfo).map_err(|source| {
        ReadAvailableMemoryError::Read {
            path: sources.meminfo.clone(),
            source,
        }
    })?;
    let host = parse_mem_available(&meminfo)
        .ok_or_else(|| ReadAvailableMemoryError::NoMemAvailable(sources.meminfo.clone()))?;
    let cgroup = cgroup_headroom(
        &sources.cgroup_v2.join("memory.max"),
        &sources.cgroup_v2.join("memory.current"),
    )
    .or_else(|| {
        cgroup_headroom(
            &sources.cgroup_v1.join("memory.limit_in_bytes"),
            &sources.cgroup_v1.join("memory.usage_in_bytes"),
        )
    });
    Ok(match cgroup {
        Some(headroom) if headroom < host => AvailableMemory {
            bytes: headroom,
            cgroup_limited: true,
        },
        _ => AvailableMemory {
            bytes: host,
            cgroup_limited: false,
        },
    })
}

/// The memory a `kvCacheFraction` is taken of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheMemory {
    /// Bytes available.
    pub bytes: u64,
    /// Device or host memory.
    pub source: KvPoolSizing,
    /// Whether a cgroup limit (rather than the host's free memory) bounded a host figure.
    pub cgroup_limited: bool,
}

impl KvCacheMemory {
    /// `fraction` (clamped to `0..=1`) of the memory, bytes.
    pub fn share(&self, fraction: f64) -> usize {
        let share = self.bytes as f64 * fraction.clamp(0.0, 1.0);
        usize::try_from(share as u64).unwrap_or(usize::MAX)
    }
}

/// What the KV pool of an engine is sized from after the weights are loaded: the GPU's free
/// memory when the engine runs on one (`device_free`), else the host's available memory read
/// from `sources`.
pub fn kv_cache_memory(
    device_free: Option<u64>,
    sources: &MemorySources,
) -> Result<KvCacheMemory, ReadAvailableMemoryError> {
    Ok(match device_free {
        Some(bytes) => KvCacheMemory {
            bytes,
            source: KvPoolSizing::DeviceMemory,
            cgroup_limited: false,
        },
        None => {
            let host = available_memory(sources)?;
            KvCacheMemory {
                bytes: host.bytes,
                source: KvPoolSizing::HostMemory,
                cgroup_limited: host.cgroup_limited,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\nBuffers:          1000 kB\n";

    fn sources(dir: &Path) -> MemorySources {
        let v2 = dir.join("v2");
        let v1 = dir.join("v1");
        std::fs::create_dir_all(&v2).expect("v2 dir");
        std::fs::create_dir_all(&v1).expect("v1 dir");
        std::fs::write(dir.join("meminfo"), MEMINFO).expect("meminfo");
        MemorySources {
            meminfo: dir.join("meminfo"),
            cgroup_v2: v2,
            cgroup_v1: v1,
        }
    }

    #[test]
    fn mem_available_is_read_in_bytes() {
        assert_eq!(parse_mem_available(MEMINFO), Some(20_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: 12 MB\n"), None);
    }

    #[test]
    fn without_a_cgroup_limit_the_host_figure_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sources = sources(dir.path());
        std::fs::write(sources.cgroup_v2.join("memory.max"), "max\n").expect("max");
        std::fs::write(sources.cgroup_v2.join("memory.current"), "1000\n").expect("current");
        let available = available_memory(&sources).expect("available");
        assert_eq!(available.bytes, 20_000_000 * 1024);
        assert!(!available.cgroup_limited);
    }

    #[test]
    fn a_cgroup_v2_limit_below_the_host_bounds_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sources = sources(dir.path());
        std::fs::write(sources.cgroup_v2.join("memory.max"), "4294967296\n").expect("max");
        std::fs::write(sources.cgroup_v2.join("memory.current"), "1073741824\n").expect("cur");
        let available = available_memory(&sources).expect("available");
        assert_eq!(available.bytes, 3 * 1024 * 1024 * 1024);
        assert!(available.cgroup_limited);
    }

    #[test]
    fn cgroup_v1_is_the_fallback_and_its_unlimited_value_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sources = sources(dir.path());
        let v1 = &sources.cgroup_v1;
        std::fs::write(v1.join("memory.limit_in_bytes"), "2147483648").expect("limit");
        std::fs::write(v1.join("memory.usage_in_bytes"), "1073741824").expect("usage");
        assert_eq!(available_memory(&sources).expect("v1").bytes, 1 << 30);
        std::fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712").expect("unl");
        let available = available_memory(&sources).expect("unlimited");
        assert!(!available.cgroup_limited);
    }

    #[test]
    fn a_missing_meminfo_is_a_typed_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sources = MemorySources {
            meminfo: dir.path().join("absent"),
            ..MemorySources::default()
        };
        assert!(matches!(
            available_memory(&sources),
            Err(ReadAvailableMemoryError::Read { .. })
        ));
    }

    #[test]
    fn the_kv_cache_takes_its_share_of_the_gpu_when_there_is_one_else_of_the_host() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sources = sources(dir.path());
        let gpu = kv_cache_memory(Some(80 << 30), &sources).expect("device figure");
        assert_eq!(gpu.source, KvPoolSizing::DeviceMemory);
        assert_eq!(gpu.share(0.5), 40 << 30);
        let host = kv_cache_memory(None, &sources).expect("host figure");
        assert_eq!(host.source, KvPoolSizing::HostMemory);
        assert_eq!(host.bytes, 20_000_000 * 1024);
        assert_eq!(host.share(0.25), 5_000_000 * 1024);
        // Out-of-range fractions are clamped, never more than all of it.
        assert_eq!(host.share(1.5), 20_000_000 * 1024);
        assert_eq!(host.share(-1.0), 0);
        // On a GPU the host's files are not read at all.
        let nowhere = MemorySources {
            meminfo: dir.path().join("absent"),
            ..MemorySources::default()
        };
        assert!(kv_cache_memory(Some(1), &nowhere).is_ok());
        assert!(kv_cache_memory(None, &nowhere).is_err());
    }

    #[test]
    fn this_host_reports_some_memory() {
        let available = available_memory(&MemorySources::default()).expect("a Linux host");
        assert!(available.bytes > 0);
    }
}
