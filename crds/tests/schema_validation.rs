//! Good and bad objects validated against the OpenAPI schema and the CEL rules of the
//! generated CRDs: every good example in the repository is accepted, and every bad object is
//! rejected with a message that names the offending field.

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Deserialize;
use serde_json::Value;
use skillkv_api::v1alpha1;

/// The schema checks of one CRD: the structural OpenAPI schema (draft 4 semantics, as the
/// apiserver's OpenAPI v3.0 subset) and the CEL `x-kubernetes-validations`.
struct CrdValidator {
    schema: Value,
    openapi: jsonschema::Validator,
}

impl CrdValidator {
    fn for_kind(kind: &str) -> Self {
        let crd = v1alpha1::crds()
            .into_iter()
            .find(|c| c.spec.names.kind == kind)
            .unwrap_or_else(|| panic!("no CRD of kind {kind}"));
        Self::new(&crd)
    }

    fn new(crd: &CustomResourceDefinition) -> Self {
        let version = &crd.spec.versions[0];
        let schema = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("every CRD has an openAPIV3Schema");
        let schema = serde_json::to_value(schema).expect("schema serializes");
        let openapi = jsonschema::draft4::new(&schema).expect("schema compiles as JSON Schema");
        Self { schema, openapi }
    }

    /// Every problem with `object`, each as `field: message`.
    fn errors(&self, object: &Value) -> Vec<String> {
        let mut errors: Vec<String> = self
            .openapi
            .iter_errors(object)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        if let Err(cel) = kube_cel::Validator::new().validate(&self.schema, object, None) {
            errors.extend(
                cel.into_vec()
                    .into_iter()
                    .map(|e| format!("{}: {}", e.field_path, e.message)),
            );
        }
        errors
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let value = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::to_value(value).expect("YAML converts to JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Every example manifest: skills/*/skill.yaml and skills/examples/*.yaml.
fn example_files() -> Vec<PathBuf> {
    let skills = repo_root().join("skills");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&skills).expect("skills/ exists") {
        let dir = entry.expect("readable").path();
        if dir.join("skill.yaml").is_file() {
            files.push(dir.join("skill.yaml"));
        }
    }
    for entry in std::fs::read_dir(skills.join("examples")).expect("skills/examples/ exists") {
        let path = entry.expect("readable").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

#[test]
fn every_example_manifest_is_valid() {
    let files = example_files();
    let mut kinds_seen = std::collections::BTreeSet::new();
    for file in &files {
        for object in yaml_documents(file) {
            let kind = object["kind"].as_str().expect("every example has a kind");
            assert_eq!(
                object["apiVersion"],
                "skillkv.io/v1alpha1",
                "{}",
                file.display()
            );
            let errors = CrdValidator::for_kind(kind).errors(&object);
            assert!(errors.is_empty(), "{}: {errors:#?}", file.display());
            kinds_seen.insert(kind.to_owned());
        }
    }
    let all: std::collections::BTreeSet<String> = v1alpha1::crds()
        .into_iter()
        .map(|c| c.spec.names.kind)
        .collect();
    assert_eq!(kinds_seen, all, "every kind has an example");
}

fn skill(spec: Value) -> Value {
    serde_json::json!({"apiVersion": "skillkv.io/v1alpha1", "kind": "Skill", "metadata": {"name": "s"}, "spec": spec})
}

fn model_deployment(spec: Value) -> Value {
    serde_json::json!({"apiVersion": "skillkv.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m"}, "spec": spec})
}

fn lora(spec: Value) -> Value {
    serde_json::json!({"apiVersion": "skillkv.io/v1alpha1", "kind": "LoRAAdapter", "metadata": {"name": "l"}, "spec": spec})
}

fn policy(spec: Value) -> Value {
    serde_json::json!({"apiVersion": "skillkv.io/v1alpha1", "kind": "RateLimitPolicy", "metadata": {"name": "p"}, "spec": spec})
}

/// Asserts that `object` is rejected and that some error names `field` and says `words`.
fn assert_rejected(object: Value, field: &str, words: &str) {
    let kind = object["kind"].as_str().expect("kind").to_owned();
    let errors = CrdValidator::for_kind(&kind).errors(&object);
    assert!(
        errors
            .iter()
            .any(|e| e.contains(field) && e.contains(words)),
        "{kind} should be rejected naming `{field}` with `{words}`; errors: {errors:#?}"
    );
}

fn good_skill_spec() -> Value {
    serde_json::json!({"modelRef": {"name": "m"}, "source": {"inline": "---\nname: s\n---\nbody\n"}})
}

fn good_model_spec() -> Value {
    serde_json::json!({"model": {"uri": "file:///models/m.gguf"}})
}

#[test]
fn minimal_objects_of_every_kind_are_valid() {
    for object in [
        skill(good_skill_spec()),
        model_deployment(good_model_spec()),
        lora(
            serde_json::json!({"modelRef": {"name": "m"}, "source": {"uri": "file:///adapters/a"}, "servedName": "m-a"}),
        ),
        policy(serde_json::json!({"limits": {"requestsPerMinute": 60}})),
    ] {
        let kind = object["kind"].as_str().expect("kind").to_owned();
        let errors = CrdValidator::for_kind(&kind).errors(&object);
        assert!(errors.is_empty(), "{kind}: {errors:#?}");
    }
}

#[test]
fn skill_without_a_source_is_rejected() {
    assert_rejected(
        skill(serde_json::json!({"modelRef": {"name": "m"}})),
        "/spec",
        "source",
    );
}

#[test]
fn skill_with_both_sources_is_rejected() {
    let mut spec = good_skill_spec();
    spec["source"]["configMapRef"] = serde_json::json!({"name": "cm", "key": "SKILL.md"});
    assert_rejected(
        skill(spec),
        "spec.source",
        "exactly one of source.inline or source.configMapRef",
    );
}

#[test]
fn skill_with_an_empty_source_is_rejected() {
    let mut spec = good_skill_spec();
    spec["source"] = serde_json::json!({});
    assert_rejected(skill(spec), "spec.source", "exactly one of");
}

#[test]
fn skill_with_an_unknown_assembly_is_rejected() {
    let mut spec = good_skill_spec();
    spec["assembly"] = "fuzzy".into();
    assert_rejected(skill(spec), "/spec/assembly", "is not one of");
}

#[test]
fn skill_with_negative_replicas_or_priority_out_of_range_is_rejected() {
    let mut spec = good_skill_spec();
    spec["replicas"] = (-1).into();
    assert_rejected(skill(spec), "/spec/replicas", "minimum");
    let mut spec = good_skill_spec();
    spec["priority"] = 1001.into();
    assert_rejected(skill(spec), "/spec/priority", "maximum");
}

#[test]
fn skill_without_a_model_is_rejected() {
    assert_rejected(
        skill(serde_json::json!({"source": {"inline": "x"}})),
        "/spec",
        "modelRef",
    );
}

#[test]
fn model_deployment_with_negative_replicas_is_rejected() {
    let mut spec = good_model_spec();
    spec["replicas"] = (-2).into();
    assert_rejected(model_deployment(spec), "/spec/replicas", "minimum");
}

#[test]
fn model_deployment_with_min_above_max_is_rejected() {
    let mut spec = good_model_spec();
    spec["autoscaling"] = serde_json::json!({"minReplicas": 5, "maxReplicas": 2});
    assert_rejected(
        model_deployment(spec),
        "spec.autoscaling",
        "minReplicas must not exceed",
    );
}

#[test]
fn model_deployment_fractions_must_be_in_the_unit_interval() {
    for (field, value) in [
        ("pinnedFraction", 0.0),
        ("pinnedFraction", 1.5),
        ("kvCacheFraction", -0.1),
    ] {
        let mut spec = good_model_spec();
        spec["engine"] = serde_json::json!({ field: value });
        assert_rejected(
            model_deployment(spec),
            &format!("spec.engine.{field}"),
            "must be in (0, 1]",
        );
    }
    let mut spec = good_model_spec();
    spec["engine"] = serde_json::json!({"pinnedFraction": 1.0, "kvCacheFraction": 0.9});
    let errors = CrdValidator::for_kind("ModelDeployment").errors(&model_deployment(spec));
    assert!(errors.is_empty(), "1.0 and 0.9 are in (0, 1]: {errors:#?}");
}

#[test]
fn model_deployment_with_both_kv_sizes_is_rejected() {
    let mut spec = good_model_spec();
    spec["engine"] = serde_json::json!({"kvCacheBytes": 1073741824_i64, "kvCacheFraction": 0.5});
    assert_rejected(
        model_deployment(spec),
        "spec.engine",
        "at most one of engine.kvCacheBytes",
    );
}

#[test]
fn model_deployment_with_a_bad_uri_dtype_or_digest_is_rejected() {
    let mut spec = good_model_spec();
    spec["model"]["uri"] = "http://example.com/m.gguf".into();
    assert_rejected(model_deployment(spec), "/spec/model/uri", "does not match");
    let mut spec = good_model_spec();
    spec["model"]["sha256"] = "abc".into();
    assert_rejected(
        model_deployment(spec),
        "/spec/model/sha256",
        "does not match",
    );
    let mut spec = good_model_spec();
    spec["engine"] = serde_json::json!({"kvDtype": "int3"});
    assert_rejected(
        model_deployment(spec),
        "/spec/engine/kvDtype",
        "is not one of",
    );
    let mut spec = good_model_spec();
    spec["engine"] = serde_json::json!({"blockSize": 32});
    assert_rejected(model_deployment(spec), "/spec/engine/blockSize", "maximum");
}

#[test]
fn model_deployment_without_a_model_is_rejected() {
    assert_rejected(
        model_deployment(serde_json::json!({"replicas": 1})),
        "/spec",
        "model",
    );
}

#[test]
fn lora_adapter_needs_a_served_name_and_a_sane_scale() {
    assert_rejected(
        lora(serde_json::json!({"modelRef": {"name": "m"}, "source": {"uri": "file:///a"}})),
        "/spec",
        "servedName",
    );
    assert_rejected(
        lora(
            serde_json::json!({"modelRef": {"name": "m"}, "source": {"uri": "file:///a"}, "servedName": "x", "scale": 0.0}),
        ),
        "spec.scale",
        "scale must be in (0, 16]",
    );
    assert_rejected(
        lora(
            serde_json::json!({"modelRef": {"name": "m"}, "source": {"uri": "file:///a"}, "servedName": "x", "replicas": -1}),
        ),
        "/spec/replicas",
        "minimum",
    );
}

#[test]
fn rate_limit_policy_with_no_limit_is_rejected() {
    assert_rejected(
        policy(serde_json::json!({"limits": {}})),
        "spec.limits",
        "at least one of",
    );
    // A burst alone limits nothing.
    assert_rejected(
        policy(serde_json::json!({"limits": {"burst": 10}})),
        "spec.limits",
        "at least one of",
    );
    assert_rejected(
        policy(serde_json::json!({"subject": "global"})),
        "/spec",
        "limits",
    );
}

#[test]
fn rate_limit_policy_with_a_bad_subject_or_zero_rate_is_rejected() {
    assert_rejected(
        policy(serde_json::json!({"subject": "user", "limits": {"requestsPerMinute": 1}})),
        "/spec/subject",
        "is not one of",
    );
    assert_rejected(
        policy(serde_json::json!({"limits": {"tokensPerMinute": 0}})),
        "/spec/limits/tokensPerMinute",
        "minimum",
    );
}
