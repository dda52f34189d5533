//! Where a daemon pod finds its model file: the volume, mount and `--model` path generated from
//! a ModelDeployment's `model.uri`, plus the init container that downloads `hf://` models into
//! the node's model cache.

use k8s_openapi::api::core::v1::{
    Container, HostPathVolumeSource, PersistentVolumeClaimVolumeSource, Volume, VolumeMount,
};

/// Where model volumes are mounted in the daemon container.
pub const MODEL_MOUNT: &str = "/models";
/// Name of the model volume.
pub const MODEL_VOLUME: &str = "model";

/// The model volume of a daemon pod and the path the daemon loads.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelMount {
    /// The pod volume holding the model.
    pub volume: Volume,
    /// Its mount in the daemon container (read-only).
    pub mount: VolumeMount,
    /// The `--model` argument.
    pub model_path: String,
    /// An init container that fetches the model first (`hf://` only).
    pub init_container: Option<Container>,
}

/// Why a `model.uri` cannot be turned into a volume.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveModelUriError {
    /// The scheme is none of `file://`, `pvc://`, `hf://`.
    #[error("model.uri {uri:?} must start with file:///, pvc:// or hf://")]
    UnknownScheme {
        /// The offending URI.
        uri: String,
    },
    /// A path segment is missing or unsafe (empty, `..`).
    #[error("model.uri {uri:?} is malformed: {reason}")]
    Malformed {
        /// The offending URI.
        uri: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Inputs of the `hf://` download step.
#[derive(Debug, Clone, Copy)]
pub struct ModelFetch<'a> {
    /// Image of the init container (the daemon image).
    pub image: &'a str,
    /// Pull policy of that image.
    pub pull_policy: &'a str,
    /// Node directory of the model cache.
    pub cache_dir: &'a str,
    /// Expected SHA-256 of the file, checked after download.
    pub sha256: Option<&'a str>,
}

/// Resolves `model.uri` into the pod's model volume.
pub fn resolve_model_uri(
    uri: &str,
    fetch: ModelFetch<'_>,
) -> Result<ModelMount, ResolveModelUriError> {
    if let Some(path) = uri.strip_prefix("file://") {
        let path = checked_path(uri, path, "file:// needs an absolute path")?;
        if !path.starts_with('/') {
            return Err(malformed(uri, "file:// needs an absolute path"));
        }
        let file_name = path.rsplit('/').next().unwrap_or_default();
        let model_path = format!("{MODEL_MOUNT}/{file_name}");
        Ok(ModelMount {
            volume: host_path_volume(MODEL_VOLUME, path, "File"),
            mount: read_only_mount(MODEL_VOLUME, &model_path),
            model_path,
            init_container: None,
        })
    } else if let Some(rest) = uri.strip_prefix("pvc://") {
        let (claim, path) = rest
            .split_once('/')
            .ok_or_else(|| malformed(uri, "pvc:// needs a claim and a path"))?;
        if claim.is_empty() {
            return Err(malformed(uri, "pvc:// needs a claim name"));
        }
        let path = checked_path(uri, path, "pvc:// needs a path inside the claim")?;
        Ok(ModelMount {
            volume: Volume {
                name: MODEL_VOLUME.to_owned(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.to_owned(),
                    read_only: Some(true),
                }),
                ..Volume::default()
            },
            mount: read_only_mount(MODEL_VOLUME, MODEL_MOUNT),
            model_path: format!("{MODEL_MOUNT}/{}", path.trim_start_matches('/')),
            init_container: None,
        })
    } else if let Some(rest) = uri.strip_prefix("hf://") {
        let mut parts = rest.splitn(3, '/');
        let (Some(org), Some(repo), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(malformed(uri, "hf:// needs org/repo/file"));
        };
        if org.is_empty() || repo.is_empty() {
            return Err(malformed(uri, "hf:// needs org/repo/file"));
        }
        let file = checked_path(uri, file, "hf:// needs a file in the repository")?;
        let relative = format!("{org}/{repo}/{file}");
        let model_path = format!("{MODEL_MOUNT}/{relative}");
        Ok(ModelMount {
            volume: host_path_volume(MODEL_VOLUME, fetch.cache_dir, "DirectoryOrCreate"),
            mount: read_only_mount(MODEL_VOLUME, MODEL_MOUNT),
            init_container: Some(download_container(&relative, &model_path, fetch)),
            model_path,
        })
    } else {
        Err(ResolveModelUriError::UnknownScheme {
            uri: uri.to_owned(),
        })
    }
}

