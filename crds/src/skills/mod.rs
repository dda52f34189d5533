//! Skills as text, shared by the daemon, the router and the controller: parsing SKILL.md
//! files ([`skill_md`]) and choosing the skills a request is about when it names none
//! ([`detect`], with its text normalisation in `text`, and optionally the static embeddings of
//! [`embedding`]), and how the router hands its choice to the daemon ([`handoff`]). All are
//! pure and need no language model.

pub mod detect;
pub mod embedding;
pub mod handoff;
pub mod skill_md;
mod text;

pub use detect::{Detection, DetectorConfig, DetectorSettings, SkillCard, SkillDetector};
pub use embedding::{LoadEmbeddingsError, TextEmbedder};
pub use handoff::{DETECTED_SKILLS_HEADER, detected_skills_value, parse_detected_skills};
pub use skill_md::{FrontMatter, ParseSkillError, SkillDocument, is_skill_object_name};
