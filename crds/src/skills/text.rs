//! Text normalisation for skill detection: splitting a query or a skill's fields into
//! lowercase words, dropping words that carry no topic, keeping lexicalised hyphenated
//! compounds ("day-to-day", "follow-up") whole, spelling out common abbreviations and stemming
//! with the Snowball English (Porter 2) stemmer, so "caching", "caches" and "cache" are one
//! term.

use std::sync::LazyLock;

use rust_stemmers::{Algorithm, Stemmer};

/// English function words: they carry no topic.
#[rustfmt::skip]
const FUNCTION_WORDS: &[&str] = &[
    "a", "about", "above", "after", "again", "against", "all", "also", "am", "an", "and", "any",
    "are", "as", "at", "be", "because", "been", "before", "being", "below", "between", "both",
    "but", "by", "can", "could", "did", "do", "does", "doing", "down", "during", "each",
    "either", "even", "ever", "every", "few", "for", "from", "further", "had", "has", "have",
    "having", "he", "her", "here", "hers", "him", "his", "how", "i", "if", "in", "into", "is",
    "it", "its", "itself", "just", "least", "less", "may", "me", "might", "mine", "more",
    "most", "much", "must", "my", "myself", "neither", "no", "nor", "not", "now", "of", "off",
    "on", "once", "only", "or", "other", "our", "ours", "out", "over", "own", "same", "shall",
    "she", "should", "since", "so", "some", "still", "such", "than", "that", "the", "their",
    "them", "then", "there", "these", "they", "this", "those", "though", "through", "thus",
    "to", "too", "under", "until", "up", "upon", "us", "very", "via", "was", "we", "were",
    "what", "whatever", "when", "where", "whether", "which", "while", "who", "whom", "whose",
    "why", "will", "with", "within", "without", "would", "yet", "you", "your", "yours",
    "yourself",
    // Numerals.
    "one", "two", "three",
];

/// Words that say what a user wants done rather than what it is about: the verbs,
/// quantities and pleasantries of requests.
#[rustfmt::skip]
const FILLER_WORDS: &[&str] = &[
    "anyone", "anything", "able", "already", "always", "another", "around", "away", "back",
    "best", "better", "bit", "cannot", "certain", "clearly", "doesn", "don", "else", "etc",
    "everything", "exactly", "explain", "fine", "get", "gets", "getting", "give", "go", "goes",
    "going", "good", "got", "great", "hello", "help", "hey", "hi", "idea", "instead", "keep",
    "keeps", "kind", "know", "let", "like", "look", "looks", "lot", "lots", "make", "makes",
    "making", "many", "maybe", "need", "needs", "new", "nothing", "ok", "okay", "please",
    "pretty", "quite", "rather", "really", "right", "say", "see", "seem", "seems", "show",
    "something", "sometimes", "somewhere", "sure", "take", "takes", "tell", "thank", "thanks",
    "thing", "things", "think", "today", "try", "trying", "use", "used", "uses",
    "using", "want", "wants", "way", "ways", "well", "whole", "work", "works", "working",
    "write", "writes", "writing", "written", "wrote", "fix", "fixes", "fixing", "fixed", "find",
    "finding", "found", "bad", "worse", "worst", "nice", "happy",
];

/// Abbreviations users write for words skills spell out, folded to the full word.
const ABBREVIATIONS: &[(&str, &str)] = &[
    ("auth", "authentication"),
    ("config", "configuration"),
    ("db", "database"),
    ("deps", "dependency"),
    ("dev", "development"),
    ("env", "environment"),
    ("img", "image"),
    ("js", "javascript"),
    ("k8s", "kubernetes"),
    ("lib", "library"),
    ("perf", "performance"),
    ("pg", "postgresql"),
    ("pkg", "package"),
    ("postgres", "postgresql"),
    ("prod", "production"),
    ("py", "python"),
    ("regexp", "regex"),
    ("repo", "repository"),
    ("repos", "repository"),
    ("ts", "typescript"),
];

