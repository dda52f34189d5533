"""Conformance of `skillkv serve` with the official `openai` client, on the real default model."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import API_KEY, MAX_BODY_BYTES

GREETING = [{"role": "user", "content": "Name three colours."}]


def test_models_lists_the_base_model(client, model_id):
    models = client.models.list()
    assert [model.id for model in models.data] == [model_id]
    assert client.models.retrieve(model_id).id == model_id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_completion_has_text_usage_and_cache_header(client, model_id):
    raw = client.chat.completions.with_raw_response.create(
        model=model_id, messages=GREETING, max_tokens=8, temperature=0
    )
    assert raw.headers["x-skillkv-cache"].startswith("mode=")
    completion = raw.parse()
    assert completion.object == "chat.completion"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0


def test_streamed_chat_matches_the_unstreamed_greedy_text(client, model_id):
    request = {"model": model_id, "messages": GREETING, "max_tokens": 10, "temperature": 0}
    full = client.chat.completions.create(**request).choices[0].message.content
    stream = client.chat.completions.create(
        **request, stream=True, stream_options={"include_usage": True}
    )
    deltas, finish_reasons, usages = [], [], []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            assert chunk.choices == []
            usages.append(chunk.usage)
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    assert "".join(deltas) == full
    assert len(finish_reasons) == 1
    assert len(usages) == 1 and usages[0].completion_tokens > 0


def test_chat_logprobs_have_openai_shape(client, model_id):
    completion = client.chat.completions.create(
        model=model_id, messages=GREETING, max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True},
    )
    tokens = completion.choices[0].logprobs.content
    assert len(tokens) == completion.usage.completion_tokens == 4
    for token in tokens:
        assert token.logprob <= 0
        assert len(token.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert token.top_logprobs[0].token == token.token
        assert bytes(token.bytes).decode("utf-8", "replace") == token.token


def test_completions_take_text_or_token_prompts(client, model_id):
    text = client.completions.create(model=model_id, prompt="The sky is", max_tokens=5, temperature=0)
    assert text.object == "text_completion"
    assert text.choices[0].text
    assert text.usage.completion_tokens > 0
    tokens = client.completions.create(model=model_id, prompt=[504, 3656, 314], max_tokens=3, temperature=0)
    assert tokens.usage.prompt_tokens == 3
    streamed = client.completions.create(
        model=model_id, prompt="The sky is", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == text.choices[0].text


def test_repeated_prompt_reports_cached_tokens(client, model_id):
    messages = [
        {"role": "system", "content": "You are a careful assistant who answers in one short sentence. " * 4},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    first = client.chat.completions.create(model=model_id, messages=messages, max_tokens=2, temperature=0)
    second = client.chat.completions.create(model=model_id, messages=messages, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens >= 32
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="no-such-model", messages=GREETING, max_tokens=2)
    assert raised.value.body["param"] == "model"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"n": 2}, "n"),
        ({"extra_body": {"skills": ["some-skill"]}}, "skills"),
    ],
)
def test_bad_parameters_are_rejected_naming_the_param(client, model_id, extra, param):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model_id, messages=GREETING, max_tokens=2, **extra)
    assert raised.value.body["param"] == param
    assert raised.value.body["type"] == "invalid_request_error"


def test_empty_skills_list_is_accepted(client, model_id):
    completion = client.chat.completions.create(
        model=model_id, messages=GREETING, max_tokens=2, extra_body={"skills": []}
    )
    assert completion.usage.completion_tokens > 0


def test_oversized_body_is_413(daemon, model_id):
    body = {"model": model_id, "messages": [{"role": "user", "content": "x" * (MAX_BODY_BYTES + 1)}]}
    response = httpx.post(
        f"{daemon.api_url}/chat/completions", json=body,
        headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_wrong_api_key_is_rejected(daemon, model_id):
    wrong = openai.OpenAI(base_url=daemon.api_url, api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=model_id, messages=GREETING, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_health_endpoints_need_no_key(daemon):
    assert httpx.get(f"{daemon.base_url}/healthz").status_code == 200
    assert httpx.get(f"{daemon.base_url}/readyz").status_code == 200
    missing = httpx.get(f"{daemon.base_url}/no/such/route")
    assert missing.status_code == 404
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
