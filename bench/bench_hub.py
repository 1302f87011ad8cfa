"""Model hub benchmarks, each against a baseline measured in the same run.

    python bench/bench_hub.py [--mb 256]

* warm resolve: time and requests for a cached avatar (fresh, then stale-and-revalidated),
  against a cold resolve that downloads;
* download throughput: ModelHub against ``curl`` fetching the same file from the same
  loopback server;
* peak memory growth while downloading the file, against the size of the file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bithuman_server import SECRET  # noqa: E402

CODE = "A91XMB7113"


def _child_peak_rss_mb(api_base: str, cache: str) -> tuple[float, float]:
    """(baseline, after download) peak RSS of a fresh process, in MB."""
    # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork+exec on Linux
    code = (
        "import asyncio, re\n"
        "def hwm():\n"
        "    text = open('/proc/self/status').read()\n"
        "    return int(re.search(r'VmHWM:\\s+(\\d+)', text).group(1)) / 1024\n"
        "from livekit_plugins_avatarhub.hub import ModelHub\n"
        "base = hwm()\n"
        f"hub = ModelHub(api_secret={SECRET!r}, api_base={api_base!r})\n"
        f"asyncio.run(hub.resolve({CODE!r}))\n"
        "print(base, hwm())\n"
    )
    env = dict(os.environ, BITHUMAN_CACHE_DIR=cache)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0]), float(out[1])


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=256, help="model size in MB")
    args = parser.parse_args()

    # the server runs in its own process, so it does not share a GIL with the client measured
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "bithuman_server.py"), str(args.mb << 20)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        env_line = server.stdout.readline().split()
        api = dict(item.split("=", 1) for item in env_line)["BITHUMAN_API_BASE"]
        await run(args.mb, api)
    finally:
        server.terminate()
        server.wait()


async def run(mb: int, api_base: str) -> None:
    import httpx

    from livekit_plugins_avatarhub.hub import ModelHub

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["BITHUMAN_CACHE_DIR"] = tmp

        def hub(**kw: object) -> ModelHub:
            return ModelHub(api_secret=SECRET, api_base=api_base, **kw)  # type: ignore[arg-type]

        t0 = time.perf_counter()
        await hub().resolve(CODE)
        cold = time.perf_counter() - t0

        warm_times = []
        for _ in range(20):
            h = hub()
            t0 = time.perf_counter()
            await h.resolve(CODE)
            warm_times.append(time.perf_counter() - t0)
        warm_requests = h.requests
        h = hub(fresh_for=0)
        t0 = time.perf_counter()
        await h.resolve(CODE)
        stale = time.perf_counter() - t0
        warm = sorted(warm_times)[len(warm_times) // 2]
        print(f"cold resolve (downloads {mb} MB): {cold * 1e3:8.1f} ms")
        print(
            f"warm resolve, fresh:  {warm * 1e3:8.2f} ms, {warm_requests} requests "
            f"({warm / cold:.5f} of cold)"
        )
        print(
            f"warm resolve, stale:  {stale * 1e3:8.2f} ms, {h.requests} requests, "
            f"no body transfer ({stale / cold:.4f} of cold)"
        )

        # throughput: curl and the hub fetch the same URL from the same server
        async with httpx.AsyncClient() as client:
            info = await client.get(
                f"{api_base}/v1/agent/{CODE}/model/download",
                params={"redirect": "false"},
                headers={"api-secret": SECRET},
            )
        url = info.json()["data"]["url"]
        curl = shutil.which("curl")
        shutil.rmtree(Path(tmp) / "agents")
        t0 = time.perf_counter()
        await hub().resolve(CODE)
        ours = time.perf_counter() - t0
        print(f"hub download:  {mb / ours:8.1f} MB/s (incl. API call, sha256, rename)")
        if curl:
            out = Path(tmp) / "curl.bin"
            t0 = time.perf_counter()
            subprocess.run([curl, "-s", "-o", str(out), url], check=True)
            theirs = time.perf_counter() - t0
            assert out.stat().st_size == mb << 20
            print(f"curl download: {mb / theirs:8.1f} MB/s")
            print(f"throughput ratio (hub / curl): {theirs / ours:.2f}")
        else:
            print("curl not installed: throughput baseline skipped (apt-get install curl)")

        shutil.rmtree(Path(tmp) / "agents")
        base, peak = _child_peak_rss_mb(api_base, tmp)
        print(
            f"peak RSS: {base:.0f} MB before, {peak:.0f} MB after downloading {mb} MB: "
            f"growth {peak - base:.1f} MB = {(peak - base) / mb:.3f} of the file size"
        )


if __name__ == "__main__":
    asyncio.run(main())