/// Lowercase terms of `text`: split at anything but letters, digits, apostrophes and hyphens,
/// contractions and possessives folded ("what's" → "what", "don't" → dropped), stop words,
/// single letters and plain numbers removed, common abbreviations spelled out ("repo" →
/// "repository"), stemmed.
///
/// A hyphenated word is split into its words ("multi-stage" → "multi", "stage"; "email-writing"
/// → "email"), unless one of them is a function word, a single letter or a number: such a
/// compound is an idiom whose words mean something else alone ("day-to-day", "follow-up",
/// "copy-on-write", "three-day"), so it stays one term ("daytoday").
pub(crate) fn terms(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !(c.is_alphanumeric() || matches!(c, '\'' | '’' | '-')))
        .flat_map(|chunk| {
            let parts: Vec<&str> = chunk.split('-').filter(|p| !p.is_empty()).collect();
            let lexicalised = parts.len() > 1 && parts.iter().any(|p| function_part(p));
            if lexicalised {
                word_term(&parts.concat()).into_iter().collect()
            } else {
                parts.into_iter().filter_map(word_term).collect::<Vec<_>>()
            }
        })
}

/// The term of one word (no hyphens), or `None` when it carries no topic.
fn word_term(raw: &str) -> Option<String> {
    let word = raw.trim_matches(|c| c == '\'' || c == '’');
    // "don't", "isn't": negated auxiliaries carry no topic. "what's", "user's": the word
    // before the apostrophe.
    let word = match word.split_once(['\'', '’']) {
        Some((_, "t")) => return None,
        Some((base, _)) => base,
        None => word,
    };
    if !informative(word) {
        return None;
    }
    let word = word.to_lowercase();
    let word = ABBREVIATIONS
        .iter()
        .find(|(short, _)| *short == word)
        .map_or(word.as_str(), |(_, long)| long);
    Some(stem(word))
}

/// Whether a word can carry a topic: more than one letter, not a plain number, neither a
/// function word nor request filler.
fn informative(word: &str) -> bool {
    let word = word.to_lowercase();
    !function_part(&word) && !FILLER_WORDS.contains(&word.as_str())
}

/// Whether a part of a hyphenated word makes it an idiom: a function word, a single letter
/// or a number ("day-to-day", "x-axis", "three-day"; not "email-writing").
fn function_part(word: &str) -> bool {
    let word = word.to_lowercase();
    word.chars().count() <= 1
        || word.chars().all(|c| c.is_ascii_digit())
        || FUNCTION_WORDS.contains(&word.as_str())
}

/// The Snowball English (Porter 2) stem of a lowercase word: a word and its inflections and
/// derivations share it ("declining", "declines", "decline" → "declin"; "politely",
/// "polite" → "polit").
pub(crate) fn stem(word: &str) -> String {
    static ENGLISH: LazyLock<Stemmer> = LazyLock::new(|| Stemmer::create(Algorithm::English));
    ENGLISH.stem(word).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(text: &str) -> Vec<String> {
        terms(text).collect()
    }

    #[test]
    fn inflections_share_a_stem() {
        for group in [
            &["cache", "caches", "caching", "cached"][..],
            &["decline", "declines", "declining", "declined"],
            &["query", "queries"],
            &["table", "tables"],
            &["rebase", "rebasing"],
            &["run", "running"],
        ] {
            let stems: Vec<String> = group.iter().map(|w| stem(w)).collect();
            assert!(
                stems.windows(2).all(|p| p[0] == p[1]),
                "{group:?} → {stems:?}"
            );
        }
        assert_eq!(stem("class"), "class");
        assert_eq!(stem("status"), "status");
        assert_eq!(stem("roll"), "roll");
        assert_eq!(stem("profiling"), stem("profile"));
        assert_eq!(stem("politely"), stem("polite"));
        assert_eq!(stem("visualization"), stem("visualize"));
    }

    #[test]
    fn drops_function_words_contractions_letters_and_numbers() {
        assert_eq!(
            all("What's the user's p99? I don't know, 2024 was a year."),
            ["user", "p99", "year"]
        );
        assert!(all("hi! how are you today?").is_empty());
    }

    #[test]
    fn hyphenated_idioms_stay_whole_and_other_compounds_split() {
        assert_eq!(all("copy-on-write"), all("copyonwrite"));
        assert_eq!(all("a follow-up"), all("followup"));
        // "day" alone is not a term of "three-day" or "day-to-day".
        assert!(!all("a three-day trip").contains(&stem("day")));
        assert!(!all("day-to-day work").contains(&stem("day")));
        assert_eq!(all("multi-stage build"), all("multi stage build"));
        assert_eq!(all("re-render"), ["re", "render"]);
        assert_eq!(all("e-mail"), all("email"));
        // Request filler does not make an idiom: a skill named "email-writing" is about email.
        assert_eq!(all("email-writing"), all("email"));
    }
}
