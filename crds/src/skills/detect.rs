//! Skill detection: which skills a request is about when it names none.
//!
//! A BM25 ranking over each skill's name, keywords and description (weighted 3 : 2 : 1, as
//! BM25F does with field weights), plus a bonus for every multi-word keyword that appears in
//! the query as a phrase. A skill is chosen when its score reaches `threshold` and is within
//! `relative_cutoff` of the best score; at most `max_skills` are chosen, best first. Text is
//! folded to lowercase words with light suffix stripping, so "caches" matches "cache".
//!
//! The same detector runs in the daemon and in the router, so both agree on which skills a
//! request needs.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// What detection knows of a skill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkillCard {
    /// The skill's name.
    pub name: String,
    /// When to use it.
    pub description: String,
    /// Words and phrases requests about it contain.
    pub keywords: Vec<String>,
}

/// Detection thresholds and BM25 parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectorConfig {
    /// Lowest score that selects a skill.
    pub threshold: f32,
    /// A skill is selected only if its score is at least this fraction of the best one.
    pub relative_cutoff: f32,
    /// Most skills selected for one request.
    pub max_skills: usize,
    /// BM25 term-frequency saturation.
    pub k1: f32,
    /// BM25 length normalisation.
    pub b: f32,
    /// Score added per multi-word keyword found as a phrase in the query.
    pub phrase_bonus: f32,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            threshold: 1.6,
            relative_cutoff: 0.6,
            max_skills: 3,
            k1: 1.2,
            b: 0.5,
            phrase_bonus: 1.5,
        }
    }
}

/// A selected skill and its score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// The skill's name.
    pub name: String,
    /// Its score (higher is more relevant).
    pub score: f32,
}

const NAME_WEIGHT: f32 = 3.0;
const KEYWORD_WEIGHT: f32 = 2.0;
const DESCRIPTION_WEIGHT: f32 = 1.0;

#[derive(Debug, Clone)]
struct IndexedSkill {
    name: String,
    /// Weighted term frequencies, by term id.
    terms: HashMap<u32, f32>,
    length: f32,
    /// Multi-word keywords as term-id sequences.
    phrases: Vec<Vec<u32>>,
}

/// A detector over a fixed set of skills. Build it once per change of the skill set; detection
/// itself allocates only the query's terms.
#[derive(Debug, Clone)]
pub struct SkillDetector {
    config: DetectorConfig,
    vocabulary: HashMap<String, u32>,
    idf: Vec<f32>,
    skills: Vec<IndexedSkill>,
    average_length: f32,
}

impl SkillDetector {
    /// Index `skills`.
    pub fn new(skills: impl IntoIterator<Item = SkillCard>, config: DetectorConfig) -> Self {
        let mut vocabulary: HashMap<String, u32> = HashMap::new();
        let mut intern = |word: String| {
            let next = vocabulary.len() as u32;
            *vocabulary.entry(word).or_insert(next)
        };
        let mut indexed = Vec::new();
        for card in skills {
            let mut terms: HashMap<u32, f32> = HashMap::new();
            let mut length = 0.0;
            let mut add = |text: &str, weight: f32, terms: &mut HashMap<u32, f32>| {
                for word in words(text) {
                    *terms.entry(intern(word)).or_default() += weight;
                    length += weight;
                }
            };
            add(&card.name.replace('-', " "), NAME_WEIGHT, &mut terms);
            add(&card.description, DESCRIPTION_WEIGHT, &mut terms);
            for keyword in &card.keywords {
                add(keyword, KEYWORD_WEIGHT, &mut terms);
            }
            let phrases = card
                .keywords
                .iter()
                .map(|k| words(k).map(&mut intern).collect::<Vec<_>>())
                .filter(|p| p.len() > 1)
                .collect();
            indexed.push(IndexedSkill {
                name: card.name,
                terms,
                length,
                phrases,
            });
        }
        let n = indexed.len() as f32;
        let mut document_frequency = vec![0.0f32; vocabulary.len()];
        for skill in &indexed {
            for term in skill.terms.keys() {
                document_frequency[*term as usize] += 1.0;
            }
        }
        let idf = document_frequency
            .iter()
            .map(|df| (1.0 + (n - df + 0.5) / (df + 0.5)).ln())
            .collect();
        let average_length = if indexed.is_empty() {
            1.0
        } else {
            indexed.iter().map(|s| s.length).sum::<f32>() / n
        };
        Self {
            config,
            vocabulary,
            idf,
            skills: indexed,
            average_length,
        }
    }

