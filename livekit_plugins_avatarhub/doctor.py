"""``doctor``: why an avatar does not show, one line per check, each with what to do.

Checks: Python and the packages this one works with (against the ranges it declares), the
bitHuman secret (present, and accepted by one API request; never printed), the model cache
(location, free space, damaged files), LiveKit (reachable, keys accepted), what a local
Chromium can decode, and the demo avatar rendering a frame. Exit code 1 when a check fails
(warnings and skipped checks do not fail); ``--json`` prints the same for machines.
"""

from __future__ import annotations

import asyncio
import json
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from .config import bithuman_secret, livekit_settings
from .exceptions import AvatarHubError

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
_DIST = "livekit-plugins-avatarhub"
_CODECS_PAGE = (
    "data:text/html,<script>document.write(JSON.stringify("
    "RTCRtpReceiver.getCapabilities('video').codecs.map(c=>c.mimeType)))</script>"
)
#: what a doctor run calls a low disk: less than two 500 MB models
LOW_DISK_BYTES = 1 << 30


@dataclass(frozen=True)
class Finding:
    check: str
    verdict: str  # ok, warn, fail, skip
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.verdict:<5} {self.check:<15} {self.detail}"
        return f"{text} — {self.fix}" if self.fix else text


def python_and_packages() -> list[Finding]:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    found: list[Finding] = []
    ours = metadata.metadata(_DIST)
    supported = SpecifierSet(ours["Requires-Python"] or "")
    version = platform.python_version()
    found.append(
        Finding("python", OK, f"{version} (supported {supported})")
        if version in supported
        else Finding("python", FAIL, f"{version} (supported {supported})", "use a supported Python")
    )
    wanted = {Requirement(r).name: Requirement(r) for r in metadata.requires(_DIST) or []}
    agents = wanted.get("livekit-agents")
    rtc_range = _requirement_of("livekit-agents", "livekit")
    for name, requirement in (
        ("livekit-agents", agents),
        ("livekit", rtc_range),
        ("bithuman", wanted.get("bithuman")),
    ):
        found.append(_package(name, requirement))
    return found


def _requirement_of(dist: str, name: str) -> object | None:
    """The range ``dist`` declares for ``name`` (livekit comes with livekit-agents)."""
    from packaging.requirements import Requirement

    try:
        for text in metadata.requires(dist) or []:
            requirement = Requirement(text)
            if requirement.name == name and not requirement.marker:
                return requirement
    except metadata.PackageNotFoundError:
        pass
    return None


def _package(name: str, requirement: object | None) -> Finding:
    spec = getattr(requirement, "specifier", None)
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        return Finding(name, FAIL, "not installed", f"pip install '{requirement or name}'")
    if spec is None or not str(spec):
        return Finding(name, OK, version)
    if spec.contains(version, prereleases=True):
        return Finding(name, OK, f"{version} (supported {spec})")
    return Finding(name, FAIL, f"{version} (supported {spec})", f"pip install '{name}{spec}'")


async def bithuman_account(api_secret: str | None, api_base: str | None) -> Finding:
    from .api import BithumanAPI
    from .exceptions import APIConnectionError, AuthenticationError

    secret = bithuman_secret(api_secret)
    if not secret:
        return Finding(
            "account",
            WARN,
            "no API secret (BITHUMAN_API_SECRET): agent codes cannot be downloaded or run",
            "set BITHUMAN_API_SECRET to your bitHuman API secret; the demo needs none",
        )
    try:
        async with BithumanAPI(api_secret=secret, api_base=api_base, timeout=15.0) as api:
            await api.request("GET", "/v1/agents", params={"limit": 1}, what="agent list")
    except AuthenticationError:
        return Finding(
            "account", FAIL, "bitHuman refused the API secret", "check BITHUMAN_API_SECRET"
        )
    except APIConnectionError as err:
        return Finding(
            "account", FAIL, f"bitHuman's API is unreachable: {err}", "check the network"
        )
    except AvatarHubError as err:
        return Finding("account", FAIL, str(err))
    return Finding("account", OK, "bitHuman accepts the API secret")


