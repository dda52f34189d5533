//! `SKILL.md`: YAML front matter between `---` lines, then a Markdown body.
//!
//! The front matter must have a `name` (lowercase letters, digits and hyphens, at most 64
//! characters, as Anthropic's Agent Skills specify) and a `description`; `version` and
//! `keywords` are optional, and every other key (`license`, `allowed-tools`, …) is kept as it
//! is. The skill's identity for caching is the BLAKE3 hash of the whole file's bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::SkillCard;

/// The front matter of a SKILL.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrontMatter {
    /// The skill's name: lowercase letters, digits and hyphens.
    pub name: String,
    /// When to use the skill.
    pub description: String,
    /// Free-form version label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Words and phrases that requests about the skill contain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keywords: Vec<String>,
    /// Every other key, preserved (`license`, `allowed-tools`, `metadata`, …).
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_yaml::Value>,
}

/// A parsed SKILL.md.
#[derive(Debug, Clone, PartialEq)]
pub struct SkillDocument {
    /// The front matter.
    pub front_matter: FrontMatter,
    /// The Markdown after the closing `---` line.
    pub body: String,
    /// The whole file, exactly as given: this is what a request's prompt carries.
    pub text: String,
    /// BLAKE3 (hex) of `text`.
    pub content_hash: String,
}

/// Why a SKILL.md could not be parsed. Every variant names the file and, where it applies,
/// the 1-based line.
#[derive(Debug, thiserror::Error)]
pub enum ParseSkillError {
    /// The file could not be read.
    #[error("{path}: cannot read SKILL.md")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with a `---` line.
    #[error("{path}:1: SKILL.md must start with a `---` line opening the YAML front matter")]
    MissingFrontMatter {
        /// The file.
        path: PathBuf,
    },
    /// No closing `---` line.
    #[error("{path}:{line}: the front matter opened on line 1 is never closed by a `---` line")]
    UnclosedFrontMatter {
        /// The file.
        path: PathBuf,
        /// The last line of the file.
        line: usize,
    },
    /// The front matter is not valid YAML, or lacks a required key or has a wrong type.
    #[error("{path}:{line}: invalid front matter: {message}")]
    InvalidYaml {
        /// The file.
        path: PathBuf,
        /// Line in the file.
        line: usize,
        /// What the YAML parser said.
        message: String,
    },
    /// A field has a value outside its rules.
    #[error("{path}:{line}: front matter `{field}`: {problem}")]
    InvalidField {
        /// The file.
        path: PathBuf,
        /// Line of the field in the file (1 when it is missing).
        line: usize,
        /// The key.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
}

impl SkillDocument {
    /// Read and parse a SKILL.md file.
    pub fn read(path: &Path) -> Result<Self, ParseSkillError> {
        let text = std::fs::read_to_string(path).map_err(|source| ParseSkillError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, text)
    }

    /// Parse SKILL.md text; `origin` names it in errors (a path, or e.g. `skill/ns/name`).
    pub fn parse(origin: &Path, text: String) -> Result<Self, ParseSkillError> {
        let path = || origin.to_owned();
        let mut lines = text.split_inclusive('\n');
        if lines.next().map(str::trim_end) != Some("---") {
            return Err(ParseSkillError::MissingFrontMatter { path: path() });
        }
        let yaml_start = text.find('\n').map_or(text.len(), |i| i + 1);
        let mut offset = yaml_start;
        let mut closing = None;
        for line in lines {
            if line.trim_end() == "---" {
                closing = Some((offset, offset + line.len()));
                break;
            }
            offset += line.len();
        }
        let Some((yaml_end, body_start)) = closing else {
            return Err(ParseSkillError::UnclosedFrontMatter {
                path: path(),
                line: text.lines().count().max(1),
            });
        };
        let yaml = &text[yaml_start..yaml_end];
        let front_matter: FrontMatter =
            serde_yaml::from_str(yaml).map_err(|e| ParseSkillError::InvalidYaml {
                path: path(),
                // The YAML starts on line 2 of the file.
                line: e.location().map_or(1, |l| l.line() + 1),
                message: e.to_string(),
            })?;
        check_fields(origin, yaml, &front_matter)?;
        let body = text[body_start..].to_owned();
        let content_hash = blake3::hash(text.as_bytes()).to_hex().to_string();
        Ok(Self {
            front_matter,
            body,
            text,
            content_hash,
        })
    }

    /// The skill's name.
    pub fn name(&self) -> &str {
        &self.front_matter.name
    }

