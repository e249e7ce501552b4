"""Keeping what libraries log and warn out of bnfold's output.

The command line promises one line on stderr. What torch, onnx and onnx_ir log or warn while
bnfold reads, folds, runs or writes a model is either harmless to the fold or refused by bnfold
with a message of its own, so it is dropped for the duration of the call that causes it.

Both helpers are safe in several threads at once: loggers get a filter of each call's own
(overlapping calls cannot undo each other's), and warnings filters, which are process-wide
state, are changed by one thread at a time.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator

_WARNINGS_LOCK = threading.RLock()


def _loggers(names: tuple[str | logging.Logger, ...]) -> list[logging.Logger]:
    """The loggers named, and every existing logger below one of them (a filter applies only to
    records logged through its own logger, not to those propagated from below)."""
    wanted = {n.name if isinstance(n, logging.Logger) else n for n in names}
    existing = [
        n
        for n in list(logging.root.manager.loggerDict)
        if any(n.startswith(w + ".") for w in wanted)
    ]
    # Named loggers are made if they do not exist yet, so that a library creating one later
    # (on a lazy import) gets this very logger, filter included.
    return [logging.getLogger(n) for n in sorted({*wanted, *existing})]


@contextlib.contextmanager
def quiet_logs(*loggers: str | logging.Logger) -> Iterator[None]:
    """Drop every record logged meanwhile through ``loggers`` (names or loggers) and through the
    loggers that exist below them (``"onnx"`` covers ``"onnx.checker"``)."""

    def drop(record: logging.LogRecord) -> bool:
        return False

    # A new filter each call: addFilter ignores a filter already there, so a shared one would
    # be removed by the first of two overlapping calls to end.
    found = _loggers(loggers)
    for logger in found:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in found:
            logger.removeFilter(drop)


@contextlib.contextmanager
def quiet_warnings(category: type[Warning] = Warning) -> Iterator[None]:
    """Ignore warnings of ``category`` meanwhile; overlapping calls in several threads take
    turns (warnings filters are global, and ``catch_warnings`` restores them on exit)."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", category)
        yield


@contextlib.contextmanager
def quiet(*loggers: str | logging.Logger) -> Iterator[None]:
    """:func:`quiet_logs` of ``loggers`` and :func:`quiet_warnings`, together."""
    with quiet_logs(*loggers), quiet_warnings():
        yield


__all__ = ["quiet", "quiet_logs", "quiet_warnings"]
