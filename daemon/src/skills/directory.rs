//! Skills from a folder (`skillkv serve --skills DIR`): every immediate subfolder that holds a
//! `SKILL.md`, plus `DIR/SKILL.md` itself when present. Names must be unique.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use skillkv_api::skills::{ParseSkillError, SkillDocument};

/// Why a skills folder could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadSkillDirError {
    /// The folder could not be listed.
    #[error("cannot read the skills folder {path}")]
    ReadDir {
        /// The folder.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A SKILL.md is malformed (the error names file and line).
    #[error(transparent)]
    Parse(#[from] ParseSkillError),
    /// Two files declare the same skill name.
    #[error("skill `{name}` is declared twice: {first} and {second}")]
    DuplicateName {
        /// The name.
        name: String,
        /// One file.
        first: PathBuf,
        /// The other.
        second: PathBuf,
    },
}

/// The skills of `dir`, by name.
pub fn load_skill_dir(dir: &Path) -> Result<BTreeMap<String, SkillDocument>, LoadSkillDirError> {
    let read_dir = |path: &Path| {
        std::fs::read_dir(path).map_err(|source| LoadSkillDirError::ReadDir {
            path: path.to_path_buf(),
            source,
        })
    };
    let mut files: Vec<PathBuf> = vec![dir.join("SKILL.md")];
    for entry in read_dir(dir)? {
        let entry = entry.map_err(|source| LoadSkillDirError::ReadDir {
            path: dir.to_path_buf(),
            source,
        })?;
        files.push(entry.path().join("SKILL.md"));
    }
    files.retain(|file| file.is_file());
    files.sort();
    let mut skills: BTreeMap<String, (PathBuf, SkillDocument)> = BTreeMap::new();
    for file in files {
        let document = SkillDocument::read(&file)?;
        let name = document.name().to_string();
        if let Some((first, _)) = skills.get(&name) {
            return Err(LoadSkillDirError::DuplicateName {
                name,
                first: first.clone(),
                second: file,
            });
        }
        skills.insert(name, (file, document));
    }
    Ok(skills
        .into_iter()
        .map(|(name, (_, document))| (name, document))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skill(name: &str) -> String {
        format!("---\nname: {name}\ndescription: about {name}\n---\nBody of {name}.\n")
    }

    fn temp_dir(label: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("skillkv-skilldir-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn subfolders_with_a_skill_md_are_loaded_by_name() {
        let dir = temp_dir("ok");
        for name in ["beta", "alpha"] {
            std::fs::create_dir_all(dir.join(name)).expect("mkdir");
            std::fs::write(dir.join(name).join("SKILL.md"), skill(name)).expect("write");
        }
        std::fs::create_dir_all(dir.join("examples")).expect("mkdir");
        std::fs::write(dir.join("README.md"), "not a skill").expect("write");
        let skills = load_skill_dir(&dir).expect("loads");
        assert_eq!(skills.keys().collect::<Vec<_>>(), ["alpha", "beta"]);
        assert!(skills["alpha"].body.contains("Body of alpha"));
    }

    #[test]
    fn a_malformed_skill_names_its_file_and_a_duplicate_name_is_refused() {
        let dir = temp_dir("bad");
        std::fs::create_dir_all(dir.join("broken")).expect("mkdir");
        std::fs::write(dir.join("broken/SKILL.md"), "no front matter").expect("write");
        let error = load_skill_dir(&dir).expect_err("malformed");
        assert!(error.to_string().contains("broken/SKILL.md:1"), "{error}");

        std::fs::write(dir.join("broken/SKILL.md"), skill("same")).expect("write");
        std::fs::create_dir_all(dir.join("other")).expect("mkdir");
        std::fs::write(dir.join("other/SKILL.md"), skill("same")).expect("write");
        let error = load_skill_dir(&dir).expect_err("duplicate");
        assert!(
            matches!(error, LoadSkillDirError::DuplicateName { ref name, .. } if name == "same")
        );
    }

    #[test]
    fn a_missing_folder_is_a_clear_error() {
        let error = load_skill_dir(Path::new("/no/such/skills")).expect_err("missing");
        assert!(error.to_string().contains("/no/such/skills"), "{error}");
    }
}
