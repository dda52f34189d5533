//! Skill detection: which skills a request is about when it names none.
//!
//! Each skill is scored with BM25 over its name, keywords and description (weighted
//! 3 : 2 : 1, as BM25F does with field weights), plus a bonus for every multi-word keyword
//! that appears in the query as a phrase. Text is normalised by `super::text`: lowercase
//! words, stop words dropped, hyphenated idioms kept whole ("day-to-day"), common
//! abbreviations spelled out, words stemmed with Snowball English ("caching" matches
//! "cache").
//!
//! Selection is greedy. The best skill is chosen if its score reaches `threshold`; it then
//! *claims* the query words it matches. Each further skill (at most `max_skills` in all) is
//! scored only on the words it matches more strongly than every skill already chosen, and is
//! chosen if that reaches `further_threshold`. So a second skill is chosen for a distinct part
//! of the request ("write pytest tests for the status codes of our REST API"), not for sharing
//! a word with the first ("the p99 latency of our API").
//!
//! With a [`TextEmbedder`] (`--detector-embeddings`), meaning checks the words: each skill's
//! card is embedded once, and a query's vector is compared with them by cosine. A skill
//! chosen by its words is dropped when its similarity is below `semantic_veto` ("summarise
//! the *plot* of Hamlet" is not about charts), and when no skill is left, the most similar one
//! is chosen if it reaches `semantic_select` (a request with none of a skill's words).
//!
//! The same detector runs in the daemon and in the router, so both agree on which skills a
//! request needs. Its accuracy on a labelled query set is measured by
//! `crds/tests/detection_accuracy.rs` (see `docs/skills.md`), its speed by
//! `crds/examples/detect_bench.rs`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::embedding::{LoadEmbeddingsError, TextEmbedder, cosine};
use super::text::terms;

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
#[serde(default)]
pub struct DetectorConfig {
    /// Lowest score that selects the best skill.
    pub threshold: f32,
    /// Lowest score that selects each further skill, counting only the query words it
    /// matches more strongly than every skill already selected.
    pub further_threshold: f32,
    /// Most skills selected for one request.
    pub max_skills: usize,
    /// BM25 term-frequency saturation.
    pub k1: f32,
    /// BM25 length normalisation.
    pub b: f32,
    /// Score added per multi-word keyword found as a phrase in the query.
    pub phrase_bonus: f32,
    /// With embeddings: lowest cosine between query and skill card that keeps a skill chosen
    /// by its words.
    pub semantic_veto: f32,
    /// With embeddings: lowest cosine that chooses the most similar skill when words chose
    /// none (or only vetoed ones).
    pub semantic_select: f32,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            threshold: 1.15,
            further_threshold: 2.3,
            max_skills: 3,
            k1: 1.2,
            b: 0.5,
            phrase_bonus: 0.6,
            semantic_veto: 0.22,
            semantic_select: 0.22,
        }
    }
}

/// What the daemon and the router build their detectors from: the thresholds and, when
/// `--detector-embeddings` names a folder, the embeddings of the semantic checks.
#[derive(Debug, Clone, Default)]
pub struct DetectorSettings {
    /// Thresholds and BM25 parameters.
    pub config: DetectorConfig,
    /// The embeddings; `None`: word matching only.
    pub embedder: Option<Arc<TextEmbedder>>,
}

impl DetectorSettings {
    /// The default thresholds, with the embeddings of `folder` when one is given
    /// (`--detector-embeddings`).
    pub fn load(folder: Option<&Path>) -> Result<Self, LoadEmbeddingsError> {
        Ok(Self {
            embedder: folder.map(TextEmbedder::load).transpose()?.map(Arc::new),
            ..Self::default()
        })
    }

    /// A detector over `skills` with these settings.
    pub fn build(&self, skills: impl IntoIterator<Item = SkillCard>) -> SkillDetector {
        SkillDetector::with_embedder(skills, self.config.clone(), self.embedder.clone())
    }

    /// For logs: "words only", or "words and meaning (embeddings from FOLDER)".
    pub fn mode(&self) -> String {
        match &self.embedder {
            None => "words only".to_string(),
            Some(embedder) => format!(
                "words and meaning (embeddings from {})",
                embedder.folder().display()
            ),
        }
    }
}

