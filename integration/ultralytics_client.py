"""Ultralytics 8.4 YOLO and RT-DETR models folded by bnfold, in the `.integration/ultralytics` venv.

What is checked, and why: Ultralytics models are among the most common PyTorch models people
fold BatchNorm in, and their ``forward`` is unusual Python (a layer loop with saved outputs,
heads that cache anchors on the module, end-to-end heads that pick top-k detections, RT-DETR's
transformer decoder), so they exercise bnfold's eager tracing (torch.fx fails on them, bnfold
falls back to torch.export) as much as its graph frontend. Every model the package ships a
config for, at its smallest scale (v3-tiny, v5, v6, v8, v9, v10, 11, 12, 26: detect, segment,
pose, obb, classify, and 26's depth and semantic heads where a config exists; RT-DETR-l), is
built from the YAML with no weights and given random non-trivial BatchNorm statistics, then:

1. ``bnfold.fold(model, (x,), return_report=True)`` (the eager frontend),
2. ``bnfold.fold(torch.export.export(model, (x,)), return_report=True)`` (the program frontend),

each compared with the original model on every output tensor (float32; RT-DETR in float64, as
its decoder's top-k query selection jumps under float32 rounding). Ultralytics' own
``model.fuse()`` runs on a copy of the same model, for the ``theirs`` column: how many of the
BatchNorm modules it removes, its time and its error. Nothing is downloaded: the offline
variables are set, and network connections are refused in-process (any attempt is noted).
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import socket
import sys
import time
import traceback
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import Rows, time_limit

REQUIREMENTS: list[list[str]] = [
    ["torch==2.14.1", "torchvision==0.29.1"],
    ["ultralytics==8.4.*"],
    ["-e", ".[torch]"],
]

CLIENT = "Ultralytics"
TOL32 = 1e-4  # relative error allowed in float32
TOL64 = 1e-9  # and in float64
IMGSZ = 160  # detection-type input side (stride 32: 5x5 at P5); small for speed
CLS_IMGSZ = 224  # classification input side
STAGE_TIMEOUT = 240.0  # seconds per stage (build, fuse, eager fold, export + fold)


@dataclass(frozen=True)
class Case:
    """One model: its name in the table, the YAML name Ultralytics resolves, and the task."""

    name: str
    cfg: str
    task: str
    double: bool = False  # compare in float64
    slow: float = 1.0  # times the stage time limit


CASES: tuple[Case, ...] = (
    Case("yolov3-tiny detect", "yolov3-tiny.yaml", "detect"),
    Case("yolov5n detect", "yolov5n.yaml", "detect"),
    Case("yolov6n detect", "yolov6n.yaml", "detect"),
    Case("yolov8n detect", "yolov8n.yaml", "detect"),
    Case("yolov8n segment", "yolov8n-seg.yaml", "segment"),
    Case("yolov8n pose", "yolov8n-pose.yaml", "pose"),
    Case("yolov8n obb", "yolov8n-obb.yaml", "obb"),
    Case("yolov8n classify", "yolov8n-cls.yaml", "classify"),
    Case("yolov9t detect", "yolov9t.yaml", "detect"),
    Case("yolov9c segment", "yolov9c-seg.yaml", "segment"),  # the smallest v9 seg config
    Case("yolov10n detect", "yolov10n.yaml", "detect"),
    Case("yolo11n detect", "yolo11n.yaml", "detect"),
    Case("yolo11n segment", "yolo11n-seg.yaml", "segment"),
    Case("yolo11n pose", "yolo11n-pose.yaml", "pose"),
    Case("yolo11n obb", "yolo11n-obb.yaml", "obb"),
    Case("yolo11n classify", "yolo11n-cls.yaml", "classify"),
    Case("yolo12n detect", "yolo12n.yaml", "detect"),
    Case("yolo12n segment", "yolo12n-seg.yaml", "segment"),
    Case("yolo12n pose", "yolo12n-pose.yaml", "pose"),
    Case("yolo12n obb", "yolo12n-obb.yaml", "obb"),
    Case("yolo12n classify", "yolo12n-cls.yaml", "classify"),
    Case("yolo26n detect", "yolo26n.yaml", "detect"),
    Case("yolo26n segment", "yolo26n-seg.yaml", "segment"),
    Case("yolo26n pose", "yolo26n-pose.yaml", "pose"),
    Case("yolo26n obb", "yolo26n-obb.yaml", "obb"),
    Case("yolo26n classify", "yolo26n-cls.yaml", "classify"),
    Case("yolo26n depth", "yolo26n-depth.yaml", "depth"),
    Case("yolo26n semantic", "yolo26n-sem.yaml", "semantic"),
    Case("rtdetr-l", "rtdetr-l.yaml", "rtdetr", double=True, slow=2.0),
)
QUICK = ("yolov8n detect", "yolo11n segment", "rtdetr-l")


# -- offline -------------------------------------------------------------------------------------

OFFLINE_ENV = {
    "YOLO_OFFLINE": "True",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "YOLO_VERBOSE": "False",
    # Ultralytics writes a settings file on import: keep it in the venv, not in the home folder
    "YOLO_CONFIG_DIR": str(Path(sys.prefix) / "ultralytics-config"),
}
NETWORK_ATTEMPTS: list[str] = []  # what something tried to reach (refused)


def block_network() -> None:
    """Refuse internet connections and name lookups in this process, and record each attempt."""
    connect = socket.socket.connect
    connect_ex = socket.socket.connect_ex

    def refuse(what: str) -> OSError:
        NETWORK_ATTEMPTS.append(what)
        return OSError(f"network access refused by the integration client: {what}")

    def guarded_connect(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise refuse(f"connect {address}")
        connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> int:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise refuse(f"connect {address}")
        return connect_ex(self, address)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        raise refuse(f"getaddrinfo {host}")

    socket.socket.connect = guarded_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = guarded_connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = guarded_getaddrinfo  # type: ignore[assignment]


# -- time limits ---------------------------------------------------------------------------------


class StageTimeout(BaseException):
    """A stage ran out of time (a BaseException, so that no ``except Exception`` swallows it)."""


# -- rows ----------------------------------------------------------------------------------------


def short(text: object, limit: int = 160) -> str:
    """One line of at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def describe(exc: BaseException) -> str:
    return short(f"{type(exc).__name__}: {exc}")


