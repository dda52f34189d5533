"""Static manifests shipped beside the chart: the generated CRDs (charts/skillkv/crds/ and
crds/manifests/) validate as apiextensions.k8s.io/v1 CustomResourceDefinitions and describe the
four skillkv.io kinds, Helm picks them up from crds/, and the example custom resources under
skills/ parse as skillkv.io/v1alpha1 objects (their schema is checked by the Rust tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from chart_helpers import CHART_DIR, REPO_ROOT

KUBERNETES_VERSION = kubernetes_validate.latest_version()
CRD_DIRECTORIES = [CHART_DIR / "crds", REPO_ROOT / "crds" / "manifests"]
EXPECTED_PLURALS = {"skills", "modeldeployments", "loraadapters", "ratelimitpolicies"}
API_VERSION = "skillkv.io/v1alpha1"


def _yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc]


def _crds_in(directory: Path) -> dict[str, dict[str, Any]]:
    """CRDs found in `directory`, by plural name. Fails when there are none."""
    files = sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml"))
    assert files, f"no CRD files in {directory.relative_to(REPO_ROOT)} (generate them with crdgen)"
    crds = {}
    for path in files:
        for doc in _yaml_documents(path):
            assert doc["kind"] == "CustomResourceDefinition", f"{path.name} holds a {doc['kind']}"
            crds[doc["spec"]["names"]["plural"]] = doc
    return crds


@pytest.fixture(params=CRD_DIRECTORIES, ids=lambda d: str(d.relative_to(REPO_ROOT)))
def crd_directory(request) -> Path:
    directory: Path = request.param
    return directory


def test_all_four_kinds_have_a_crd(crd_directory: Path) -> None:
    crds = _crds_in(crd_directory)
    assert set(crds) == EXPECTED_PLURALS


def test_crds_validate_strictly_as_apiextensions_v1(crd_directory: Path) -> None:
    crds = _crds_in(crd_directory)
    for crd in crds.values():
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
        kubernetes_validate.validate(crd, KUBERNETES_VERSION, strict=True)


def test_crds_are_namespaced_skillkv_v1alpha1_with_status(crd_directory: Path) -> None:
    crds = _crds_in(crd_directory)
    for plural, crd in crds.items():
        spec = crd["spec"]
        assert crd["metadata"]["name"] == f"{plural}.skillkv.io"
        assert spec["group"] == "skillkv.io"
        assert spec["scope"] == "Namespaced"
        versions = {version["name"]: version for version in spec["versions"]}
        assert "v1alpha1" in versions
        v1alpha1 = versions["v1alpha1"]
        assert v1alpha1["served"] is True and v1alpha1["storage"] is True
        assert "status" in v1alpha1.get("subresources", {}), f"{plural} lacks the status subresource"
        assert v1alpha1.get("additionalPrinterColumns"), f"{plural} has no printer columns"


def test_model_deployment_has_a_scale_subresource(crd_directory: Path) -> None:
    crds = _crds_in(crd_directory)
    versions = {v["name"]: v for v in crds["modeldeployments"]["spec"]["versions"]}
    scale = versions["v1alpha1"]["subresources"]["scale"]
    assert scale["specReplicasPath"] == ".spec.replicas"
    assert scale["statusReplicasPath"] == ".status.replicas"
    assert scale["labelSelectorPath"] == ".status.selector"


def test_helm_loads_the_crds_from_the_chart(chart: helm_python.Chart) -> None:
    names = {yaml.safe_load(entry["data"])["spec"]["names"]["plural"] for entry in chart.crds}
    assert names == EXPECTED_PLURALS


def _example_manifests() -> list[Path]:
    return sorted((REPO_ROOT / "skills").glob("*/skill.yaml")) + sorted(
        (REPO_ROOT / "skills" / "examples").glob("*.yaml")
    )


def test_example_manifests_exist() -> None:
    assert _example_manifests(), "no skills/*/skill.yaml or skills/examples/*.yaml found"


def test_example_manifests_are_skillkv_v1alpha1_objects() -> None:
    known_kinds = {"Skill", "ModelDeployment", "LoRAAdapter", "RateLimitPolicy"}
    for path in _example_manifests():
        documents = _yaml_documents(path)
        assert documents, f"{path.relative_to(REPO_ROOT)} is empty"
        for doc in documents:
            if doc.get("apiVersion") == "v1" and doc.get("kind") in {"ConfigMap", "Secret", "Namespace"}:
                continue
            assert doc.get("apiVersion") == API_VERSION, (
                f"{path.relative_to(REPO_ROOT)}: {doc.get('apiVersion')}"
            )
            assert doc.get("kind") in known_kinds, f"{path.relative_to(REPO_ROOT)}: kind {doc.get('kind')}"
            assert doc.get("metadata", {}).get("name"), (
                f"{path.relative_to(REPO_ROOT)}: object without a name"
            )
            assert isinstance(doc.get("spec"), dict), f"{path.relative_to(REPO_ROOT)}: object without a spec"