impl PartialEq for DetectorSettings {
    /// Same thresholds and the same loaded embeddings (or none).
    fn eq(&self, other: &Self) -> bool {
        self.config == other.config
            && match (&self.embedder, &other.embedder) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

/// A selected skill and its score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// The skill's name.
    pub name: String,
    /// Its score over the whole query (higher is more relevant).
    pub score: f32,
    /// Cosine between the query and the skill's card, when the detector has embeddings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f32>,
}

impl std::fmt::Display for Detection {
    /// `name<TAB>score`, and `<TAB>cos similarity` with embeddings (`skillkv skills detect`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}\t{:.2}", self.name, self.score)?;
        match self.similarity {
            Some(similarity) => write!(f, "\tcos {similarity:.2}"),
            None => Ok(()),
        }
    }
}

const NAME_WEIGHT: f32 = 3.0;
const KEYWORD_WEIGHT: f32 = 2.0;
const DESCRIPTION_WEIGHT: f32 = 1.0;

#[derive(Debug, Clone)]
struct IndexedSkill {
    name: String,
    /// BM25 length normalisation `k1 * (1 - b + b * length / average_length)`.
    norm: f32,
    /// Multi-word keywords as term-id sequences.
    phrases: Vec<Vec<u32>>,
}

/// A detector over a fixed set of skills. Build it once per change of the skill set;
/// detection reads it only, so one detector serves concurrent requests.
#[derive(Debug, Clone)]
pub struct SkillDetector {
    config: DetectorConfig,
    vocabulary: HashMap<String, u32>,
    idf: Vec<f32>,
    /// Per term: the skills containing it and its weighted frequency there.
    postings: Vec<Vec<(u32, f32)>>,
    skills: Vec<IndexedSkill>,
    semantic: Option<SemanticIndex>,
}

/// The embedder and every skill card's vector (`None`: the card has no tokens).
#[derive(Debug, Clone)]
struct SemanticIndex {
    embedder: Arc<TextEmbedder>,
    cards: Vec<Option<Vec<f32>>>,
}

/// The text of a card that is embedded: name, description and keywords.
fn card_text(card: &SkillCard) -> String {
    format!(
        "{}. {} Keywords: {}",
        card.name.replace('-', " "),
        card.description,
        card.keywords.join(", ")
    )
}

/// One query term's contribution to one skill's score.
#[derive(Debug, Clone, Copy)]
struct Contribution {
    skill: u32,
    /// Index of the term among the query's distinct known terms.
    term: usize,
    score: f32,
}

impl SkillDetector {
    /// Index `skills` for word matching only.
    pub fn new(skills: impl IntoIterator<Item = SkillCard>, config: DetectorConfig) -> Self {
        Self::with_embedder(skills, config, None)
    }

