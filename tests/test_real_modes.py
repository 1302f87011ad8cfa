"""Every way to run the avatar, in a real room: a real dispatch starts the cloud-style example
on a LiveKit worker, and a real subscriber decodes the avatar it publishes.

* local: the example as published renders the demo avatar in the agent's job;
* participant: the same agent with ``mode="participant"``, rendered by ``serve``;
* official: the example with only its import swapped back to ``livekit-plugins-bithuman``,
  in its cloud mode, launching the avatar on ``serve``;
* dispatch: ``mode="dispatch"``, rendered by a ``worker start`` process on LiveKit's dispatch.

In each: the video at the published size at >= 24 FPS over 9.5 s past the call's ramp-up,
the speech in the avatar's audio, the mouth open while it speaks and shut in its silences,
playback finished reported back (the agent's ``wait_for_playout()`` returns), the ``trigger_dynamics`` RPC answered for
bitHuman's documented call from the agent itself and, where the avatar is a participant of its
own, for a participant the operator allowed (``--allow-gestures-from``).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import pytest

from livekit import rtc

from livekit_real import ADAPTS_RESOLUTION, Subscriber, until
from real_processes import avatar_backend, dispatched_avatar, speaking_agent, times

pytestmark = [pytest.mark.livekit_real, pytest.mark.slow]

REMOTE_IDENTITY = "bithuman-avatar-agent"


def official_cloud_mode() -> bool:
    import inspect

    from livekit.plugins import bithuman

    return "avatar_id" in inspect.signature(bithuman.AvatarSession).parameters


@pytest.mark.parametrize("mode", ["local", "participant", "official", "dispatch"])
async def test_the_avatar_speaks_in_a_real_room(real_livekit, tmp_path, mode):
    if mode == "official" and not official_cloud_mode():
        pytest.skip("this livekit-plugins-bithuman has no cloud mode")
    agent_name, room_name = f"speaker-{mode}", f"room-{mode}"
    async with (
        avatar_backend(mode, real_livekit, tmp_path) as env,
        speaking_agent(
            real_livekit,
            tmp_path,
            agent_name,
            AVATARHUB_TEST_MODE=mode,
            AVATARHUB_TEST_PAUSE="1.5",  # silences long enough to see the mouth shut
            **env,
        ) as agent,
        Subscriber(real_livekit, room_name) as sub,
    ):
        avatar = await dispatched_avatar(sub, agent_name)
        if mode == "local":  # the agent publishes the avatar itself
            assert avatar.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        else:  # a participant of its own, on the agent's behalf
            assert avatar.identity == REMOTE_IDENTITY
            assert avatar.attributes.get("lk.publish_on_behalf", "").startswith("agent-")
        sub.record(avatar)
        started = time.monotonic()
        await until(lambda: time.monotonic() - started > 11.5, 30, "11.5 s of the avatar")
        # another participant plays a gesture (the viewer: allowed by the operator)
        answer = await sub.room.local_participant.perform_rpc(
            destination_identity=avatar.identity,
            method="trigger_dynamics",
            payload=json.dumps({"action": "wave"}),
        )
        assert json.loads(answer)["status"] == "success", answer
        # the agent's own call, as bitHuman documents it for the cloud
        await until(lambda: " rpc " in agent.text(), 60, "the agent's trigger_dynamics call")
        await until(lambda: " interrupted" in agent.text(), 30, "the interrupted reply")
        await asyncio.sleep(2)
        await sub.stop_recording()
        log = agent.text()

    assert "said sample 0" in log, "playback finished came back to the agent"
    if mode in ("participant", "dispatch"):
        assert "avatar joined" in log, "wait_for_join() returned"
    elif mode == "official":
        assert "avatar joined" in log or "no wait_for_join" in log
    # the interruption clears the reply: talking before it, the mouth shut from 0.5 s after
    cut = times(log, " interrupting")[0]
    before = [s.mouth for s in sub.video if cut - 1.5 < s.at < cut]
    after = [s.mouth for s in sub.video if cut + 0.5 < s.at < cut + 2]
    assert max(before) > 0.15, "the interrupted reply was being spoken"
    assert after and max(after) < 0.05, f"the mouth still moves after the interruption: {after}"
    (rpc_line,) = [line for line in log.splitlines() if " rpc " in line]
    assert "rpc answer" in rpc_line and '"status": "success"' in rpc_line, rpc_line
    frames = [s for s in sub.video if started + 1 < s.at < started + 11]
    sizes = {(s.width, s.height) for s in frames}
    if ADAPTS_RESOLUTION:  # libwebrtc lowers the resolution of a loaded encoder
        assert all(w <= 1280 and abs(w / h - 16 / 9) < 0.1 for w, h in sizes), sizes
    else:
        assert sizes == {(1280, 720)}, "the published size"
    # the steady state a viewer watches: past the call's first seconds, in which the sender's
    # bandwidth estimate and encoder ramp up (and may drop frames to get there)
    rate = sub.fps(started + 2, started + 11.5)
    each = sub.frames_each_second(started, started + 11.5)
    assert rate >= 24, f"frames per second over 9.5 s: {rate:.1f}; each second: {each}"
    assert sub.loud_audio(), "the avatar's audio arrived with the speech in it"
    speaking, silent = sub.mouth_while(loud=True), sub.mouth_while(loud=False)
    assert len(speaking) > 20 and len(silent) > 20, (len(speaking), len(silent))
    open_, shut = statistics.mean(speaking), statistics.mean(silent)
    assert open_ > 0.05 and open_ > 4 * shut, f"mouth while speaking {open_}, silent {shut}"
