"""Bounded load: 200 concurrent streaming requests against a small waiting queue. Every request
ends complete or with a clean 429, nothing hangs, the KV returns to idle and the request
counters match what was sent."""

from __future__ import annotations

import asyncio

import httpx
from conftest import API_KEY, MAX_WAITING
from test_wire import metric_values

REQUESTS = 200
ROUTE = "/v1/chat/completions"


async def one_request(client: httpx.AsyncClient, url: str, model_id: str, index: int) -> str:
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": f"Say the number {index}."}],
        "max_tokens": 3,
        "stream": True,
    }
    async with client.stream("POST", url, json=body) as response:
        raw = b"".join([chunk async for chunk in response.aiter_bytes()])
    if response.status_code == 429:
        assert response.headers["retry-after"] == "1"
        assert b'"rate_limit_error"' in raw
        return "rejected"
    assert response.status_code == 200, raw
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    return "complete"


def route_count(values: dict) -> float:
    return sum(v for (name, labels), v in values.items() if name == "skillkv_requests_total" and ("route", ROUTE) in labels)


def test_two_hundred_concurrent_streams_end_cleanly(daemon, model_id):
    before = route_count(metric_values(daemon))

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=0)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(limits=limits, headers=headers, timeout=120) as client:
            url = f"{daemon.api_url}/chat/completions"
            tasks = [one_request(client, url, model_id, i) for i in range(REQUESTS)]
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout=240)

    outcomes = asyncio.run(run())
    assert len(outcomes) == REQUESTS
    completed = outcomes.count("complete")
    assert completed + outcomes.count("rejected") == REQUESTS
    assert completed >= MAX_WAITING
    daemon.wait_for_idle_kv()
    after = route_count(metric_values(daemon))
    assert after - before == REQUESTS
