"""The on-disk model cache, shared with the bithuman SDK.

Layout (the SDK's, so ``python -m bithuman pull`` and this package find each other's files)::

    ${BITHUMAN_CACHE_DIR:-~/.cache/bithuman}/
        CACHEDIR.TAG
        agents/<code>/<filename>                       the model, as the SDK writes it
        agents/<code>/.avatarhub/<filename>.json       our metadata (sha256, size, etag, times)
        agents/<code>/.avatarhub/download.lock         cross-process download lock
        agents/<code>/.<filename>.<random>.incomplete   a download in progress

Models in use are held with a shared ``flock`` so that eviction (in any process) skips them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import cache_root
from ..exceptions import CacheError
from ..log import logger

MODEL_SUFFIXES = (".imx", ".avatar")
META_DIR = ".avatarhub"
INCOMPLETE_SUFFIX = ".incomplete"
_CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by livekit-plugins-avatarhub.\n"
)


@dataclass
class ModelRecord:
    """Sidecar metadata for one cached model file."""

    code: str
    filename: str
    model: str | None = None
    size: int | None = None
    sha256: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    source: str | None = None  # scheme://host/path of the download, never its signed query
    fetched_at: float | None = None
    validated_at: float | None = None
    last_used: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "size": (int,),
    "sha256": (str,),
    "etag": (str,),
    "last_modified": (str,),
    "source": (str,),
    "fetched_at": (int, float),
    "validated_at": (int, float),
    "last_used": (int, float),
    "extra": (dict,),
}


def _well_typed(name: str, value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):  # JSON true is an int to Python; never a size or a time
        return False
    return isinstance(value, _FIELD_TYPES[name])


@dataclass(frozen=True)
class CacheEntry:
    code: str
    path: Path
    size: int
    model: str | None
    last_used: float
    #: the file's size differs from the one recorded when it was verified (truncated or grown)
    damaged: bool = False


def is_model_file(path: Path) -> bool:
    name = path.name
    return not name.startswith(".") and name.endswith(MODEL_SUFFIXES) and path.is_file()


def guess_family(filename: str) -> str | None:
    """What the SDK's file naming says about the model family, when it says anything."""
    if filename.endswith(".lebundle.imx"):
        return "essence-2"
    if filename.endswith(".avatar"):
        return "expression-2"
    return None


def cache_error(err: OSError, directory: Path, action: str) -> CacheError:
    """Turn an OSError into one that names the directory and the variable to change."""
    import errno

    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
    }.get(err.errno or 0, err.strerror or str(err))
    return CacheError(
        err.errno or 0,
        f"cannot {action} in the avatar cache {directory}: {reason}. Free space there, or point "
        f"BITHUMAN_CACHE_DIR at a writable directory with room for the model",
    )


