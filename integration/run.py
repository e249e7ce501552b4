"""Run bnfold's integration clients, each in its own virtual environment, and print one table.

Each client (``integration/<name>_client.py``) folds models made by a real third-party package
(Keras through tf2onnx, ExecuTorch, Ultralytics, timm) and writes one JSON row per case. The
packages pin conflicting versions of numpy, protobuf and torch, so every client gets a virtual
environment of its own, ``.integration/<name>/``: created with ``python3.11 -m venv``, then
``pip install`` of each argument list in the module's ``REQUIREMENTS`` (read with ``ast``: the
module cannot be imported here). A stamp file, ``.installed``, holds a hash of those lists and of
``pyproject.toml``; a later run whose hash matches installs nothing (``--reinstall`` starts the
environment afresh).

A client runs as ``.integration/<name>/bin/python -m integration.<name>_client --out ROWS.jsonl
[--quick]`` from the repository root, offline, under a time limit (``--timeout``). Its rows are
kept whatever happens; a client killed by the limit gets one more row, "not run: time limit ...",
one that exits with an error gets "FAILED: <last line of its stderr>", and one whose environment
cannot be installed gets a single "not run: <pip's last error line>" row while the others go on.

The table (Markdown, grouped by client) and one summary line per client go to stdout and to
``.integration/last_run.md``; progress goes to stderr, each client's output to
``.integration/<name>/client.log``. The exit status is 1 when any row is FAILED, else 0.
This module uses the standard library only: it runs with the plain system Python.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".integration"
CLIENTS = ("keras", "executorch", "ultralytics", "timm")  # the default set, in run order
NAMES = {
    "keras": "Keras → ONNX",
    "executorch": "ExecuTorch",
    "ultralytics": "Ultralytics",
    "timm": "timm",
}
ENV = {
    "HF_HUB_OFFLINE": "1",
    "YOLO_OFFLINE": "True",
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "2",
    "PYTHONUNBUFFERED": "1",
}
PIP_TIMEOUT = 30 * 60  # seconds per pip step
KEYS = (
    "client",
    "case",
    "status",
    "bn",
    "folded",
    "kept",
    "affine",
    "err",
    "fold_s",
    "theirs",
    "notes",
)
HEAD = (
    "client",
    "case",
    "status",
    "BN",
    "folded",
    "kept (rule n)",
    "affine",
    "err",
    "fold s",
    "theirs",
    "notes",
)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _row(client: str, case: str, status: str, notes: str = "") -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(KEYS)
    row.update(client=client, case=case, status=status, kept="", theirs="", notes=notes)
    return row


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


# -- requirements and environments -------------------------------------------------------------


def module_path(name: str) -> Path:
    return ROOT / "integration" / f"{name}_client.py"


def requirements(path: Path) -> list[list[str]]:
    """The module-level ``REQUIREMENTS`` of a client module, read without importing it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "REQUIREMENTS" for t in targets):
            found = ast.literal_eval(value)
            if not (
                isinstance(found, list)
                and all(
                    isinstance(step, list) and all(isinstance(a, str) for a in step)
                    for step in found
                )
            ):
                raise ValueError(f"{path.name}: REQUIREMENTS is not a list of lists of strings")
            return found
    raise ValueError(f"{path.name} has no module-level REQUIREMENTS")


def _stamp(steps: list[list[str]], python: str) -> str:
    digest = hashlib.sha256(json.dumps({"python": python, "steps": steps}).encode())
    digest.update((ROOT / "pyproject.toml").read_bytes())  # what `-e .[extra]` installs
    return digest.hexdigest()


def _python() -> str:
    return shutil.which("python3.11") or sys.executable