    /// Index `skills`, and with `embedder` also embed their cards for the semantic checks.
    pub fn with_embedder(
        skills: impl IntoIterator<Item = SkillCard>,
        config: DetectorConfig,
        embedder: Option<Arc<TextEmbedder>>,
    ) -> Self {
        let mut card_vectors = Vec::new();
        let mut vocabulary: HashMap<String, u32> = HashMap::new();
        let mut intern = |word: String| {
            let next = vocabulary.len() as u32;
            *vocabulary.entry(word).or_insert(next)
        };
        let mut frequencies: Vec<HashMap<u32, f32>> = Vec::new();
        let mut lengths = Vec::new();
        let mut indexed = Vec::new();
        for card in skills {
            if let Some(embedder) = &embedder {
                card_vectors.push(embedder.embed(&card_text(&card)));
            }
            let mut tf: HashMap<u32, f32> = HashMap::new();
            let mut length = 0.0;
            let fields = [
                (card.name.as_str(), NAME_WEIGHT),
                (card.description.as_str(), DESCRIPTION_WEIGHT),
            ]
            .into_iter()
            .chain(card.keywords.iter().map(|k| (k.as_str(), KEYWORD_WEIGHT)));
            for (text, weight) in fields {
                for term in terms(text) {
                    *tf.entry(intern(term)).or_default() += weight;
                    length += weight;
                }
            }
            let phrases = card
                .keywords
                .iter()
                .map(|k| terms(k).map(&mut intern).collect::<Vec<_>>())
                .filter(|p| p.len() > 1)
                .collect();
            frequencies.push(tf);
            lengths.push(length);
            indexed.push(IndexedSkill {
                name: card.name,
                norm: 0.0,
                phrases,
            });
        }
        let n = indexed.len() as f32;
        let average_length = if indexed.is_empty() {
            1.0
        } else {
            (lengths.iter().sum::<f32>() / n).max(f32::MIN_POSITIVE)
        };
        let mut postings: Vec<Vec<(u32, f32)>> = vec![Vec::new(); vocabulary.len()];
        for (skill, tf) in frequencies.into_iter().enumerate() {
            for (term, frequency) in tf {
                postings[term as usize].push((skill as u32, frequency));
            }
        }
        // BM25's idf, divided by that of a term only one skill has: 1 for such a term whatever
        // the number of skills, so thresholds mean the same for 2 skills as for 200.
        let raw_idf = |df: f32| (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
        let unique = raw_idf(1.0);
        let idf = postings
            .iter()
            .map(|p| raw_idf(p.len() as f32) / unique)
            .collect();
        for (skill, length) in indexed.iter_mut().zip(lengths) {
            skill.norm = config.k1 * (1.0 - config.b + config.b * length / average_length);
        }
        Self {
            config,
            vocabulary,
            idf,
            postings,
            skills: indexed,
            semantic: embedder.map(|embedder| SemanticIndex {
                embedder,
                cards: card_vectors,
            }),
        }
    }

    /// Whether the semantic checks run (the detector has embeddings).
    pub fn is_semantic(&self) -> bool {
        self.semantic.is_some()
    }

    /// Every skill's cosine with `query`; `None` without embeddings.
    fn similarities(&self, query: &str) -> Option<Vec<f32>> {
        let semantic = self.semantic.as_ref()?;
        let vector = semantic.embedder.embed(query);
        Some(
            semantic
                .cards
                .iter()
                .map(|card| match (&vector, card) {
                    (Some(q), Some(c)) => cosine(q, c),
                    _ => 0.0,
                })
                .collect(),
        )
    }

    /// The semantic checks on the skills chosen by their words: drop those below
    /// `semantic_veto`; if none is left, choose the most similar skill at `semantic_select`.
    fn check_meaning(&self, chosen: &mut Vec<usize>, similarities: &[f32]) {
        chosen.retain(|&skill| similarities[skill] >= self.config.semantic_veto);
        if chosen.is_empty() {
            chosen.extend(self.best(similarities, |_| true, self.config.semantic_select));
        }
    }

    /// The skill with the highest of `values` (one per skill) at or above `threshold` among
    /// those `eligible`; ties go to the name that sorts first, so the result is deterministic.
    fn best(
        &self,
        values: &[f32],
        eligible: impl Fn(usize) -> bool,
        threshold: f32,
    ) -> Option<usize> {
        values
            .iter()
            .enumerate()
            .filter(|&(skill, value)| eligible(skill) && *value >= threshold)
            .max_by(|(a, x), (b, y)| {
                x.total_cmp(y)
                    .then_with(|| self.skills[*b].name.cmp(&self.skills[*a].name))
            })
            .map(|(skill, _)| skill)
    }

    /// The skills `query` is about, best first (possibly none).
    pub fn detect(&self, text: &str) -> Vec<Detection> {
        let query = self.query(text);
        let full = self.totals(&query, &[]);
        let mut claims = vec![0.0f32; query.distinct.len()];
        let mut chosen: Vec<usize> = Vec::new();
        while chosen.len() < self.config.max_skills {
            let (scores, threshold) = if chosen.is_empty() {
                (full.clone(), self.config.threshold)
            } else {
                (self.totals(&query, &claims), self.config.further_threshold)
            };
            let Some(skill) = self.best(&scores, |skill| !chosen.contains(&skill), threshold)
            else {
                break;
            };
            chosen.push(skill);
            for c in query
                .contributions
                .iter()
                .filter(|c| c.skill as usize == skill)
            {
                claims[c.term] = claims[c.term].max(c.score);
            }
        }
        let similarities = self.similarities(text);
        if let Some(similarities) = &similarities {
            self.check_meaning(&mut chosen, similarities);
        }
        chosen
            .into_iter()
            .map(|skill| Detection {
                name: self.skills[skill].name.clone(),
                score: full[skill],
                similarity: similarities.as_ref().map(|s| s[skill]),
            })
            .collect()
    }

    /// Every skill's score for the whole `query`, in index order.
    pub fn scores(&self, text: &str) -> Vec<Detection> {
        let query = self.query(text);
        let similarities = self.similarities(text);
        self.totals(&query, &[])
            .into_iter()
            .zip(&self.skills)
            .enumerate()
            .map(|(index, (score, skill))| Detection {
                name: skill.name.clone(),
                score,
                similarity: similarities.as_ref().map(|s| s[index]),
            })
            .collect()
    }

    /// The query's known terms, in order, and their contributions to every skill.
    fn query(&self, text: &str) -> Query {
        let sequence: Vec<Option<u32>> = terms(text)
            .map(|w| self.vocabulary.get(&w).copied())
            .collect();
        let mut distinct: Vec<u32> = sequence.iter().flatten().copied().collect();
        distinct.sort_unstable();
        distinct.dedup();
        let k1 = self.config.k1;
        let mut contributions = Vec::new();
        for (index, term) in distinct.iter().enumerate() {
            let idf = self.idf[*term as usize];
            for &(skill, tf) in &self.postings[*term as usize] {
                let norm = self.skills[skill as usize].norm;
                contributions.push(Contribution {
                    skill,
                    term: index,
                    score: idf * tf * (k1 + 1.0) / (tf + norm),
                });
            }
        }
        Query {
            sequence,
            distinct,
            contributions,
        }
    }

    /// Every skill's score over the query terms it matches more strongly than `claims` (the
    /// strongest contribution of a chosen skill per distinct term; empty: none chosen). A
    /// phrase counts if one of its terms is unclaimed.
    fn totals(&self, query: &Query, claims: &[f32]) -> Vec<f32> {
        let claimed = |term: usize| claims.get(term).copied().unwrap_or(0.0);
        let mut totals = vec![0.0f32; self.skills.len()];
        let mut touched = Vec::new();
        for c in &query.contributions {
            if c.score > claimed(c.term) {
                if totals[c.skill as usize] == 0.0 {
                    touched.push(c.skill as usize);
                }
                totals[c.skill as usize] += c.score;
            }
        }
        for skill in touched {
            let phrases = self.skills[skill]
                .phrases
                .iter()
                .filter(|p| {
                    p.iter().any(|t| {
                        query
                            .distinct
                            .binary_search(t)
                            .is_ok_and(|i| claimed(i) == 0.0)
                    }) && query
                        .sequence
                        .windows(p.len())
                        .any(|w| w.iter().zip(p.iter()).all(|(q, t)| *q == Some(*t)))
                })
                .count();
            totals[skill] += self.config.phrase_bonus * phrases as f32;
        }
        totals
    }
}

/// A query prepared for scoring.
struct Query {
    /// Its terms in order (`None`: not in any skill).
    sequence: Vec<Option<u32>>,
    /// Its distinct known terms, sorted.
    distinct: Vec<u32>,
    contributions: Vec<Contribution>,
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
        let query = "sql join index for the kv cache radix tree block table";
        let both = SkillDetector::new(cards(), DetectorConfig::default()).detect(query);
        assert_eq!(
            both.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(),
            ["kv-cache", "sql"]
        );
        let config = DetectorConfig {
            max_skills: 1,
            ..DetectorConfig::default()
        };
        let one = SkillDetector::new(cards(), config).detect(query);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].name, "kv-cache");
    }

    #[test]
    fn a_second_skill_needs_words_of_its_own() {
        let cards = vec![
            SkillCard {
                name: "performance".into(),
                description: "Latency and throughput of a service.".into(),
                keywords: vec!["latency".into(), "p99".into(), "slow".into()],
            },
            SkillCard {
                name: "api-design".into(),
                description: "Designing an HTTP API: status codes, pagination.".into(),
                keywords: vec!["rest api".into(), "latency budget".into()],
            },
        ];
        let d = SkillDetector::new(cards, DetectorConfig::default());
        let names = |q: &str| d.detect(q).into_iter().map(|h| h.name).collect::<Vec<_>>();
        // "latency" scores for both, but only the best skill may claim it.
        assert_eq!(names("the p99 latency is slow"), ["performance"]);
        assert_eq!(
            names("p99 latency is slow and which status codes and pagination for our rest api"),
            ["api-design", "performance"]
        );
    }

    #[test]
    fn phrases_score_above_their_scattered_words() {
        let d = SkillDetector::new(cards(), DetectorConfig::default());
        let phrase = d.scores("radix tree")[0].score;
        let scattered = d.scores("tree radix")[0].score;
        assert!(phrase > scattered, "{phrase} > {scattered}");
    }

    #[test]
    fn an_empty_detector_detects_nothing() {
        let d = SkillDetector::new(Vec::new(), DetectorConfig::default());
        assert!(d.detect("anything at all").is_empty());
        assert!(d.scores("anything at all").is_empty());
    }
}
