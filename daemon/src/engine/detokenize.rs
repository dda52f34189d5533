//! Streaming detokenization: token ids in, complete UTF-8 text deltas out.
//!
//! Owns [`StreamDecoder`]. A character may span several byte-level tokens (emoji, CJK,
//! accented letters), so the bytes of a token that end mid-character are held back until the
//! character completes. Invalid byte sequences become U+FFFD exactly where
//! [`String::from_utf8_lossy`] would put them, so the concatenated deltas (plus
//! [`StreamDecoder::finish`]) always equal [`GgufTokenizer::decode`] of all the ids.

use super::tokenizer::GgufTokenizer;

/// The longest byte sequence of one UTF-8 character.
const MAX_UTF8_CHAR_BYTES: usize = 4;

/// Incremental decoder of one sequence's generated tokens.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    /// Bytes of an incomplete character at the end of the stream so far (at most 3).
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds token `id` and returns the text that is now complete (possibly empty). Ids outside
    /// the vocabulary add nothing, as in [`GgufTokenizer::decode`].
    pub fn push(&mut self, tokenizer: &GgufTokenizer, id: u32) -> String {
        match tokenizer.token_bytes(id) {
            Some(bytes) => self.push_bytes(bytes),
            None => String::new(),
        }
    }

    /// Adds raw bytes and returns the text that is now complete (possibly empty).
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut text = String::with_capacity(self.pending.len());
        let mut rest = self.pending.as_slice();
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(error) => {
                    let (valid, after) = rest.split_at(error.valid_up_to());
                    // `valid_up_to` marks a prefix that is valid UTF-8 by definition.
                    text.push_str(&String::from_utf8_lossy(valid));
                    match error.error_len() {
                        Some(invalid_len) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[invalid_len.min(after.len())..];
                        }
                        None => {
                            // A character that the next bytes may complete.
                            debug_assert!(after.len() < MAX_UTF8_CHAR_BYTES);
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let held = rest.len();
        let start = self.pending.len() - held;
        self.pending.drain(..start);
        text
    }

    /// Ends the stream: an incomplete character left over becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }

    /// Whether bytes of an incomplete character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(pieces: &[&[u8]]) -> String {
        let mut decoder = StreamDecoder::new();
        let mut text: String = pieces
            .iter()
            .map(|piece| decoder.push_bytes(piece))
            .collect();
        text.push_str(&decoder.finish());
        text
    }

    #[test]
    fn holds_back_a_character_split_across_pieces() {
        let crab = "🦀".as_bytes();
        let mut decoder = StreamDecoder::new();
        assert_eq!(decoder.push_bytes(b"a"), "a");
        assert_eq!(decoder.push_bytes(&crab[..1]), "");
        assert_eq!(decoder.push_bytes(&crab[1..3]), "");
        assert!(decoder.has_pending());
        assert_eq!(decoder.push_bytes(&crab[3..]), "🦀");
        assert!(!decoder.has_pending());
        assert_eq!(decoder.finish(), "");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters_like_lossy_decoding() {
        let cases: [&[&[u8]]; 4] = [
            &[b"a\xffb"],
            &[b"\xe2\x82", b"x"],
            &[b"\xf0\x9f", b"\x98"],
            &[b"\xc3", b"\xa9\x80", b"\xed\xa0\x80"],
        ];
        for pieces in cases {
            let all: Vec<u8> = pieces.concat();
            assert_eq!(
                decode_in_pieces(pieces),
                String::from_utf8_lossy(&all),
                "{pieces:?}"
            );
        }
    }
}