# -- models and outputs --------------------------------------------------------------------------


def build(case: Case) -> Any:
    """The model of ``case`` from its YAML, no weights, eval mode, random BatchNorm statistics."""
    import torch
    from ultralytics.nn import tasks

    classes = {
        "detect": tasks.DetectionModel,
        "segment": tasks.SegmentationModel,
        "pose": tasks.PoseModel,
        "obb": tasks.OBBModel,
        "classify": tasks.ClassificationModel,
        "depth": tasks.DepthModel,
        "semantic": tasks.SemanticSegmentationModel,
        "rtdetr": tasks.RTDETRDetectionModel,
    }
    torch.manual_seed(0)
    model = classes[case.task](case.cfg, verbose=False).eval()
    randomize_batchnorms(model, seed=zlib.crc32(case.name.encode()))
    return model.double() if case.double else model


def batchnorms(model: Any) -> list[Any]:
    import torch

    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def randomize_batchnorms(model: Any, seed: int) -> None:
    """Trained-looking statistics: a fold with the defaults (mean 0, var 1) would prove little."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in batchnorms(model):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if bn.weight is not None:
                bn.weight.copy_(torch.randn(n, generator=g) * 0.3 + 1.0)
                bn.bias.copy_(torch.randn(n, generator=g) * 0.3)


def example_input(case: Case) -> Any:
    import torch

    side = CLS_IMGSZ if case.task == "classify" else IMGSZ
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, side, side, generator=g)  # an image in [0, 1], as Ultralytics feeds
    return x.double() if case.double else x


def run(model: Callable[..., Any], x: Any) -> dict[str, Any]:
    """The model's output tensors by pytree path (tuples, lists and dicts flattened)."""
    import torch
    from torch.utils import _pytree as pytree

    with torch.no_grad():
        out = model(x)
    leaves, _ = pytree.tree_flatten_with_path(out)
    return {
        pytree.keystr(path): leaf.detach().clone()
        for path, leaf in leaves
        if isinstance(leaf, torch.Tensor)
    }