def install(name: str, steps: list[list[str]], reinstall: bool) -> str | None:
    """Create or reuse ``.integration/<name>/``; return None when ready, else why not."""
    venv = STATE / name
    python = venv / "bin" / "python"
    stamp_file = venv / ".installed"
    base = _python()
    stamp = _stamp(steps, base)
    if reinstall and venv.exists():
        _log(f"removing {venv.relative_to(ROOT)} …")
        shutil.rmtree(venv)
    if python.exists() and stamp_file.exists() and stamp_file.read_text().strip() == stamp:
        _log(f"{name}: environment up to date ({venv.relative_to(ROOT)})")
        return None
    stamp_file.unlink(missing_ok=True)
    commands: list[list[str]] = []
    if not python.exists():
        commands.append([base, "-m", "venv", str(venv)])
    commands.append([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    commands += [[str(python), "-m", "pip", "install", "--quiet", *step] for step in steps]
    for i, command in enumerate(commands):
        shown = " ".join(command[3:] if command[0] == str(python) else command[1:])
        _log(f"installing {name} ({i + 1}/{len(commands)}): {shown} …")
        try:
            proc = subprocess.run(
                command, cwd=ROOT, capture_output=True, text=True, timeout=PIP_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            return f"not run: `{shown}` took over {PIP_TIMEOUT} s"
        if proc.returncode != 0:
            if "--upgrade pip" in shown:  # an old pip still installs
                _log(f"{name}: pip upgrade failed, going on: {_last_line(proc.stderr)}")
                continue
            errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
            why = (
                _last_line(errors[-1] if errors else proc.stderr)
                or _last_line(proc.stdout)
                or f"exit status {proc.returncode}"
            )
            return f"not run: {why}"
    stamp_file.write_text(stamp + "\n")
    return None


# -- running a client --------------------------------------------------------------------------


def _read_rows(path: Path, client: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            found = json.loads(line)
            if not isinstance(found, dict):
                raise ValueError("not an object")
        except ValueError as e:
            if i == len(lines) - 1:  # cut off by a kill: drop it
                continue
            rows.append(_row(client, "?", f"FAILED: unreadable row {i + 1}: {e}"))
            continue
        row = _row(client, "?", "?")
        row.update({k: found.get(k, row[k]) for k in KEYS})
        rows.append(row)
    return rows


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End the client and everything it started: its process group (its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what is left: converters, workers
    except ProcessLookupError:
        pass
    proc.wait()


def run_client(name: str, quick: bool, timeout: float) -> list[dict[str, Any]]:
    """Run one client in its environment; return its rows and the driver's own, if any."""
    venv = STATE / name
    out = venv / "rows.jsonl"
    log = venv / "client.log"
    out.unlink(missing_ok=True)
    command = [str(venv / "bin" / "python"), "-m", f"integration.{name}_client", "--out", str(out)]
    if quick:
        command.append("--quick")
    display = NAMES.get(name, name)
    _log(f"running {name} … (log: {log.relative_to(ROOT)})")
    start = time.monotonic()
    timed_out = False
    shown = 0
    with open(log, "wb") as stdout, open(venv / "client.stderr", "wb") as stderr:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **ENV},
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,  # its own process group, killed as a whole
        )
        try:
            while True:
                try:
                    proc.wait(timeout=2)
                    break
                except subprocess.TimeoutExpired:
                    pass
                rows = _read_rows(out, display)
                for row in rows[shown:]:
                    _log(f"  {name}: {row['case']}: {row['status']}")
                shown = max(shown, len(rows))
                if time.monotonic() - start > timeout:
                    timed_out = True
                    _stop(proc)
                    break
        except BaseException:
            _stop(proc)
            raise
        finally:
            if proc.poll() is None:
                _stop(proc)
    seconds = time.monotonic() - start
    err_text = (venv / "client.stderr").read_text(encoding="utf-8", errors="replace")
    with open(log, "a", encoding="utf-8") as f:  # one log: stdout, then stderr
        f.write("\n--- stderr ---\n" + err_text)
    (venv / "client.stderr").unlink()
    rows = _read_rows(out, display)
    for row in rows[shown:]:
        _log(f"  {name}: {row['case']}: {row['status']}")
    if timed_out:
        last = rows[-1]["case"] if rows else "no case"
        rows.append(
            _row(display, "(client)", f"not run: time limit of {timeout:g} s reached after {last}")
        )
    elif proc.returncode != 0:
        why = _last_line(err_text) or f"exit status {proc.returncode}"
        rows.append(_row(display, "(client)", f"FAILED: {why}"))
    elif not rows:
        rows.append(_row(display, "(client)", "FAILED: the client wrote no rows"))
    _log(f"{name}: {len(rows)} rows in {seconds:.0f} s")
    return rows


# -- the table ---------------------------------------------------------------------------------


def _cell(value: Any, key: str) -> str:
    if value is None or value == "":
        return "–" if key in ("bn", "folded", "affine", "err", "fold_s") else ""
    if key == "err" and isinstance(value, int | float):
        return f"{value:.1e}"
    if key == "fold_s" and isinstance(value, int | float):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    text = str(value).replace("\r", " ").replace("\n", " ")
    return text.replace("|", "\\|")


def kind(status: str) -> str:
    """'ok', 'failed' or 'not run', from a row's status."""
    if status.startswith("ok"):
        return "ok"
    if status.startswith("not run"):
        return "not run"
    return "failed"


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "|".join("---" for _ in HEAD) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k), k) for k in KEYS) + " |")
    return "\n".join(lines)


