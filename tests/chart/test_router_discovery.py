"""The router Deployment discovers its backends in the cluster: discovery settings reach it, and
`router.watchNamespace` narrows both what it watches and where its RBAC is bound."""

from __future__ import annotations

from chart_helpers import RELEASE_NAMESPACE, Rendered, env_of


def test_router_discovers_in_every_namespace_by_default(default_render: Rendered) -> None:
    router = default_render.component("Deployment", "router")
    env = env_of(router)
    assert env["SKILLKV_DISCOVERY"] == "kubernetes"
    assert env["SKILLKV_WATCH_NAMESPACE"] == ""
    # The replica count that splits the rate limits comes from the router's own Service.
    assert env["SKILLKV_ROUTER_SERVICE"] == default_render.component("Service", "router")["metadata"]["name"]
    assert "SKILLKV_BACKENDS" not in env
    binding = default_render.component("ClusterRoleBinding", "router")
    assert binding["roleRef"]["kind"] == "ClusterRole"
    assert not [b for b in default_render.of_kind("RoleBinding") if "router" in b["metadata"]["name"]]


def test_watch_namespace_binds_the_router_role_in_that_namespace_only(render) -> None:
    rendered = render({"router": {"watchNamespace": "models"}})
    env = env_of(rendered.component("Deployment", "router"))
    assert env["SKILLKV_WATCH_NAMESPACE"] == "models"
    cluster_bindings = [b for b in rendered.of_kind("ClusterRoleBinding") if "router" in b["metadata"]["name"]]
    assert cluster_bindings == []
    role = rendered.component("ClusterRole", "router")
    bindings = [b for b in rendered.of_kind("RoleBinding") if b["roleRef"]["name"] == role["metadata"]["name"]]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(["models", RELEASE_NAMESPACE])
    account = rendered.component("Deployment", "router")["spec"]["template"]["spec"]["serviceAccountName"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "ClusterRole"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": RELEASE_NAMESPACE}]
    # Watching the release namespace itself needs one binding.
    same = render({"router": {"watchNamespace": RELEASE_NAMESPACE}})
    role_name = same.component("ClusterRole", "router")["metadata"]["name"]
    assert len([b for b in same.of_kind("RoleBinding") if b["roleRef"]["name"] == role_name]) == 1
