"""The whole system on a real cluster: install the CRDs and the chart, apply the example
ModelDeployment and skills, wait for their Conditions, send an OpenAI request through the router
Service, then delete everything and check that the controller's children are gone.

Environment:
  KUBECONFIG                 the cluster (required; without it the suite skips)
  SKILLKV_E2E_NAMESPACE      namespace of the release and the examples (default skillkv-e2e)
  SKILLKV_E2E_IMAGE_REGISTRY registry prefix of both images (chart value image.registry)
  SKILLKV_E2E_IMAGE_TAG      tag of both images (chart value image.tag)
  SKILLKV_E2E_TIMEOUT        seconds to wait for each condition (default 600)
"""

import json
import os
import pathlib
import subprocess
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
NAMESPACE = os.environ.get("SKILLKV_E2E_NAMESPACE", "skillkv-e2e")
RELEASE = "skillkv-e2e"
TIMEOUT = int(os.environ.get("SKILLKV_E2E_TIMEOUT", "600"))
MODEL = "smollm2-135m"
SKILLS = ["debugging", "performance"]


def kubectl(*args, check=True, capture=True, timeout=120):
    return subprocess.run(
        ["kubectl", *args], check=check, capture_output=capture, text=True, timeout=timeout
    )


def helm(*args, timeout=600):
    return subprocess.run(["helm", *args], check=True, capture_output=True, text=True, timeout=timeout)


def wait_for(description, predicate, timeout=TIMEOUT, interval=3):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {description} (last: {last!r})")


def get_json(*args):
    result = kubectl("get", *args, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


@pytest.fixture(scope="module")
def installed():
    kubectl("create", "namespace", NAMESPACE, check=False)
    kubectl("apply", "--server-side", "-f", str(ROOT / "charts/skillkv/crds/"))
    values = ["--set", "logFormat=text"]
    if registry := os.environ.get("SKILLKV_E2E_IMAGE_REGISTRY"):
        values += ["--set", f"image.registry={registry}"]
    if tag := os.environ.get("SKILLKV_E2E_IMAGE_TAG"):
        values += ["--set", f"image.tag={tag}"]
    helm("upgrade", "--install", RELEASE, str(ROOT / "charts/skillkv"), "-n", NAMESPACE, "--wait", *values)
    kubectl("apply", "-n", NAMESPACE, "-f", str(ROOT / "skills/examples/modeldeployment.yaml"))
    for skill in SKILLS:
        kubectl("apply", "-n", NAMESPACE, "-f", str(ROOT / f"skills/{skill}/skill.yaml"))
    yield
    for skill in SKILLS:
        kubectl("delete", "-n", NAMESPACE, "skill", skill, "--ignore-not-found", "--wait=true", check=False, timeout=300)
    kubectl("delete", "-n", NAMESPACE, "modeldeployment", MODEL, "--ignore-not-found", check=False)
    helm("uninstall", RELEASE, "-n", NAMESPACE)
    kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def condition(obj, type_):
    for cond in (obj or {}).get("status", {}).get("conditions", []):
        if cond["type"] == type_:
            return cond
    return None


def test_model_deployment_becomes_available(installed):
    def available():
        md = get_json("modeldeployment", MODEL, "-n", NAMESPACE)
        cond = condition(md, "Available")
        return md if cond and cond["status"] == "True" else None

    md = wait_for("ModelDeployment Available", available)
    assert md["status"]["selector"]
    pool = get_json("deployment", f"{MODEL}-daemon", "-n", NAMESPACE)
    assert pool["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    gates = pool["spec"]["template"]["spec"]["readinessGates"]
    assert {"conditionType": "skillkv.io/skills-warm"} in gates


def test_skills_become_ready_on_every_pod(installed):
    kubectl("wait", "-n", NAMESPACE, "--for=condition=Ready", *[f"skill/{s}" for s in SKILLS], f"--timeout={TIMEOUT}s", timeout=TIMEOUT + 30)
    for skill in SKILLS:
        obj = get_json("skill", skill, "-n", NAMESPACE)
        status = obj["status"]
        assert status["contentHash"]
        assert status["tokens"] > 0
        assert all(p["state"] == "Ready" for p in status["placements"])
        assert status["readyReplicas"] == len(status["placements"])


def test_an_openai_request_through_the_router(installed):
    port_forward = subprocess.Popen(
        ["kubectl", "port-forward", "-n", NAMESPACE, f"svc/{RELEASE}-router", "18000:8000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        body = json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "My service segfaults. Where do I start?"}], "max_tokens": 16}
        ).encode()

        def answer():
            request = urllib.request.Request(
                "http://127.0.0.1:18000/v1/chat/completions", data=body, headers={"content-type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return json.loads(response.read())
            except OSError:
                return None

        reply = wait_for("a chat completion through the router", answer, timeout=120)
        assert reply["choices"][0]["message"]["content"]
        assert reply["usage"]["prompt_tokens"] > 0
    finally:
        port_forward.terminate()
        port_forward.wait(timeout=10)


def test_deleting_cleans_up(installed):
    kubectl("delete", "-n", NAMESPACE, "skill", SKILLS[0], "--wait=true", timeout=300)
    assert get_json("skill", SKILLS[0], "-n", NAMESPACE) is None
    kubectl("delete", "-n", NAMESPACE, "modeldeployment", MODEL, "--wait=true", timeout=300)

    def children_gone():
        selector = f"skillkv.io/model-deployment={MODEL}"
        leftovers = kubectl("get", "deployments,services,pods,secrets", "-n", NAMESPACE, "-l", selector, "-o", "name").stdout.strip()
        return leftovers == "" or None

    wait_for("the pool's Deployment, Service, pods and Secret to be garbage-collected", children_gone, timeout=300)
