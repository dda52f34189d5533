//! Unit tests of [`GgufTokenizer`] on a small synthetic byte-level vocabulary, and the
//! streaming property tests of [`StreamDecoder`] and [`StopMatcher`] over it (every byte is a
//! token there, so multi-byte characters are split across tokens in every possible way).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use proptest::prelude::*;

use super::*;
use crate::engine::detokenize::StreamDecoder;
use crate::engine::stop::StopMatcher;

const CONTROL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const MERGES: [&str; 6] = ["h e", "l l", "he ll", "hell o", "Ġ w", "1 2"];

/// Metadata of a vocabulary: the control tokens, the 256 byte tokens, then one token per merge.
fn metadata(pre: &str, merges: &[&str]) -> HashMap<String, Value> {
    let string = |s: &str| Value::String(s.to_owned());
    let char_to_byte = byte_level_char_to_byte();
    let mut byte_chars: Vec<char> = char_to_byte.keys().copied().collect();
    byte_chars.sort_by_key(|c| char_to_byte.get(c).copied());
    let mut tokens: Vec<String> = CONTROL.iter().map(|s| (*s).to_owned()).collect();
    tokens.extend(byte_chars.iter().map(char::to_string));
    tokens.extend(merges.iter().map(|merge| merge.replace(' ', "")));
    let token_types: Vec<Value> = (0..tokens.len())
        .map(|id| Value::I32(if id < CONTROL.len() { 3 } else { 1 }))
        .collect();
    HashMap::from([
        (KEY_MODEL.to_owned(), string("gpt2")),
        (KEY_PRE.to_owned(), string(pre)),
        (
            KEY_TOKENS.to_owned(),
            Value::Array(tokens.iter().map(|t| string(t)).collect()),
        ),
        (
            KEY_MERGES.to_owned(),
            Value::Array(merges.iter().map(|m| string(m)).collect()),
        ),
        (KEY_TOKEN_TYPE.to_owned(), Value::Array(token_types)),
        (KEY_BOS.to_owned(), Value::U32(1)),
        (KEY_EOS.to_owned(), Value::U32(2)),
    ])
}

