"""Skills end to end on the real default model: a daemon started with `--skills DIR` prefills
and pins them before it is ready, requests name or detect skills and reuse their KV, the admin
API reports and changes them (`PUT /admin/v1/desired`), and /metrics and the CLI show them."""

from __future__ import annotations

import json
import subprocess

import httpx
import openai
import pytest
from conftest import ADMIN_TOKEN, API_KEY, detector_embeddings_path, start_daemon
from prometheus_client.parser import text_string_to_metric_families

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

SKILLS = {
    "haiku-writer": (
        "Use when the user asks for a poem, a haiku or verse about any topic",
        ["haiku", "poem", "verse"],
        "When asked for a poem, answer with one haiku: three lines of five, seven and five "
        "syllables. Use concrete images from nature. Do not explain the poem. " * 3,
    ),
    "sql-tuning": (
        "Use when a SQL query is slow: indexes, query plans, joins and statistics",
        ["sql", "index", "query plan", "slow query"],
        "To speed up a slow SQL query, read its plan with EXPLAIN ANALYZE, add an index on the "
        "columns of selective filters and join keys, and keep table statistics fresh. " * 3,
    ),
}


def skill_md(name: str, description: str, keywords: list[str], body: str) -> str:
    keyword_lines = "".join(f"  - {keyword}\n" for keyword in keywords)
    return f'---\nname: {name}\ndescription: "{description}"\nkeywords:\n{keyword_lines}---\n{body}\n'


@pytest.fixture(scope="module")
def skills_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("skills")
    for name, (description, keywords, body) in SKILLS.items():
        (root / name).mkdir()
        (root / name / "SKILL.md").write_text(skill_md(name, description, keywords, body))
    return root


@pytest.fixture(scope="module")
def skilled(skillkv_binary, skills_dir, tmp_path_factory):
    daemon = start_daemon(
        skillkv_binary, tmp_path_factory.mktemp("skilled"), "--skills", str(skills_dir),
        "--detector-embeddings", str(detector_embeddings_path()),
    )
    yield daemon
    assert daemon.stop() == 0


@pytest.fixture(scope="module")
def skilled_model(skilled) -> str:
    return skilled.admin_state()["model"]["id"]


@pytest.fixture()
def skilled_client(skilled):
    return openai.OpenAI(base_url=skilled.api_url, api_key=API_KEY, max_retries=0, timeout=120)


def skill_states(daemon) -> dict:
    return {skill["name"]: skill for skill in daemon.admin_state()["skills"]}