def rel_err(ref: dict[str, Any], got: dict[str, Any], *, subset: bool = False) -> float:
    """``max|a-b| / max|a|`` per output, the largest over outputs. Outputs must match by path
    (with ``subset``, only the paths both have are compared)."""
    import torch

    if not subset and ref.keys() != got.keys():
        missing = sorted(ref.keys() ^ got.keys())
        raise AssertionError(f"outputs differ in structure: {short(missing, 80)}")
    common = [k for k in ref if k in got]
    if not common:
        raise AssertionError("no output in common")
    worst = 0.0
    for key in common:
        a, b = ref[key], got[key]
        if a.shape != b.shape:
            return float("inf")
        if not a.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(a, b) else float("inf"))
            continue
        a64, b64 = a.double(), b.double()
        if a64.numel() == 0:
            continue
        diff = (a64 - b64).abs().max().item()
        if torch.isnan(b64).any() and not torch.isnan(a64).any():
            diff = float("inf")
        scale = a64.abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


# -- bnfold's report -----------------------------------------------------------------------------


def summarize(report: Any) -> dict[str, Any]:
    """The row's bn / folded / kept / affine columns, and notes on kept entries."""
    bns = report.batch_norms
    kept = [e for e in bns if not e.folded]
    rules = collections.Counter(e.rule or "?" for e in kept)
    notes: list[str] = []
    groups: dict[tuple[str | None, str], list[str]] = {}  # same rule and reason, names aside
    for e in kept:
        reason = e.reason.replace(e.bn, "<bn>") if e.bn else e.reason
        groups.setdefault((e.rule, reason), []).append(e.bn)
    for (rule, reason), names in groups.items():
        who = names[0] if len(names) == 1 else f"{len(names)} BNs, e.g. {names[0]}"
        notes.append(short(f"kept [{rule}] {who}: {reason}", 220))
    affines = report.affines
    kept_aff = collections.Counter(e.rule or "?" for e in affines if not e.folded)
    if kept_aff:
        notes.append("affine kept: " + ", ".join(f"{r} {n}" for r, n in kept_aff.items()))
    for note in report.notes:
        if "torch.fx could not trace" in note:
            notes.append("fx untraceable: traced with torch.export")
        else:
            notes.append(short(note, 120))
    return {
        "bn": len(bns),
        "folded": sum(e.folded for e in bns),
        "kept": ", ".join(f"{r} {n}" for r, n in rules.most_common()),
        "affine": sum(e.folded for e in affines),
        "notes": notes,
    }


# -- Ultralytics' own fuse() ---------------------------------------------------------------------