def model_cache() -> list[Finding]:
    from .hub.cache import ModelCache

    cache = ModelCache()
    existing = cache.root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    entries = cache.entries() if cache.root.exists() else []
    size = sum(e.size for e in entries)
    where = (
        f"{cache.root}: {len(entries)} models, {size / 2**20:.0f} MB, {free / 2**30:.1f} GB free"
    )
    found = [
        Finding("cache", WARN, where, "free disk space or set BITHUMAN_CACHE_DIR elsewhere")
        if free < LOW_DISK_BYTES
        else Finding("cache", OK, where)
    ]
    for entry in entries:
        if entry.damaged:
            found.append(
                Finding(
                    "cache",
                    FAIL,
                    f"{entry.code}: {entry.path.name} is damaged",
                    f"avatarhub rm {entry.code} && avatarhub pull {entry.code}",
                )
            )
    return found


async def livekit_server() -> Finding:
    from .remote.server_api import check_livekit_keys

    url, key, secret = livekit_settings()
    if not url:
        return Finding("server", SKIP, "LIVEKIT_URL is not set", "set it to check your server")
    if not (key and secret):
        return Finding(
            "server", FAIL, f"{url}: no API key and secret", "set LIVEKIT_API_KEY and _SECRET"
        )
    try:
        await check_livekit_keys(url, key, secret, timeout=10.0)
    except Exception as err:
        return Finding("server", FAIL, str(err))
    return Finding("server", OK, f"{url} accepts the keys")


def chromium_codecs(timeout: float = 60.0) -> Finding:
    browser = next(
        (
            found
            for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
            if (found := shutil.which(name))
        ),
        None,
    )
    if browser is None:
        return Finding("browser", SKIP, "no Chromium or Chrome on PATH")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", _CODECS_PAGE]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        start, end = done.stdout.find("["), done.stdout.rfind("]")
        codecs = json.loads(done.stdout[start : end + 1]) if start >= 0 else []
    except (OSError, subprocess.TimeoutExpired, ValueError) as err:
        return Finding("browser", WARN, f"{browser} did not answer: {type(err).__name__}")
    names = sorted(
        {c.split("/", 1)[1] for c in codecs if c.startswith("video/")}
        - {"rtx", "red", "ulpfec", "flexfec-03"}
    )
    if "H264" not in names:
        return Finding(
            "browser",
            WARN,
            f"{browser} decodes {', '.join(names) or 'nothing'}, not H.264 (the default)",
            "publish VP8 (VideoPublishOptions(codec='vp8')), or use a browser with H.264",
        )
    return Finding("browser", OK, f"{Path(browser).name} decodes {', '.join(names)}")


def demo_frame() -> Finding:
    from .rendering.demo.face import DemoRuntime

    started = time.perf_counter()
    try:
        frame = DemoRuntime(output_size=(640, 360)).get_first_frame()
        assert frame is not None, "no frame"
    except Exception as err:
        return Finding("demo", FAIL, f"the demo avatar does not render: {err}", "reinstall")
    took = (time.perf_counter() - started) * 1000
    return Finding("demo", OK, f"renders {frame.shape[1]}x{frame.shape[0]} in {took:.0f} ms")


async def run_checks(
    *, api_secret: str | None = None, api_base: str | None = None, browser: bool = True
) -> list[Finding]:
    findings = python_and_packages()
    account, server = await asyncio.gather(bithuman_account(api_secret, api_base), livekit_server())
    findings.append(account)
    findings.extend(await asyncio.to_thread(model_cache))
    findings.append(server)
    blocking: list[Callable[[], Finding]] = [demo_frame]
    if browser:
        blocking.insert(0, chromium_codecs)
    for check in blocking:
        findings.append(await asyncio.to_thread(check))
    return findings


def report(findings: list[Finding], *, as_json: bool) -> int:
    failed = any(f.verdict == FAIL for f in findings)
    if as_json:
        print(json.dumps({"ok": not failed, "checks": [asdict(f) for f in findings]}, indent=2))
    else:
        for finding in findings:
            print(finding.line())
    return 1 if failed else 0


def main(api_secret: str | None, api_base: str | None, *, as_json: bool, browser: bool) -> int:
    findings = asyncio.run(run_checks(api_secret=api_secret, api_base=api_base, browser=browser))
    return report(findings, as_json=as_json)
