//! The text ↔ token-id mapping of a GGUF model, built from the file's own vocabulary.
//!
//! Owns [`GgufTokenizer`]: a byte-level BPE tokenizer (the `tokenizers` crate) assembled from the
//! GGUF metadata `tokenizer.ggml.tokens`, `tokenizer.ggml.merges` and `tokenizer.ggml.token_type`,
//! with the pre-tokenizer that llama.cpp uses for the file's `tokenizer.ggml.pre`, CONTROL tokens
//! registered as special tokens (recognised when they appear in text) and decoding done here from
//! per-token byte strings so streaming detokenization ([`super::detokenize`]) and [`GgufTokenizer::decode`]
//! agree byte for byte. Nothing is fetched at run time.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

/// GGUF token type of a control token (`<|im_start|>`, `<|endoftext|>`, ...).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF token type of a user-defined token: matched in text like a control token, but not special.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";

/// The GGUF `tokenizer.ggml.pre` values whose pre-tokenization this module reproduces.
const SUPPORTED_PRE_TOKENIZERS: &[&str] = &["smollm", "gpt2"];

/// Why a tokenizer could not be built from GGUF metadata.
#[derive(Debug, thiserror::Error)]
pub enum BuildTokenizerError {
    #[error("GGUF metadata lacks `{key}`")]
    MissingMetadata { key: &'static str },
    #[error("GGUF metadata `{key}` is not {expected}")]
    WrongMetadataType {
        key: &'static str,
        expected: &'static str,
    },
    #[error("tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)")]
    UnsupportedModel { model: String },
    #[error("pre-tokenizer `{pre}` is not supported (supported: {SUPPORTED_PRE_TOKENIZERS:?})")]
    UnsupportedPreTokenizer { pre: String },
    #[error("merge {index} (`{merge}`) is not two tokens separated by one space")]
    MalformedMerge { index: usize, merge: String },
    #[error("`{KEY_TOKEN_TYPE}` has {types} entries but the vocabulary has {tokens} tokens")]
    TokenTypeCountMismatch { types: usize, tokens: usize },
    #[error("token id {id} of `{key}` is outside the vocabulary of {vocab_size} tokens")]
    TokenIdOutOfRange {
        key: &'static str,
        id: u64,
        vocab_size: usize,
    },
    #[error("building the BPE model failed")]
    Bpe {
        #[source]
        source: tokenizers::Error,
    },
}

/// Why a text could not be tokenized.
#[derive(Debug, thiserror::Error)]
#[error("tokenizing the text failed")]
pub struct EncodeTextError {
    #[source]
    source: tokenizers::Error,
}

/// A byte-level BPE tokenizer built from a GGUF file's metadata.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    inner: Tokenizer,
    /// The raw bytes each token id stands for (special tokens: their text).
    token_bytes: Vec<Vec<u8>>,
    control: Vec<bool>,
    bos: Option<u32>,
    eos: u32,
    digest: String,
}

