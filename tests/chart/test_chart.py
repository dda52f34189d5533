"""Helm chart tests: lint with Helm's own SDK, render with default and non-default values,
validate every rendered object against the Kubernetes OpenAPI schemas (kubernetes-validate,
strict, the oldest supported and the latest version it ships), and assert what the values
change. Offline, seconds."""

from __future__ import annotations

import copy
import re
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from chart_helpers import (
    CHART_DIR,
    RELEASE_NAMESPACE,
    REPO_ROOT,
    Rendered,
    container,
    env_of,
    nondefault_values,
)

KUBERNETES_VERSION = kubernetes_validate.latest_version()
LINT_WARNING = 2
# Kinds whose schema comes from a third-party CRD, not from Kubernetes itself.
THIRD_PARTY_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


@pytest.mark.parametrize("values_name", ["default", "nondefault"])
def test_lint_strict_reports_no_warning_or_error(values_name: str) -> None:
    values = None if values_name == "default" else nondefault_values()
    report = helm_python.lint(CHART_DIR, values, strict=True, kube_version=f"v{KUBERNETES_VERSION}")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    serious = [m for m in report["messages"] if m["severity"] >= LINT_WARNING]
    assert serious == []


def test_chart_metadata(chart: helm_python.Chart) -> None:
    metadata = chart.metadata
    assert metadata["apiVersion"] == "v2"
    assert metadata["name"] == "skillkv"
    assert metadata["version"] == "0.1.0"
    assert metadata["appVersion"] == "0.1.0"
    assert metadata["kubeVersion"] == ">=1.33.0-0"


def _oldest_supported_kubernetes(chart: helm_python.Chart) -> str:
    """The minor version in Chart.yaml's `kubeVersion: ">=X.Y.Z-0"` constraint."""
    match = re.fullmatch(r">=(\d+\.\d+)\.\d+-0", chart.metadata["kubeVersion"])
    assert match, "kubeVersion is not a plain lower bound"
    return match.group(1)


@pytest.mark.parametrize("version", ["oldest-supported", "latest"])
def test_every_rendered_object_validates_strictly(
    chart: helm_python.Chart, any_render: Rendered, version: str
) -> None:
    kubernetes = KUBERNETES_VERSION if version == "latest" else _oldest_supported_kubernetes(chart)
    validated = 0
    for obj in any_render.objects:
        if (obj["apiVersion"], obj["kind"]) in THIRD_PARTY_KINDS:
            continue
        assert kubernetes_validate.validate(obj, kubernetes, strict=True).startswith(kubernetes[:4])
        validated += 1
    assert validated >= 12


