//! The node's skill KV store: one file per skill version, so a restarted daemon loads its
//! skills' KV instead of prefilling them again.
//!
//! File `NAME.HASH16.skv`: the magic `SKILLKV\0`, a little-endian `u32` header length, a JSON
//! header ([`StoredHeader`]: store format version, the [`StoreIdentity`] — model, tokenizer and
//! chat-template digests, KV dtype, engine KV-format version and layout — the skill's name,
//! content hash and token ids, and a BLAKE3 checksum per layer), then per layer K and V of every
//! block as little-endian `f32`. Files are written to a temporary name, fsynced, renamed and the
//! folder fsynced, so a crash leaves either the old file or the new one, never half of one;
//! leftover temporary files are deleted when the store opens. Anything that does not match —
//! another model, another layout, a flipped byte, a truncated file — is reported, the file is
//! removed and the skill is prefilled again: stored KV never produces wrong output.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::scheduler::transfer::PrefixKv;

const MAGIC: &[u8; 8] = b"SKILLKV\0";
/// Version of the file layout.
pub const STORE_FORMAT_VERSION: u32 = 1;
const EXTENSION: &str = "skv";
const TEMP_MARKER: &str = ".tmp-";
/// Largest header accepted (token ids of a long skill fit easily).
const MAX_HEADER_BYTES: u32 = 64 * 1024 * 1024;

/// What stored KV must have been computed with to be usable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreIdentity {
    /// SHA-256 of the model file.
    pub model_digest: String,
    /// Digest of the tokenizer.
    pub tokenizer_digest: String,
    /// Digest of the chat template.
    pub chat_template_digest: String,
    /// KV element type.
    pub kv_dtype: String,
    /// The engine's KV layout version.
    pub kv_format_version: u32,
    /// Layers.
    pub n_layers: usize,
    /// Floats of K (or V) per block and layer.
    pub block_floats: usize,
    /// Tokens per block.
    pub block_tokens: usize,
}

/// The header of a stored file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredHeader {
    /// [`STORE_FORMAT_VERSION`].
    pub format_version: u32,
    /// What the KV was computed with.
    pub identity: StoreIdentity,
    /// The skill's name.
    pub skill: String,
    /// BLAKE3 of the SKILL.md text.
    pub content_hash: String,
    /// The prefix's token ids.
    pub tokens: Vec<u32>,
    /// Full blocks stored.
    pub blocks: usize,
    /// What computing the prefix cost per token, in nanoseconds (for "prefill seconds saved").
    pub prefill_nanos_per_token: u64,
    /// BLAKE3 (hex) of each layer's K then V bytes.
    pub layer_checksums: Vec<String>,
}

/// KV loaded from the store, with what computing it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredKv {
    /// The KV.
    pub kv: PrefixKv,
    /// Prefill cost per token when it was computed, in nanoseconds.
    pub prefill_nanos_per_token: u64,
}

/// Why a stored file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadStoredKvError {
    /// Reading failed.
    #[error("reading {path} failed")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a store file, is truncated, or its header does not parse.
    #[error("{path} is malformed: {problem}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// It was written for something else (another model, tokenizer, layout or text).
    #[error("{path} was written for {field} {found}, not {expected}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The differing field.
        field: &'static str,
        /// The file's value.
        found: String,
        /// The value needed.
        expected: String,
    },
    /// A layer's checksum does not match its bytes.
    #[error("{path}: layer {layer} fails its checksum")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The layer.
        layer: usize,
    },
}

/// Why a file could not be saved.
#[derive(Debug, thiserror::Error)]
#[error("saving {path} failed")]
pub struct SaveStoredKvError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Why the store folder could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the skill KV store {path}")]
pub struct OpenSkillStoreError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// A store folder bound to one model identity.
#[derive(Debug, Clone)]
pub struct SkillStore {
    dir: PathBuf,
    identity: StoreIdentity,
}