impl GgufTokenizer {
    /// Builds the tokenizer from the metadata of a GGUF file.
    pub fn from_gguf(content: &Content) -> Result<Self, BuildTokenizerError> {
        let model = metadata_string(content, KEY_MODEL)?;
        if model != "gpt2" {
            return Err(BuildTokenizerError::UnsupportedModel {
                model: model.to_owned(),
            });
        }
        let pre = metadata_string(content, KEY_PRE)?;
        let pre_tokenizer = pre_tokenizer_for(pre)?;
        let tokens = metadata_strings(content, KEY_TOKENS)?;
        let merges = metadata_strings(content, KEY_MERGES)?;
        let token_types = metadata_token_types(content, tokens.len())?;
        let bos = optional_token_id(content, KEY_BOS, tokens.len())?;
        let eos = optional_token_id(content, KEY_EOS, tokens.len())?
            .ok_or(BuildTokenizerError::MissingMetadata { key: KEY_EOS })?;

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, token)| ((*token).to_owned(), id as u32))
            .collect();
        let merge_pairs = split_merges(&merges)?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merge_pairs)
            .build()
            .map_err(|source| BuildTokenizerError::Bpe { source })?;

        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        let added_token = |id: usize, special: bool| AddedToken::from(tokens[id], special);
        let special: Vec<AddedToken> = (0..tokens.len())
            .filter(|&id| token_types[id] == TOKEN_TYPE_CONTROL)
            .map(|id| added_token(id, true))
            .collect();
        let user_defined: Vec<AddedToken> = (0..tokens.len())
            .filter(|&id| token_types[id] == TOKEN_TYPE_USER_DEFINED)
            .map(|id| added_token(id, false))
            .collect();
        inner.add_special_tokens(&special);
        inner.add_tokens(&user_defined);

        let char_to_byte = byte_level_char_to_byte();
        let token_bytes = tokens
            .iter()
            .zip(&token_types)
            .map(|(token, &token_type)| match token_type {
                TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED => token.as_bytes().to_vec(),
                _ => byte_level_decode(token, &char_to_byte),
            })
            .collect();
        let control = token_types
            .iter()
            .map(|&token_type| token_type == TOKEN_TYPE_CONTROL)
            .collect();
        let digest = tokenizer_digest(pre, &tokens, &token_types, &merges);
        tracing::debug!(
            vocab_size = tokens.len(),
            merges = merges.len(),
            special_tokens = special.len(),
            pre_tokenizer = pre,
            digest = %digest,
            "built GGUF tokenizer"
        );
        Ok(Self {
            inner,
            token_bytes,
            control,
            bos,
            eos,
            digest,
        })
    }

    /// Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) become
    /// their ids. No BOS is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EncodeTextError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|source| EncodeTextError { source })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included as their text. Byte sequences that are not
    /// valid UTF-8 become U+FFFD; ids outside the vocabulary are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .filter_map(|&id| self.token_bytes(id))
            .flatten()
            .copied()
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The raw bytes token `id` stands for, or `None` outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.token_bytes.get(id as usize).map(Vec::as_slice)
    }

    /// Whether `id` is a control token (`<|im_start|>`, `<|im_end|>`, ...).
    pub fn is_control_token(&self, id: u32) -> bool {
        self.control.get(id as usize).copied().unwrap_or(false)
    }

    /// End-of-sequence token id.
    pub fn eos_token_id(&self) -> u32 {
        self.eos
    }

    /// Beginning-of-sequence token id, if the file names one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    /// Hex BLAKE3 of the pre-tokenizer name, vocabulary, token types and merges: two tokenizers
    /// with equal digests produce equal ids for every text.
    pub fn digest(&self) -> String {
        self.digest.clone()
    }

    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }
}

/// The pre-tokenizer llama.cpp applies for the GGUF `tokenizer.ggml.pre` value `pre`.
fn pre_tokenizer_for(pre: &str) -> Result<PreTokenizerWrapper, BuildTokenizerError> {
    let byte_level = ByteLevel::new(false, true, true);
    match pre {
        // llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM: every digit alone, then the GPT-2 regex.
        "smollm" => Ok(Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()),
        "gpt2" => Ok(byte_level.into()),
        other => Err(BuildTokenizerError::UnsupportedPreTokenizer {
            pre: other.to_owned(),
        }),
    }
}

fn split_merges(merges: &[&str]) -> Result<Merges, BuildTokenizerError> {
    merges
        .iter()
        .enumerate()
        .map(|(index, merge)| match merge.split_once(' ') {
            Some((left, right))
                if !left.is_empty() && !right.is_empty() && !right.contains(' ') =>
            {
                Ok((left.to_owned(), right.to_owned()))
            }
            _ => Err(BuildTokenizerError::MalformedMerge {
                index,
                merge: (*merge).to_owned(),
            }),
        })
        .collect()
}

/// GPT-2's byte-level alphabet, reversed: the printable character standing for each byte.
/// GPT-2's byte-level alphabet: the character each byte is written as in a vocabulary.
pub(crate) fn byte_level_char_to_byte() -> HashMap<char, u8> {
    let printable = |byte: u8| matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut shifted = 0u32;
    (0..=255u8)
        .filter_map(|byte| {
            let code = if printable(byte) {
                u32::from(byte)
            } else {
                shifted += 1;
                255 + shifted
            };
            char::from_u32(code).map(|c| (c, byte))
        })
        .collect()
}

