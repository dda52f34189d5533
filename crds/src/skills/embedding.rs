//! Static text embeddings for skill detection: a token embedding table averaged over a text's
//! tokens and scaled to unit length, so the cosine of two texts is a dot product.
//!
//! The table and its tokenizer come from a folder (`--detector-embeddings DIR`):
//! `tokenizer.json` (a Hugging Face `tokenizers` file) and `embeddings.safetensors` (one tensor,
//! `embedding.weight`, `[vocabulary, dimensions]`, f16 or f32). `make detector-embeddings`
//! fills such a folder with WordLlama's `l2_supercat` 256-dimension table (MIT, from the PyPI
//! package `wordllama`), trained so that averaged token vectors place texts of similar meaning
//! close together. Embedding a query is a tokenizer pass and a few thousand additions: no
//! model runs, so detection stays well under a millisecond (`docs/skills.md`).

use std::fmt;
use std::path::{Path, PathBuf};

use half::f16;
use safetensors::{Dtype, SafeTensors};
use tokenizers::Tokenizer;

/// File name of the tokenizer in an embeddings folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// File name of the embedding table in an embeddings folder.
pub const TABLE_FILE: &str = "embeddings.safetensors";
/// Name of the table's tensor.
pub const TABLE_TENSOR: &str = "embedding.weight";

/// Loading an embeddings folder failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadEmbeddingsError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `tokenizer.json` is not a tokenizer.
    #[error("{path} is not a tokenizers JSON file: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// `embeddings.safetensors` is not a safetensors file or lacks the table.
    #[error("{path}: {message}")]
    Table { path: PathBuf, message: String },
}

/// A token embedding table and its tokenizer.
pub struct TextEmbedder {
    tokenizer: Tokenizer,
    /// Row-major `[rows, dimensions]`.
    table: Vec<f16>,
    rows: usize,
    dimensions: usize,
    folder: PathBuf,
}

impl fmt::Debug for TextEmbedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextEmbedder")
            .field("folder", &self.folder)
            .field("rows", &self.rows)
            .field("dimensions", &self.dimensions)
            .finish_non_exhaustive()
    }
}

impl TextEmbedder {
    /// Load `folder/tokenizer.json` and `folder/embeddings.safetensors`.
    pub fn load(folder: &Path) -> Result<Self, LoadEmbeddingsError> {
        let tokenizer_path = folder.join(TOKENIZER_FILE);
        let tokenizer_text =
            std::fs::read(&tokenizer_path).map_err(|source| LoadEmbeddingsError::Read {
                path: tokenizer_path.clone(),
                source,
            })?;
        let tokenizer =
            Tokenizer::from_bytes(&tokenizer_text).map_err(|e| LoadEmbeddingsError::Tokenizer {
                path: tokenizer_path,
                message: e.to_string(),
            })?;
        let table_path = folder.join(TABLE_FILE);
        let bytes = std::fs::read(&table_path).map_err(|source| LoadEmbeddingsError::Read {
            path: table_path.clone(),
            source,
        })?;
        let bad_table = |message: String| LoadEmbeddingsError::Table {
            path: table_path.clone(),
            message,
        };
        let tensors = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad_table(format!("not a safetensors file: {e}")))?;
        let tensor = tensors
            .tensor(TABLE_TENSOR)
            .map_err(|e| bad_table(format!("no tensor {TABLE_TENSOR:?}: {e}")))?;
        let &[rows, dimensions] = tensor.shape() else {
            return Err(bad_table(format!(
                "{TABLE_TENSOR} has shape {:?}, expected [vocabulary, dimensions]",
                tensor.shape()
            )));
        };
        if rows == 0 || dimensions == 0 {
            return Err(bad_table(format!("{TABLE_TENSOR} is empty")));
        }
        let data = tensor.data();
        let table: Vec<f16> = match tensor.dtype() {
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]))
                .collect(),
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect(),
            other => {
                return Err(bad_table(format!(
                    "{TABLE_TENSOR} is {other:?}, expected F16 or F32"
                )));
            }
        };
        let vocabulary = tokenizer.get_vocab_size(true);
        if vocabulary > rows {
            return Err(bad_table(format!(
                "{rows} rows for a tokenizer of {vocabulary} tokens"
            )));
        }
        Ok(Self {
            tokenizer,
            table,
            rows,
            dimensions,
            folder: folder.to_path_buf(),
        })
    }

    /// The folder the embedder was loaded from.
    pub fn folder(&self) -> &Path {
        &self.folder
    }

    /// Length of every vector.
    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// The unit-length mean of `text`'s token vectors; `None` when it has no tokens (or they
    /// cancel out).
    pub fn embed(&self, text: &str) -> Option<Vec<f32>> {
        let encoding = self.tokenizer.encode(text, false).ok()?;
        let mut sum = vec![0.0f32; self.dimensions];
        for &id in encoding.get_ids() {
            let row = (id as usize).min(self.rows - 1) * self.dimensions;
            for (s, v) in sum.iter_mut().zip(&self.table[row..row + self.dimensions]) {
                *s += v.to_f32();
            }
        }
        // The mean's length only scales the vector: normalising the sum gives the same unit
        // vector. No tokens leave the sum zero.
        let norm = sum.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm <= f32::MIN_POSITIVE {
            return None;
        }
        sum.iter_mut().for_each(|x| *x /= norm);
        Some(sum)
    }
}

