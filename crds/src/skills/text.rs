//! Text normalisation for skill detection: splitting a query or a skill's fields into
//! lowercase words, dropping words that carry no topic, spelling out common abbreviations and
//! folding inflections with a small suffix stripper, so "caching", "caches" and "cache" are
//! one term.

/// Words that carry no topic: English function words, and the verbs, quantities and
/// pleasantries that say what a user wants done rather than what it is about.
#[rustfmt::skip]
const STOP_WORDS: &[&str] = &[
    // Function words.
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
    // Requests, pleasantries and filler.
    "anyone", "anything", "able", "already", "always", "another", "around", "away", "back",
    "best", "better", "bit", "cannot", "certain", "clearly", "doesn", "don", "else", "etc",
    "everything", "exactly", "explain", "fine", "get", "gets", "getting", "give", "go", "goes",
    "going", "good", "got", "great", "hello", "help", "hey", "hi", "idea", "instead", "keep",
    "keeps", "kind", "know", "let", "like", "look", "looks", "lot", "lots", "make", "makes",
    "making", "many", "maybe", "need", "needs", "new", "nothing", "ok", "okay", "one", "please",
    "pretty", "quite", "rather", "really", "right", "say", "see", "seem", "seems", "show",
    "something", "sometimes", "somewhere", "sure", "take", "takes", "tell", "thank", "thanks",
    "thing", "things", "think", "today", "try", "trying", "two", "three", "use", "used", "uses",
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

/// Lowercase terms of `text`: split at anything but letters and digits, contractions and
/// possessives folded ("what's" → "what", "don't" → dropped), stop words, single letters and
/// plain numbers removed, common abbreviations spelled out ("repo" → "repository"), inflections
/// stripped.
pub(crate) fn terms(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '’'))
        .filter_map(|raw| {
            let word = raw.trim_matches(|c| c == '\'' || c == '’');
            // "don't", "isn't": negated auxiliaries carry no topic. "what's", "user's": the
            // word before the apostrophe.
            let word = match word.split_once(['\'', '’']) {
                Some((_, "t")) => return None,
                Some((base, _)) => base,
                None => word,
            };
            let word = word.to_lowercase();
            let informative = word.chars().count() > 1
                && !word.chars().all(|c| c.is_ascii_digit())
                && !STOP_WORDS.contains(&word.as_str());
            let word = ABBREVIATIONS
                .iter()
                .find(|(short, _)| *short == word)
                .map_or(word.as_str(), |(_, long)| long);
            informative.then(|| stem(word))
        })
}

/// A small suffix stripper in the spirit of Porter's first step: plurals, "-ing" and "-ed",
/// then a final "e", so that a word and its inflections share a stem ("declining",
/// "declines" and "decline" → "declin"). It over-strips some words; only consistency matters.
pub(crate) fn stem(word: &str) -> String {
    let mut w = word.to_owned();
    let len = |w: &str| w.chars().count();
    if len(&w) <= 3 || !w.is_ascii() {
        return w;
    }
    if w.ends_with("ies") && len(&w) > 4 {
        w.truncate(w.len() - 3);
        w.push('y');
    } else if ["sses", "ches", "shes", "xes", "zes"]
        .iter()
        .any(|s| w.ends_with(s))
    {
        w.truncate(w.len() - 2);
    } else if w.ends_with('s') && !["ss", "us", "is"].iter().any(|s| w.ends_with(s)) {
        w.truncate(w.len() - 1);
    } else if w.ends_with("ing") && len(&w) >= 6 {
        w.truncate(w.len() - 3);
        undouble(&mut w);
    } else if w.ends_with("ed") && len(&w) >= 5 {
        w.truncate(w.len() - 2);
        undouble(&mut w);
    }
    if w.ends_with('e') && len(&w) > 3 {
        w.pop();
    }
    w
}

/// "running" → "runn" → "run"; "rolled" keeps "roll" (l, s and z double in the stem itself).
fn undouble(w: &mut String) {
    let bytes = w.as_bytes();
    if let [.., a, b] = bytes
        && a == b
        && !matches!(a, b'l' | b's' | b'z')
        && !matches!(a, b'a' | b'e' | b'i' | b'o' | b'u')
    {
        w.pop();
    }
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
    }

    #[test]
    fn drops_function_words_contractions_letters_and_numbers() {
        assert_eq!(
            all("What's the user's p99? I don't know, 2024 was a year."),
            ["user", "p99", "year"]
        );
        assert_eq!(all("copy-on-write"), ["copy"]);
        assert!(all("hi! how are you today?").is_empty());
    }
}
