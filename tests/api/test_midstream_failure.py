"""A stream that fails midway (here: the per-request timeout) ends with exactly one SSE error
event and no `[DONE]`, and its KV is freed."""

from __future__ import annotations

import json

import httpx
from conftest import API_KEY, start_daemon


def test_timeout_mid_stream_sends_one_error_event_then_ends(skillkv_binary, tmp_path):
    daemon = start_daemon(skillkv_binary, tmp_path, "--request-timeout", "2")
    try:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        model_id = httpx.get(f"{daemon.api_url}/models", headers=headers).json()["data"][0]["id"]
        body = {
            "model": model_id, "messages": [{"role": "user", "content": "Write a long essay."}],
            "max_tokens": 4000, "stream": True, "ignore_eos": True,
        }
        with httpx.stream("POST", f"{daemon.api_url}/chat/completions", json=body, headers=headers, timeout=60) as response:
            assert response.status_code == 200
            raw = b"".join(response.iter_bytes())
        frames = raw.split(b"\n\n")
        assert frames[-1] == b""
        frames = frames[:-1]
        assert b"[DONE]" not in raw
        errors = [frame for frame in frames if b'"error"' in frame]
        assert errors == [frames[-1]]
        error = json.loads(frames[-1][len(b"data: "):])["error"]
        assert error["code"] == "timeout"
        assert set(error) == {"message", "type", "param", "code"}
        assert len(frames) > 2, "some tokens were streamed before the timeout"
        daemon.wait_for_idle_kv()
        assert daemon.stop() == 0
    finally:
        daemon.stop()