/// Dot product; the cosine of two vectors from [`TextEmbedder::embed`].
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a word-level tokenizer over `words` and a table with one row per word (`rows`)
    /// into a fresh folder: the mechanics of an embeddings folder without the real one.
    pub(crate) fn write_folder(dir: &Path, words: &[&str], rows: &[Vec<f32>]) {
        let vocab: serde_json::Map<String, serde_json::Value> = words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
            .collect();
        let tokenizer = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": {"type": "Lowercase"},
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": words[0]},
        });
        std::fs::write(dir.join(TOKENIZER_FILE), tokenizer.to_string()).unwrap();
        let dimensions = rows[0].len();
        let data: Vec<u8> = rows
            .iter()
            .flatten()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect();
        let view =
            safetensors::tensor::TensorView::new(Dtype::F16, vec![rows.len(), dimensions], &data)
                .unwrap();
        safetensors::serialize_to_file([(TABLE_TENSOR, view)], None, &dir.join(TABLE_FILE))
            .unwrap();
    }

    fn temp_folder(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "skillkv-embeddings-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_text_is_the_unit_mean_of_its_token_vectors() {
        let dir = temp_folder("mean");
        write_folder(
            &dir,
            &["<unk>", "red", "blue"],
            &[
                vec![0.0, 0.0, 1.0],
                vec![1.0, 0.0, 0.0],
                vec![0.0, 1.0, 0.0],
            ],
        );
        let e = TextEmbedder::load(&dir).unwrap();
        assert_eq!(e.dimensions(), 3);
        let red = e.embed("Red").unwrap();
        assert_eq!(red, vec![1.0, 0.0, 0.0]);
        let both = e.embed("red blue red").unwrap();
        let expected = [2.0 / 5f32.sqrt(), 1.0 / 5f32.sqrt(), 0.0];
        for (x, y) in both.iter().zip(expected) {
            assert!((x - y).abs() < 1e-3, "{both:?}");
        }
        assert!((cosine(&red, &both) - expected[0]).abs() < 1e-3);
        assert!(e.embed("").is_none(), "no tokens, no vector");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn charts_card() -> crate::skills::SkillCard {
        crate::skills::SkillCard {
            name: "charts".into(),
            description: "Draw a chart or graph.".into(),
            keywords: vec!["plot".into(), "chart".into()],
        }
    }

    /// Two skills whose cards point along different axes: `charts` (chart, graph) and
    /// `literature` (story, novel). "plot" is a keyword of `charts` but has no meaning of its
    /// own here (a zero vector), "twist" and "story" point at `literature`, "sql" at neither.
    fn semantic_detector() -> crate::skills::SkillDetector {
        let dir = temp_folder("detector");
        let words = [
            "<unk>", "chart", "graph", "plot", "story", "novel", "twist", "sql",
        ];
        let axis = |i: usize| (0..3).map(|d| if d == i { 1.0 } else { 0.0 }).collect();
        let rows = vec![
            vec![0.0; 3], // unknown words add nothing
            axis(0),
            axis(0),
            vec![0.0; 3],
            axis(1),
            axis(1),
            axis(1),
            axis(2),
        ];
        write_folder(&dir, &words, &rows);
        let embedder = std::sync::Arc::new(TextEmbedder::load(&dir).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        let cards = vec![
            charts_card(),
            crate::skills::SkillCard {
                name: "literature".into(),
                description: "Talk about a story or novel.".into(),
                keywords: vec!["novel".into()],
            },
        ];
        crate::skills::DetectorSettings {
            embedder: Some(embedder),
            ..Default::default()
        }
        .build(cards)
    }

    #[test]
    fn meaning_vetoes_a_word_match_and_chooses_by_similarity() {
        let d = semantic_detector();
        assert!(d.is_semantic());
        let names = |q: &str| d.detect(q).into_iter().map(|h| h.name).collect::<Vec<_>>();
        // Words and meaning agree.
        assert_eq!(names("draw a chart"), ["charts"]);
        // "plot" matches the keyword of charts, but the query means literature: charts is
        // vetoed and literature, which no word matched, is chosen by similarity.
        let lexical = crate::skills::DetectorSettings::default().build([charts_card()]);
        assert_eq!(lexical.detect("a plot twist")[0].name, "charts");
        let twist = d.detect("a plot twist");
        assert_eq!(twist.len(), 1);
        assert_eq!(twist[0].name, "literature");
        assert_eq!(twist[0].similarity, Some(1.0));
        assert!(twist[0].to_string().starts_with("literature\t"));
        assert!(twist[0].to_string().ends_with("\tcos 1.00"), "{}", twist[0]);
        // Nothing similar enough: nothing chosen.
        assert!(names("sql").is_empty());
        assert!(names("").is_empty());
        // Scores carry every skill's cosine.
        let scores = d.scores("plot twist");
        assert_eq!(scores.len(), 2);
        assert!(scores.iter().all(|s| s.similarity.is_some()));
    }

    #[test]
    fn a_broken_folder_is_an_error_naming_the_file() {
        let dir = temp_folder("broken");
        let missing = TextEmbedder::load(&dir).unwrap_err();
        assert!(
            matches!(&missing, LoadEmbeddingsError::Read { path, .. } if path.ends_with(TOKENIZER_FILE)),
            "{missing}"
        );

        write_folder(&dir, &["<unk>", "a"], &[vec![1.0, 0.0], vec![0.0, 1.0]]);
        std::fs::write(dir.join(TABLE_FILE), b"not safetensors").unwrap();
        let corrupt = TextEmbedder::load(&dir).unwrap_err();
        assert!(
            corrupt.to_string().contains(TABLE_FILE) && corrupt.to_string().contains("safetensors"),
            "{corrupt}"
        );

        // A table with fewer rows than the tokenizer has tokens.
        write_folder(
            &dir,
            &["<unk>", "a", "b"],
            &[vec![1.0, 0.0], vec![0.0, 1.0]],
        );
        let short = TextEmbedder::load(&dir).unwrap_err();
        assert!(short.to_string().contains("2 rows"), "{short}");

        std::fs::write(dir.join(TOKENIZER_FILE), b"{").unwrap();
        let tokenizer = TextEmbedder::load(&dir).unwrap_err();
        assert!(
            matches!(tokenizer, LoadEmbeddingsError::Tokenizer { .. }),
            "{tokenizer}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
