//! The prefix block hash shared by the daemons' radix cache and the router's prefix index.
//!
//! A prompt is cut into full blocks of [`BLOCK_TOKENS`] tokens. Block `i`'s identity is a
//! chained BLAKE3 hash: `h(i) = BLAKE3(h(i-1) ‖ tokens of block i)`, with `h(-1)` the hash of
//! the [`HashNamespace`] (model digest, tokenizer digest, adapter id, KV dtype and the engine's
//! KV-format version). Two prompts share block `i` exactly when they share every token up to
//! the end of that block under the same namespace, so the router can predict cache hits
//! without a tokenizer on its side of the wire only by receiving these hashes from daemons.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Tokens per KV block, engine-wide.
pub const BLOCK_TOKENS: usize = 16;

/// Everything that makes the KV of the same tokens differ between engines.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct HashNamespace {
    /// SHA-256 (hex) of the model file.
    pub model_digest: String,
    /// Digest of the tokenizer (vocabulary and merges).
    pub tokenizer_digest: String,
    /// LoRA adapter id, or `None` for the base model.
    pub adapter_id: Option<String>,
    /// KV element type, e.g. `f32`, `f16`.
    pub kv_dtype: String,
    /// Version of the engine's KV layout; bump it when the layout changes.
    pub kv_format_version: u32,
}

/// The identity of one full KV block (and, by chaining, of the whole prefix before it).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockHash(#[serde(with = "hex32")] pub [u8; 32]);

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({self})")
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl HashNamespace {
    /// The hash that the first block chains from.
    pub fn root(&self) -> BlockHash {
        let mut h = blake3::Hasher::new_derive_key("skillkv.io prefix block hash v1");
        for field in [
            self.model_digest.as_str(),
            self.tokenizer_digest.as_str(),
            self.adapter_id.as_deref().unwrap_or(""),
            self.kv_dtype.as_str(),
        ] {
            // Length-prefixed so that field boundaries cannot be shifted.
            h.update(&(field.len() as u64).to_le_bytes());
            h.update(field.as_bytes());
        }
        h.update(&[u8::from(self.adapter_id.is_some())]);
        h.update(&self.kv_format_version.to_le_bytes());
        BlockHash(*h.finalize().as_bytes())
    }

    /// Hashes of every full block of `tokens`, in order. A trailing partial block has none.
    pub fn block_hashes(&self, tokens: &[u32]) -> Vec<BlockHash> {
        block_hashes_from(self.root(), tokens)
    }
}

/// Hashes of every full block of `tokens`, chained from `root` (a namespace's root, as the
/// router receives it in `ModelInfo::namespace_root`). A trailing partial block has none.
pub fn block_hashes_from(root: BlockHash, tokens: &[u32]) -> Vec<BlockHash> {
    let mut parent = root;
    tokens
        .chunks_exact(BLOCK_TOKENS)
        .map(|block| {
            parent = chain(&parent, block);
            parent
        })
        .collect()
}

/// The hash of a block whose predecessor hashed to `parent`.
pub fn chain(parent: &BlockHash, tokens: &[u32]) -> BlockHash {
    let mut h = blake3::Hasher::new();
    h.update(&parent.0);
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
    BlockHash(*h.finalize().as_bytes())
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(64);
        for b in bytes {
            out.push_str(&format!("{b:02x}"));
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        if s.len() != 64 || !s.is_ascii() {
            return Err(D::Error::custom("a block hash is 64 hex digits"));
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| D::Error::custom("a block hash is 64 hex digits"))?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> HashNamespace {
        HashNamespace {
            model_digest: "m".into(),
            tokenizer_digest: "t".into(),
            adapter_id: None,
            kv_dtype: "f32".into(),
            kv_format_version: 1,
        }
    }

    #[test]
    fn only_full_blocks_are_hashed() {
        let tokens: Vec<u32> = (0..40).collect();
        assert_eq!(ns().block_hashes(&tokens).len(), 2);
        assert!(ns().block_hashes(&tokens[..15]).is_empty());
    }

    #[test]
    fn shared_prefixes_share_hashes_until_they_diverge() {
        let a: Vec<u32> = (0..48).collect();
        let mut b = a.clone();
        b[20] = 999;
        let (ha, hb) = (ns().block_hashes(&a), ns().block_hashes(&b));
        assert_eq!(ha[0], hb[0]);
        assert_ne!(ha[1], hb[1]);
        // Chaining: a difference in block 1 changes every later block too.
        assert_ne!(ha[2], hb[2]);
    }

    #[test]
    fn every_namespace_field_changes_the_hash() {
        let tokens: Vec<u32> = (0..16).collect();
        let base = ns().block_hashes(&tokens)[0];
        let variants = [
            HashNamespace {
                model_digest: "m2".into(),
                ..ns()
            },
            HashNamespace {
                tokenizer_digest: "t2".into(),
                ..ns()
            },
            HashNamespace {
                adapter_id: Some("a".into()),
                ..ns()
            },
            HashNamespace {
                adapter_id: Some(String::new()),
                ..ns()
            },
            HashNamespace {
                kv_dtype: "f16".into(),
                ..ns()
            },
            HashNamespace {
                kv_format_version: 2,
                ..ns()
            },
        ];
        for v in variants {
            assert_ne!(v.block_hashes(&tokens)[0], base, "{v:?}");
        }
    }

    #[test]
    fn hashes_round_trip_through_json() {
        let h = ns().block_hashes(&(0..16).collect::<Vec<_>>())[0];
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json.len(), 66);
        assert_eq!(serde_json::from_str::<BlockHash>(&json).unwrap(), h);
        assert!(serde_json::from_str::<BlockHash>("\"zz\"").is_err());
    }
}
