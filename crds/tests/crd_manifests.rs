//! The committed CRD manifests are exactly what the types generate (run `make crds` after
//! changing a type), and the generated CRDs carry what users and tools rely on.

use std::path::Path;

use skillkv_api::{crdgen, v1alpha1};

#[test]
fn committed_manifests_do_not_drift_from_the_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let drift = crdgen::drift(&root).expect("manifests readable");
    assert!(
        drift.is_empty(),
        "run `make crds` and commit:\n{}",
        drift.join("\n")
    );
}

#[test]
fn drift_is_reported_for_a_changed_missing_or_stale_file() {
    let dir = std::env::temp_dir().join(format!("skillkv-crdgen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    crdgen::write_all(&dir).expect("writes");
    assert!(crdgen::drift(&dir).expect("reads").is_empty());
    let first = dir
        .join(crdgen::MANIFEST_DIRS[0])
        .join("skills.skillkv.io.yaml");
    std::fs::write(&first, "changed").expect("writes");
    std::fs::remove_file(
        dir.join(crdgen::MANIFEST_DIRS[1])
            .join("loraadapters.skillkv.io.yaml"),
    )
    .expect("removes");
    std::fs::write(dir.join(crdgen::MANIFEST_DIRS[1]).join("old.yaml"), "x").expect("writes");
    let drift = crdgen::drift(&dir).expect("reads");
    assert_eq!(drift.len(), 3, "{drift:#?}");
    assert!(drift[0].contains("skills.skillkv.io.yaml differs"));
    assert!(
        drift
            .iter()
            .any(|d| d.contains("loraadapters.skillkv.io.yaml is missing"))
    );
    assert!(
        drift
            .iter()
            .any(|d| d.contains("old.yaml is not generated"))
    );
    std::fs::remove_dir_all(&dir).expect("cleans up");
}

fn all_descriptions_present(schema: &serde_json::Value, path: &str, missing: &mut Vec<String>) {
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        for (name, prop) in props {
            let here = format!("{path}.{name}");
            // Kubernetes' own types (metadata, affinity, conditions) document themselves.
            if prop.get("description").is_none()
                && !matches!(name.as_str(), "apiVersion" | "kind" | "metadata")
            {
                missing.push(here.clone());
            }
            all_descriptions_present(prop, &here, missing);
            if let Some(items) = prop.get("items") {
                all_descriptions_present(items, &format!("{here}[]"), missing);
            }
        }
    }
}

#[test]
fn every_spec_and_status_field_has_a_description() {
    for crd in v1alpha1::crds() {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("serializes");
        let root = &schema["openAPIV3Schema"];
        let mut missing = Vec::new();
        all_descriptions_present(root, &crd.spec.names.kind, &mut missing);
        assert!(
            missing.is_empty(),
            "fields without a description (they show in `kubectl explain`): {missing:#?}"
        );
    }
}

#[test]
fn crds_have_names_columns_and_subresources_users_rely_on() {
    for crd in v1alpha1::crds() {
        let names = &crd.spec.names;
        assert_eq!(crd.spec.group, "skillkv.io");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(
            names.categories.as_deref(),
            Some(&["skillkv".to_owned()][..]),
            "{}",
            names.kind
        );
        assert!(
            names.short_names.as_ref().is_some_and(|s| !s.is_empty()),
            "{}",
            names.kind
        );
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        let sub = version.subresources.as_ref().expect("subresources");
        assert!(
            sub.status.is_some(),
            "{} has a status subresource",
            names.kind
        );
        let columns: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert!(columns.contains(&"Age"), "{}: {columns:?}", names.kind);
        let status = &serde_json::to_value(&version.schema).expect("serializes")["openAPIV3Schema"]
            ["properties"]["status"]["properties"];
        assert!(status.get("observedGeneration").is_some(), "{}", names.kind);
        assert!(status.get("conditions").is_some(), "{}", names.kind);
    }
    let skill = v1alpha1::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == "Skill")
        .expect("Skill");
    let columns: Vec<String> = skill.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.to_uppercase())
        .collect();
    for wanted in ["MODEL", "READY", "TOKENS", "AGE"] {
        assert!(
            columns.iter().any(|c| c == wanted),
            "kubectl get skills shows {wanted}: {columns:?}"
        );
    }
    let md = v1alpha1::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == "ModelDeployment")
        .expect("MD");
    let scale = md.spec.versions[0]
        .subresources
        .as_ref()
        .and_then(|s| s.scale.as_ref())
        .expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
}
