//! Where a daemon pod finds its model file: the volume, mount and `--model` path generated from
//! a ModelDeployment's `model.uri`, plus the init container that downloads `hf://` models into
//! the node's model cache.
//!
//! The daemon names the model it serves after its file (`/models/<id>.gguf` serves `<id>`), so
//! whatever the source, the file is mounted at `/models/<servedName>.gguf` (a file mount, or a
//! `subPath` of the volume): the id clients send is the ModelDeployment's `servedName`.

use k8s_openapi::api::core::v1::{
    Container, HostPathVolumeSource, PersistentVolumeClaimVolumeSource, SecurityContext, Volume,
    VolumeMount,
};

/// The folder of the model file in the daemon container.
pub const MODEL_MOUNT: &str = "/models";
/// Where the `fetch-model` init container mounts the node's model cache.
pub const MODEL_CACHE_MOUNT: &str = "/cache";
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
    /// The served name cannot be a file name, which the daemon takes its model id from.
    #[error(
        "servedName {name:?} cannot be served by this daemon version, which takes the model id from the file name: {reason}"
    )]
    ServedName {
        /// The served name.
        name: String,
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

/// The model file's path in the daemon container for a served name: `/models/<name>.gguf`.
pub fn served_model_path(served_name: &str) -> Result<String, ResolveModelUriError> {
    let reason = if served_name.is_empty() {
        Some("it is empty")
    } else if served_name.contains('/') {
        Some("it contains `/`")
    } else if served_name == "." || served_name == ".." {
        Some("`.` and `..` are not file names")
    } else if served_name.chars().any(char::is_control) {
        Some("it contains control characters")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ResolveModelUriError::ServedName {
            name: served_name.to_owned(),
            reason,
        }),
        None => Ok(format!("{MODEL_MOUNT}/{served_name}.gguf")),
    }
}

/// Resolves `model.uri` into the pod's model volume, with the file at `/models/<served>.gguf`.
pub fn resolve_model_uri(
    uri: &str,
    served_name: &str,
    fetch: ModelFetch<'_>,
) -> Result<ModelMount, ResolveModelUriError> {
    let model_path = served_model_path(served_name)?;
    if let Some(path) = uri.strip_prefix("file://") {
        let path = checked_path(uri, path, "file:// needs an absolute path")?;
        if !path.starts_with('/') {
            return Err(malformed(uri, "file:// needs an absolute path"));
        }
        Ok(ModelMount {
            volume: host_path_volume(MODEL_VOLUME, path, "File"),
            mount: read_only_mount(MODEL_VOLUME, &model_path, None),
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
            mount: read_only_mount(
                MODEL_VOLUME,
                &model_path,
                Some(path.trim_start_matches('/')),
            ),
            model_path,
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
        Ok(ModelMount {
            volume: host_path_volume(MODEL_VOLUME, fetch.cache_dir, "DirectoryOrCreate"),
            mount: read_only_mount(MODEL_VOLUME, &model_path, Some(&relative)),
            init_container: Some(download_container(&relative, fetch)),
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

fn read_only_mount(name: &str, path: &str, sub_path: Option<&str>) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        sub_path: sub_path.map(str::to_owned),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

/// The init container: downloads the file from the Hugging Face hub into the node cache unless
/// it is there already, into a temporary name first so that pods on the same node never load a
/// partial file, and checks the SHA-256 when one is pinned. The image needs `sh`, `curl` and
/// `sha256sum`.
fn download_container(relative: &str, fetch: ModelFetch<'_>) -> Container {
    let target = format!("{MODEL_CACHE_MOUNT}/{relative}");
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
        "set -eu; target='{target}'; if [ -s \"$target\" ]; then exit 0; fi; \
         mkdir -p \"$(dirname \"$target\")\"; tmp=\"$target.partial.$HOSTNAME\"; \
         curl -fsSL --retry 5 -o \"$tmp\" \"${{HF_ENDPOINT:-https://huggingface.co}}/{repo_path}/resolve/main/{file}\"{verify} \
         && mv \"$tmp\" \"$target\""
    );
    Container {
        name: "fetch-model".to_owned(),
        image: Some(fetch.image.to_owned()),
        image_pull_policy: Some(fetch.pull_policy.to_owned()),
        command: Some(vec!["sh".to_owned(), "-c".to_owned(), script]),
        // kubelet creates the cache folder root-owned (hostPath `DirectoryOrCreate`): the
        // download must be able to write there whatever user the image defaults to.
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: MODEL_VOLUME.to_owned(),
            mount_path: MODEL_CACHE_MOUNT.to_owned(),
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
    fn file_uri_mounts_the_file_from_the_node_under_the_served_name() {
        let mount = resolve_model_uri("file:///data/m/model.gguf", "llm", FETCH).expect("resolves");
        let host = mount.volume.host_path.expect("hostPath");
        assert_eq!(host.path, "/data/m/model.gguf");
        assert_eq!(host.type_.as_deref(), Some("File"));
        assert_eq!(mount.model_path, "/models/llm.gguf");
        assert_eq!(mount.mount.mount_path, "/models/llm.gguf");
        assert_eq!(mount.mount.sub_path, None);
        assert!(mount.init_container.is_none());
    }

    #[test]
    fn pvc_uri_mounts_the_file_of_the_claim_read_only() {
        let mount =
            resolve_model_uri("pvc://models/llama/q4.gguf", "llama-3", FETCH).expect("resolves");
        let claim = mount.volume.persistent_volume_claim.expect("pvc");
        assert_eq!(claim.claim_name, "models");
        assert_eq!(claim.read_only, Some(true));
        assert_eq!(mount.model_path, "/models/llama-3.gguf");
        assert_eq!(mount.mount.mount_path, "/models/llama-3.gguf");
        assert_eq!(mount.mount.sub_path.as_deref(), Some("llama/q4.gguf"));
        assert_eq!(mount.mount.read_only, Some(true));
    }

    #[test]
    fn hf_uri_downloads_into_the_node_cache_and_checks_the_pin() {
        let sha = "a".repeat(64);
        let fetch = ModelFetch {
            sha256: Some(&sha),
            ..FETCH
        };
        let mount = resolve_model_uri("hf://org/repo/sub/m.gguf", "m", fetch).expect("resolves");
        assert_eq!(mount.model_path, "/models/m.gguf");
        assert_eq!(mount.mount.sub_path.as_deref(), Some("org/repo/sub/m.gguf"));
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
        assert!(
            script.contains("target='/cache/org/repo/sub/m.gguf'"),
            "{script}"
        );
        assert_eq!(
            init.volume_mounts.expect("mounts")[0].mount_path,
            MODEL_CACHE_MOUNT
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
                resolve_model_uri(uri, "m", FETCH).is_err(),
                "{uri} should be rejected"
            );
        }
    }

    #[test]
    fn served_names_that_are_not_file_names_are_errors() {
        for name in ["", "org/model", ".", "..", "a\nb"] {
            let error =
                resolve_model_uri("file:///m.gguf", name, FETCH).expect_err("not a file name");
            assert!(
                matches!(error, ResolveModelUriError::ServedName { .. }),
                "{name:?}: {error}"
            );
        }
        assert_eq!(
            served_model_path("smollm2-135m").as_deref(),
            Ok("/models/smollm2-135m.gguf")
        );
        assert_eq!(
            served_model_path("a..b").as_deref(),
            Ok("/models/a..b.gguf")
        );
    }
}