def their_fuse(model: Any, x: Any, ref: dict[str, Any]) -> str:
    """``fuse()`` on a copy: BatchNorm modules it folded (or dropped with the head branch it
    removes from an end-to-end head), where those left are, its time, its error on the outputs
    the fused model still returns."""
    from ultralytics.nn.modules.head import Detect

    twin = copy.deepcopy(model)
    before = batchnorms(twin)
    branches = []  # (head, attribute, BatchNorm ids below): fuse() may set the attribute to None
    for head in twin.modules():
        if isinstance(head, Detect):
            for name, child in head.named_children():
                branches.append((head, name, child, {id(m) for m in batchnorms(child)}))
    owners = {id(m): owner_name(twin, name) for name, m in twin.named_modules()}
    start = time.perf_counter()
    try:
        fused = twin.fuse(verbose=False)
    except Exception as exc:  # noqa: BLE001 - their tool's failure is a result
        return f"fuse() raises {describe(exc)}"
    took = time.perf_counter() - start
    present = {id(m) for m in fused.modules()}
    left = [bn for bn in before if id(bn) in present]
    gone = set()
    for head, name, child, ids in branches:
        if getattr(head, name, None) is not child:
            gone |= ids
    dropped = sum(id(bn) in gone for bn in before)
    folded = len(before) - len(left) - dropped
    text = f"fuse(): {folded} of {len(before)} folded"
    if dropped:
        text += f", {dropped} dropped with a head branch"
    if left:
        where = collections.Counter(owners.get(id(bn), "?") for bn in left)
        text += " (left in " + ", ".join(f"{n} {k}" for k, n in where.items()) + ")"
    try:
        got = run(fused, x)
        err = rel_err(ref, got, subset=True)
        text += f", err {err:.1e}"
        if got.keys() != ref.keys():
            text += f" on {len(got.keys() & ref.keys())} of {len(ref)} outputs"
    except Exception as exc:  # noqa: BLE001
        text += f", fused model raises {describe(exc)}"
    return f"{text}, {took:.2f} s"


def owner_name(model: Any, path: str) -> str:
    """Where a module sits, short: ``model.28.input_proj.0.1`` -> ``RTDETRDecoder.input_proj``."""
    parts = path.split(".")
    if len(parts) < 3 or parts[0] != "model" or not parts[1].isdigit():
        return path
    layer = type(model.model[int(parts[1])]).__name__
    inner = [p for p in parts[2:-1] if not p.isdigit()]
    return ".".join([layer, *inner])


# -- one model -----------------------------------------------------------------------------------


def check_model(case: Case, rows: Rows, timeout: float) -> None:
    """Build one model and write its eager and export rows. Float64 cases run with denormals
    flushed to zero: SiLU of large negative values gives float64 denormals, which made single
    runs of RT-DETR 50-200x slower (bnfold's eager fold 25-260 s; 35-85 s with them flushed); the
    original and the folded model run under the same setting, so the comparison is unchanged."""
    import torch

    flush = torch.set_flush_denormal(True) if case.double else False
    try:
        _check_model(case, rows, timeout)
    finally:
        if flush:
            torch.set_flush_denormal(False)


