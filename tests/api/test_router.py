"""The official `openai` client through the router: two real daemons (`skillkv serve` on the
default model, each with its own skill) behind `skillkv-operator router` with an API-key file.
Models are listed across the fleet, chat completions work streamed and unstreamed, a request
naming a skill lands on the daemon that holds it, and errors keep OpenAI's shape."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess

import httpx
import openai
import pytest
from conftest import ADMIN_TOKEN, Daemon, free_port, start_daemon, stop_process, wait_until_serving

ROUTER_KEY = "sk-router-test-0123456789"

SKILLS = {
    "haiku-writer": (
        "Use when the user asks for a poem, a haiku or verse about any topic",
        "When asked for a poem, answer with one haiku of three short lines about nature.",
    ),
    "sql-tuning": (
        "Use when a SQL query is slow: indexes, query plans, joins and statistics",
        "To speed up a slow SQL query, read its plan with EXPLAIN ANALYZE and add an index.",
    ),
}


@dataclasses.dataclass
class Router:
    process: subprocess.Popen
    base_url: str
    metrics_url: str
    log_path: pathlib.Path

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/v1"

    def stop(self, timeout: float = 30.0) -> int:
        return stop_process(self.process, timeout)


def healthy_backends(router: Router) -> int:
    text = httpx.get(f"{router.metrics_url}/metrics", timeout=5).text
    return sum(
        1
        for line in text.splitlines()
        if line.startswith("skillkv_router_backend_healthy{") and line.endswith(" 1")
    )


def start_router(binary: pathlib.Path, tmp: pathlib.Path, daemons: list[Daemon]) -> Router:
    token_file = tmp / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    keys_file = tmp / "api-keys.yaml"
    keys_file.write_text(f"- {{key: {ROUTER_KEY}, name: tester, tenant: team-a}}\n")
    port, metrics_port = free_port(), free_port()
    backends = []
    for daemon in daemons:
        backends += ["--backend", f"{daemon.base_url},admin={daemon.admin_url},admin-token-file={token_file}"]
    log_path = tmp / "router.log"
    process = subprocess.Popen(
        [
            str(binary), "router",
            "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
            *backends,
            "--api-keys-file", str(keys_file), "--require-api-key", "true",
        ],
        stdout=subprocess.DEVNULL, stderr=log_path.open("wb"), env=dict(os.environ, RUST_LOG="info"),
    )
    router = Router(process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}", log_path)
    # Ready once both daemons' admin event streams are followed (their skills known).
    wait_until_serving(
        process, log_path, lambda: healthy_backends(router) == len(daemons),
        seconds=60, what="the router", interval=0.05,
    )
    return router


@pytest.fixture(scope="module")
def fleet(skillkv_binary, operator_binary, tmp_path_factory):
    daemons = []
    router = None
    try:
        for name, (description, body) in SKILLS.items():
            root = tmp_path_factory.mktemp(f"skills-{name}")
            (root / name).mkdir()
            (root / name / "SKILL.md").write_text(f'---\nname: {name}\ndescription: "{description}"\n---\n{body}\n')
            daemons.append(
                start_daemon(skillkv_binary, tmp_path_factory.mktemp(f"daemon-{name}"), "--skills", str(root), api_key=None)
            )
        router = start_router(operator_binary, tmp_path_factory.mktemp("router"), daemons)
        yield router, daemons
        assert router.stop() == 0, "the router did not exit cleanly on SIGTERM"
    finally:
        if router is not None:
            router.stop()
        for daemon in daemons:
            daemon.stop()


@pytest.fixture()
def routed(fleet):
    router, _ = fleet
    return openai.OpenAI(base_url=router.api_url, api_key=ROUTER_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def routed_model(fleet) -> str:
    router, _ = fleet
    client = openai.OpenAI(base_url=router.api_url, api_key=ROUTER_KEY, max_retries=0, timeout=60)
    return client.models.list().data[0].id


def test_models_are_listed_once_across_the_fleet(routed, fleet):
    _, daemons = fleet
    direct = httpx.get(f"{daemons[0].api_url}/models", timeout=10).json()["data"]
    models = routed.models.list().data
    assert [model.id for model in models] == [model["id"] for model in direct]
    assert routed.models.retrieve(models[0].id).id == models[0].id


def test_chat_completion_through_the_router(routed, routed_model):
    raw = routed.chat.completions.with_raw_response.create(
        model=routed_model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=4, temperature=0
    )
    assert raw.headers["x-request-id"]
    assert raw.headers["x-skillkv-backend"].startswith("127.0.0.1:")
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == routed_model
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens <= 4
    assert completion.usage.prompt_tokens > 0


def test_streamed_chat_through_the_router(routed, routed_model):
    stream = routed.chat.completions.create(
        model=routed_model,
        messages=[{"role": "user", "content": "Count to three."}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"] or finishes == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6


@pytest.mark.parametrize("skill", sorted(SKILLS))
def test_a_named_skill_lands_on_the_daemon_that_holds_it(routed, routed_model, fleet, skill):
    _, daemons = fleet
    holder = daemons[list(SKILLS).index(skill)]
    raw = routed.chat.completions.with_raw_response.create(
        model=routed_model,
        messages=[{"role": "user", "content": "Help me."}],
        max_tokens=2,
        extra_body={"skills": [skill]},
    )
    assert raw.headers["x-skillkv-backend"] == holder.base_url.removeprefix("http://")
    assert raw.headers["x-skillkv-route"] == "skill-hit"
    assert f"warm={skill}" in raw.headers["x-skillkv-cache"]
    assert raw.parse().usage.prompt_tokens_details.cached_tokens > 0


def test_a_wrong_or_missing_key_is_401_with_an_openai_body(fleet, routed_model):
    router, _ = fleet
    client = openai.OpenAI(base_url=router.api_url, api_key="sk-wrong-key", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model=routed_model, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert caught.value.status_code == 401
    assert set(caught.value.body) == {"message", "type", "param", "code"}
    missing = httpx.post(
        f"{router.api_url}/chat/completions",
        json={"model": routed_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        timeout=30,
    )
    assert missing.status_code == 401
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_an_unknown_model_is_404_with_an_openai_body(routed):
    with pytest.raises(openai.NotFoundError) as caught:
        routed.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert caught.value.status_code == 404
    assert caught.value.body["code"] == "model_not_found"
    assert "no-such-model" in caught.value.body["message"]
