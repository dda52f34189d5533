//! The bundled skills' `skill.yaml` carries the same SKILL.md text as the folder's `SKILL.md`,
//! so `kubectl apply -f skills/x/skill.yaml` serves exactly what `skillkv serve --skills skills/`
//! serves.

use std::path::Path;

use skillkv_api::v1alpha1::Skill;

#[test]
fn every_skill_yaml_inlines_its_skill_md() {
    let skills = Path::new(env!("CARGO_MANIFEST_DIR")).join("../skills");
    let mut checked = 0;
    for entry in std::fs::read_dir(&skills).expect("skills/ exists") {
        let dir = entry.expect("readable").path();
        let (md, yaml) = (dir.join("SKILL.md"), dir.join("skill.yaml"));
        if !md.is_file() {
            continue;
        }
        let skill: Skill = serde_yaml::from_str(
            &std::fs::read_to_string(&yaml).expect("skill.yaml beside SKILL.md"),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", yaml.display()));
        let folder = dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 name");
        assert_eq!(
            skill.metadata.name.as_deref(),
            Some(folder),
            "{}",
            yaml.display()
        );
        assert_eq!(
            skill.spec.source.inline.as_deref(),
            Some(std::fs::read_to_string(&md).expect("readable").as_str()),
            "{} must inline {} byte for byte (run scripts/skill-yaml.py)",
            yaml.display(),
            md.display()
        );
        checked += 1;
    }
    assert!(
        checked >= 3,
        "expected the three bundled skills, found {checked}"
    );
}