def summaries(groups: Sequence[tuple[str, list[dict[str, Any]]]]) -> list[str]:
    lines = []
    for name, rows in groups:
        counts = {"ok": 0, "failed": 0, "not run": 0}
        for row in rows:
            counts[kind(str(row["status"]))] += 1
        lines.append(
            f"{NAMES.get(name, name)}: {counts['ok']} ok, {counts['failed']} failed, "
            f"{counts['not run']} not run"
        )
    return lines


# -- main --------------------------------------------------------------------------------------


def _clients(text: str) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for name in names:
        if name not in CLIENTS and not module_path(name).exists():
            raise argparse.ArgumentTypeError(
                f"unknown client {name!r}: one of {', '.join(CLIENTS)}"
            )
    if not names:
        raise argparse.ArgumentTypeError("no client given")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m integration.run",
        description="Run bnfold's integration clients (each in .integration/<client>/, "
        "installed on first use) and print one Markdown table; also written to "
        ".integration/last_run.md. Exit status 1 when any row is FAILED.",
    )
    parser.add_argument(
        "--clients",
        type=_clients,
        default=list(CLIENTS),
        help=f"comma-separated, run in this order (default {','.join(CLIENTS)})",
    )
    parser.add_argument("--quick", action="store_true", help="a few cases per client")
    parser.add_argument(
        "--timeout",
        type=float,
        default=20 * 60,
        help="time limit per client run, seconds (default 1200; installing is not counted)",
    )
    parser.add_argument(
        "--reinstall", action="store_true", help="recreate the clients' environments first"
    )
    args = parser.parse_args(argv)

    STATE.mkdir(exist_ok=True)
    start = time.monotonic()
    groups: list[tuple[str, list[dict[str, Any]]]] = []
    for name in args.clients:
        display = NAMES.get(name, name)
        path = module_path(name)
        if not path.exists():
            why = f"not run: {path.relative_to(ROOT)} does not exist"
            groups.append((name, [_row(display, "(client)", why)]))
            _log(f"{name}: {why}")
            continue
        try:
            steps = requirements(path)
        except (SyntaxError, ValueError) as e:
            groups.append((name, [_row(display, "(client)", f"FAILED: {_last_line(str(e))}")]))
            continue
        why = install(name, steps, args.reinstall)
        if why is not None:
            _log(f"{name}: {why}")
            groups.append((name, [_row(display, "(client)", why)]))
            continue
        groups.append((name, run_client(name, args.quick, args.timeout)))

    rows = [row for _, rows in groups for row in rows]
    text = table(rows) + "\n\n" + "\n".join(summaries(groups)) + "\n"
    print(text, end="")
    options = " ".join(["--clients", ",".join(args.clients)] + (["--quick"] if args.quick else []))
    header = (
        f"<!-- python -m integration.run {options}, {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{time.monotonic() - start:.0f} s -->\n\n"
    )
    (STATE / "last_run.md").write_text(header + text, encoding="utf-8")
    _log(f"table written to {(STATE / 'last_run.md').relative_to(ROOT)}")
    return 1 if any(kind(str(r["status"])) == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
