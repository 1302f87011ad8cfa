"""Keeping credentials out of what this package shows: reprs, messages and log lines.

A pre-signed storage URL's query is a credential. httpx logs every request's URL at INFO and
urllib3 at DEBUG, so :func:`install_log_filter` (called once, by the package's ``__init__``)
takes the query out of their log lines.
"""

from __future__ import annotations

import logging
import re

import httpx  # what logs the URLs; the package imports it anyway (api.py)

_QUERY = re.compile(r"\?[^\s'\"<>]*")


def redact(secret: str | None) -> str:
    """What a secret looks like in a repr: whether it is set, never any of its characters."""
    return "<set>" if secret else "<unset>"


def scrub(text: str, *secrets: str | None) -> str:
    """``text`` with every given secret replaced, for messages built from other libraries."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def without_query(text: str) -> str:
    """``text`` with every URL query in it replaced by ``?redacted``."""
    return _QUERY.sub("?redacted", text) if "?" in text else text


def described(err: BaseException) -> str:
    """An error's type and words, with any URL query (a storage signature) taken out."""
    return f"{type(err).__name__}: {without_query(str(err))}"


class NoSignedQueries(logging.Filter):
    """Takes URL queries out of a log record's arguments (httpx URLs and strings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redacted(arg) for arg in record.args)
        return True


def _redacted(arg: object) -> object:
    if isinstance(arg, str):
        return without_query(arg)
    if isinstance(arg, httpx.URL) and arg.query:
        return arg.copy_with(query=b"redacted")
    return arg


_INSTALLED = False


def install_log_filter() -> None:
    """Once per process: the HTTP libraries' loggers never show a URL's query."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    for name in ("httpx", "urllib3.connectionpool"):
        logging.getLogger(name).addFilter(NoSignedQueries())
