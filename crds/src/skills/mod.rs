//! Skills as text, shared by the daemon, the router and the controller: parsing SKILL.md
//! files ([`skill_md`]) and choosing the skills a request is about when it names none
//! ([`detect`], with its text normalisation in `text`, and optionally the static embeddings of
//! [`embedding`]). Both are pure and need no language model.

pub mod detect;
pub mod embedding;
pub mod skill_md;
mod text;

pub use detect::{Detection, DetectorConfig, DetectorSettings, SkillCard, SkillDetector};
pub use embedding::{LoadEmbeddingsError, TextEmbedder};
pub use skill_md::{FrontMatter, ParseSkillError, SkillDocument};