fn content(metadata: HashMap<String, Value>) -> Content {
    Content {
        magic: VersionedMagic::GgufV3,
        metadata,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

fn tokenizer_with(pre: &str) -> GgufTokenizer {
    GgufTokenizer::from_gguf(&content(metadata(pre, &MERGES))).expect("synthetic tokenizer")
}

fn tokenizer() -> GgufTokenizer {
    tokenizer_with("smollm")
}

/// Id of the first merged token (they follow the control and byte tokens).
const FIRST_MERGED: u32 = (CONTROL.len() + 256) as u32;

fn byte_token(tokenizer: &GgufTokenizer, byte: u8) -> u32 {
    (0..tokenizer.vocab_size() as u32)
        .find(|&id| !tokenizer.is_control_token(id) && tokenizer.token_bytes(id) == Some(&[byte]))
        .expect("every byte has a token")
}

#[test]
fn merges_apply_and_special_tokens_in_text_become_their_ids() {
    let tokenizer = tokenizer();
    let hello = FIRST_MERGED + 3;
    let space_w = FIRST_MERGED + 4;
    let ids = tokenizer
        .encode("<|im_start|>hello world<|im_end|>")
        .expect("encodes");
    let mut expected = vec![1, hello, space_w];
    expected.extend(b"orld".iter().map(|&b| byte_token(&tokenizer, b)));
    expected.push(2);
    assert_eq!(ids, expected);
    assert!(tokenizer.is_control_token(1));
    assert!(!tokenizer.is_control_token(hello));
    assert_eq!(
        (tokenizer.bos_token_id(), tokenizer.eos_token_id()),
        (Some(1), 2)
    );
    assert_eq!(tokenizer.vocab_size(), CONTROL.len() + 256 + MERGES.len());
}

#[test]
fn smollm_splits_every_digit_but_gpt2_merges_them() {
    let twelve = FIRST_MERGED + 5;
    let digits = |tokenizer: &GgufTokenizer| tokenizer.encode("12").expect("encodes");
    let smollm = tokenizer();
    assert_eq!(
        digits(&smollm),
        vec![byte_token(&smollm, b'1'), byte_token(&smollm, b'2')]
    );
    assert_eq!(digits(&tokenizer_with("gpt2")), vec![twelve]);
}

#[test]
fn decode_inverts_encode_for_unicode_and_special_tokens() {
    let tokenizer = tokenizer();
    let text = "<|im_start|>user\nhéllo 🦀 世界  \t 123<|im_end|>\n";
    let ids = tokenizer.encode(text).expect("encodes");
    assert_eq!(tokenizer.decode(&ids), text);
    assert_eq!(tokenizer.decode(&[u32::MAX]), "");
}

#[test]
fn digest_depends_on_vocabulary_and_merges() {
    let base = tokenizer().digest();
    assert_eq!(base, tokenizer().digest());
    assert_eq!(base.len(), 64);
    assert_ne!(base, tokenizer_with("gpt2").digest());
    let fewer = GgufTokenizer::from_gguf(&content(metadata("smollm", &MERGES[..5])))
        .expect("synthetic tokenizer");
    assert_ne!(base, fewer.digest());
}

#[test]
fn malformed_metadata_gives_typed_errors() {
    let build = |edit: &dyn Fn(&mut HashMap<String, Value>)| {
        let mut metadata = metadata("smollm", &MERGES);
        edit(&mut metadata);
        GgufTokenizer::from_gguf(&content(metadata)).expect_err("must be rejected")
    };
    let error = build(&|m| {
        m.remove(KEY_TOKENS);
    });
    assert!(
        matches!(
            error,
            BuildTokenizerError::MissingMetadata { key: KEY_TOKENS }
        ),
        "{error}"
    );
    let error = build(&|m| {
        m.insert(KEY_PRE.to_owned(), Value::String("llama-bpe".to_owned()));
    });
    assert!(
        matches!(error, BuildTokenizerError::UnsupportedPreTokenizer { .. }),
        "{error}"
    );
    let error = build(&|m| {
        m.insert(KEY_MODEL.to_owned(), Value::String("llama".to_owned()));
    });
    assert!(
        matches!(error, BuildTokenizerError::UnsupportedModel { .. }),
        "{error}"
    );
    let error = build(&|m| {
        m.insert(
            KEY_MERGES.to_owned(),
            Value::Array(vec![Value::String("abc".to_owned())]),
        );
    });
    assert!(
        matches!(error, BuildTokenizerError::MalformedMerge { index: 0, .. }),
        "{error}"
    );
    let error = build(&|m| {
        m.insert(KEY_TOKEN_TYPE.to_owned(), Value::Array(vec![Value::I32(1)]));
    });
    assert!(
        matches!(
            error,
            BuildTokenizerError::TokenTypeCountMismatch { types: 1, .. }
        ),
        "{error}"
    );
    let error = build(&|m| {
        m.insert(KEY_EOS.to_owned(), Value::U32(1_000_000));
    });
    assert!(
        matches!(
            error,
            BuildTokenizerError::TokenIdOutOfRange { key: KEY_EOS, .. }
        ),
        "{error}"
    );
    let error = build(&|m| {
        m.insert(KEY_TOKENS.to_owned(), Value::String("x".to_owned()));
    });
    assert!(
        matches!(
            error,
            BuildTokenizerError::WrongMetadataType {
                key: KEY_TOKENS,
                ..
            }
        ),
        "{error}"
    );
}

/// Feeds `ids` one by one through a decoder and a stop matcher; returns the emitted text.
fn stream(tokenizer: &GgufTokenizer, ids: &[u32], stops: &[String]) -> (Vec<String>, String) {
    let mut decoder = StreamDecoder::new();
    let mut matcher = StopMatcher::new(stops);
    let mut deltas = Vec::new();
    let mut emitted = String::new();
    for &id in ids {
        let delta = decoder.push(tokenizer, id);
        emitted.push_str(&matcher.push(&delta).text);
        deltas.push(delta);
    }
    let tail = decoder.finish();
    emitted.push_str(&matcher.push(&tail).text);
    emitted.push_str(&matcher.finish());
    deltas.push(tail);
    (deltas, emitted)
}

fn truncate_at_first_stop(text: &str, stops: &[String]) -> String {
    let cut = stops
        .iter()
        .filter(|stop| !stop.is_empty())
        .filter_map(|stop| text.find(stop.as_str()))
        .min()
        .unwrap_or(text.len());
    text[..cut].to_owned()
}

/// Text mixing ASCII, accented letters, CJK, emoji and the merged tokens.
fn varied_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("hello".to_owned()),
            Just(" w".to_owned()),
            Just("é".to_owned()),
            Just("世界".to_owned()),
            Just("🦀".to_owned()),
            Just("👩‍💻".to_owned()),
            Just("<|im_end|>".to_owned()),
            any::<char>().prop_map(String::from),
            "[a-z0-9 \n]{1,4}",
        ],
        0..24,
    )
    .prop_map(|pieces| pieces.concat())
}

proptest! {
    #[test]
    fn streamed_deltas_concatenate_to_the_full_decode(text in varied_text()) {
        let tokenizer = tokenizer();
        let ids = tokenizer.encode(&text).expect("encodes");
        let (deltas, _) = stream(&tokenizer, &ids, &[]);
        prop_assert_eq!(deltas.concat(), tokenizer.decode(&ids));
        prop_assert_eq!(deltas.concat(), text);
    }

    #[test]
    fn stop_strings_cut_the_stream_before_their_first_occurrence(
        text in varied_text(),
        stops in prop::collection::vec(
            prop_oneof![Just("é".to_owned()), Just("🦀".to_owned()), Just("<|im_end|>".to_owned()), "[a-z ]{1,3}"],
            0..3,
        ),
    ) {
        let tokenizer = tokenizer();
        let ids = tokenizer.encode(&text).expect("encodes");
        let (_, emitted) = stream(&tokenizer, &ids, &stops);
        prop_assert_eq!(emitted, truncate_at_first_stop(&text, &stops));
    }

    #[test]
    fn stop_matching_does_not_depend_on_how_text_is_split(
        text in varied_text(),
        stop in "[a-z ]{1,3}|é|🦀",
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let boundaries: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
        let mut cut_points: Vec<usize> = cuts
            .iter()
            .filter(|_| !boundaries.is_empty())
            .map(|index| boundaries[index.index(boundaries.len())])
            .collect();
        cut_points.sort_unstable();
        cut_points.dedup();
        let stops = vec![stop];
        let mut matcher = StopMatcher::new(&stops);
        let mut emitted = String::new();
        let mut start = 0;
        for cut in cut_points.into_iter().chain([text.len()]) {
            emitted.push_str(&matcher.push(&text[start..cut]).text);
            start = cut;
        }
        emitted.push_str(&matcher.finish());
        prop_assert_eq!(emitted, truncate_at_first_stop(&text, &stops));
    }
}
