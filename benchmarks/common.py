"""What the benchmark scripts share: worker processes, clocks, memory, tables, results.

Every fold is measured in a process of its own (``run_worker``), so that one tool's memory and
warm caches never count against another's. Inside a worker, ``measure`` times a call with
``time.perf_counter`` and reads its peak memory as the growth of the process's resident set
(Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` before each call) over what the process
held before it: what the call cost, not what the model already occupied.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"  # results (JSON) and exported models: generated, git-ignored
MIB = 1 << 20


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    """Give freed memory back to the system (glibc), so that every measured call starts from
    the same state: otherwise a call reuses what the previous one freed, and its memory and
    page faults go uncounted."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(call: Callable[[], Any]) -> tuple[Any, float, float | None]:
    """Run ``call()``; return its result, its time in seconds and its peak extra memory in MiB
    (None where the peak cannot be reset: not Linux)."""
    gc.collect()
    _trim()
    can_peak = _reset_peak()
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    result = call()
    elapsed = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    extra = None
    if can_peak and before is not None and peak is not None:
        extra = max(peak - before, 0) / 1024
    return result, elapsed, extra


def run_worker(module: str, job: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """Run ``python -m benchmarks.<module> --worker JOB`` and return the JSON it prints last."""
    env = dict(
        os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=HERE.parent,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return {"error": f"worker exited with {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def worker_main(handlers: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """In a worker process: run the job given on the command line, print its result as JSON.
    Returns False when this process is not a worker."""
    if len(sys.argv) < 3 or sys.argv[1] != "--worker":
        return False
    print(json.dumps(handlers(json.loads(sys.argv[2]))))
    return True


def median_ms(times: Sequence[float]) -> float:
    return statistics.median(times) * 1e3


def median_peak(peaks: Sequence[float | None]) -> float | None:
    values = [p for p in peaks if p is not None]
    return statistics.median(values) if values else None


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "–"
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.3f}"


def fmt_mib(mib: float | None) -> str:
    return "–" if mib is None else f"{mib:,.0f}"


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Iterable[int] = ()) -> str:
    """A Markdown table (aligned in plain text too); ``right`` are right-aligned columns."""
    rows = [[str(c) for c in r] for r in rows]
    right = set(right)
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        out = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(out) + " |"

    rule = ["-" * (w - 1) + ":" if i in right else "-" * w for i, w in enumerate(widths)]
    return "\n".join([line(headers), "| " + " | ".join(rule) + " |", *map(line, rows)])


def parser(doc: str | None, models: bool = True) -> argparse.ArgumentParser:
    """A script's argument parser, described by its docstring's first line, with ``--models``
    (every benchmark network by default) unless ``models`` is False."""
    result = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    if models:
        from .models import MODELS

        result.add_argument("--models", default=",".join(MODELS))
    return result


def publish(
    name: str, title: str, results: Any, report: Callable[[Any], str], **extra: Any
) -> None:
    """Save a script's results (``benchmarks/out/NAME.json``, with the machine) and print its
    tables under ``title``."""
    here = machine()
    save(name, {"machine": here, **extra, "results": results})
    print(f"## {title} ({here})\n")
    print(report(results))


def save(name: str, data: Any) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def machine() -> str:
    """One line on what the numbers were measured on."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
