"""``AvatarSession``: the bitHuman plugin's interface, rendered on the local runtime."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    APIConnectOptions,
    NotGivenOr,
    utils,
)
from livekit.agents.voice.avatar import AvatarRunner

from livekit import rtc

from . import _compat, config, ids
from ._redact import redact
from ._retry import RetryPolicy
from .config import env_or
from .exceptions import (
    CLOUD_PLUGIN_HINT,
    AvatarHubError,
    CloudOnlyError,
    ConfigurationError,
    MissingSecretError,
)
from .ids import DEMO_AVATAR_ID, is_demo
from .log import logger
from .remote.protocol import DEFAULT_IDENTITY, agent_name, answer_in_process
from .rendering.generator import RuntimeVideoGenerator
from .rendering.loader import OpenedAvatar, check_model_file, open_avatar
from .rendering.publish import VideoPublishOptions, avatar_runner
from .rendering.runtime import AvatarRuntime, check_output_size, renew_for_job

if TYPE_CHECKING:
    from bithuman import VideoControl
    from livekit.agents import AgentSession

    from .backends.service import ServiceAvatar
    from .hub.resolver import AvatarResolver


class AvatarSession(_compat.AvatarSessionBase):  # type: ignore[misc,name-defined]
    """A bitHuman avatar in a LiveKit room, rendered by this process.

    Takes the arguments of ``livekit.plugins.bithuman.AvatarSession`` (cloud and local) so that
    code written for either runs unchanged, and adds:

    * ``avatar_id`` works locally: the id is resolved to a cached ``.imx`` (downloaded from
      bitHuman when needed). ``avatar_id="demo"`` is a built-in avatar needing no account.
    * ``resolver``: how ids become files (default: download and cache, see ``ModelHub``).
    * ``video_options``: codec, layers, frame-rate cap and bitrate of the video track
      (default H.264, one layer, at the avatar's frame rate).
    * ``output_size``: the rendered resolution, ``(width, height)``.
    * ``mode="participant"`` with ``service_url`` / ``service_key``: render in the avatar
      service instead, as a separate participant (like bitHuman's cloud).
    * ``mode="dispatch"``: dispatch an avatar worker into the room through LiveKit (the
      agent's LiveKit credentials; workers run ``python -m livekit_plugins_avatarhub worker``).
    """

    def __init__(
        self,
        *,
        api_url: NotGivenOr[str] = NOT_GIVEN,
        api_secret: NotGivenOr[str] = NOT_GIVEN,
        api_token: NotGivenOr[str] = NOT_GIVEN,
        model: NotGivenOr[str] = NOT_GIVEN,
        model_path: NotGivenOr[str | None] = NOT_GIVEN,
        runtime: NotGivenOr[AvatarRuntime | None] = NOT_GIVEN,
        avatar_image: NotGivenOr[Any] = NOT_GIVEN,
        avatar_id: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        avatar_participant_identity: NotGivenOr[str] = NOT_GIVEN,
        avatar_participant_name: NotGivenOr[str] = NOT_GIVEN,
        resolver: NotGivenOr[AvatarResolver] = NOT_GIVEN,
        video_options: VideoPublishOptions | None = None,
        output_size: NotGivenOr[tuple[int, int]] = NOT_GIVEN,
        mode: Literal["local", "participant", "dispatch"] = "local",
        service_url: NotGivenOr[str] = NOT_GIVEN,
        service_key: NotGivenOr[str] = NOT_GIVEN,
    ) -> None:
        super().__init__()
        if mode not in ("local", "participant", "dispatch"):
            raise ConfigurationError("mode must be 'local', 'participant' or 'dispatch'")
        self._mode = mode
        if utils.is_given(avatar_image) and avatar_image is not None:
            raise CloudOnlyError(
                "avatar_image= starts a cloud photo session (Expression 1), which has no local "
                "runtime; create an agent from the photo and pass avatar_id=, or "
                f"{CLOUD_PLUGIN_HINT}"
            )
        self._api_url = config.runtime_auth_url(api_url)
        self._api_secret = config.bithuman_secret(api_secret)
        self._api_token = config.bithuman_token(api_token)
        self._model = model if utils.is_given(model) and model else None
        ids.check_model(self._model)  # rejects unknown names now, not at start()
        self._conn_options = conn_options
        self._participant_identity = env_or(avatar_participant_identity) or DEFAULT_IDENTITY
        self._participant_name = env_or(avatar_participant_name) or DEFAULT_IDENTITY
        self._video_options = video_options or VideoPublishOptions()
        self._output_size = check_output_size(output_size) if utils.is_given(output_size) else None

        given_runtime = runtime if utils.is_given(runtime) else None
        self._runtime: AvatarRuntime | None = given_runtime
        self._avatar_id, self._model_path = self._choose_source(avatar_id, model_path)
        self._retry = RetryPolicy.from_conn_options(conn_options)
        self._service: ServiceAvatar | None = None
        if mode == "participant":
            self._service = self._service_avatar(service_url, service_key, given_runtime)
        elif mode == "dispatch":
            self._service = self._dispatched_avatar(given_runtime)
        elif given_runtime is None and not is_demo(self._avatar_id):
            self._require_secret()

        self._resolver = resolver if utils.is_given(resolver) else None
        self._runner: AvatarRunner | None = None
        self._generator: RuntimeVideoGenerator | None = None
        self._opened: OpenedAvatar | None = None  # what this session loaded (runtime + lease)
        self._audio_sink: Any = None
        self._stop_answering: Any = None  # undoes dynamics_rpc.answer_in_process
        self._started = False
        self._closed = False

    def _dispatched_avatar(self, runtime: AvatarRuntime | None) -> ServiceAvatar:
        from .backends.service import DispatchedAvatar

        if self._model_path or runtime is not None or not self._avatar_id:
            raise ConfigurationError(
                "mode='dispatch' renders on an avatar worker: pass avatar_id=, not model_path= "
                "or runtime="
            )
        return DispatchedAvatar(
            agent_id=self._avatar_id,
            model=self._model,
            identity=self._participant_identity,
            name=self._participant_name,
            agent_name=agent_name(),
            join_timeout=max(self._conn_options.timeout, 60.0),
        )

    def _service_avatar(
        self, url: NotGivenOr[str], key: NotGivenOr[str], runtime: AvatarRuntime | None
    ) -> ServiceAvatar:
        from .backends.service import ServiceAvatar

        service_url = config.service_url(url)
        if not service_url:
            raise ConfigurationError(
                "mode='participant' needs the avatar service: pass service_url= or set "
                "AVATARHUB_SERVICE_URL (run one with `python -m livekit_plugins_avatarhub serve`)"
            )
        if self._model_path or runtime is not None:
            raise ConfigurationError(
                "mode='participant' renders in the avatar service: pass avatar_id=, not "
                "model_path= or runtime="
            )
        assert self._avatar_id is not None
        return ServiceAvatar(
            service_url=service_url,
            service_key=config.service_key(key),
            agent_id=self._avatar_id,
            model=self._model,
            identity=self._participant_identity,
            name=self._participant_name,
            retry=self._retry,
        )

    def _choose_source(
        self, avatar_id: NotGivenOr[str], model_path: NotGivenOr[str | None]
    ) -> tuple[str | None, str | None]:
        """Explicit arguments win; the environment fills in only when neither is passed."""
        arg_id = avatar_id if utils.is_given(avatar_id) and avatar_id else None
        arg_path = model_path if utils.is_given(model_path) and model_path else None
        if arg_id and arg_path:
            # bitHuman's cloud quickstart passes both; like livekit-plugins-bithuman, the id wins
            logger.warning(
                "avatar_id=%r and model_path=%r were both given; rendering the avatar id and "
                "ignoring the model file",
                arg_id,
                arg_path,
            )
            arg_path = None
        if not arg_id and not arg_path:
            env_id, env_path = config.avatar_from_env()
            if env_id and env_path and self._runtime is None:
                raise ConfigurationError(
                    "both BITHUMAN_AVATAR_ID and BITHUMAN_MODEL_PATH are set; unset one, or pass "
                    "avatar_id= or model_path= explicitly"
                )
            arg_id, arg_path = env_id, env_path
        if not arg_id and not arg_path and self._runtime is None:
            raise ConfigurationError(
                f"no avatar: pass avatar_id= (a bitHuman agent code, or {DEMO_AVATAR_ID!r} for the "
                "built-in demo) or model_path= (an .imx file), or set BITHUMAN_AVATAR_ID / "
                "BITHUMAN_MODEL_PATH"
            )
        if arg_id and not is_demo(arg_id):
            ids.validate_avatar_id(arg_id)
        if arg_path and Path(arg_path).expanduser().is_file():
            check_model_file(arg_path)  # an empty file is refused now, not blamed on the network
        if arg_path and self._model is not None:
            logger.debug("model=%r is ignored with model_path: the file decides", self._model)
        return arg_id, arg_path

    def _require_secret(self) -> None:
        if self._api_secret:
            return
        if self._api_token and _compat.token_alone_accepted() and self._model_path:
            return
        hint = " (an api_token alone is refused by bithuman 2.x)" if self._api_token else ""
        raise MissingSecretError(
            "a bitHuman API secret is required: pass api_secret= or set BITHUMAN_API_SECRET"
            f"{hint}; avatar_id='demo' runs without one"
        )

    def __repr__(self) -> str:
        source = (
            f"avatar_id={self._avatar_id!r}"
            if self._avatar_id
            else f"model_path={self._model_path!r}"
        )
        return (
            f"AvatarSession({source}, model={self._model!r}, "
            f"api_secret={redact(self._api_secret)}, "
            f"api_token={redact(self._api_token)})"
        )

    # -- properties of the LiveKit AvatarSession interface ----------------------------------

    @property
    def avatar_identity(self) -> str:
        if self._service is not None:
            return self._participant_identity
        # rendered in this process: the agent's own participant publishes the avatar
        room = getattr(self, "_room", None)
        if room is not None:
            with contextlib.suppress(Exception):
                return cast(str, room.local_participant.identity)
        return self._participant_identity

    @property
    def provider(self) -> str:
        return "avatarhub"

    @property
    def runtime(self) -> AvatarRuntime:
        """The runtime rendering this avatar, e.g. to ``push(VideoControl(action=...))``."""
        if self._runtime is None:
            raise AvatarHubError("the avatar runtime is not loaded yet; call start() first")
        return self._runtime

    @property
    def video_generator(self) -> RuntimeVideoGenerator | None:
        return self._generator

    # -- gestures, in either mode -----------------------------------------------------------

    async def push(self, control: VideoControl) -> None:
        """Send ``control`` to the avatar wherever it renders.

        In this process it goes to the runtime; in ``mode="participant"`` its action goes to the
        avatar participant as bitHuman's ``trigger_dynamics`` RPC (speech reaches that avatar
        through the AgentSession, so a control carrying audio is refused there).
        """
        if self._service is None:
            await self.runtime.push(control)
            return
        if control.audio is not None or control.end_of_speech:
            raise ConfigurationError(
                "in mode='participant' the avatar takes speech from the AgentSession; push() "
                "sends only actions (VideoControl(action=...))"
            )
        actions = [control.action] if isinstance(control.action, str) else control.action or []
        action = actions[0] if actions else None  # bithuman plays a list's first gesture
        if action:
            if not self._started:
                raise AvatarHubError("the avatar is not started yet; call start() first")
            await self._service.trigger(action, force=bool(control.force_action))

    async def trigger(self, action: str, *, force: bool = False) -> None:
        """Play the gesture ``action`` (one of the agent's dynamics) in either mode."""
        from bithuman import VideoControl

        await self.push(VideoControl(action=action, force_action=force))

    # -- lifecycle --------------------------------------------------------------------------

    async def start(
        self,
        agent_session: AgentSession[Any],
        room: rtc.Room,
        *,
        livekit_url: NotGivenOr[str] = NOT_GIVEN,
        livekit_api_key: NotGivenOr[str] = NOT_GIVEN,
        livekit_api_secret: NotGivenOr[str] = NOT_GIVEN,
    ) -> None:
        """Load the avatar, then route ``agent_session``'s speech through it into ``room``.

        Everything that can fail on bad input (resolution, model file, runtime) fails here
        before anything is published. The LiveKit credentials are accepted for signature
        compatibility; an avatar rendered in this process does not need them.
        """
        if self._started:
            raise AvatarHubError("this AvatarSession was already started; create one per job")
        self._started = True
        if self._service is not None:
            await self._service.start(
                room,
                livekit_url=livekit_url if utils.is_given(livekit_url) else None,
                livekit_api_key=livekit_api_key if utils.is_given(livekit_api_key) else None,
                livekit_api_secret=livekit_api_secret
                if utils.is_given(livekit_api_secret)
                else None,
            )
            await super().start(agent_session, room)
            self._service.route_speech(agent_session, room)
            return
        try:
            runtime = await self._load_runtime()
            generator = await RuntimeVideoGenerator.create(runtime, live=True)
        except BaseException:
            await self._release_runtime()
            raise
        self._generator = generator

        await super().start(agent_session, room)
        audio_sink = _compat.queue_audio_output(generator.audio_sample_rate)
        self._audio_sink = audio_sink
        self._runner = avatar_runner(room, generator, audio_sink, self._video_options)
        await self._runner.start()
        _compat.replace_audio_output(agent_session, audio_sink)
        self._stop_answering = answer_in_process(
            room.local_participant, lambda action, force: self.trigger(action, force=force)
        )
        logger.info(
            "avatar started",
            extra={
                "avatar": self._avatar_id or Path(self._model_path or "").name,
                "size": "x".join(map(str, generator.video_resolution)),
                "fps": generator.video_fps,
            },
        )

    async def _load_runtime(self) -> AvatarRuntime:
        if self._runtime is not None:  # prewarmed: make it ready for this job
            await renew_for_job(self._runtime)
            return self._runtime
        self._opened = await open_avatar(
            self._avatar_id,
            model_path=self._model_path if self._avatar_id is None else None,
            model=self._model,
            api_secret=self._api_secret,
            api_token=self._api_token,
            api_url=self._api_url,
            output_size=self._output_size,
            resolver=self._resolver,
            retry=self._retry,
            timeout=max(self._conn_options.timeout, 30.0),
        )
        self._runtime = self._opened.runtime
        return self._runtime

    async def _release_runtime(self) -> None:
        opened, self._opened = self._opened, None
        if opened is not None:  # loaded here: free the runtime and the model's lease
            self._runtime = None
            await opened.aclose()
        elif self._runtime is not None:  # the caller's (runtime=): stop talking, keep it
            self._runtime.interrupt()

    async def aclose(self) -> None:
        """Stop rendering and free the runtime this session loaded. Safe to call twice.

        A runtime passed in with ``runtime=`` stays usable: it is interrupted, not freed.
        """
        if self._closed:
            return
        self._closed = True
        if self._service is not None:
            await self._service.aclose()
            await super().aclose()  # removes the avatar participant (livekit-agents 1.5.13+)
            return
        stop_answering, self._stop_answering = self._stop_answering, None
        if stop_answering is not None:
            stop_answering()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.aclose()
            # a reply cut off by the close must still end for the AgentSession
            position = float(getattr(runner, "_playback_position", 0.0) or 0.0)
            _compat.finish_interrupted_playback(self._audio_sink, position)
        await self._release_runtime()
        _compat.detach_room(self)
        await super().aclose()
