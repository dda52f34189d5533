//! Stop sequences over streamed text.
//!
//! Owns [`StopMatcher`]: it receives the text deltas of one sequence and passes on only text
//! that can no longer be part of a stop string, holding back a tail that might still grow into
//! one (stop strings may span tokens and deltas). When a stop string appears, the output ends
//! just before its earliest occurrence, the way OpenAI's `stop` parameter does, and the stop
//! string itself is never emitted.

/// What one [`StopMatcher::push`] lets through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutput {
    /// Text safe to emit now.
    pub text: String,
    /// Index (into the matcher's stop strings) of the stop string that ended the output.
    pub stopped_by: Option<usize>,
}

/// Holds back streamed text that may be the start of a stop string.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

/// Where the held text must be cut.
enum Cut {
    /// A stop string begins at this byte offset: the output ends here.
    Stop { at: usize, stop: usize },
    /// The text from this byte offset on may still become a stop string.
    HoldFrom(usize),
}

impl StopMatcher {
    /// A matcher for `stops`; empty strings never match.
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.to_vec(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Adds the next piece of text. After a stop string was found, returns nothing.
    pub fn push(&mut self, text: &str) -> StopOutput {
        if self.stopped {
            return StopOutput::default();
        }
        self.held.push_str(text);
        match self.find_cut() {
            Some(Cut::Stop { at, stop }) => {
                self.stopped = true;
                self.held.truncate(at);
                StopOutput {
                    text: std::mem::take(&mut self.held),
                    stopped_by: Some(stop),
                }
            }
            Some(Cut::HoldFrom(at)) => {
                let tail = self.held.split_off(at);
                StopOutput {
                    text: std::mem::replace(&mut self.held, tail),
                    stopped_by: None,
                }
            }
            None => StopOutput {
                text: std::mem::take(&mut self.held),
                stopped_by: None,
            },
        }
    }

    /// Ends the stream without more text: releases what was held back (nothing if stopped).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Whether a stop string has been found.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// The earliest offset of the held text where a stop string starts or may start.
    fn find_cut(&self) -> Option<Cut> {
        let stops = || self.stops.iter().enumerate().filter(|(_, s)| !s.is_empty());
        for (at, _) in self.held.char_indices() {
            let rest = &self.held[at..];
            if let Some((stop, _)) = stops().find(|(_, s)| rest.starts_with(s.as_str())) {
                return Some(Cut::Stop { at, stop });
            }
            if stops().any(|(_, s)| s.starts_with(rest)) {
                return Some(Cut::HoldFrom(at));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        let stops: Vec<String> = stops.iter().map(|s| (*s).to_owned()).collect();
        StopMatcher::new(&stops)
    }

    #[test]
    fn stop_spanning_pieces_is_cut_and_never_emitted() {
        let mut stop = matcher(&["</answer>"]);
        assert_eq!(stop.push("42 </an").text, "42 ");
        let last = stop.push("swer> trailing");
        assert_eq!(
            last,
            StopOutput {
                text: String::new(),
                stopped_by: Some(0)
            }
        );
        assert!(stop.is_stopped());
        assert_eq!(stop.push("more").text, "");
        assert_eq!(stop.finish(), "");
    }

    #[test]
    fn held_text_is_released_when_it_stops_looking_like_a_stop() {
        let mut stop = matcher(&["STOP"]);
        assert_eq!(stop.push("ST").text, "");
        assert_eq!(stop.push("A").text, "STA");
        assert_eq!(stop.push("S").text, "");
        assert_eq!(stop.finish(), "S");
    }

    #[test]
    fn earliest_occurrence_wins_even_when_a_shorter_stop_completes_first() {
        let mut stop = matcher(&["bc", "abcd"]);
        assert_eq!(stop.push("xab").text, "x");
        assert_eq!(stop.push("c").text, "");
        let last = stop.push("d");
        assert_eq!(
            last,
            StopOutput {
                text: String::new(),
                stopped_by: Some(1)
            }
        );
    }

    #[test]
    fn no_stops_passes_everything_through() {
        let mut stop = matcher(&[""]);
        assert_eq!(stop.push("héllo").text, "héllo");
        assert_eq!(stop.finish(), "");
    }
}
