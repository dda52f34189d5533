"""The SSE wire format byte by byte, cancellation on disconnect, the admin API, /metrics,
request ids and what the logs must never contain."""

from __future__ import annotations

import ctypes.util
import json
import uuid

import httpx
from conftest import ADMIN_TOKEN, API_KEY
from prometheus_client.parser import text_string_to_metric_families

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def chat_body(model_id: str, content: str = "Count to five.", **extra) -> dict:
    return {"model": model_id, "messages": [{"role": "user", "content": content}], **extra}


def test_stream_is_data_frames_ending_in_done(daemon, model_id):
    body = chat_body(model_id, max_tokens=6, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{daemon.api_url}/chat/completions", json=body, headers=AUTH, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        raw = b"".join(response.iter_bytes())
    assert raw.endswith(b"data: [DONE]\n\n")
    frames = raw.split(b"\n\n")
    assert frames[-1] == b""
    frames = frames[:-1]
    assert frames[-1] == b"data: [DONE]"
    for frame in frames[:-1]:
        assert frame.startswith(b"data: {") and b"\n" not in frame
        json.loads(frame[len(b"data: "):])
    assert b"[DONE]" not in b"".join(frames[:-1])


def test_client_disconnect_cancels_and_frees_kv(daemon, model_id):
    baseline = daemon.wait_for_idle_kv()
    body = chat_body(model_id, max_tokens=400, stream=True, ignore_eos=True)
    with httpx.stream("POST", f"{daemon.api_url}/chat/completions", json=body, headers=AUTH, timeout=60) as response:
        lines = response.iter_lines()
        received = 0
        for line in lines:
            if line.startswith("data: {"):
                received += 1
            if received >= 3:
                break
        running = daemon.admin_state()["load"]
        assert running["running"] == 1 and running["usedBlocks"] > 0
    # Leaving the block closed the connection mid-stream.
    after = daemon.wait_for_idle_kv()
    assert after["usedBlocks"] == baseline["usedBlocks"] == 0
    metrics = metric_values(daemon)
    assert metrics[("skillkv_kv_blocks", (("state", "used"),))] == 0


def test_admin_needs_the_token_and_reports_the_model(daemon, model_id):
    assert httpx.get(f"{daemon.admin_url}/admin/v1/state").status_code == 401
    wrong = httpx.get(f"{daemon.admin_url}/admin/v1/state", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    state = daemon.admin_state()
    assert state["model"]["id"] == model_id
    assert len(state["model"]["modelDigest"]) == 64
    assert state["kvBudget"]["blockTokens"] == 16
    load = state["load"]
    total = load["freeBlocks"] + load["cachedBlocks"] + load["pinnedBlocks"] + load["usedBlocks"]
    assert total == state["kvBudget"]["totalBlocks"]


def test_admin_events_stream_stored_blocks(daemon, model_id):
    unique = f"A fresh prompt {uuid.uuid4()} that fills more than one block of sixteen tokens."
    with httpx.stream("GET", f"{daemon.admin_url}/admin/v1/events", headers=ADMIN_AUTH, timeout=60) as events:
        assert events.headers["content-type"] == "text/event-stream"
        lines = events.iter_lines()
        # The first event is the current load, so the subscription is live before we send.
        assert next(lines) == "event: load"
        completion = httpx.post(
            f"{daemon.api_url}/chat/completions", json=chat_body(model_id, unique, max_tokens=2),
            headers=AUTH, timeout=60,
        )
        assert completion.status_code == 200
        for line in lines:
            if line == "event: blockStored":
                data = json.loads(next(lines)[len("data: "):])
                assert data["type"] == "blockStored" and len(data["hash"]) == 64
                break


def metric_values(daemon) -> dict:
    text = httpx.get(f"{daemon.base_url}/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_metrics_parse_and_cover_the_required_families(daemon, model_id):
    httpx.post(f"{daemon.api_url}/chat/completions", json=chat_body(model_id, max_tokens=2), headers=AUTH, timeout=60)
    text = httpx.get(f"{daemon.base_url}/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name in [
        "skillkv_requests", "skillkv_time_to_first_token_seconds", "skillkv_time_per_output_token_seconds",
        "skillkv_e2e_request_latency_seconds", "skillkv_queue_time_seconds", "skillkv_prompt_tokens",
        "skillkv_completion_tokens", "skillkv_cached_prompt_tokens", "skillkv_kv_blocks",
        "skillkv_prefix_cache_hit_ratio", "skillkv_running_sequences", "skillkv_waiting_sequences",
        "skillkv_preemptions", "skillkv_gpu_present",
    ]:
        assert name in families, f"{name} missing from /metrics"
    values = metric_values(daemon)
    assert values[("skillkv_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))] >= 1
    assert values[("skillkv_kv_blocks", (("state", "total"),))] > 0
    gpu_present = values[("skillkv_gpu_present", ())]
    if ctypes.util.find_library("nvidia-ml") is None:
        assert gpu_present == 0


def test_request_id_is_honoured_and_logged_without_content(daemon, model_id):
    marker = f"secret-marker-{uuid.uuid4()}"
    request_id = f"req-{uuid.uuid4()}"
    response = httpx.post(
        f"{daemon.api_url}/chat/completions", json=chat_body(model_id, marker, max_tokens=2),
        headers={**AUTH, "x-request-id": request_id}, timeout=60,
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == request_id
    assert response.json()["id"] == f"chatcmpl-{request_id}"
    trace_id = uuid.uuid4().hex
    traced = httpx.get(
        f"{daemon.api_url}/models", headers={**AUTH, "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    )
    assert traced.headers["x-request-id"] == trace_id
    log = daemon.log_path.read_text()
    assert request_id in log
    assert marker not in log
    assert API_KEY not in log
    for line in log.splitlines():
        json.loads(line)