    /// What skill detection indexes.
    pub fn card(&self) -> SkillCard {
        SkillCard {
            name: self.front_matter.name.clone(),
            description: self.front_matter.description.clone(),
            keywords: self.front_matter.keywords.clone(),
        }
    }
}

/// Whether `name` can name a skill the way a Kubernetes object is named (a DNS-1123
/// subdomain: 1–253 lowercase letters, digits, `-` and `.`, starting and ending with a letter
/// or digit) — the names the operator sends in a daemon's desired state. Such a name is safe
/// in a file name (the node's KV store), a header (`x-skillkv-detected-skills`, `x-skillkv-cache`)
/// and a metric label.
pub fn is_skill_object_name(name: &str) -> bool {
    let edge = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    name.len() <= 253
        && edge(name.bytes().next())
        && edge(name.bytes().last())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fn check_fields(origin: &Path, yaml: &str, fm: &FrontMatter) -> Result<(), ParseSkillError> {
    let invalid = |field: &'static str, problem: String| ParseSkillError::InvalidField {
        path: origin.to_owned(),
        line: line_of_key(yaml, field),
        field,
        problem,
    };
    // An object name without dots, of at most 64 bytes (the Agent Skills rule).
    let name_ok = fm.name.len() <= 64 && !fm.name.contains('.') && is_skill_object_name(&fm.name);
    if !name_ok {
        return Err(invalid(
            "name",
            format!(
                "{:?} must be 1-64 lowercase letters, digits and hyphens, not starting or ending with a hyphen",
                fm.name
            ),
        ));
    }
    if fm.description.trim().is_empty() || fm.description.len() > 1024 {
        return Err(invalid(
            "description",
            "must be non-empty and at most 1024 characters".into(),
        ));
    }
    if let Some(k) = fm
        .keywords
        .iter()
        .find(|k| k.trim().is_empty() || k.len() > 64)
    {
        return Err(invalid(
            "keywords",
            format!("{k:?} must be non-empty and at most 64 characters"),
        ));
    }
    Ok(())
}

/// 1-based line in the file of `key:` at the top level of the front matter (1 if absent).
fn line_of_key(yaml: &str, key: &str) -> usize {
    yaml.lines()
        .position(|l| {
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
        .map_or(1, |i| i + 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_dns_subdomains() {
        for good in ["a", "sql-tuning", "team.sql-2", &"a".repeat(253)] {
            assert!(is_skill_object_name(good), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            ".a",
            "A",
            "a_b",
            "a,b",
            "a b",
            "../a",
            "é",
            &"a".repeat(254),
        ] {
            assert!(!is_skill_object_name(bad), "{bad}");
        }
    }

    fn parse(text: &str) -> Result<SkillDocument, ParseSkillError> {
        SkillDocument::parse(Path::new("skills/x/SKILL.md"), text.to_owned())
    }

    #[test]
    fn parses_front_matter_body_and_keeps_unknown_keys() {
        let text = "---\nname: my-skill\ndescription: Does things.\nversion: \"2\"\nkeywords: [a, b c]\nlicense: MIT\nallowed-tools: [Bash, Read]\n---\n# Title\n\nBody.\n";
        let doc = parse(text).expect("valid");
        assert_eq!(doc.name(), "my-skill");
        assert_eq!(doc.front_matter.version.as_deref(), Some("2"));
        assert_eq!(doc.front_matter.keywords, ["a", "b c"]);
        assert_eq!(
            doc.front_matter.extra["license"],
            serde_yaml::Value::from("MIT")
        );
        assert!(doc.front_matter.extra.contains_key("allowed-tools"));
        assert_eq!(doc.body, "# Title\n\nBody.\n");
        assert_eq!(doc.text, text);
        assert_eq!(
            doc.content_hash,
            blake3::hash(text.as_bytes()).to_hex().to_string()
        );
    }

    #[test]
    fn malformed_yaml_names_file_and_line() {
        let err =
            parse("---\nname: x\ndescription: ok\nkeywords: [unclosed\n---\nbody\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("skills/x/SKILL.md:"), "{msg}");
        assert!(
            matches!(err, ParseSkillError::InvalidYaml { line, .. } if (4..=5).contains(&line)),
            "{msg}"
        );
    }

    #[test]
    fn missing_description_and_bad_name_are_reported_with_their_line() {
        let err = parse("---\nname: x\n---\nbody\n").unwrap_err();
        assert!(err.to_string().contains("description"), "{err}");
        let err = parse("---\ndescription: d\nname: Not_Valid\n---\n").unwrap_err();
        assert!(
            matches!(
                err,
                ParseSkillError::InvalidField {
                    field: "name",
                    line: 3,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn front_matter_must_open_and_close() {
        assert!(matches!(
            parse("# no front matter\n"),
            Err(ParseSkillError::MissingFrontMatter { .. })
        ));
        assert!(matches!(
            parse("---\nname: x\ndescription: d\n"),
            Err(ParseSkillError::UnclosedFrontMatter { line: 3, .. })
        ));
    }

    #[test]
    fn the_bundled_skills_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../skills");
        for name in ["pagedattention", "performance", "debugging"] {
            let doc = SkillDocument::read(&dir.join(name).join("SKILL.md"))
                .expect("bundled skill parses");
            assert_eq!(doc.name(), name);
            assert!(!doc.front_matter.keywords.is_empty());
        }
    }
}