class ModelCache:
    """Paths, metadata, leases and eviction for cached models."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = cache_root(root)

    def agent_dir(self, code: str) -> Path:
        return self.root / "agents" / code

    def meta_dir(self, code: str) -> Path:
        return self.agent_dir(code) / META_DIR

    def lock_path(self, code: str) -> Path:
        return self.meta_dir(code) / "download.lock"

    def ensure_dirs(self, code: str) -> Path:
        """Create the agent's directories (and CACHEDIR.TAG); return the agent directory."""
        try:
            self.meta_dir(code).mkdir(parents=True, exist_ok=True)
            tag = self.root / "CACHEDIR.TAG"
            if not tag.exists():
                self._write_atomic(tag, _CACHEDIR_TAG.encode())
        except OSError as err:
            raise cache_error(err, self.root, "create directories") from err
        return self.agent_dir(code)

    # -- metadata ---------------------------------------------------------------------------

    def _meta_path(self, code: str, filename: str) -> Path:
        return self.meta_dir(code) / f"{filename}.json"

    def read_record(self, code: str, filename: str) -> ModelRecord | None:
        """The sidecar, or None. Fields of the wrong type are ignored, never trusted."""
        try:
            raw = json.loads(self._meta_path(code, filename).read_text("utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(raw, dict):
            return None
        known = {k: raw[k] for k in _FIELD_TYPES if k in raw and _well_typed(k, raw[k])}
        return ModelRecord(code=code, filename=filename, **known)

    def write_record(self, record: ModelRecord) -> None:
        path = self._meta_path(record.code, record.filename)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write_atomic(path, json.dumps(asdict(record), indent=1).encode())
        except OSError as err:
            # metadata is an optimisation; a read-only cache still serves its models
            logger.warning("could not write cache metadata %s: %s", path, err)

    def touch(self, code: str, filename: str) -> None:
        record = self.read_record(code, filename) or ModelRecord(code, filename)
        record.last_used = time.time()
        self.write_record(record)

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # -- lookup -----------------------------------------------------------------------------

    def models(self, code: str) -> list[Path]:
        directory = self.agent_dir(code)
        try:
            return sorted(p for p in directory.iterdir() if is_model_file(p))
        except OSError:
            return []

    def find(self, code: str, family: str | None = None) -> Path | None:
        """The cached model for ``code`` (and ``family`` when given), most recently used first.

        A file whose size is not the size recorded when it was verified is not a cached model:
        someone truncated or appended to it. (A full sha256 check: ``pull --verify``.)
        """
        candidates: list[tuple[float, Path]] = []
        files = self.models(code)
        for path in files:
            record = self.read_record(code, path.name)
            if self.damaged(path, record):
                logger.warning(
                    "cached model %s is %d bytes but was verified at %s; treating it as not cached",
                    path,
                    path.stat().st_size,
                    record.size if record else "?",
                )
                continue
            known = (record.model if record else None) or guess_family(path.name)
            if family is not None and known is not None and known != family:
                continue
            if family is not None and known is None and len(files) > 1:
                continue  # ambiguous file: only trust it when it is the only one
            used = (record.last_used if record else None) or path.stat().st_mtime
            candidates.append((used, path))
        if not candidates:
            return None
        return max(candidates)[1]

    def entries(self) -> list[CacheEntry]:
        result: list[CacheEntry] = []
        agents = self.root / "agents"
        try:
            codes = sorted(p.name for p in agents.iterdir() if p.is_dir())
        except OSError:
            return result
        for code in codes:
            for path in self.models(code):
                record = self.read_record(code, path.name)
                stat = path.stat()
                model = (record.model if record else None) or guess_family(path.name)
                used = (record.last_used if record else None) or stat.st_mtime
                damaged = self.damaged(path, record)
                result.append(CacheEntry(code, path, stat.st_size, model, used, damaged))
        return result

    @staticmethod
    def damaged(path: Path, record: ModelRecord | None) -> bool:
        """Whether the file's size differs from the size recorded when it was verified."""
        if record is None or record.size is None:
            return False  # pulled by the bithuman SDK: nothing recorded to compare with
        try:
            return path.stat().st_size != record.size
        except OSError:
            return True

    def verify(self, code: str, path: Path) -> bool | None:
        """Hash the whole file against the recorded sha256 (blocking; None: nothing recorded)."""
        import hashlib

        record = self.read_record(code, path.name)
        if record is None or record.sha256 is None:
            return None
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        return digest.hexdigest() == record.sha256

    # -- removal ----------------------------------------------------------------------------

    def remove_partials(self, code: str) -> int:
        """Delete abandoned ``.incomplete`` files; call only while holding the download lock."""
        removed = 0
        for path in self.agent_dir(code).glob(f".*{INCOMPLETE_SUFFIX}"):
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
        return removed

    def remove(self, code: str) -> int:
        """Delete everything cached for ``code``; returns the bytes freed."""
        directory = self.agent_dir(code)
        freed = sum(p.stat().st_size for p in self.models(code))
        if directory.exists():
            shutil.rmtree(directory)
        return freed

    def evict(self, max_bytes: int, *, keep: Path | None = None) -> list[CacheEntry]:
        """Delete least-recently-used models until the cache fits ``max_bytes``.

        Models held open (see :func:`hold`) and ``keep`` are never evicted.
        """
        entries = sorted(self.entries(), key=lambda e: e.last_used)
        total = sum(e.size for e in entries)
        evicted: list[CacheEntry] = []
        for entry in entries:
            if total <= max_bytes:
                break
            if keep is not None and entry.path == keep:
                continue
            if not _try_remove_unheld(entry.path):
                continue
            with contextlib.suppress(OSError):
                self._meta_path(entry.code, entry.path.name).unlink()
            total -= entry.size
            evicted.append(entry)
            logger.info("evicted %s (%d MB) from the avatar cache", entry.path, entry.size >> 20)
        return evicted


if sys.platform == "win32":  # pragma: no cover - Windows refuses to delete open files itself

    @contextlib.contextmanager
    def hold(path: Path) -> Iterator[None]:
        yield

    def _try_remove_unheld(path: Path) -> bool:
        try:
            path.unlink()
            return True
        except OSError:
            return False

else:
    import fcntl

    @contextlib.contextmanager
    def hold(path: Path) -> Iterator[None]:
        """Mark ``path`` as in use for as long as the block runs (shared flock)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _try_remove_unheld(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        try:
            path.unlink()
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
