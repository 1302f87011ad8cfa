"""``python -m livekit_plugins_avatarhub <command>`` (also installed as ``avatarhub``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from .exceptions import AvatarHubError

Command = Callable[[argparse.Namespace], int]


def _progress_bar(desc: str) -> tuple[Callable[[int, int | None], None], Callable[[], None]]:
    from tqdm import tqdm

    bar = tqdm(
        desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=True, disable=None
    )  # disabled when stderr is not a terminal

    def update(done: int, total: int | None) -> None:
        if total and bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    return update, bar.close


# -- cache -------------------------------------------------------------------------------------


def cmd_pull(args: argparse.Namespace) -> int:
    from .hub.resolver import ModelHub

    async def pull() -> int:
        status = 0
        for code in args.codes:
            update, close = _progress_bar(code)
            hub = ModelHub(
                api_secret=args.api_secret,
                api_base=args.api_base,
                fresh_for=0 if args.force else None,
                progress=update,
            )
            try:
                path = await hub.resolve(code, model=args.model)
            finally:
                close()
            if args.verify and not await _verified(hub, code, path):
                status = 1
                continue
            print(f"{code}\t{path}")
        return status

    return asyncio.run(pull())


async def _verified(hub: Any, code: str, path: Any) -> bool:
    """``pull --verify``: hash the whole cached file; a mismatch is removed and fetched again."""
    ok = await asyncio.to_thread(hub.cache.verify, code, path)
    if ok is None:
        print(f"{code}: no sha256 recorded for {path.name}; size checked only", file=sys.stderr)
        return True
    if ok:
        return True
    print(f"{code}: {path.name} does not match its sha256; downloading it again", file=sys.stderr)
    await asyncio.to_thread(path.unlink)
    hub.fresh_for = 0
    again = await hub.resolve(code)
    return bool(await asyncio.to_thread(hub.cache.verify, code, again) is not False)


def cmd_ls(args: argparse.Namespace) -> int:
    from .hub.cache import ModelCache

    entries = ModelCache().entries()
    if not entries:
        print(f"no avatars cached in {ModelCache().root}", file=sys.stderr)
        return 0
    print(f"{'CODE':<12} {'MODEL':<13} {'SIZE':>10}  {'LAST USED':<16}  FILE")
    for e in sorted(entries, key=lambda e: e.last_used, reverse=True):
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        note = "  DAMAGED (size changed since it was verified; pull it again)" if e.damaged else ""
        print(
            f"{e.code:<12} {e.model or '?':<13} {_size(e.size):>10}  {used:<16}  "
            f"{e.path.name}{note}"
        )
    total = sum(e.size for e in entries)
    print(f"{len(entries)} models, {_size(total)} in {ModelCache().root}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from .hub.cache import ModelCache
    from .ids import validate_avatar_id

    cache = ModelCache()
    status = 0
    for code in args.codes:
        validate_avatar_id(code)
        if not cache.agent_dir(code).exists():
            print(f"{code}: not cached", file=sys.stderr)
            status = 1
            continue
        print(f"{code}: removed {_size(cache.remove(code))}")
    return status


def cmd_prune(args: argparse.Namespace) -> int:
    from .hub.cache import ModelCache

    evicted = ModelCache().evict(int(args.max_gb * (1 << 30)))
    for e in evicted:
        print(f"{e.code}: removed {e.path.name} ({_size(e.size)})")
    print(f"freed {_size(sum(e.size for e in evicted))}")
    return 0


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


# -- parser ------------------------------------------------------------------------------------


def _non_negative(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}, 0 or more")
    return value


def _gigabytes(text: str) -> float:
    return _non_negative(text, "a size in GB")


def _seconds(text: str) -> float:
    return _non_negative(text, "a number of seconds")


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def _port_or_zero(text: str) -> int:
    if text == "0":
        return 0
    return _port(text)


def _host(text: str) -> str:
    """An IP address or a host name; dotted numbers must be a valid IPv4 address."""
    import ipaddress
    import re

    try:
        ipaddress.ip_address(text.strip("[]"))
        return text.strip("[]")
    except ValueError:
        pass
    if re.fullmatch(r"[\d.]+", text) or not re.fullmatch(
        r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*",
        text,
    ):
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address or host name")
    return text


def _session_limit_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-session-seconds",
        metavar="S",
        default=None,
        help="every avatar leaves after S seconds, whatever a request asks "
        "(AVATARHUB_MAX_SESSION_SECONDS; default: no limit)",
    )


def _gesture_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-gestures-from",
        metavar="IDENTITY",
        action="append",
        default=[],
        help="a participant identity that may trigger gestures besides the agent the avatar "
        "serves (repeatable, or comma-separated; added to AVATARHUB_ALLOW_GESTURES_FROM)",
    )


def _api_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-secret", help="default: BITHUMAN_API_SECRET")
    parser.add_argument(
        "--api-base", help="default: BITHUMAN_API_BASE, then https://api.bithuman.ai"
    )


def build_parser() -> argparse.ArgumentParser:
    from .remote.protocol import DEFAULT_IDLE_TIMEOUT
    from .rendering import mp4

    parser = argparse.ArgumentParser(
        prog="python -m livekit_plugins_avatarhub",
        description="bitHuman avatars for LiveKit: fetch, list and render avatars.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pull", help="download avatars into the cache (with a progress bar)")
    p.add_argument("codes", nargs="+", metavar="CODE", help="bitHuman agent codes, e.g. A91XMB7113")
    p.add_argument(
        "--model", help="essence-1, essence-2 or expression-2 (default: the agent's own)"
    )
    p.add_argument("--force", action="store_true", help="revalidate even if recently checked")
    p.add_argument(
        "--verify",
        action="store_true",
        help="also hash the whole cached file against its recorded sha256 (sizes are always "
        "checked)",
    )
    _api_options(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("ls", help="list cached avatars: code, model, size, last used")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("rm", help="remove avatars from the cache")
    p.add_argument("codes", nargs="+", metavar="CODE")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("prune", help="evict least-recently-used avatars down to a size")
    p.add_argument("--max-gb", type=_gigabytes, required=True, help="size to shrink the cache to")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("render", help="render speech through an avatar into an MP4 (H.264 + AAC)")
    p.add_argument("avatar", help="'demo', a bitHuman agent code, or a model file path")
    p.add_argument("audio", nargs="?", help="any audio file (default: a bundled speech sample)")
    p.add_argument(
        "-o", "--output", default="avatar.mp4", help="MP4 to write (default: avatar.mp4)"
    )
    p.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT (default: 1280x720)")
    p.add_argument(
        "--preset",
        default=mp4.DEFAULT_PRESET,
        help="libx264 preset: ultrafast ... veryslow (default: %(default)s); faster presets "
        "encode sooner into larger files",
    )
    p.add_argument(
        "--crf",
        type=_crf,
        default=mp4.DEFAULT_CRF,
        help="libx264 quality, 0-51, lower is better and larger (default: %(default)s)",
    )
    p.add_argument("--model", help="model family when AVATAR is an agent code")
    _api_options(p)
    p.set_defaults(func=cmd_render)

    agents = sub.add_parser("agents", help="list, inspect and generate bitHuman agents")
    agents_sub = agents.add_subparsers(dest="agents_command", required=True, metavar="ACTION")
    p = agents_sub.add_parser("ls", help="every agent of the account")
    p.add_argument("--status", help="only agents in this state (e.g. ready)")
    _api_options(p)
    p.set_defaults(func=cmd_agents_ls)
    p = agents_sub.add_parser("status", help="build status of an agent")
    p.add_argument("agent_id")
    _api_options(p)
    p.set_defaults(func=cmd_agents_status)
    p = agents_sub.add_parser("generate", help="create an agent from a prompt, image or audio")
    p.add_argument("--prompt")
    p.add_argument("--image", help="portrait image URL")
    p.add_argument("--audio", help="voice sample URL")
    p.add_argument("--aspect-ratio", choices=["16:9", "9:16", "1:1"])
    p.add_argument("--framing", choices=["portrait", "full_body"])
    p.add_argument("--model", help="essence-1, essence-2 or expression-2")
    p.add_argument("--idempotency-key", help="reuse to retry safely (default: a fresh one)")
    p.add_argument("--wait", action="store_true", help="poll until ready, with progress")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait (with --wait)")
    _api_options(p)
    p.set_defaults(func=cmd_agents_generate)

    sub.add_parser(  # handled in main(): LiveKit's worker CLI takes the arguments
        "worker",
        help="run an avatar worker on LiveKit's job dispatch: worker [--agent-name N] "
        "[--max-avatars N] start|dev (LiveKit's worker CLI)",
    )

    p = sub.add_parser("gestures", help="the gesture actions an agent can perform")
    p.add_argument("agent_id", help="agent code, or 'demo'")
    _api_options(p)
    p.set_defaults(func=cmd_gestures)

    p = sub.add_parser(
        "doctor",
        help="check this machine: versions, the bitHuman secret, the cache, LiveKit, codecs",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-browser", action="store_true", help="skip the Chromium codec check (slow)")
    _api_options(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser(
        "preview",
        help="see and talk to an avatar in your browser, in a real LiveKit room",
        description="Puts the avatar in a LiveKit room and serves a page on 127.0.0.1 that "
        "joins it: the avatar's video and audio, your microphone, the sample speech, its "
        "gestures, live figures. LiveKit: LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET "
        "when set, else a livekit-server from PATH (or --livekit-server) on loopback.",
    )
    p.add_argument(
        "avatar", nargs="?", default="demo", help="'demo' (default), an agent code, or a .imx"
    )
    p.add_argument(
        "--port", type=_port_or_zero, default=8090, help="the page's port (default 8090; 0 any)"
    )
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    p.add_argument(
        "--livekit-server", metavar="PATH", help="the livekit-server to start on loopback"
    )
    p.add_argument(
        "--livekit-client",
        metavar="PATH",
        help="a local livekit-client (its folder or livekit-client.umd.js) instead of the CDN",
    )
    p.add_argument("--model", help="model family for an agent code (default: the agent's)")
    p.add_argument("--api-secret", help="bitHuman secret (default: BITHUMAN_API_SECRET)")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser(
        "serve", help="run the self-hosted avatar service (needs the 'service' extra)"
    )
    p.add_argument(
        "--host", type=_host, default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    p.add_argument("--port", type=_port, default=8089)
    p.add_argument("--max-workers", type=int, default=4, help="avatars rendering at once")
    p.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=DEFAULT_IDLE_TIMEOUT,
        help="seconds with no one else in the room and no audio before an avatar leaves "
        "(default %(default)g; 0 never)",
    )
    p.add_argument(
        "--dispatch",
        action="store_true",
        help="keep no avatars here: dispatch them to avatar workers through LiveKit "
        "(LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET)",
    )
    p.add_argument(
        "--agent-name",
        default=None,
        help="with --dispatch: the avatar workers' agent name (default: AVATARHUB_AGENT_NAME, "
        "else avatarhub-avatar)",
    )
    _gesture_option(p)
    _session_limit_option(p)
    p.add_argument("--key", help="the key clients must send (default: AVATARHUB_SERVICE_KEY)")
    p.add_argument(
        "--api-secret", help="bitHuman secret for model downloads (default: BITHUMAN_API_SECRET)"
    )
    p.set_defaults(func=cmd_serve)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["worker"]:  # LiveKit's own worker CLI parses the rest
        from .remote.jobs import main as worker_main

        return worker_main(given[1:])
    parser = build_parser()
    args = parser.parse_args(given)
    import logging

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except AvatarHubError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import main as doctor

    return doctor(args.api_secret, args.api_base, as_json=args.json, browser=not args.no_browser)


def cmd_preview(args: argparse.Namespace) -> int:
    from .preview.command import run_preview

    return asyncio.run(
        run_preview(
            args.avatar,
            port=args.port,
            open_browser=args.open,
            livekit_server=args.livekit_server,
            livekit_client=args.livekit_client,
            model=args.model,
            api_secret=args.api_secret,
        )
    )


def cmd_render(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .exceptions import ConfigurationError
    from .rendering.loader import open_avatar, split_source
    from .rendering.mp4 import SAMPLE_AUDIO, Encoder, check_preset, render

    try:  # --crf was checked as it was parsed
        encoder = Encoder(check_preset(args.preset), args.crf)
    except ConfigurationError as err:
        raise SystemExit(f"error: --{err}") from None
    audio = Path(args.audio) if args.audio else SAMPLE_AUDIO
    width, height = _parse_size(args.size)

    async def run() -> int:
        from tqdm import tqdm

        avatar_id, model_path = split_source(args.avatar)
        opened = await open_avatar(
            avatar_id,
            model_path=model_path,
            api_secret=args.api_secret,
            model=args.model,
            output_size=(width, height),
            realtime=False,
        )
        bar = tqdm(desc="rendering", unit="frame", disable=None)

        def on_frame(done: int, total: int) -> None:
            if bar.total != total:
                bar.total = total
            bar.update(done - bar.n)

        try:
            result = await render(
                opened.runtime,
                audio,
                Path(args.output),
                encoder=encoder,
                on_frame=on_frame,
            )
        finally:
            bar.close()
            await opened.aclose()
        print(
            f"{result.path}: {result.frames} frames at {result.fps} FPS, "
            f"{result.width}x{result.height}, {result.audio_seconds:.2f} s of audio"
        )
        return 0

    return asyncio.run(run())


def _crf(text: str) -> int:
    from .exceptions import ConfigurationError
    from .rendering.mp4 import check_crf

    try:
        return check_crf(int(text))
    except ValueError as err:  # ConfigurationError is one
        message = (
            str(err) if isinstance(err, ConfigurationError) else f"not a whole number: {text!r}"
        )
        raise argparse.ArgumentTypeError(message.removeprefix("crf ")) from None


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"error: --size must look like 1280x720, not {text!r}") from None
    from .exceptions import ConfigurationError
    from .rendering.runtime import check_output_size

    try:
        return check_output_size((width, height))
    except ConfigurationError as err:
        raise SystemExit(f"error: --size: {err}") from None


# -- agents and gestures -----------------------------------------------------------------------


def _api(args: argparse.Namespace) -> Any:
    from .api import BithumanAPI

    return BithumanAPI(api_secret=args.api_secret, api_base=args.api_base)


def cmd_agents_ls(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _api(args) as api:
            agents = await api.list_agents(status=args.status)
        print(f"{'CODE':<12} {'STATUS':<11} {'MODEL':<13} NAME")
        for a in agents:
            print(
                f"{a.get('code') or a.get('agent_id', '?'):<12} {a.get('status', '?'):<11} "
                f"{a.get('model') or '?':<13} {a.get('name') or ''}"
            )
        print(f"{len(agents)} agents")
        return 0

    return asyncio.run(run())


def cmd_agents_status(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _api(args) as api:
            status = await api.agent_status(args.agent_id)
        progress = status.get("progress")
        pct = f" {float(progress) * 100:.0f}%" if isinstance(progress, (int, float)) else ""
        print(
            f"{args.agent_id}: {status.get('status', '?')}{pct} "
            f"{status.get('progress_msg') or ''}".rstrip()
        )
        if status.get("error_message"):
            print(f"error: {status['error_message']}")
        return 1 if str(status.get("status")).lower() == "failed" else 0

    return asyncio.run(run())


def cmd_agents_generate(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _api(args) as api:
            started = await api.generate_agent(
                prompt=args.prompt,
                image=args.image,
                audio=args.audio,
                aspect_ratio=args.aspect_ratio,
                framing=args.framing,
                model=args.model,
                idempotency_key=args.idempotency_key,
            )
            agent_id = str(started["agent_id"])
            print(f"{agent_id}: {started.get('status', 'processing')}")
            if not args.wait:
                return 0
            from tqdm import tqdm

            bar = tqdm(total=100, desc=agent_id, unit="%", disable=None)

            def on_progress(fraction: float, message: str) -> None:
                bar.set_postfix_str(message[:40])
                bar.update(max(0, round(fraction * 100) - bar.n))

            try:
                await api.wait_until_ready(agent_id, timeout=args.timeout, on_progress=on_progress)
            finally:
                bar.close()
            print(f"{agent_id}: ready")
            return 0

    return asyncio.run(run())


def cmd_gestures(args: argparse.Namespace) -> int:
    from .ids import is_demo

    if is_demo(args.agent_id):
        from .rendering.demo import DemoRuntime

        for action in DemoRuntime.ACTIONS:
            print(action)
        return 0

    async def run() -> int:
        async with _api(args) as api:
            gestures = await api.gestures(args.agent_id)
        if not gestures:
            print(f"{args.agent_id} has no gestures", file=sys.stderr)
            return 1
        for action, url in sorted(gestures.items()):
            print(f"{action}\t{url}")
        return 0

    return asyncio.run(run())


def cmd_serve(args: argparse.Namespace) -> int:
    from . import config

    try:
        from .service.app import serve
    except ImportError as err:
        raise SystemExit(
            f"error: {err}; install the service extra: "
            "pip install 'livekit-plugins-avatarhub[service]'"
        ) from None
    key = config.service_key(args.key)
    if not key:
        raise SystemExit("error: set AVATARHUB_SERVICE_KEY (or --key): clients must authenticate")
    if args.max_workers < 1:
        raise SystemExit("error: --max-workers must be at least 1")
    secret = config.bithuman_secret(args.api_secret)
    from .remote.protocol import allow_gestures_from

    allow_gestures_from(args.allow_gestures_from)
    if args.max_session_seconds is not None:
        from .remote.protocol import limit_sessions

        try:
            limit_sessions(args.max_session_seconds)
        except AvatarHubError as err:
            raise SystemExit(f"error: --max-session-seconds: {err}") from None
    try:
        _serve(args, serve, key, secret)
    except OSError as err:  # the address is taken, or not this machine's
        reason = err.strerror or err
        raise SystemExit(f"error: cannot listen on {args.host}:{args.port}: {reason}") from None
    return 0


def _serve(args: argparse.Namespace, serve: Any, key: str, secret: str | None) -> None:
    asyncio.run(
        serve(
            host=args.host,
            port=args.port,
            key=key,
            api_secret=secret,
            max_workers=args.max_workers,
            idle_timeout=args.idle_timeout,
            dispatch=args.dispatch,
            agent_name=args.agent_name,
        )
    )