def test_skills_are_ready_and_pinned_before_the_daemon_is_ready(skilled):
    # start_daemon returned only after /readyz said 200.
    states = skill_states(skilled)
    assert set(states) == set(SKILLS)
    state = skilled.admin_state()
    for skill in states.values():
        assert skill["state"] == "Ready", skill
        assert skill["origin"] == "directory"
        assert skill["tokens"] > 100
        assert skill["kvBytes"] == skill["tokens"] * state["kvBudget"]["kvBytesPerToken"]
        assert skill["servingContentHash"] == skill["contentHash"]
    pinned = sum(skill["tokens"] // 16 for skill in states.values())
    assert state["load"]["pinnedBlocks"] >= pinned
    assert state["kvBudget"]["pinnedBudgetBlocks"] >= pinned


def test_a_named_skill_is_served_from_its_pinned_kv(skilled_client, skilled, skilled_model):
    tokens = skill_states(skilled)["sql-tuning"]["tokens"]
    raw = skilled_client.chat.completions.with_raw_response.create(
        model=skilled_model,
        messages=[{"role": "user", "content": "Why would my report be slow?"}],
        max_tokens=4, temperature=0, extra_body={"skills": ["sql-tuning"]},
    )
    assert raw.headers["x-skillkv-cache"] == (
        "mode=exact; skills=sql-tuning; selection=named; warm=sql-tuning; cached=none"
    )
    usage = raw.parse().usage
    # The first request already reuses every full block of the pinned skill.
    assert usage.prompt_tokens_details.cached_tokens >= (tokens // 16) * 16
    assert usage.prompt_tokens > tokens


def test_skills_are_detected_when_the_request_names_none(skilled_client, skilled_model):
    raw = skilled_client.chat.completions.with_raw_response.create(
        model=skilled_model,
        messages=[{"role": "user", "content": "Write a haiku poem about autumn rain."}],
        max_tokens=4, temperature=0,
    )
    assert "skills=haiku-writer; selection=detected" in raw.headers["x-skillkv-cache"]
    none = skilled_client.chat.completions.with_raw_response.create(
        model=skilled_model,
        messages=[{"role": "user", "content": "Write a haiku poem about autumn rain."}],
        max_tokens=2, temperature=0, extra_body={"skills": []},
    )
    assert "skills=none" in none.headers["x-skillkv-cache"]


@pytest.mark.parametrize(("query", "detected"), [
    # "slow" is a keyword of sql-tuning, but the request is not about databases: vetoed.
    ("my knee is slow to heal after the marathon", "none"),
    # No word of sql-tuning's card, but its meaning: chosen by similarity.
    ("the checkout page takes nine seconds because of one Postgres statement", "sql-tuning"),
])
def test_detection_checks_meaning_with_embeddings(skilled_client, skilled_model, query, detected):
    raw = skilled_client.chat.completions.with_raw_response.create(
        model=skilled_model, messages=[{"role": "user", "content": query}], max_tokens=1, temperature=0,
    )
    assert f"skills={detected};" in raw.headers["x-skillkv-cache"], raw.headers["x-skillkv-cache"]


@pytest.mark.parametrize("skills", [["no-such-skill"], "everything"])
def test_bad_skills_are_rejected_naming_the_param(skilled_client, skilled_model, skills):
    with pytest.raises(openai.BadRequestError) as raised:
        skilled_client.chat.completions.create(
            model=skilled_model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            extra_body={"skills": skills},
        )
    assert raised.value.body["param"] == "skills"


def test_per_skill_accounting_in_state_and_metrics(skilled, skilled_model):
    before = skill_states(skilled)["haiku-writer"]
    response = httpx.post(
        f"{skilled.api_url}/chat/completions", headers=AUTH, timeout=120,
        json={"model": skilled_model, "messages": [{"role": "user", "content": "hello"}],
              "max_tokens": 2, "skills": ["haiku-writer"]},
    )
    assert response.status_code == 200
    after = skill_states(skilled)["haiku-writer"]
    assert after["hits"] == before["hits"] + 1
    assert after["cachedTokens"] >= before["cachedTokens"] + (after["tokens"] // 16) * 16
    assert after["prefillSecondsSaved"] > before["prefillSecondsSaved"]
    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{skilled.base_url}/metrics").text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert values[("skillkv_skill_hits_total", (("skill", "haiku-writer"),))] == after["hits"]
    assert values[("skillkv_skill_state", (("skill", "haiku-writer"), ("state", "Ready")))] == 1
    assert values[("skillkv_skill_state", (("skill", "haiku-writer"), ("state", "Failed")))] == 0
    assert values[("skillkv_skill_tokens", (("skill", "haiku-writer"),))] == after["tokens"]


def test_state_reports_the_engine_device_and_why(skilled):
    state = httpx.get(f"{skilled.admin_url}/admin/v1/state", headers=ADMIN_AUTH, timeout=30).json()
    device = state["device"]
    assert device["kind"] in ("cpu", "cuda")
    assert device["reason"].startswith("--device auto"), device
    if device["kind"] == "cuda":
        assert device["ordinal"] == 0 and device["name"]
        assert device["memoryTotalBytes"] > 0
    else:
        assert "ordinal" not in device and "name" not in device
        assert "memoryFreeAfterWeightsBytes" not in device
    # The pool was given in bytes (--kv-cache-bytes), not as a fraction of any memory.
    budget = state["kvBudget"]
    assert budget["sizedFrom"] == "configured", budget
    assert "memoryAvailableBytes" not in budget
    assert budget["totalBlocks"] * budget["blockTokens"] * budget["kvBytesPerToken"] <= 256 * 1024 * 1024


def put_desired(daemon, document: dict) -> httpx.Response:
    return httpx.put(f"{daemon.admin_url}/admin/v1/desired", headers=ADMIN_AUTH, json=document, timeout=30)


def wait_for_skill_event(events, name: str, state: str, not_hash: str | None = None) -> dict:
    """Reads the admin event stream until `name` reaches `state` (with a content hash other than
    `not_hash`: the stream starts with every skill's current state)."""
    lines = events.iter_lines()
    for line in lines:
        if line == "event: skillState":
            data = json.loads(next(lines)[len("data: "):])
            if data["name"] == name and data["state"] == state and data["contentHash"] != not_hash:
                return data
    raise AssertionError(f"the event stream ended before {name} became {state}")


def test_desired_state_adds_updates_and_removes_skills(skilled):
    skill = skill_md("release-notes", "Use when writing release notes", ["release"], "Write release notes as bullets. " * 20)
    document = {"generation": 1, "skills": [{"name": "release-notes", "content": skill}], "adapters": []}
    with httpx.stream("GET", f"{skilled.admin_url}/admin/v1/events", headers=ADMIN_AUTH, timeout=300) as events:
        first = put_desired(skilled, document)
        assert first.status_code == 200 and first.json() == {"generation": 1, "changed": True}
        ready = wait_for_skill_event(events, "release-notes", "Ready")
    assert ready["origin"] == "desired"
    assert put_desired(skilled, document).json() == {"generation": 1, "changed": False}
    stale = put_desired(skilled, {**document, "generation": 0})
    assert stale.status_code == 409
    assert stale.json()["error"]["code"] == "conflict"
    bad = put_desired(skilled, {"generation": 5, "skills": [{"name": "x", "content": "no front matter"}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "skills"

    # A hot update: the new text is prefilled, then serves.
    updated = skill.replace("as bullets", "as short bullets")
    with httpx.stream("GET", f"{skilled.admin_url}/admin/v1/events", headers=ADMIN_AUTH, timeout=300) as events:
        assert put_desired(skilled, {**document, "generation": 2, "skills": [{"name": "release-notes", "content": updated}]}).status_code == 200
        updated_ready = wait_for_skill_event(events, "release-notes", "Ready", not_hash=ready["contentHash"])
    assert updated_ready["servingContentHash"] == updated_ready["contentHash"]
    assert skill_states(skilled)["release-notes"]["servingContentHash"] == updated_ready["contentHash"]

    # Adapters are reported as Failed with the reason, never silently "loaded".
    with_adapter = {"generation": 3, "skills": [], "adapters": [{"name": "my-lora", "uri": "file:///a"}]}
    assert put_desired(skilled, with_adapter).json()["changed"] is True
    state = skilled.admin_state()
    assert state["desiredGeneration"] == 3
    assert "release-notes" not in skill_states(skilled)
    assert set(SKILLS) <= set(skill_states(skilled)), "folder skills are not touched by desired state"
    assert state["adapters"] == [{"name": "my-lora", "state": "Failed", "message": state["adapters"][0]["message"]}]
    assert "not supported" in state["adapters"][0]["message"]


def test_event_stream_starts_with_every_skill(skilled):
    with httpx.stream("GET", f"{skilled.admin_url}/admin/v1/events", headers=ADMIN_AUTH, timeout=60) as events:
        lines = events.iter_lines()
        names = set()
        for line in lines:
            if line == "event: skillState":
                names.add(json.loads(next(lines)[len("data: "):])["name"])
            elif line.startswith("event: "):
                break
    assert set(SKILLS) <= names


def test_cli_lists_a_running_daemon_and_detects_offline(skillkv_binary, skilled, skills_dir, tmp_path):
    token = tmp_path / "token"
    token.write_text(ADMIN_TOKEN)
    listed = subprocess.run(
        [str(skillkv_binary), "skills", "list", "--admin-url", skilled.admin_url, "--admin-token-file", str(token)],
        check=True, capture_output=True, text=True,
    ).stdout
    assert "sql-tuning" in listed and "Ready" in listed
    detected = subprocess.run(
        [str(skillkv_binary), "skills", "detect", "--skills", str(skills_dir), "my slow SQL query needs an index"],
        check=True, capture_output=True, text=True,
    ).stdout
    assert detected.split("\t")[0] == "sql-tuning"
    # Words only: "slow" picks sql-tuning; with the embeddings its cosine vetoes it, and the
    # scores show every skill's cosine.
    trap = "my knee is slow to heal after the marathon"
    words = subprocess.run(
        [str(skillkv_binary), "skills", "detect", "--skills", str(skills_dir), trap],
        check=True, capture_output=True, text=True,
    ).stdout
    assert words.split("\t")[0] == "sql-tuning"
    meaning = subprocess.run(
        [str(skillkv_binary), "skills", "detect", "--skills", str(skills_dir), trap, "--all",
         "--detector-embeddings", str(detector_embeddings_path())],
        check=True, capture_output=True, text=True,
    ).stdout
    assert meaning.startswith("no skill selected"), meaning
    assert meaning.count("\tcos ") == len(SKILLS), meaning


def test_a_restarted_daemon_loads_skills_from_its_store(skillkv_binary, skills_dir, tmp_path):
    store = tmp_path / "kv-store"
    first = start_daemon(skillkv_binary, tmp_path / "first", "--skills", str(skills_dir), "--kv-store", str(store))
    try:
        prefilled = skill_states(first)
        assert all("message" not in skill for skill in prefilled.values()), prefilled
        body = {"model": first.admin_state()["model"]["id"], "max_tokens": 6, "temperature": 0,
                "messages": [{"role": "user", "content": "A poem about rivers."}], "skills": ["haiku-writer"]}
        before = httpx.post(f"{first.api_url}/chat/completions", headers=AUTH, json=body, timeout=120).json()
    finally:
        assert first.stop() == 0
    assert sorted(path.name.split(".")[0] for path in store.iterdir()) == sorted(SKILLS)

    second = start_daemon(skillkv_binary, tmp_path / "second", "--skills", str(skills_dir), "--kv-store", str(store))
    try:
        for skill in skill_states(second).values():
            assert skill["state"] == "Ready"
            assert skill["message"] == "loaded from the node's KV store"
            assert skill["prefillMillis"] == 0
        after = httpx.post(f"{second.api_url}/chat/completions", headers=AUTH, json=body, timeout=120).json()
    finally:
        assert second.stop() == 0
    assert after["choices"][0]["message"]["content"] == before["choices"][0]["message"]["content"]
    assert after["usage"]["prompt_tokens_details"]["cached_tokens"] == before["usage"]["prompt_tokens_details"]["cached_tokens"]