fn checked_path<'a>(
    uri: &str,
    path: &'a str,
    reason: &'static str,
) -> Result<&'a str, ResolveModelUriError> {
    if path.is_empty() || path.ends_with('/') {
        return Err(malformed(uri, reason));
    }
    if path.split('/').any(|segment| segment == "..") {
        return Err(malformed(uri, "`..` is not allowed in the path"));
    }
    if path.chars().any(|c| c == '\'' || c.is_control()) {
        return Err(malformed(
            uri,
            "quotes and control characters are not allowed",
        ));
    }
    Ok(path)
}

fn malformed(uri: &str, reason: &'static str) -> ResolveModelUriError {
    ResolveModelUriError::Malformed {
        uri: uri.to_owned(),
        reason,
    }
}

/// A hostPath volume.
pub fn host_path_volume(name: &str, path: &str, type_: &str) -> Volume {
    Volume {
        name: name.to_owned(),
        host_path: Some(HostPathVolumeSource {
            path: path.to_owned(),
            type_: Some(type_.to_owned()),
        }),
        ..Volume::default()
    }
}

fn read_only_mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

/// The init container: downloads the file from the Hugging Face hub into the node cache unless
/// it is there already, into a temporary name first so that pods on the same node never load a
/// partial file, and checks the SHA-256 when one is pinned.
fn download_container(relative: &str, model_path: &str, fetch: ModelFetch<'_>) -> Container {
    let (repo_path, file) = relative
        .match_indices('/')
        .nth(1)
        .map(|(at, _)| (&relative[..at], &relative[at + 1..]))
        .unwrap_or((relative, ""));
    let verify = fetch
        .sha256
        .map(|sha| format!(" && echo '{sha}  '\"$tmp\" | sha256sum -c -"))
        .unwrap_or_default();
    let script = format!(
        "set -eu; target='{model_path}'; if [ -s \"$target\" ]; then exit 0; fi; \
         mkdir -p \"$(dirname \"$target\")\"; tmp=\"$target.partial.$HOSTNAME\"; \
         curl -fsSL --retry 5 -o \"$tmp\" \"${{HF_ENDPOINT:-https://huggingface.co}}/{repo_path}/resolve/main/{file}\"{verify} \
         && mv \"$tmp\" \"$target\""
    );
    Container {
        name: "fetch-model".to_owned(),
        image: Some(fetch.image.to_owned()),
        image_pull_policy: Some(fetch.pull_policy.to_owned()),
        command: Some(vec!["sh".to_owned(), "-c".to_owned(), script]),
        volume_mounts: Some(vec![VolumeMount {
            name: MODEL_VOLUME.to_owned(),
            mount_path: MODEL_MOUNT.to_owned(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FETCH: ModelFetch<'static> = ModelFetch {
        image: "img",
        pull_policy: "IfNotPresent",
        cache_dir: "/var/cache/m",
        sha256: None,
    };

    #[test]
    fn file_uri_mounts_the_file_from_the_node() {
        let mount = resolve_model_uri("file:///data/m/model.gguf", FETCH).expect("resolves");
        let host = mount.volume.host_path.expect("hostPath");
        assert_eq!(host.path, "/data/m/model.gguf");
        assert_eq!(mount.model_path, "/models/model.gguf");
        assert!(mount.init_container.is_none());
    }

    #[test]
    fn pvc_uri_mounts_the_claim_read_only() {
        let mount = resolve_model_uri("pvc://models/llama/q4.gguf", FETCH).expect("resolves");
        let claim = mount.volume.persistent_volume_claim.expect("pvc");
        assert_eq!(claim.claim_name, "models");
        assert_eq!(claim.read_only, Some(true));
        assert_eq!(mount.model_path, "/models/llama/q4.gguf");
    }

    #[test]
    fn hf_uri_downloads_into_the_node_cache_and_checks_the_pin() {
        let sha = "a".repeat(64);
        let fetch = ModelFetch {
            sha256: Some(&sha),
            ..FETCH
        };
        let mount = resolve_model_uri("hf://org/repo/sub/m.gguf", fetch).expect("resolves");
        assert_eq!(mount.model_path, "/models/org/repo/sub/m.gguf");
        assert_eq!(
            mount.volume.host_path.expect("hostPath").path,
            "/var/cache/m"
        );
        let init = mount.init_container.expect("init container");
        let script = init.command.expect("command").join(" ");
        assert!(
            script.contains("/org/repo/resolve/main/sub/m.gguf"),
            "{script}"
        );
        assert!(script.contains(&sha), "{script}");
    }

    #[test]
    fn bad_uris_are_errors_not_panics() {
        for uri in [
            "s3://b/k",
            "file://relative",
            "pvc://claim",
            "hf://org/repo",
            "file:///a/../b",
            "file:///a'b",
        ] {
            assert!(
                resolve_model_uri(uri, FETCH).is_err(),
                "{uri} should be rejected"
            );
        }
    }
}
