"""Model hub benchmarks, each against a baseline measured in the same run.

    python bench/bench_hub.py [--mb 256] [--runs 5]

* warm resolve: time and requests for a cached avatar (fresh, then stale-and-revalidated),
  against a cold resolve that downloads;
* download throughput and CPU per MB (the event loop's share too): ModelHub against ``curl``
  fetching the same file from the same loopback server, and against
  ``curl | tee | openssl sha256`` (the same work as the hub: receive, write and hash in one
  pass), interleaved run by run;
* peak memory growth while downloading the file, against the size of the file.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import resource
import shlex
import shutil
import statistics
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
        "from livekit_plugins_avatarhub.hub.resolver import ModelHub\n"
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
    parser.add_argument("--runs", type=int, default=5, help="throughput runs (interleaved)")
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
        await run(args.mb, args.runs, api, server.pid)
    finally:
        server.terminate()
        server.wait()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _sha256_ms_per_mb() -> float:
    block = os.urandom(1 << 20)
    hasher = hashlib.sha256()
    start = time.process_time()
    for _ in range(256):
        hasher.update(block)
    return (time.process_time() - start) * 1e3 / 256


def _spread(values: list[float], digits: int = 0) -> str:
    """median (min-max)"""
    mid = statistics.median(values)
    return f"{mid:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _process_cpu(pid: int) -> float:
    """CPU seconds of another process (Linux), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(mb: int, runs: int, api_base: str, server_pid: int) -> None:
    import httpx

    from livekit_plugins_avatarhub.hub.resolver import ModelHub

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
        if not curl:
            print("curl not installed: throughput baseline skipped (apt-get install curl)")
        ours_mbs: list[float] = []
        ours_cpu: list[float] = []
        loop_cpu: list[float] = []  # the event loop thread's share of it
        theirs_mbs: list[float] = []
        theirs_cpu: list[float] = []
        hashed_mbs: list[float] = []
        hashed_cpu: list[float] = []
        server_cpu: list[float] = []  # the server's CPU per MB while curl fetches
        for _ in range(runs):  # interleaved, so both see the same machine
            shutil.rmtree(Path(tmp) / "agents")
            c0, l0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
            await hub().resolve(CODE)
            ours_mbs.append(mb / (time.perf_counter() - t0))
            ours_cpu.append((time.process_time() - c0) * 1e3 / mb)
            loop_cpu.append((time.thread_time() - l0) * 1e3 / mb)
            if curl:
                out = Path(tmp) / "curl.bin"
                before, served = _children_cpu(), _process_cpu(server_pid)
                t0 = time.perf_counter()
                subprocess.run([curl, "-s", "-o", str(out), url], check=True)
                theirs_mbs.append(mb / (time.perf_counter() - t0))
                theirs_cpu.append((_children_cpu() - before) * 1e3 / mb)
                server_cpu.append((_process_cpu(server_pid) - served) * 1e3 / mb)
                assert out.stat().st_size == mb << 20
                out.unlink()
                # the same work as the hub in C tools: receive, write and sha256 in one pass
                before = _children_cpu()
                t0 = time.perf_counter()
                subprocess.run(
                    f"{curl} -s {shlex.quote(url)} | tee {out} | openssl dgst -sha256",
                    shell=True,
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                hashed_mbs.append(mb / (time.perf_counter() - t0))
                hashed_cpu.append((_children_cpu() - before) * 1e3 / mb)
                out.unlink()
        print(
            f"hub download:  {_spread(ours_mbs)} MB/s, CPU {_spread(ours_cpu, 2)} ms/MB "
            f"(incl. API call, sha256, rename; {runs} runs)"
        )
        print(
            f"  of which on the event loop's thread: {_spread(loop_cpu, 3)} ms/MB "
            f"({statistics.median(loop_cpu) / statistics.median(ours_cpu):.1%})"
        )
        if curl:
            print(f"curl download: {_spread(theirs_mbs)} MB/s, CPU {_spread(theirs_cpu, 2)} ms/MB")
            print(
                f"curl | tee | openssl sha256: {_spread(hashed_mbs)} MB/s, "
                f"CPU {_spread(hashed_cpu, 2)} ms/MB"
            )
            ratios = [a / b for a, b in zip(ours_mbs, theirs_mbs, strict=True)]
            print(f"throughput ratio (hub / curl, per run): {_spread(ratios, 2)}")
            # the least CPU a hashing client needs: curl's best run (noise only adds) + sha256
            floor = min(theirs_cpu) + _sha256_ms_per_mb()
            print(
                f"floor for a hashing client: curl's CPU (best run) + sha256 = {floor:.2f} ms/MB "
                f"(hub / floor: {statistics.median(ours_cpu) / floor:.2f})"
            )
            # the server shares the machine: a client at the floor, all cores busy, can go no
            # faster than this (if the work splits perfectly across the cores; best runs)
            cores = len(os.sched_getaffinity(0))
            serving = min(server_cpu)
            ceiling = cores * 1e3 / (serving + floor)
            print(
                f"server CPU {_spread(server_cpu, 2)} ms/MB; ceiling for a hashing client on "
                f"{cores} cores beside it: {ceiling:.0f} MB/s = "
                f"{ceiling / statistics.median(theirs_mbs):.2f} of curl"
            )
            ratios = [a / b for a, b in zip(ours_mbs, hashed_mbs, strict=True)]
            print(f"throughput ratio (hub / curl|tee|openssl, per run): {_spread(ratios, 2)}")

        shutil.rmtree(Path(tmp) / "agents")
        base, peak = _child_peak_rss_mb(api_base, tmp)
        print(
            f"peak RSS: {base:.0f} MB before, {peak:.0f} MB after downloading {mb} MB: "
            f"growth {peak - base:.1f} MB = {(peak - base) / mb:.3f} of the file size"
        )


if __name__ == "__main__":
    asyncio.run(main())