    /// The skills `query` is about, best first (possibly none).
    pub fn detect(&self, query: &str) -> Vec<Detection> {
        let mut scored = self.scores(query);
        scored.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| a.name.cmp(&b.name))
        });
        let best = scored.first().map_or(0.0, |d| d.score);
        scored.retain(|d| {
            d.score >= self.config.threshold && d.score >= best * self.config.relative_cutoff
        });
        scored.truncate(self.config.max_skills);
        scored
    }

    /// Every skill's score for `query`, in index order.
    pub fn scores(&self, query: &str) -> Vec<Detection> {
        let mut query_terms: Vec<Option<u32>> = words(query)
            .map(|w| self.vocabulary.get(&w).copied())
            .collect();
        let sequence = query_terms.clone();
        query_terms.sort_unstable();
        query_terms.dedup();
        let DetectorConfig {
            k1,
            b,
            phrase_bonus,
            ..
        } = self.config;
        self.skills
            .iter()
            .map(|skill| {
                let norm = k1 * (1.0 - b + b * skill.length / self.average_length);
                let mut score: f32 = query_terms
                    .iter()
                    .flatten()
                    .filter_map(|t| skill.terms.get(t).map(|tf| (t, tf)))
                    .map(|(t, tf)| self.idf[*t as usize] * tf * (k1 + 1.0) / (tf + norm))
                    .sum();
                let phrases = skill
                    .phrases
                    .iter()
                    .filter(|p| {
                        sequence
                            .windows(p.len())
                            .any(|w| w.iter().zip(p.iter()).all(|(q, t)| *q == Some(*t)))
                    })
                    .count();
                score += phrase_bonus * phrases as f32;
                Detection {
                    name: skill.name.clone(),
                    score,
                }
            })
            .collect()
    }
}

/// English words that carry no topic.
const STOP_WORDS: &[&str] = &[
    "a", "about", "an", "and", "are", "as", "at", "be", "by", "can", "do", "does", "for", "from",
    "how", "i", "if", "in", "is", "it", "its", "me", "my", "of", "on", "or", "our", "should", "so",
    "that", "the", "this", "to", "use", "we", "what", "when", "where", "which", "why", "with",
    "you", "your", "it's", "i'm", "am", "was", "there", "have", "has", "get", "need", "want",
    "help", "please", "some", "one", "would", "could", "them", "they", "than", "then", "into",
    "up", "out", "not", "no", "but", "all", "any", "every", "each",
];

/// Lowercase words of `text`, stop words removed, suffixes stripped.
fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .filter(|w| !STOP_WORDS.contains(&w.as_str()))
        .map(|w| stem(&w))
}

/// A deliberately small suffix stripper: plural and common verb endings.
fn stem(word: &str) -> String {
    let n = word.chars().count();
    for (suffix, min_len) in [("ing", 6), ("ed", 5), ("s", 4)] {
        if n >= min_len && word.ends_with(suffix) && !word.ends_with("ss") {
            return word[..word.len() - suffix.len()].to_owned();
        }
    }
    word.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cards() -> Vec<SkillCard> {
        vec![
            SkillCard {
                name: "kv-cache".into(),
                description: "Paged KV caches and prefix caching.".into(),
                keywords: vec!["block table".into(), "radix tree".into()],
            },
            SkillCard {
                name: "sql".into(),
                description: "Writing SQL queries for Postgres.".into(),
                keywords: vec!["join".into(), "index".into()],
            },
        ]
    }

    #[test]
    fn picks_the_matching_skill_and_nothing_for_unrelated_queries() {
        let d = SkillDetector::new(cards(), DetectorConfig::default());
        let hits = d.detect("how do block tables work in a paged kv cache?");
        assert_eq!(
            hits.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(),
            ["kv-cache"]
        );
        assert!(d.detect("what's the weather in Paris tomorrow").is_empty());
        assert!(d.detect("").is_empty());
    }

    #[test]
    fn respects_max_skills_and_orders_best_first() {
        let config = DetectorConfig {
            max_skills: 1,
            relative_cutoff: 0.0,
            ..DetectorConfig::default()
        };
        let d = SkillDetector::new(cards(), config);
        let hits = d.detect("sql join index for the kv cache radix tree block table");
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].name, "kv-cache");
    }

    #[test]
    fn phrases_score_above_their_scattered_words() {
        let d = SkillDetector::new(cards(), DetectorConfig::default());
        let phrase = d.scores("radix tree")[0].score;
        let scattered = d.scores("tree radix")[0].score;
        assert!(phrase > scattered, "{phrase} > {scattered}");
    }

    #[test]
    fn stems_plurals_and_verb_forms() {
        assert_eq!(stem("caches"), stem("cache"));
        assert_eq!(stem("tables"), stem("table"));
        assert_eq!(stem("profiling"), "profil");
        assert_eq!(stem("class"), "class");
    }

    #[test]
    fn an_empty_detector_detects_nothing() {
        let d = SkillDetector::new(Vec::new(), DetectorConfig::default());
        assert!(d.detect("anything at all").is_empty());
    }
}
