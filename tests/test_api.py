"""BithumanAPI against the local bitHuman server: every endpoint, pagination, polling, errors."""

from __future__ import annotations

import pytest

from livekit_plugins_avatarhub import BithumanAPI, MissingSecretError, RetryPolicy
from livekit_plugins_avatarhub.exceptions import (
    AgentGenerationFailedError,
    AgentNotReadyError,
    ConfigurationError,
    InsufficientBalanceError,
    ServiceUnavailableError,
)

from bithuman_server import SECRET

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02)


@pytest.fixture
async def api(bithuman_api):
    client = BithumanAPI(api_secret=SECRET, api_base=bithuman_api.api_base, retry=FAST)
    yield client
    await client.aclose()


async def test_get_agent(bithuman_api, api):
    bithuman_api.add_agent(
        "A91XMB7113", model="essence-2", supported_models=["essence-2", "essence-1"]
    )
    agent = await api.get_agent("A91XMB7113")
    assert agent["code"] == "A91XMB7113" and agent["supported_models"] == ["essence-2", "essence-1"]


async def test_list_follows_every_page(bithuman_api, api):
    for i in range(230):
        bithuman_api.add_agent(f"A{i:09d}", size=64, status="ready" if i % 2 else "processing")
    agents = await api.list_agents(page_size=100)
    assert [a["code"] for a in agents] == [f"A{i:09d}" for i in range(230)]
    pages = [p for m, p, _ in bithuman_api.api_requests if p.startswith("/v1/agents")]
    assert len(pages) == 3 and "offset=200" in pages[-1]
    ready = await api.list_agents(status="ready")
    assert len(ready) == 115
    with pytest.raises(ConfigurationError):
        await api.list_agents(page_size=500)


async def test_generate_sends_one_idempotency_key_across_retries(bithuman_api, api):
    bithuman_api.api_faults = [(503, None, {})]  # the first attempt's answer is lost
    started = await api.generate_agent(
        prompt="a friendly robot", image="https://x.example/a.png", aspect_ratio="16:9"
    )
    assert started["agent_id"] and started["status"] == "processing"
    keys = bithuman_api.idempotency_keys
    assert len(keys) == 1 and keys[0]  # the 503 was injected before the handler ran
    first = [
        h.get("idempotency-key")
        for m, p, h in bithuman_api.api_requests
        if p == "/v1/agent/generate"
    ]
    assert len(first) == 2 and first[0] == first[1]
    assert len(bithuman_api.generated) == 1
    assert bithuman_api.generated[0]["body"] == {
        "prompt": "a friendly robot",
        "image": "https://x.example/a.png",
        "aspect_ratio": "16:9",
    }
    again = await api.generate_agent(prompt="a friendly robot", idempotency_key=first[0])
    assert again["agent_id"] == started["agent_id"] and len(bithuman_api.generated) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"prompt": "x", "aspect_ratio": "4:3"},
        {"prompt": "x", "framing": "close"},
        {"image": "file:///etc/passwd"},
    ],
)
async def test_generate_validates_before_sending(bithuman_api, api, kwargs):
    with pytest.raises(ConfigurationError):
        await api.generate_agent(**kwargs)
    assert not bithuman_api.api_requests


async def test_generate_insufficient_balance(bithuman_api, api):
    bithuman_api.api_faults = [(402, "INSUFFICIENT_BALANCE", {})]
    with pytest.raises(InsufficientBalanceError, match="credits"):
        await api.generate_agent(prompt="x")
    assert len(bithuman_api.api_requests) == 1


async def test_wait_until_ready_reports_progress(bithuman_api, api):
    bithuman_api.status_script["A000000000"] = [
        {"status": "processing", "progress": 0.1, "progress_msg": "queued"},
        {"status": "processing", "progress": 0.6, "progress_msg": "rendering"},
        {"status": "ready", "progress": 1.0, "supported_models": ["essence-1"]},
    ]
    seen = []
    status = await api.wait_until_ready(
        "A000000000", interval=0.01, on_progress=lambda f, m: seen.append((f, m))
    )
    assert status["status"] == "ready"
    assert seen == [(0.1, "queued"), (0.6, "rendering"), (1.0, "ready")]


async def test_wait_until_ready_raises_the_servers_reason(bithuman_api, api):
    bithuman_api.status_script["A000000000"] = [
        {"status": "processing", "progress": 0.3},
        {"status": "failed", "error_message": "no face found in the image"},
    ]
    with pytest.raises(AgentGenerationFailedError, match="no face found"):
        await api.wait_until_ready("A000000000", interval=0.01)


async def test_wait_until_ready_times_out(bithuman_api, api):
    bithuman_api.status_script["A000000000"] = [{"status": "processing", "progress": 0.2}]
    with pytest.raises(AgentNotReadyError, match="not ready"):
        await api.wait_until_ready("A000000000", interval=0.05, timeout=0.12)


async def test_gestures_and_dynamics_generation(bithuman_api, api):
    bithuman_api.add_agent(
        "A91XMB7113",
        gestures={"mini_wave_hello": "https://v/1.mp4", "laugh_react": "https://v/2.mp4"},
    )
    assert await api.gestures("A91XMB7113") == {
        "mini_wave_hello": "https://v/1.mp4",
        "laugh_react": "https://v/2.mp4",
    }
    answer = await api.generate_dynamics("A91XMB7113", duration=5)
    assert answer["status"] == "processing"


async def test_no_secret_is_refused_without_a_request(bithuman_api):
    async with BithumanAPI(api_base=bithuman_api.api_base) as api:
        with pytest.raises(MissingSecretError, match="BITHUMAN_API_SECRET"):
            await api.get_agent("A91XMB7113")
    assert not bithuman_api.api_requests
    assert SECRET not in repr(BithumanAPI(api_secret=SECRET))


async def test_api_base_from_environment_not_api_url(bithuman_api, monkeypatch):
    monkeypatch.setenv("BITHUMAN_API_URL", "https://auth.api.bithuman.ai/v1/runtime-tokens/request")
    async with BithumanAPI(api_secret=SECRET) as api:
        assert api.base_url == "https://api.bithuman.ai"
    monkeypatch.setenv("BITHUMAN_API_BASE", bithuman_api.api_base + "/")
    async with BithumanAPI(api_secret=SECRET) as api:
        assert api.base_url == bithuman_api.api_base


async def test_persistent_5xx_surfaces_after_the_retries(bithuman_api, api):
    bithuman_api.api_faults = [(500, None, {})] * 3
    with pytest.raises(ServiceUnavailableError):
        await api.get_agent("A91XMB7113")
    assert len(bithuman_api.api_requests) == 3
