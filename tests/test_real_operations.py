"""The operator's checks against LiveKit's own server: ``serve``'s ``/ready`` and ``doctor``
accept the right keys and name the refused ones, as the server itself answers them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from livekit_real import clean_env

pytestmark = [pytest.mark.livekit_real, pytest.mark.real_once]

WRONG = "not-the-secret-of-this-server-0123456789"


async def test_ready_follows_what_livekit_says_of_the_services_keys(
    avatar_service, livekit_env, monkeypatch
):
    client, _, _ = avatar_service
    r = await client.get("/ready")
    assert r.status_code == 200, r.text
    assert r.json()["checks"]["livekit"]["detail"].endswith("accepts the service's keys")

    monkeypatch.setenv("LIVEKIT_API_SECRET", WRONG)
    from livekit_plugins_avatarhub.service import readiness

    monkeypatch.setattr(readiness, "LIVEKIT_CHECK_TTL", 0.0)  # ask again now, not in 10 s
    r = await client.get("/ready")
    assert r.status_code == 503
    reason = r.json()["reason"]
    assert reason.startswith(f"livekit: LiveKit at {livekit_env.url} refused the API key")
    assert WRONG not in r.text


@pytest.mark.parametrize("secret_ok", [True, False])
def test_doctor_checks_the_livekit_keys(real_livekit, secret_ok):
    env = clean_env(**real_livekit.env())
    if not secret_ok:
        env["LIVEKIT_API_SECRET"] = WRONG
    done = subprocess.run(
        [sys.executable, "-m", "livekit_plugins_avatarhub", "doctor", "--json", "--no-browser"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    server = next(c for c in json.loads(done.stdout)["checks"] if c["check"] == "server")
    if secret_ok:
        assert server["verdict"] == "ok", server
    else:
        assert server["verdict"] == "fail" and "refused the API key" in server["detail"]
        assert done.returncode == 1 and WRONG not in done.stdout + done.stderr
