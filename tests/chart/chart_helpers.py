"""Helpers of the Helm chart tests: repository paths, the non-default values, and lookups over
the objects one render of the chart produced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "skillkv"
NONDEFAULT_VALUES_FILE = CHART_DIR / "ci" / "values-nondefault.yaml"
RELEASE_NAME = "skillkv"
RELEASE_NAMESPACE = "skillkv-system"


class Rendered:
    """The objects and NOTES one `helm template` of the chart produced."""

    def __init__(self, manifests: dict[str, str]) -> None:
        self.notes = ""
        self.objects: list[dict[str, Any]] = []
        for template_path, text in sorted(manifests.items()):
            if template_path.endswith("NOTES.txt"):
                self.notes = text
                continue
            for document in yaml.safe_load_all(text):
                if document:
                    self.objects.append(document)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        matches = [obj for obj in self.of_kind(kind) if obj["metadata"]["name"] == name]
        assert len(matches) == 1, f"expected exactly one {kind}/{name}, got {len(matches)}"
        return matches[0]

    def component(self, kind: str, component: str) -> dict[str, Any]:
        """The one object of `kind` labelled app.kubernetes.io/component=`component`."""
        matches = [
            obj
            for obj in self.of_kind(kind)
            if obj["metadata"]["labels"].get("app.kubernetes.io/component") == component
        ]
        assert len(matches) == 1, f"expected one {kind} of component {component}, got {len(matches)}"
        return matches[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    """The single container of an operator Deployment."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    """Plain environment values of a Deployment's container (valueFrom entries map to None)."""
    return {entry["name"]: entry.get("value") for entry in container(deployment).get("env", [])}


def nondefault_values() -> dict[str, Any]:
    with NONDEFAULT_VALUES_FILE.open() as values_file:
        values: dict[str, Any] = yaml.safe_load(values_file)
    return values
