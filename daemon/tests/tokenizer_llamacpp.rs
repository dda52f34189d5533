//! The tokenizer, chat template and streaming detokenizer on the real default model: our token
//! ids equal llama.cpp's for a long varied text (the fixture written by
//! `bench/llama_cpp_tokenize.py`), decoding round-trips it, the ChatML template renders as it
//! defines, and streamed deltas (with stop strings) match the full decode.

mod model_support;

use std::fs::File;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::Content;
use proptest::prelude::*;
use skillkv_daemon::engine::chat_template::{ChatMessage, ChatTemplate};
use skillkv_daemon::engine::detokenize::StreamDecoder;
use skillkv_daemon::engine::stop::StopMatcher;
use skillkv_daemon::engine::tokenizer::GgufTokenizer;

fn metadata() -> &'static Content {
    static CONTENT: OnceLock<Content> = OnceLock::new();
    CONTENT.get_or_init(|| {
        let path = model_support::real_model_path();
        let mut file = File::open(&path).expect("open the model");
        Content::read(&mut file).expect("read GGUF metadata")
    })
}

fn tokenizer() -> &'static GgufTokenizer {
    static TOKENIZER: OnceLock<GgufTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| GgufTokenizer::from_gguf(metadata()).expect("build the tokenizer"))
}

struct Fixture {
    text: String,
    tokens: Vec<u32>,
}

fn fixture() -> Fixture {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer_llamacpp.json");
    let raw = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (regenerate with bench/llama_cpp_tokenize.py)",
            path.display()
        )
    });
    let json: serde_json::Value = serde_json::from_str(&raw).expect("fixture is JSON");
    let text = json["text"]
        .as_str()
        .expect("fixture has `text`")
        .to_owned();
    let tokens = json["tokens"]
        .as_array()
        .expect("fixture has `tokens`")
        .iter()
        .map(|id| {
            id.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .expect("token id")
        })
        .collect();
    Fixture { text, tokens }
}

#[test]
fn token_ids_equal_llama_cpp_on_the_fixture() {
    let Fixture {
        text,
        tokens: expected,
    } = fixture();
    assert!(
        expected.len() >= 2_000,
        "fixture too short: {}",
        expected.len()
    );
    let ours = tokenizer().encode(&text).expect("encode");
    if let Some(index) = ours.iter().zip(&expected).position(|(a, b)| a != b) {
        let window =
            |ids: &[u32]| ids[index.saturating_sub(3)..(index + 4).min(ids.len())].to_vec();
        panic!(
            "first difference at token {index}: ours {:?} ({:?}) vs llama.cpp {:?} ({:?})",
            window(&ours),
            tokenizer().decode(&window(&ours)),
            window(&expected),
            tokenizer().decode(&window(&expected)),
        );
    }
    assert_eq!(ours.len(), expected.len(), "same prefix, different lengths");
}

#[test]
fn decode_round_trips_the_fixture_text() {
    let Fixture { text, tokens } = fixture();
    assert_eq!(tokenizer().decode(&tokens), text);
}

#[test]
fn chatml_special_tokens_are_single_ids() {
    let tokenizer = tokenizer();
    assert_eq!(
        tokenizer.encode("<|im_end|>").expect("encode"),
        vec![tokenizer.eos_token_id()]
    );
    let start = tokenizer
        .bos_token_id()
        .expect("the model names a BOS token");
    assert_eq!(
        tokenizer.encode("<|im_start|>").expect("encode"),
        vec![start]
    );
    assert!(tokenizer.is_control_token(start));
    assert_eq!(tokenizer.vocab_size(), 49_152);
    assert_eq!(
        tokenizer.digest(),
        GgufTokenizer::from_gguf(metadata())
            .expect("build")
            .digest()
    );
}

#[test]
fn chat_template_renders_chatml() {
    let template = ChatTemplate::from_gguf(metadata()).expect("load the chat template");
    let conversation = [
        ChatMessage::new("system", "You answer in one word."),
        ChatMessage::new("user", "Capital of France?"),
    ];
    assert_eq!(
        template.render(&conversation, true).expect("render"),
        "<|im_start|>system\nYou answer in one word.<|im_end|>\n\
         <|im_start|>user\nCapital of France?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    // Without a system message the template inserts its own.
    assert_eq!(
        template.render(&conversation[1..], false).expect("render"),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nCapital of France?<|im_end|>\n"
    );
}

/// Streams `ids` through a decoder and a stop matcher; returns (all deltas, emitted text).
fn stream(ids: &[u32], stops: &[String]) -> (String, String) {
    let mut decoder = StreamDecoder::new();
    let mut matcher = StopMatcher::new(stops);
    let (mut deltas, mut emitted) = (String::new(), String::new());
    for &id in ids {
        let delta = decoder.push(tokenizer(), id);
        emitted.push_str(&matcher.push(&delta).text);
        deltas.push_str(&delta);
    }
    let tail = decoder.finish();
    emitted.push_str(&matcher.push(&tail).text);
    emitted.push_str(&matcher.finish());
    deltas.push_str(&tail);
    (deltas, emitted)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn streaming_real_tokens_matches_the_full_decode(
        text in "(\\PC|[ \n]|é|🦀|世界|👍🏽|<\\|im_end\\|>){0,40}",
        stop in "\\PC{1,2}|é|🦀|世",
    ) {
        let ids = tokenizer().encode(&text).expect("encode");
        let stops = vec![stop];
        let (deltas, emitted) = stream(&ids, &stops);
        prop_assert_eq!(&deltas, &tokenizer().decode(&ids));
        prop_assert_eq!(&deltas, &text);
        let cut = text.find(stops[0].as_str()).unwrap_or(text.len());
        prop_assert_eq!(emitted, &text[..cut]);
    }
}
