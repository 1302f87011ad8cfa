"""``python -m livekit_plugins_avatarhub <command>`` (also installed as ``avatarhub``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Sequence

from .exceptions import AvatarHubError

Command = Callable[[argparse.Namespace], int]


def _progress_bar(desc: str) -> tuple[Callable[[int, int | None], None], Callable[[], None]]:
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=True,
               disable=None)  # disabled when stderr is not a terminal

    def update(done: int, total: int | None) -> None:
        if total and bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    return update, bar.close


# -- cache -------------------------------------------------------------------------------------


def cmd_pull(args: argparse.Namespace) -> int:
    from .hub import ModelHub

    async def pull() -> int:
        for code in args.codes:
            update, close = _progress_bar(code)
            hub = ModelHub(api_secret=args.api_secret, api_base=args.api_base,
                           fresh_for=0 if args.force else None, progress=update)
            try:
                path = await hub.resolve(code, model=args.model)
            finally:
                close()
            print(f"{code}\t{path}")
        return 0

    return asyncio.run(pull())


def cmd_ls(args: argparse.Namespace) -> int:
    from .cache import ModelCache

    entries = ModelCache().entries()
    if not entries:
        print(f"no avatars cached in {ModelCache().root}", file=sys.stderr)
        return 0
    print(f"{'CODE':<12} {'MODEL':<13} {'SIZE':>10}  {'LAST USED':<16}  FILE")
    for e in sorted(entries, key=lambda e: e.last_used, reverse=True):
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        print(f"{e.code:<12} {e.model or '?':<13} {_size(e.size):>10}  {used:<16}  {e.path.name}")
    total = sum(e.size for e in entries)
    print(f"{len(entries)} models, {_size(total)} in {ModelCache().root}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from .cache import ModelCache
    from .settings import validate_avatar_id

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
    from .cache import ModelCache

    if args.max_gb < 0:
        raise SystemExit("error: --max-gb must be zero or more")
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


def _api_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-secret", help="default: BITHUMAN_API_SECRET")
    parser.add_argument("--api-base", help="default: BITHUMAN_API_BASE, then https://api.bithuman.ai")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m livekit_plugins_avatarhub",
        description="bitHuman avatars for LiveKit: fetch, list and render avatars.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pull", help="download avatars into the cache (with a progress bar)")
    p.add_argument("codes", nargs="+", metavar="CODE", help="bitHuman agent codes, e.g. A91XMB7113")
    p.add_argument("--model", help="essence-1, essence-2 or expression-2 (default: the agent's own)")
    p.add_argument("--force", action="store_true", help="revalidate even if recently checked")
    _api_options(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("ls", help="list cached avatars: code, model, size, last used")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("rm", help="remove avatars from the cache")
    p.add_argument("codes", nargs="+", metavar="CODE")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("prune", help="evict least-recently-used avatars down to a size")
    p.add_argument("--max-gb", type=float, required=True, help="size to shrink the cache to")
    p.set_defaults(func=cmd_prune)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
