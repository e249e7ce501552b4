"""What every client module shares: a time limit per case and the rows file the driver reads.

Standard library only: each client imports it inside its own virtual environment."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class CaseTimeout(Exception):
    """Raised by :func:`time_limit` when one case takes longer than it may."""


@contextlib.contextmanager
def time_limit(seconds: float, error: type[BaseException] = CaseTimeout) -> Iterator[None]:
    """Raise ``error`` (with ``"over N s"``) in the main thread after ``seconds``."""

    def _alarm(signum: int, frame: Any) -> None:
        raise error(f"over {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def row(client: str, case: str, status: str, **values: Any) -> dict[str, Any]:
    """One row with every key of the driver's table (``None`` or ``""`` where not given)."""
    out: dict[str, Any] = dict.fromkeys(("bn", "folded", "affine", "err", "fold_s"))
    out.update(client=client, case=case, status=status, kept="", theirs="", notes="")
    out.update(values)
    return out


class Rows:
    """The JSONL file the driver reads: one object per row (the keys of the driver's table),
    flushed at once, so that a client killed by its time limit keeps the rows it wrote."""

    def __init__(self, client: str, path: Path) -> None:
        self.client, self.path = client, path

    def write(self, case: str, status: str, **values: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row(self.client, case, status, **values)) + "\n")
            f.flush()
        print(f"{case}: {status}", file=sys.stderr, flush=True)