impl SkillStore {
    /// Opens (creating) `dir` and deletes temporary files a crash left behind.
    pub fn open(dir: &Path, identity: StoreIdentity) -> Result<Self, OpenSkillStoreError> {
        let error = |source| OpenSkillStoreError {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(error)?;
        for entry in std::fs::read_dir(dir).map_err(error)? {
            let path = entry.map_err(error)?.path();
            let is_temp = path
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.contains(TEMP_MARKER));
            if is_temp {
                tracing::warn!(path = %path.display(), "removing an unfinished skill KV file");
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            identity,
        })
    }

    /// The file of a skill version.
    pub fn path_of(&self, skill: &str, content_hash: &str) -> PathBuf {
        let short = content_hash.get(..16).unwrap_or(content_hash);
        self.dir.join(format!("{skill}.{short}.{EXTENSION}"))
    }

    /// The stored KV of `skill` at `content_hash` for `tokens`: `Ok(None)` when there is no
    /// file; an error (after which the file is removed) when it cannot be used.
    pub fn load(
        &self,
        skill: &str,
        content_hash: &str,
        tokens: &[u32],
    ) -> Result<Option<StoredKv>, LoadStoredKvError> {
        let path = self.path_of(skill, content_hash);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(LoadStoredKvError::Read { path, source }),
        };
        let result = self.decode(&path, &bytes, skill, content_hash, tokens);
        if result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        result.map(Some)
    }

    fn decode(
        &self,
        path: &Path,
        bytes: &[u8],
        skill: &str,
        content_hash: &str,
        tokens: &[u32],
    ) -> Result<StoredKv, LoadStoredKvError> {
        let malformed = |problem: &str| LoadStoredKvError::Malformed {
            path: path.to_path_buf(),
            problem: problem.to_string(),
        };
        let mut reader = bytes;
        let mut magic = [0u8; 8];
        reader
            .read_exact(&mut magic)
            .map_err(|_| malformed("shorter than its magic"))?;
        if &magic != MAGIC {
            return Err(malformed("wrong magic"));
        }
        let mut length = [0u8; 4];
        reader
            .read_exact(&mut length)
            .map_err(|_| malformed("no header length"))?;
        let length = u32::from_le_bytes(length);
        if length > MAX_HEADER_BYTES || length as usize > reader.len() {
            return Err(malformed("header length beyond the file"));
        }
        let (header, payload) = reader.split_at(length as usize);
        let header: StoredHeader = serde_json::from_slice(header)
            .map_err(|error| malformed(&format!("header: {error}")))?;
        let mismatch = |field: &'static str, found: String, expected: String| {
            Err(LoadStoredKvError::Mismatch {
                path: path.to_path_buf(),
                field,
                found,
                expected,
            })
        };
        if header.format_version != STORE_FORMAT_VERSION {
            return mismatch(
                "format version",
                header.format_version.to_string(),
                STORE_FORMAT_VERSION.to_string(),
            );
        }
        if header.identity != self.identity {
            return mismatch(
                "model identity",
                format!("{:?}", header.identity),
                format!("{:?}", self.identity),
            );
        }
        if header.skill != skill || header.content_hash != content_hash {
            return mismatch(
                "skill",
                format!("{}@{}", header.skill, header.content_hash),
                format!("{skill}@{content_hash}"),
            );
        }
        if header.tokens != tokens {
            return mismatch(
                "token ids",
                format!("{} tokens", header.tokens.len()),
                format!("{} tokens", tokens.len()),
            );
        }
        let identity = &self.identity;
        let expected_blocks = tokens.len() / identity.block_tokens.max(1);
        let layer_bytes = 2 * expected_blocks * identity.block_floats * 4;
        if header.blocks != expected_blocks
            || header.layer_checksums.len() != identity.n_layers
            || payload.len() != layer_bytes * identity.n_layers
        {
            return Err(malformed("payload size does not match the header"));
        }
        let half = layer_bytes / 2;
        let mut layers = Vec::with_capacity(identity.n_layers);
        for (layer, chunk) in payload.chunks_exact(layer_bytes.max(1)).enumerate() {
            if blake3::hash(chunk).to_hex().as_str() != header.layer_checksums[layer] {
                return Err(LoadStoredKvError::Corrupt {
                    path: path.to_path_buf(),
                    layer,
                });
            }
            let (k, v) = chunk.split_at(half);
            layers.push((floats(k), floats(v)));
        }
        Ok(StoredKv {
            kv: PrefixKv {
                block_floats: identity.block_floats,
                blocks: expected_blocks,
                layers,
            },
            prefill_nanos_per_token: header.prefill_nanos_per_token,
        })
    }

    /// Saves `kv` for `skill` at `content_hash` atomically and removes the skill's older files.
    pub fn save(
        &self,
        skill: &str,
        content_hash: &str,
        tokens: &[u32],
        kv: &PrefixKv,
        prefill_nanos_per_token: u64,
    ) -> Result<PathBuf, SaveStoredKvError> {
        let path = self.path_of(skill, content_hash);
        let fail = |source| SaveStoredKvError {
            path: path.clone(),
            source,
        };
        let payloads: Vec<Vec<u8>> = kv
            .layers
            .iter()
            .map(|(k, v)| k.iter().chain(v).flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let header = StoredHeader {
            format_version: STORE_FORMAT_VERSION,
            identity: self.identity.clone(),
            skill: skill.to_string(),
            content_hash: content_hash.to_string(),
            tokens: tokens.to_vec(),
            blocks: kv.blocks,
            prefill_nanos_per_token,
            layer_checksums: payloads
                .iter()
                .map(|bytes| blake3::hash(bytes).to_hex().to_string())
                .collect(),
        };
        let header = serde_json::to_vec(&header).map_err(|error| fail(error.into()))?;
        let header_len = u32::try_from(header.len())
            .map_err(|_| fail(std::io::Error::other("header too large")))?;
        let temp = self.dir.join(format!(
            "{skill}{TEMP_MARKER}{}-{}",
            std::process::id(),
            content_hash.get(..16).unwrap_or(content_hash)
        ));
        let write = || -> std::io::Result<()> {
            let mut file = std::io::BufWriter::new(File::create(&temp)?);
            file.write_all(MAGIC)?;
            file.write_all(&header_len.to_le_bytes())?;
            file.write_all(&header)?;
            for payload in &payloads {
                file.write_all(payload)?;
            }
            file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&temp, &path)?;
            File::open(&self.dir)?.sync_all()
        };
        if let Err(source) = write() {
            let _ = std::fs::remove_file(&temp);
            return Err(fail(source));
        }
        self.remove_other_versions(skill, &path);
        Ok(path)
    }

    /// Removes every stored version of `skill` except `keep`.
    fn remove_other_versions(&self, skill: &str, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let prefix = format!("{skill}.");
        for path in entries.flatten().map(|entry| entry.path()) {
            let is_version = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|name| {
                    name.starts_with(&prefix)
                        && name.ends_with(EXTENSION)
                        && name[prefix.len()..].split('.').count() == 2
                });
            if is_version && path != keep {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> StoreIdentity {
        StoreIdentity {
            model_digest: "m".into(),
            tokenizer_digest: "t".into(),
            chat_template_digest: "c".into(),
            kv_dtype: "f32".into(),
            kv_format_version: 1,
            n_layers: 2,
            block_floats: 3,
            block_tokens: 16,
        }
    }

    fn kv(blocks: usize) -> PrefixKv {
        let layer = |seed: f32| -> (Vec<f32>, Vec<f32>) {
            let k = (0..blocks * 3).map(|i| seed + i as f32 * 0.5).collect();
            let v = (0..blocks * 3).map(|i| -seed - i as f32).collect();
            (k, v)
        };
        PrefixKv {
            block_floats: 3,
            blocks,
            layers: vec![layer(1.0), layer(2.0)],
        }
    }

    fn temp_store(label: &str) -> (PathBuf, SkillStore) {
        let dir =
            std::env::temp_dir().join(format!("skillkv-store-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = SkillStore::open(&dir, identity()).expect("opens");
        (dir, store)
    }

    #[test]
    fn saved_kv_loads_back_exactly_and_old_versions_go() {
        let (dir, store) = temp_store("roundtrip");
        let tokens: Vec<u32> = (0..40).collect();
        store
            .save("s", "aaaaaaaaaaaaaaaaaaaa", &tokens, &kv(2), 7)
            .expect("saves");
        store
            .save("s", "bbbbbbbbbbbbbbbbbbbb", &tokens, &kv(2), 7)
            .expect("saves");
        assert_eq!(
            store
                .load("s", "aaaaaaaaaaaaaaaaaaaa", &tokens)
                .expect("no error"),
            None
        );
        let loaded = store
            .load("s", "bbbbbbbbbbbbbbbbbbbb", &tokens)
            .expect("loads");
        assert_eq!(
            loaded,
            Some(StoredKv {
                kv: kv(2),
                prefill_nanos_per_token: 7
            })
        );
        let files = std::fs::read_dir(&dir).expect("dir").count();
        assert_eq!(files, 1);
    }

    #[test]
    fn a_flipped_byte_or_truncation_is_detected_and_the_file_removed() {
        let (_dir, store) = temp_store("corrupt");
        let tokens: Vec<u32> = (0..32).collect();
        let path = store
            .save("s", "cccccccccccccccc", &tokens, &kv(2), 7)
            .expect("saves");
        let mut bytes = std::fs::read(&path).expect("read");
        let last = bytes.len() - 5;
        bytes[last] ^= 0x40;
        std::fs::write(&path, &bytes).expect("write");
        let error = store
            .load("s", "cccccccccccccccc", &tokens)
            .expect_err("corrupt");
        assert!(
            matches!(error, LoadStoredKvError::Corrupt { layer: 1, .. }),
            "{error}"
        );
        assert!(!path.exists(), "an unusable file is removed");

        let path = store
            .save("s", "cccccccccccccccc", &tokens, &kv(2), 7)
            .expect("saves");
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() - 7]).expect("truncate");
        let error = store
            .load("s", "cccccccccccccccc", &tokens)
            .expect_err("truncated");
        assert!(
            matches!(error, LoadStoredKvError::Malformed { .. }),
            "{error}"
        );
    }

    #[test]
    fn another_model_or_other_tokens_do_not_match() {
        let (dir, store) = temp_store("mismatch");
        let tokens: Vec<u32> = (0..32).collect();
        store
            .save("s", "dddddddddddddddd", &tokens, &kv(2), 7)
            .expect("saves");
        let other = SkillStore::open(
            &dir,
            StoreIdentity {
                model_digest: "another".into(),
                ..identity()
            },
        )
        .expect("opens");
        let error = other
            .load("s", "dddddddddddddddd", &tokens)
            .expect_err("mismatch");
        assert!(matches!(
            error,
            LoadStoredKvError::Mismatch {
                field: "model identity",
                ..
            }
        ));

        store
            .save("s", "dddddddddddddddd", &tokens, &kv(2), 7)
            .expect("saves");
        let fewer: Vec<u32> = (0..31).collect();
        let error = store
            .load("s", "dddddddddddddddd", &fewer)
            .expect_err("mismatch");
        assert!(matches!(
            error,
            LoadStoredKvError::Mismatch {
                field: "token ids",
                ..
            }
        ));
    }

    #[test]
    fn opening_removes_files_a_crash_left_half_written() {
        let (dir, _store) = temp_store("crash");
        let leftover = dir.join(format!("s{TEMP_MARKER}123-abcd"));
        std::fs::write(&leftover, b"SKILLKV\0partial").expect("write");
        SkillStore::open(&dir, identity()).expect("opens");
        assert!(!leftover.exists());
    }
}
