//! Skills as text, shared by the daemon, the router and the controller: parsing SKILL.md
//! files ([`skill_md`]) and choosing the skills a request is about when it names none
//! ([`detect`], with its text normalisation in `text`). Both are pure and need no model or
//! tokenizer.

pub mod detect;
pub mod skill_md;
mod text;

pub use detect::{Detection, DetectorConfig, SkillCard, SkillDetector};
pub use skill_md::{FrontMatter, ParseSkillError, SkillDocument};