def _check_model(case: Case, rows: Rows, timeout: float) -> None:
    import torch

    import bnfold

    tol = TOL64 if case.double else TOL32
    timeout *= case.slow
    try:
        with time_limit(timeout, StageTimeout):
            model = build(case)
            x = example_input(case)
            ref = run(model, x)  # also fills the heads' anchor caches before any trace
    except StageTimeout:
        rows.write(case.name, f"not run: building and running took over {timeout:g} s")
        return
    except Exception as exc:  # noqa: BLE001 - an Ultralytics build failure is not bnfold's
        rows.write(case.name, f"not run: build failed: {describe(exc)}")
        return
    n_modules = len(batchnorms(model))
    network_seen = len(NETWORK_ATTEMPTS)

    try:
        with time_limit(timeout, StageTimeout):
            theirs = their_fuse(model, x, ref)
    except StageTimeout:
        theirs = f"fuse() took over {timeout:g} s"

    def bnfold_row(
        form: str, fold: Callable[[], tuple[Any, Any, dict[str, Any], list[str]]]
    ) -> bool:
        """Write the row of one form; True when it ran out of time."""
        case_name = f"{case.name} ({form})"
        extra: list[str] = []
        values: dict[str, Any] = {"theirs": theirs}
        if case.double:
            extra.append("float64")
        try:
            with time_limit(timeout, StageTimeout), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                folded_s, report, got, pre_notes = fold()
        except StageTimeout:
            what = "bnfold.fold" if form == "eager" else "torch.export and bnfold.fold"
            rows.write(case_name, f"not run: {what} took over {timeout:g} s", **values)
            return True
        except NotExported as exc:
            rows.write(case_name, f"not run: torch.export failed: {exc}", **values)
            return
        except bnfold.BnfoldError as exc:  # a refusal of the whole model, not a wrong fold
            rows.write(
                case_name,
                "ok",
                bn=n_modules,
                folded=0,
                kept=f"{type(exc).__name__} (whole model) {n_modules}",
                notes=f"bnfold refused the model: {describe(exc)}",
                **values,
            )
            return False
        except Exception as exc:  # noqa: BLE001 - bnfold crashing, or its result not running
            traceback.print_exc()
            rows.write(case_name, f"FAILED: {describe(exc)}", bn=n_modules, **values)
            return False
        summary = summarize(report)
        notes = extra + pre_notes + summary.pop("notes")
        if len(NETWORK_ATTEMPTS) > network_seen:
            notes.append("network refused: " + short(NETWORK_ATTEMPTS[network_seen:], 80))
        if summary["bn"] != n_modules:
            notes.insert(0, f"{n_modules} BatchNorm modules, {summary['bn']} in the report")
        status = "ok"
        try:
            err = rel_err(ref, got)
        except AssertionError as exc:
            err = None
            status = f"FAILED: {exc}"
        if err is not None and not err <= tol:
            status = f"FAILED: err {err:.2e} > {tol:g}"
        if form == "eager":
            summary["affine"] = None  # the eager frontend never folds arithmetic
        rows.write(
            case_name,
            status,
            err=err,
            fold_s=round(folded_s, 3),
            notes="; ".join(notes),
            **summary,
            **values,
        )
        return False

    def eager() -> tuple[float, Any, dict[str, Any], list[str]]:
        start = time.perf_counter()
        folded, report = bnfold.fold(model, (x,), return_report=True)
        took = time.perf_counter() - start
        return took, report, run(folded, x), []

    def export() -> tuple[float, Any, dict[str, Any], list[str]]:
        start = time.perf_counter()
        try:
            ep = torch.export.export(model, (x,))
            how = "export"
        except Exception as first:  # noqa: BLE001
            try:
                ep = torch.export.export(model, (x,), strict=True)
                how = "export(strict=True)"
            except Exception:  # noqa: BLE001
                raise NotExported(describe(first)) from first
        exported = time.perf_counter() - start
        start = time.perf_counter()
        folded, report = bnfold.fold(ep, return_report=True)
        took = time.perf_counter() - start
        return took, report, run(folded.module(), x), [f"{how} {exported:.1f} s"]

    if bnfold_row("eager", eager):
        model = build(case)  # interrupted mid-fold: export a model no trace has touched
        run(model, x)
    bnfold_row("export", export)


class NotExported(Exception):
    """torch.export could not export the model: not bnfold's doing."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m integration.ultralytics_client")
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to append rows to")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--only", help="comma-separated case names (for development)")
    parser.add_argument("--timeout", type=float, default=STAGE_TIMEOUT, help="seconds per stage")
    args = parser.parse_args(argv)

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    block_network()
    import torch
    import ultralytics

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(f"ultralytics {ultralytics.__version__}, torch {torch.__version__}", file=sys.stderr)

    cases = list(CASES)
    if args.only:
        wanted = {name.strip() for name in args.only.split(",")}
        cases = [c for c in cases if c.name in wanted]
    elif args.quick:
        cases = [c for c in cases if c.name in QUICK]
    rows = Rows(CLIENT, args.out)
    for case in cases:
        start = time.perf_counter()
        check_model(case, rows, args.timeout)
        print(f"  {case.name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    if NETWORK_ATTEMPTS:
        print(f"network access refused: {sorted(set(NETWORK_ATTEMPTS))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
