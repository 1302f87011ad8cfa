"""``AvatarSession``: the bitHuman plugin's interface, rendered on the local runtime."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    APIConnectOptions,
    NotGivenOr,
    utils,
)

from livekit import rtc

from . import _compat, config, ids
from ._redact import redact
from ._retry import RetryPolicy
from .backends.base import AvatarBackend, LiveKitKeys, RemoteAvatar
from .backends.local import LocalBackend
from .config import env_or
from .exceptions import (
    CLOUD_PLUGIN_HINT,
    AvatarHubError,
    CloudOnlyError,
    ConfigurationError,
    MissingSecretError,
)
from .ids import DEMO_AVATAR_ID
from .log import logger
from .remote.protocol import DEFAULT_IDENTITY, DEFAULT_IDLE_TIMEOUT, agent_name
from .rendering.failover import AvatarState, AvatarStateChanged
from .rendering.generator import RuntimeVideoGenerator
from .rendering.loader import check_model_file
from .rendering.publish import VideoPublishOptions
from .rendering.runtime import AvatarRuntime, check_output_size
from .rendering.source import AvatarSource

if TYPE_CHECKING:
    from bithuman import VideoControl
    from livekit.agents import AgentSession

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
    * the conversation survives the avatar: if the runtime fails (or, in the remote modes, the
      avatar participant goes), the agent's speech goes on as plain audio at once (the reply in
      progress included), the avatar is brought back, and ``avatar_state_changed``
      (:class:`AvatarStateChanged`) says so each time.
    * cost guards: ``max_session_seconds`` (stop rendering for good after that long) and
      ``idle_timeout`` (stop rendering, and free the runtime, while nobody but agents is in
      the room; render again when someone joins; default 300 s).
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
        max_session_seconds: NotGivenOr[float | None] = NOT_GIVEN,
        idle_timeout: NotGivenOr[float | None] = NOT_GIVEN,
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
        given_runtime = runtime if utils.is_given(runtime) else None
        given_size = output_size if utils.is_given(output_size) else None
        self._model = model if utils.is_given(model) and model else None
        arg_id, arg_path = self._choose_source(avatar_id, model_path, given_runtime)
        # every input decided once; what is loaded at start() takes this as given
        self._source: AvatarSource | None = None
        if arg_id or arg_path:
            self._source = AvatarSource.decide(
                arg_id,
                model_path=None if arg_id else arg_path,
                model=self._model,
                api_secret=api_secret if utils.is_given(api_secret) else None,
                api_token=api_token if utils.is_given(api_token) else None,
                api_url=api_url if utils.is_given(api_url) else None,
                output_size=given_size,
            )
        else:  # runtime= alone: it renders at its own size, with its own credentials
            ids.check_model(self._model)
            if given_size is not None:
                check_output_size(given_size)
        identity = env_or(avatar_participant_identity) or DEFAULT_IDENTITY
        name = env_or(avatar_participant_name) or DEFAULT_IDENTITY
        retry = RetryPolicy.from_conn_options(conn_options)
        # cost guards: the avatar stops rendering at the limit (the agent speaks on)
        self._max_session_seconds = config.seconds_setting(
            max_session_seconds,
            "AVATARHUB_MAX_SESSION_SECONDS",
            "max_session_seconds",
            default=None,
        )
        idle = config.seconds_setting(
            idle_timeout, "AVATARHUB_IDLE_TIMEOUT", "idle_timeout", default=DEFAULT_IDLE_TIMEOUT
        )
        self._backend: AvatarBackend
        if mode == "local":
            if given_runtime is None and not (self._source and self._source.is_demo):
                self._require_secret()
            self._backend = LocalBackend(
                source=self._source,
                runtime=given_runtime,
                resolver=resolver if utils.is_given(resolver) else None,
                retry=retry,
                timeout=max(conn_options.timeout, 30.0),
                video_options=video_options or VideoPublishOptions(),
                fallback_identity=identity,
                max_session_seconds=self._max_session_seconds,
                idle_timeout=idle or 0.0,
            )
        else:
            avatar = RemoteAvatar(
                self._remote_avatar(mode, arg_path, given_runtime), self._model, identity, name
            )
            if mode == "participant":
                from .backends.service import ServiceBackend

                url = config.service_url(service_url)
                if not url:
                    raise ConfigurationError(
                        "mode='participant' needs the avatar service: pass service_url= or set "
                        "AVATARHUB_SERVICE_URL (run one with `python -m livekit_plugins_avatarhub "
                        "serve`)"
                    )
                self._backend = ServiceBackend(
                    avatar=avatar,
                    service_url=url,
                    service_key=config.service_key(service_key),
                    retry=retry,
                    max_session_seconds=self._max_session_seconds,
                )
            else:
                from .backends.dispatch import DispatchBackend

                self._backend = DispatchBackend(
                    avatar=avatar,
                    agent_name=agent_name(),
                    join_timeout=max(conn_options.timeout, 60.0),
                    max_session_seconds=self._max_session_seconds,
                )
        self._backend.on_state_changed = self._state_changed
        self._started = False
        self._closed = False

    def _remote_avatar(
        self, mode: str, model_path: str | None, runtime: AvatarRuntime | None
    ) -> str:
        where = "in the avatar service" if mode == "participant" else "on an avatar worker"
        if model_path or runtime is not None or self._source is None or not self._source.avatar_id:
            raise ConfigurationError(
                f"mode={mode!r} renders {where}: pass avatar_id=, not model_path= or runtime="
            )
        return self._source.avatar_id

    def _choose_source(
        self,
        avatar_id: NotGivenOr[str],
        model_path: NotGivenOr[str | None],
        runtime: AvatarRuntime | None,
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
            if env_id and env_path and runtime is None:
                raise ConfigurationError(
                    "both BITHUMAN_AVATAR_ID and BITHUMAN_MODEL_PATH are set; unset one, or pass "
                    "avatar_id= or model_path= explicitly"
                )
            arg_id, arg_path = env_id, env_path
        if not arg_id and not arg_path and runtime is None:
            raise ConfigurationError(
                f"no avatar: pass avatar_id= (a bitHuman agent code, or {DEMO_AVATAR_ID!r} for the "
                "built-in demo) or model_path= (an .imx file), or set BITHUMAN_AVATAR_ID / "
                "BITHUMAN_MODEL_PATH"
            )
        if arg_path and Path(arg_path).expanduser().is_file():
            check_model_file(arg_path)  # an empty file is refused now, not blamed on the network
        return arg_id, arg_path

    def _require_secret(self) -> None:
        source = self._source
        if source is not None and source.api_secret:
            return
        token = source.api_token if source is not None else None
        if token and _compat.token_alone_accepted() and source and source.model_path:
            return
        hint = " (an api_token alone is refused by bithuman 2.x)" if token else ""
        raise MissingSecretError(
            "a bitHuman API secret is required: pass api_secret= or set BITHUMAN_API_SECRET"
            f"{hint}; avatar_id='demo' runs without one"
        )

    def __repr__(self) -> str:
        source = self._source
        if source is None:
            return f"AvatarSession(runtime=<given>, model={self._model!r})"
        what = (
            f"avatar_id={source.avatar_id!r}"
            if source.avatar_id
            else f"model_path={str(source.model_path)!r}"
        )
        return (
            f"AvatarSession({what}, model={self._model!r}, "
            f"api_secret={redact(source.api_secret)}, api_token={redact(source.api_token)})"
        )

    # -- properties of the LiveKit AvatarSession interface ----------------------------------

    @property
    def avatar_identity(self) -> str:
        return self._backend.identity(getattr(self, "_room", None))

    @property
    def provider(self) -> str:
        return "avatarhub"

    @property
    def avatar_state(self) -> AvatarState:
        """``rendering``; or ``recovering`` / ``audio_only`` while the agent speaks without
        its avatar (see ``avatar_state_changed``)."""
        return self._backend.avatar_state

    @property
    def rendered_seconds(self) -> float:
        """How long this session's runtime has rendered, idle frames included (bitHuman
        bills runtime minutes); 0 when the avatar renders elsewhere."""
        generator = self.video_generator
        return generator.stats.rendered_seconds if generator is not None else 0.0

    def _state_changed(self, event: AvatarStateChanged) -> None:
        self.emit("avatar_state_changed", event)

    @property
    def runtime(self) -> AvatarRuntime:
        """The runtime rendering this avatar, e.g. to ``push(VideoControl(action=...))``."""
        runtime = self._backend.runtime if isinstance(self._backend, LocalBackend) else None
        if runtime is None:
            if self._started and self.avatar_state != "rendering":
                raise AvatarHubError(
                    f"the avatar is not rendering ({self.avatar_state}): its runtime is not "
                    "loaded now"
                )
            raise AvatarHubError("the avatar runtime is not loaded yet; call start() first")
        return runtime

    @property
    def video_generator(self) -> RuntimeVideoGenerator | None:
        return self._backend.generator if isinstance(self._backend, LocalBackend) else None

    # -- gestures, in every mode ------------------------------------------------------------

    async def push(self, control: VideoControl) -> None:
        """Send ``control`` to the avatar wherever it renders.

        In this process it goes to the runtime; when the avatar is a participant of its own its
        action goes there as bitHuman's ``trigger_dynamics`` RPC (speech reaches that avatar
        through the AgentSession, so a control carrying audio is refused there).
        """
        await self._backend.push(control)

    async def trigger(self, action: str, *, force: bool = False) -> None:
        """Play the gesture ``action`` (one of the agent's dynamics) in every mode."""
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
        """Load or launch the avatar, then route ``agent_session``'s speech through it.

        Everything that can fail on bad input (resolution, model file, runtime) fails here
        before anything is published. The LiveKit credentials are used by the modes that put
        the avatar in a participant of its own; rendered here, it does not need them.
        """
        if self._started:
            raise AvatarHubError("this AvatarSession was already started; create one per job")
        self._started = True
        keys = LiveKitKeys(
            url=livekit_url if utils.is_given(livekit_url) else None,
            api_key=livekit_api_key if utils.is_given(livekit_api_key) else None,
            api_secret=livekit_api_secret if utils.is_given(livekit_api_secret) else None,
        )

        async def attach() -> None:
            await super(AvatarSession, self).start(agent_session, room)

        await self._backend.start(agent_session, room, keys, attach)

    async def aclose(self) -> None:
        """Stop rendering and free what this session loaded. Safe to call twice.

        A runtime passed in with ``runtime=`` stays usable: it is interrupted, not freed.
        """
        if self._closed:
            return
        self._closed = True
        await self._backend.aclose()
        if not self._backend.own_participant:
            _compat.detach_room(self)  # LiveKit's base would remove the agent's participant
        await super().aclose()  # removes an avatar participant (livekit-agents 1.5.13+)
