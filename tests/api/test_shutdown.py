"""Graceful shutdown: on SIGTERM an in-flight stream still completes, then the daemon exits 0."""

from __future__ import annotations

import signal

import httpx
from conftest import API_KEY, start_daemon


def test_sigterm_lets_the_inflight_stream_finish(skillkv_binary, tmp_path):
    daemon = start_daemon(skillkv_binary, tmp_path, "--shutdown-grace", "60")
    try:
        model_id = httpx.get(f"{daemon.api_url}/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"][0]["id"]
        body = {
            "model": model_id, "messages": [{"role": "user", "content": "Tell a story."}],
            "max_tokens": 24, "stream": True, "ignore_eos": True,
        }
        with httpx.stream(
            "POST", f"{daemon.api_url}/chat/completions", json=body,
            headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
        ) as response:
            chunks = response.iter_bytes()
            first = next(chunks)
            assert first.startswith(b"data: ")
            daemon.process.send_signal(signal.SIGTERM)
            rest = b"".join(chunks)
        assert rest.endswith(b"data: [DONE]\n\n")
        assert daemon.process.wait(timeout=60) == 0
    finally:
        daemon.stop()
