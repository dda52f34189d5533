"""Gate of the real-cluster suite: it runs only where KUBECONFIG reaches a cluster and the
kubectl and helm CLIs are installed; everywhere else every test skips with the reason."""

import os
import shutil
import subprocess

import pytest


def _cluster_unavailable_reason():
    if not os.environ.get("KUBECONFIG"):
        return "skipped: KUBECONFIG is not set (run e2e/kind.sh, or point KUBECONFIG at a test cluster)"
    for tool in ("kubectl", "helm"):
        if shutil.which(tool) is None:
            return f"skipped: {tool} is not installed"
    try:
        subprocess.run(
            ["kubectl", "version", "--request-timeout=5s"],
            check=True,
            capture_output=True,
            timeout=15,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        return f"skipped: no cluster reachable through KUBECONFIG ({error})"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _cluster_unavailable_reason()
    if reason is None:
        return
    print(f"\ne2e/cluster: {reason}")
    for item in items:
        item.add_marker(pytest.mark.skip(reason=reason))