/// The bytes a byte-level BPE token stands for; characters outside the byte alphabet (which a
/// well-formed vocabulary does not contain) keep their own UTF-8 bytes.
fn byte_level_decode(token: &str, char_to_byte: &HashMap<char, u8>) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(token.len());
    for c in token.chars() {
        match char_to_byte.get(&c) {
            Some(&byte) => bytes.push(byte),
            None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    bytes
}

fn tokenizer_digest(pre: &str, tokens: &[&str], token_types: &[i32], merges: &[&str]) -> String {
    let mut hasher = blake3::Hasher::new();
    let mut put = |bytes: &[u8]| {
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    put(b"skillkv-gguf-tokenizer-v1");
    put(pre.as_bytes());
    put(&(tokens.len() as u64).to_le_bytes());
    for (token, token_type) in tokens.iter().zip(token_types) {
        put(token.as_bytes());
        put(&token_type.to_le_bytes());
    }
    put(&(merges.len() as u64).to_le_bytes());
    for merge in merges {
        put(merge.as_bytes());
    }
    hasher.finalize().to_hex().to_string()
}

fn metadata_value<'a>(
    content: &'a Content,
    key: &'static str,
) -> Result<&'a Value, BuildTokenizerError> {
    content
        .metadata
        .get(key)
        .ok_or(BuildTokenizerError::MissingMetadata { key })
}

fn metadata_string<'a>(
    content: &'a Content,
    key: &'static str,
) -> Result<&'a str, BuildTokenizerError> {
    match metadata_value(content, key)? {
        Value::String(value) => Ok(value),
        _ => Err(BuildTokenizerError::WrongMetadataType {
            key,
            expected: "a string",
        }),
    }
}

fn metadata_strings<'a>(
    content: &'a Content,
    key: &'static str,
) -> Result<Vec<&'a str>, BuildTokenizerError> {
    let wrong_type = || BuildTokenizerError::WrongMetadataType {
        key,
        expected: "an array of strings",
    };
    let Value::Array(values) = metadata_value(content, key)? else {
        return Err(wrong_type());
    };
    values
        .iter()
        .map(|value| match value {
            Value::String(text) => Ok(text.as_str()),
            _ => Err(wrong_type()),
        })
        .collect()
}

fn metadata_token_types(
    content: &Content,
    vocab_size: usize,
) -> Result<Vec<i32>, BuildTokenizerError> {
    let key = KEY_TOKEN_TYPE;
    let wrong_type = || BuildTokenizerError::WrongMetadataType {
        key,
        expected: "an array of i32",
    };
    let Value::Array(values) = metadata_value(content, key)? else {
        return Err(wrong_type());
    };
    if values.len() != vocab_size {
        return Err(BuildTokenizerError::TokenTypeCountMismatch {
            types: values.len(),
            tokens: vocab_size,
        });
    }
    values
        .iter()
        .map(|value| match value {
            Value::I32(token_type) => Ok(*token_type),
            _ => Err(wrong_type()),
        })
        .collect()
}

fn optional_token_id(
    content: &Content,
    key: &'static str,
    vocab_size: usize,
) -> Result<Option<u32>, BuildTokenizerError> {
    let Some(value) = content.metadata.get(key) else {
        return Ok(None);
    };
    let id = value
        .to_u64()
        .map_err(|_| BuildTokenizerError::WrongMetadataType {
            key,
            expected: "an unsigned integer",
        })?;
    match u32::try_from(id) {
        Ok(id) if (id as usize) < vocab_size => Ok(Some(id)),
        _ => Err(BuildTokenizerError::TokenIdOutOfRange {
            key,
            id,
            vocab_size,
        }),
    }
}

#[cfg(test)]
#[path = "tokenizer_tests.rs"]
mod tests;
