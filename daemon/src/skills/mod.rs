//! Skills on the daemon: where their tokens go in a prompt ([`assembly`]), the registry of
//! their KV lifecycle, budget and accounting ([`registry`]), the `--skills` folder
//! ([`directory`]), the admin API's desired state ([`desired`]), the node's KV store
//! ([`store`]) and the prefix-cache KV of skills a daemon does not pin ([`unpinned`]).

pub mod assembly;
pub mod desired;
pub mod directory;
pub mod registry;
pub mod store;
pub mod unpinned;

pub use assembly::{
    AssemblePromptError, AssembledPrompt, PromptSkill, TokenizedSkill, assemble_chat,
    modular_spans, tokenize_skill,
};
pub use desired::{ApplyDesiredStateError, DesiredStateManager};
pub use directory::{LoadSkillDirError, load_skill_dir};
pub use registry::{
    ResolveSkillsError, ResolvedSkill, SkillCounters, SkillRegistry, SkillSelection, SkillUpdate,
    SkillVersion, SkillsConfig,
};
pub use store::{SkillStore, StoreIdentity};
pub use unpinned::{UnpinnedPrepared, UnpinnedSkillCache};