def test_strict_validation_rejects_an_unknown_field(default_render: Rendered) -> None:
    deployment = copy.deepcopy(default_render.component("Deployment", "router"))
    container(deployment)["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def _is_kubernetes_api(api_version: str) -> bool:
    group = api_version.rpartition("/")[0]
    return group in {"", "apps", "policy", "batch", "autoscaling"} or group.endswith(".k8s.io")


def test_only_known_third_party_kinds_are_rendered(nondefault_render: Rendered) -> None:
    kinds = {(obj["apiVersion"], obj["kind"]) for obj in nondefault_render.objects}
    third_party = {kind for kind in kinds if not _is_kubernetes_api(kind[0])}
    assert third_party == THIRD_PARTY_KINDS


def test_default_render_has_the_expected_objects(default_render: Rendered) -> None:
    kinds = sorted(obj["kind"] for obj in default_render.objects)
    assert kinds == sorted(
        ["Deployment"] * 2
        + ["Service"] * 2
        + ["ServiceAccount"] * 2
        + ["ClusterRole"] * 2
        + ["ClusterRoleBinding"] * 2
        + ["Role", "RoleBinding"]
    )


def test_objects_carry_standard_labels_and_release_namespace(any_render: Rendered) -> None:
    for obj in any_render.objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "skillkv"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "skillkv"
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["helm.sh/chart"] == "skillkv-0.1.0"
        assert labels["app.kubernetes.io/component"] in {"controller", "router", "metrics"}
        if obj["kind"] not in {"ClusterRole", "ClusterRoleBinding"}:
            assert obj["metadata"]["namespace"] == RELEASE_NAMESPACE


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_services_select_the_right_pods(any_render: Rendered) -> None:
    controller_pods = any_render.component("Deployment", "controller")["spec"]["template"]
    router_pods = any_render.component("Deployment", "router")["spec"]["template"]
    router_service = any_render.component("Service", "router")
    metrics_service = any_render.component("Service", "metrics")
    assert _selects(router_service["spec"]["selector"], router_pods["metadata"]["labels"])
    assert not _selects(router_service["spec"]["selector"], controller_pods["metadata"]["labels"])
    for pods in (controller_pods, router_pods):
        assert _selects(metrics_service["spec"]["selector"], pods["metadata"]["labels"])


def test_deployment_selectors_match_their_pod_templates(any_render: Rendered) -> None:
    for deployment in any_render.of_kind("Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert _selects(selector, deployment["spec"]["template"]["metadata"]["labels"])


def _service_port(service: dict[str, Any], name: str) -> dict[str, Any]:
    ports = [port for port in service["spec"]["ports"] if port["name"] == name]
    assert len(ports) == 1
    return ports[0]


def _container_port(deployment: dict[str, Any], name: str) -> int:
    ports = [p for p in container(deployment)["ports"] if p["name"] == name]
    assert len(ports) == 1, f"container has no port named {name}"
    port: int = ports[0]["containerPort"]
    return port


def test_router_service_exposes_the_openai_port_by_default(default_render: Rendered) -> None:
    service = default_render.component("Service", "router")
    router = default_render.component("Deployment", "router")
    assert service["spec"]["type"] == "ClusterIP"
    port = _service_port(service, "openai")
    assert port["port"] == 8000
    assert _container_port(router, port["targetPort"]) == 8000
    assert env_of(router)["SKILLKV_LISTEN_ADDR"] == "0.0.0.0:8000"


def test_router_service_follows_nondefault_values(nondefault_render: Rendered) -> None:
    service_values = nondefault_values()["router"]["service"]
    service = nondefault_render.component("Service", "router")
    port = _service_port(service, "openai")
    assert service["spec"]["type"] == service_values["type"] == "LoadBalancer"
    assert port["port"] == service_values["port"]
    assert port["nodePort"] == service_values["nodePort"]
    assert service["spec"]["loadBalancerSourceRanges"] == service_values["loadBalancerSourceRanges"]
    assert service["metadata"]["annotations"] == service_values["annotations"]
    router = nondefault_render.component("Deployment", "router")
    assert _container_port(router, port["targetPort"]) == 8000


def test_metrics_service_reaches_the_health_port_of_both_components(any_render: Rendered) -> None:
    port = _service_port(any_render.component("Service", "metrics"), "metrics")
    assert port["port"] == 9090
    for component in ("controller", "router"):
        deployment = any_render.component("Deployment", component)
        assert _container_port(deployment, port["targetPort"]) == 9090
        assert env_of(deployment)["SKILLKV_METRICS_ADDR"] == "0.0.0.0:9090"


def test_probes_use_named_container_ports(any_render: Rendered) -> None:
    for deployment in any_render.of_kind("Deployment"):
        spec = container(deployment)
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            _container_port(deployment, spec[probe]["httpGet"]["port"])
        assert spec["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert spec["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_images_share_the_app_version_tag_by_default(default_render: Rendered) -> None:
    controller = default_render.component("Deployment", "controller")
    router = default_render.component("Deployment", "router")
    assert container(controller)["image"] == "ghcr.io/skillkv/skillkv-operator:0.1.0"
    assert container(router)["image"] == "ghcr.io/skillkv/skillkv-operator:0.1.0"
    assert env_of(controller)["SKILLKV_DAEMON_IMAGE"] == "ghcr.io/skillkv/skillkv:0.1.0"


def test_one_tag_and_registry_value_drive_both_images(nondefault_render: Rendered) -> None:
    image = nondefault_values()["image"]
    registry = image["registry"].rstrip("/")
    operator_image = f"{registry}/skillkv-operator:{image['tag']}"
    controller = nondefault_render.component("Deployment", "controller")
    for deployment in nondefault_render.of_kind("Deployment"):
        assert container(deployment)["image"] == operator_image
        assert container(deployment)["imagePullPolicy"] == image["pullPolicy"]
    assert env_of(controller)["SKILLKV_DAEMON_IMAGE"] == f"{registry}/skillkv:{image['tag']}"
    assert env_of(controller)["SKILLKV_DAEMON_IMAGE_PULL_POLICY"] == image["pullPolicy"]


def test_empty_registry_gives_unprefixed_images(render) -> None:
    rendered = render({"image": {"registry": "", "tag": "9.9.9"}})
    controller = rendered.component("Deployment", "controller")
    assert container(controller)["image"] == "skillkv-operator:9.9.9"
    assert env_of(controller)["SKILLKV_DAEMON_IMAGE"] == "skillkv:9.9.9"


def test_pull_secrets_reach_operator_pods_and_daemon_pods(nondefault_render: Rendered) -> None:
    secrets = nondefault_values()["imagePullSecrets"]
    for deployment in nondefault_render.of_kind("Deployment"):
        assert deployment["spec"]["template"]["spec"]["imagePullSecrets"] == secrets
    controller = nondefault_render.component("Deployment", "controller")
    names = env_of(controller)["SKILLKV_DAEMON_IMAGE_PULL_SECRETS"].split(",")
    assert names == [secret["name"] for secret in secrets]


def test_operator_pods_run_non_root_with_read_only_root_filesystem(any_render: Rendered) -> None:
    for deployment in any_render.of_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        security = container(deployment)["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert "add" not in security["capabilities"]
        mounts = {m["mountPath"]: m["name"] for m in container(deployment)["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], "/tmp must be writable scratch space"


def test_nondefault_values_change_replicas_scheduling_and_resources(nondefault_render: Rendered) -> None:
    values = nondefault_values()
    for component in ("controller", "router"):
        deployment = nondefault_render.component("Deployment", component)
        pod = deployment["spec"]["template"]["spec"]
        assert deployment["spec"]["replicas"] == values[component]["replicas"] == 2
        assert container(deployment)["resources"] == values[component]["resources"]
        assert pod["nodeSelector"] == values["nodeSelector"]
        assert pod["tolerations"] == values["tolerations"]
        assert pod["affinity"] == values["affinity"]
        assert container(deployment)["args"] == [component, *values[component]["extraArgs"]]
        assert env_of(deployment)["RUST_LOG"] == values[component]["logLevel"]
        assert env_of(deployment)["SKILLKV_LOG_FORMAT"] == "text"
    controller = nondefault_render.component("Deployment", "controller")
    assert env_of(controller)["SKILLKV_EXTRA"] == "1"
    assert controller["spec"]["template"]["metadata"]["annotations"] == values["controller"]["podAnnotations"]
    router_labels = nondefault_render.component("Deployment", "router")["spec"]["template"]["metadata"][
        "labels"
    ]
    assert router_labels["example.com/tier"] == "frontend"


def test_default_scheduling_is_unconstrained(default_render: Rendered) -> None:
    for deployment in default_render.of_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert deployment["spec"]["replicas"] == 1
        assert {"nodeSelector", "tolerations", "affinity", "imagePullSecrets"}.isdisjoint(pod)
        assert container(deployment)["args"] == [
            deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        ]


def test_api_key_settings_reach_the_router(default_render: Rendered, nondefault_render: Rendered) -> None:
    default_env = env_of(default_render.component("Deployment", "router"))
    assert default_env["SKILLKV_REQUIRE_API_KEY"] == "false"
    assert default_env["SKILLKV_API_KEY_SELECTOR"] == "skillkv.io/api-key=true"
    keys = nondefault_values()["apiKeys"]
    router_env = env_of(nondefault_render.component("Deployment", "router"))
    assert router_env["SKILLKV_REQUIRE_API_KEY"] == "true"
    assert router_env["SKILLKV_API_KEY_SELECTOR"] == keys["secretSelector"]
    controller_env = env_of(nondefault_render.component("Deployment", "controller"))
    assert controller_env["SKILLKV_API_KEY_SELECTOR"] == keys["secretSelector"]


def test_pod_disruption_budget_and_service_monitor_follow_their_switches(
    default_render: Rendered, nondefault_render: Rendered
) -> None:
    assert default_render.of_kind("PodDisruptionBudget") == []
    assert default_render.of_kind("ServiceMonitor") == []
    budget = nondefault_render.component("PodDisruptionBudget", "router")
    router_pods = nondefault_render.component("Deployment", "router")["spec"]["template"]
    assert _selects(budget["spec"]["selector"]["matchLabels"], router_pods["metadata"]["labels"])
    monitor = nondefault_render.of_kind("ServiceMonitor")[0]
    metrics_service = nondefault_render.component("Service", "metrics")
    assert _selects(monitor["spec"]["selector"]["matchLabels"], metrics_service["metadata"]["labels"])
    endpoint_ports = [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]]
    assert endpoint_ports == ["metrics"]
    assert monitor["spec"]["endpoints"][0]["interval"] == "15s"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_names_fit_dns_labels_for_the_longest_release_name(render) -> None:
    rendered = render(None, name="r" * 53)
    for obj in rendered.objects:
        if obj["kind"] in {"Deployment", "Service", "ServiceAccount"}:
            assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]


@pytest.mark.parametrize(
    "bad_values",
    [
        {"router": {"service": {"type": "Ingress"}}},
        {"router": {"service": {"port": 70000}}},
        {"controler": {"replicas": 2}},
        {"apiKeys": {"required": "yes"}},
        {"image": {"pullPolicy": "Sometimes"}},
        {"logFormat": "xml"},
    ],
)
def test_values_schema_rejects_invalid_values(chart: helm_python.Chart, bad_values: dict[str, Any]) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        chart.render(bad_values, name="skillkv", namespace=RELEASE_NAMESPACE)


def test_notes_tell_how_to_reach_the_endpoint(default_render: Rendered, nondefault_render: Rendered) -> None:
    notes = default_render.notes
    assert f"kubectl port-forward -n {RELEASE_NAMESPACE} svc/skillkv-router 8000:8000" in notes
    assert 'base_url="http://localhost:8000/v1"' in notes
    assert "kubectl get skills" in notes
    assert "kubectl apply --server-side -f charts/skillkv/crds/" in notes
    assert "kubectl get svc skv-router" in nondefault_render.notes
    assert 'base_url="http://<EXTERNAL-IP>:443/v1"' in nondefault_render.notes
    assert "REQUIRED" in nondefault_render.notes


def _documented_value_paths(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Every value path a user sets, stopping at free-form maps (resources, contexts, ...)."""
    free_form = {
        "resources",
        "podSecurityContext",
        "securityContext",
        "affinity",
        "nodeSelector",
        "podAnnotations",
        "podLabels",
        "annotations",
        "labels",
    }
    paths = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in free_form:
            paths.extend(_documented_value_paths(value, f"{path}."))
        else:
            paths.append(path)
    return paths


FREE_FORM_VALUE_BLOCKS = {
    "resources",
    "requests",
    "limits",
    "podSecurityContext",
    "securityContext",
    "capabilities",
    "seccompProfile",
}


def _parent_key(lines: list[str], index: int) -> str | None:
    """The key of the nearest earlier line indented less than line `index`."""
    indent = len(lines[index]) - len(lines[index].lstrip())
    for earlier in reversed(lines[:index]):
        match = re.match(r"^(\s*)(\w+):", earlier)
        if match and len(match.group(1)) < indent:
            return match.group(2)
    return None


def test_every_value_is_documented(chart: helm_python.Chart) -> None:
    helm_doc = (REPO_ROOT / "docs" / "helm.md").read_text()
    paths = _documented_value_paths(chart.values)
    assert "router.service.port" in paths
    undocumented = [path for path in paths if f"`{path}`" not in helm_doc]
    assert undocumented == [], "values missing from docs/helm.md"
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    uncommented = [
        line
        for index, line in enumerate(lines)
        if re.match(r"^\s*\w+:", line)
        and _parent_key(lines, index) not in FREE_FORM_VALUE_BLOCKS
        and not lines[index - 1].strip().startswith("#")
    ]
    assert uncommented == [], "values.yaml keys without a comment above them"


def test_rendering_twice_gives_identical_output(chart: helm_python.Chart) -> None:
    first = chart.render(nondefault_values(), name="skillkv", namespace=RELEASE_NAMESPACE)
    second = chart.render(nondefault_values(), name="skillkv", namespace=RELEASE_NAMESPACE)
    assert first == second
    assert yaml.safe_load(first["skillkv/templates/router-service.yaml"])["spec"]["ports"][0]["port"] == 443


def test_packaged_chart_renders_like_the_directory(chart: helm_python.Chart, tmp_path) -> None:
    archive = helm_python.package(CHART_DIR, destination=tmp_path)
    assert archive.endswith("skillkv-0.1.0.tgz")
    with helm_python.Chart.load(archive) as packaged:
        assert packaged.metadata == chart.metadata
        assert packaged.values == chart.values
        packaged_render = packaged.render(nondefault_values(), name="skillkv", namespace=RELEASE_NAMESPACE)
    assert packaged_render == chart.render(nondefault_values(), name="skillkv", namespace=RELEASE_NAMESPACE)
