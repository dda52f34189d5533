"""RBAC tests: least privilege of the controller and router roles, each component bound to its
own ServiceAccount, and docs/rbac.md listing exactly the rules the chart grants."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from chart_helpers import RELEASE_NAMESPACE, REPO_ROOT, Rendered, env_of

READ_VERBS = {"get", "list", "watch"}
SKILLKV_KINDS = ["skills", "modeldeployments", "loraadapters", "ratelimitpolicies"]
# (role, apiGroup, resource, verb, resourceName or "") — one permission per tuple.
Grant = tuple[str, str, str, str, str]


def _role_of(rendered: Rendered, kind: str, component: str) -> dict[str, Any]:
    return rendered.component(kind, component)


def _grants(role_label: str, rules: list[dict[str, Any]]) -> Iterator[Grant]:
    for rule in rules:
        names = rule.get("resourceNames") or [""]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in names:
                        yield (role_label, group, resource, verb, name)


def _all_grants(rendered: Rendered) -> set[Grant]:
    grants = set()
    grants |= set(_grants("controller", _role_of(rendered, "ClusterRole", "controller")["rules"]))
    grants |= set(_grants("router", _role_of(rendered, "ClusterRole", "router")["rules"]))
    grants |= set(_grants("controller-lease", rendered.component("Role", "controller")["rules"]))
    return grants


def _allows(grants: set[Grant], role: str, group: str, resource: str, verb: str, name: str = "") -> bool:
    return any(
        g[0] == role and g[1] == group and g[2] == resource and g[3] == verb and g[4] in {"", name}
        for g in grants
    )


def test_no_wildcards_or_escalation_verbs(any_render: Rendered) -> None:
    for kind in ("ClusterRole", "Role"):
        for role in any_render.of_kind(kind):
            for rule in role["rules"]:
                for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                    assert "*" not in rule.get(field, []), (
                        f"{role['metadata']['name']} has a wildcard in {field}"
                    )
                assert {"escalate", "bind", "impersonate", "deletecollection"}.isdisjoint(rule["verbs"])
                assert "nonResourceURLs" not in rule


def test_router_only_lists_and_watches_what_discovery_reads(default_render: Rendered) -> None:
    grants = set(_grants("router", _role_of(default_render, "ClusterRole", "router")["rules"]))
    # Its reflectors list and watch; nothing gets single objects.
    assert {grant[3] for grant in grants} == {"list", "watch"}
    for kind in ["modeldeployments", "loraadapters", "ratelimitpolicies"]:
        assert _allows(grants, "router", "skillkv.io", kind, "watch")
    assert not _allows(grants, "router", "skillkv.io", "skills", "list")
    assert _allows(grants, "router", "discovery.k8s.io", "endpointslices", "watch")
    assert _allows(grants, "router", "", "secrets", "list")
    assert {grant[2] for grant in grants} == {
        "modeldeployments",
        "loraadapters",
        "ratelimitpolicies",
        "endpointslices",
        "secrets",
    }


def test_controller_holds_what_reconciling_needs(default_render: Rendered) -> None:
    grants = _all_grants(default_render)
    for kind in SKILLKV_KINDS:
        for verb in ("get", "list", "watch", "patch"):
            assert _allows(grants, "controller", "skillkv.io", kind, verb)
        assert _allows(grants, "controller", "skillkv.io", f"{kind}/status", "patch")
    for group, resource in (("apps", "deployments"), ("", "services")):
        for verb in ("get", "list", "watch", "create", "patch", "delete"):
            assert _allows(grants, "controller", group, resource, verb)
    assert _allows(grants, "controller", "", "pods", "watch")
    assert _allows(grants, "controller", "", "pods/status", "patch")
    assert _allows(grants, "controller", "discovery.k8s.io", "endpointslices", "watch")
    assert _allows(grants, "controller", "", "configmaps", "watch")
    assert _allows(grants, "controller", "events.k8s.io", "events", "create")
    assert _allows(grants, "controller", "events.k8s.io", "events", "patch")


def test_controller_cannot_write_what_it_only_reads(default_render: Rendered) -> None:
    grants = _all_grants(default_render)
    for group, resource in (
        ("", "secrets"),
        ("", "configmaps"),
        ("", "pods"),
        ("discovery.k8s.io", "endpointslices"),
    ):
        writes = {
            g[3] for g in grants if g[0] == "controller" and g[1] == group and g[2] == resource
        } - READ_VERBS
        # The one write: creating each daemon pool's admin-token Secret (docs/operating.md).
        allowed = {"create"} if resource == "secrets" else set()
        assert writes == allowed, f"controller may {writes} {resource}"
    for kind in SKILLKV_KINDS:
        assert not _allows(grants, "controller", "skillkv.io", kind, "create")
        assert not _allows(grants, "controller", "skillkv.io", kind, "delete")


def test_leader_election_is_namespaced_and_limited_to_its_lease(any_render: Rendered) -> None:
    role = any_render.component("Role", "controller")
    assert role["metadata"]["namespace"] == RELEASE_NAMESPACE
    lease_name = env_of(any_render.component("Deployment", "controller"))["SKILLKV_LEASE_NAME"]
    grants = set(_grants("lease", role["rules"]))
    assert {g[1:3] for g in grants} == {("coordination.k8s.io", "leases")}
    assert {(g[3], g[4]) for g in grants} == {("create", ""), ("get", lease_name), ("patch", lease_name)}
    cluster_resources = {
        g[2] for g in _grants("c", any_render.component("ClusterRole", "controller")["rules"])
    }
    assert "leases" not in cluster_resources


def test_each_component_is_bound_to_its_own_service_account(any_render: Rendered) -> None:
    for component in ("controller", "router"):
        deployment = any_render.component("Deployment", component)
        account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        binding = any_render.component("ClusterRoleBinding", component)
        assert (
            binding["roleRef"]["name"] == any_render.component("ClusterRole", component)["metadata"]["name"]
        )
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": RELEASE_NAMESPACE}
        ]
        any_render.one("ServiceAccount", account)
    controller_account = any_render.component("Deployment", "controller")["spec"]["template"]["spec"][
        "serviceAccountName"
    ]
    router_account = any_render.component("Deployment", "router")["spec"]["template"]["spec"][
        "serviceAccountName"
    ]
    assert controller_account != router_account
    lease_binding = any_render.component("RoleBinding", "controller")
    assert lease_binding["subjects"][0]["name"] == controller_account


def test_service_account_name_and_annotations_follow_values(nondefault_render: Rendered) -> None:
    accounts = {sa["metadata"]["name"]: sa for sa in nondefault_render.of_kind("ServiceAccount")}
    assert set(accounts) == {"skillkv-sa-controller", "skillkv-sa-router"}
    for account in accounts.values():
        assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].startswith("skillkv@")
        assert account["automountServiceAccountToken"] is False


def test_rbac_and_service_accounts_can_be_left_to_the_user(render) -> None:
    rendered = render({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "mine"}})
    kinds = {obj["kind"] for obj in rendered.objects}
    assert kinds.isdisjoint({"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"})
    accounts = {d["spec"]["template"]["spec"]["serviceAccountName"] for d in rendered.of_kind("Deployment")}
    assert accounts == {"mine-controller", "mine-router"}


def _documented_grants() -> set[Grant]:
    """Rows of the rules table in docs/rbac.md: | role | apiGroup | resources | verbs | names | why |.

    The names cell is `any`, or the leader-election Lease's name (mapped to `<lease>`)."""
    text = (REPO_ROOT / "docs" / "rbac.md").read_text()
    grants: set[Grant] = set()
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 6 or cells[0] not in {"controller", "router", "controller-lease"}:
            continue
        role, group, resources, verbs, names, why = cells
        assert why, f"rule without a reason in docs/rbac.md: {line}"
        group = "" if group == "core" else group.strip("`")
        for resource in re.findall(r"[\w./]+", resources):
            for verb in re.findall(r"\w+", verbs):
                grants.add((role, group, resource, verb, "" if names == "any" else "<lease>"))
    return grants


def test_docs_rbac_table_lists_exactly_the_granted_rules(default_render: Rendered) -> None:
    documented = _documented_grants()
    assert documented, "docs/rbac.md has no rules table"
    rendered = {(g[0], g[1], g[2], g[3], "<lease>" if g[4] else "") for g in _all_grants(default_render)}
    assert documented == rendered
