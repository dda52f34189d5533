//! A small server-sent-events parser: bytes in, `(event, data)` records out. It keeps partial
//! lines (and partial UTF-8 characters) across chunks, joins multi-line `data`, ignores comments
//! and fields it does not use, and accepts `\n` or `\r\n` line ends.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Incremental parser state.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
}

impl SseParser {
    /// Feeds a chunk; returns the events it completes.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        for &byte in chunk {
            if byte != b'\n' {
                self.line.push(byte);
                continue;
            }
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            let line = String::from_utf8_lossy(&self.line).into_owned();
            self.line.clear();
            if line.is_empty() {
                if let Some(data) = self.data.take() {
                    events.push(SseEvent {
                        event: self.event.take(),
                        data,
                    });
                }
                self.event = None;
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line.as_str(), ""),
            };
            match field {
                "event" => self.event = Some(value.to_string()),
                "data" => match self.data.as_mut() {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => self.data = Some(value.to_string()),
                },
                _ => {}
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_split_anywhere() {
        let stream =
            "event: load\ndata: {\"a\":1}\n\n: comment\n\ndata: x\ndata: y\r\n\r\ndata: [DONE]\n\n";
        let whole = SseParser::default().feed(stream.as_bytes());
        let expected = vec![
            SseEvent {
                event: Some("load".to_string()),
                data: "{\"a\":1}".to_string(),
            },
            SseEvent {
                event: None,
                data: "x\ny".to_string(),
            },
            SseEvent {
                event: None,
                data: "[DONE]".to_string(),
            },
        ];
        assert_eq!(whole, expected);
        for split in 1..stream.len() {
            let mut parser = SseParser::default();
            let mut events = parser.feed(&stream.as_bytes()[..split]);
            events.extend(parser.feed(&stream.as_bytes()[split..]));
            assert_eq!(events, expected, "split at {split}");
        }
    }

    #[test]
    fn keeps_multibyte_characters_split_across_chunks() {
        let bytes = "data: é\n\n".as_bytes();
        let mut parser = SseParser::default();
        let mut events = parser.feed(&bytes[..7]);
        events.extend(parser.feed(&bytes[7..]));
        assert_eq!(events[0].data, "é");
    }
}
