"""timm integration client: fold the BatchNorms of real timm models, eager and exported.

timm's convolutional families wrap BatchNorm in their own classes (``BatchNormAct2d``, a
BatchNorm2d subclass whose forward adds an activation; ``FrozenBatchNorm2d``), pad convolutions
at run time (``Conv2dSame`` in the ``tf_`` ports), and ship their own inference rewrite,
``timm.utils.model.reparameterize_model``, for RepVGG/MobileOne-style blocks. This client builds
a dozen families offline (``pretrained=False``), gives every BatchNorm-like module random
non-trivial statistics with a fixed seed, and for each model checks:

1. ``bnfold.fold`` on the eager module: BatchNorms folded, kept by rule, error vs the original;
2. ``bnfold.fold`` on ``torch.export.export(model)``: the same, plus affine chains folded;
3. timm's ``reparameterize_model``: BatchNorms it leaves and its error, and how many of those
   bnfold then folds.

The error of a folded model is measured here, not by ``bnfold.verify``: ``max|a-b| / max|a|``
over the outputs, in float64, on the example input and on a second input bnfold never saw. A
fold with error above 1e-4 (float32), bnfold raising, or the original model changed by the
folds is a FAILED row; a model timm cannot build or torch cannot export is "not run". Run
inside ``.integration/timm/``::

    .integration/timm/bin/python -m integration.timm_client --out ROWS.jsonl [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import row as common_row
from .common import time_limit

REQUIREMENTS: list[list[str]] = [
    ["torch==2.14.1", "torchvision==0.29.1"],
    ["timm==1.0.31"],
    ["-e", ".[torch]"],
]

CLIENT = "timm"
TOLERANCE = 1e-4  # max relative error allowed for a float32 fold
CASE_SECONDS = 120  # time limit of one model's three checks
SIZE = 160  # input height and width

# (timm model name, what it covers); the first three are the --quick set.
MODELS: list[tuple[str, str]] = [
    ("resnet18", "plain BatchNorm2d"),
    ("repvgg_a0", "RepVGG blocks, BatchNormAct2d"),
    ("tf_efficientnet_b0", "Conv2dSame (padding computed in forward)"),
    ("efficientnet_b0", "BatchNormAct2d, squeeze-excite"),
    ("mobilenetv3_small_050", "BatchNormAct2d, hard-swish"),
    ("mobileone_s0", "MobileOne blocks"),
    ("mixnet_s", "mixed-kernel depthwise convs"),
    ("ghostnet_100", "ghost modules, BatchNorm2d and BatchNormAct2d"),
    ("regnetx_002", "RegNet"),
    ("dpn68", "dual-path: BatchNormAct2d before the conv (pre-activation)"),
    ("hrnet_w18_small", "multi-branch fuse layers"),
    ("cspdarknet53", "CSP stages"),
    ("densenet121", "pre-activation dense blocks"),
    ("convnext_atto", "no BatchNorm: a control"),
    ("resnet18+frozen", "FrozenBatchNorm2d (timm.layers.freeze_batch_norm_2d)"),
    ("efficientnet_b0+frozen", "FrozenBatchNormAct2d (timm.layers.freeze_batch_norm_2d)"),
]
QUICK = ("resnet18", "repvgg_a0", "tf_efficientnet_b0")


class CaseTimeout(BaseException):
    """Raised by the alarm when one model's checks take longer than ``CASE_SECONDS``.

    A ``BaseException``, so that the ``except Exception`` around each step lets it through.
    """


_in_fold = [False]  # whether bnfold.fold is running (a time limit hit there is bnfold's)


def is_bn_like(module: Any) -> bool:
    """A torch BatchNorm (and subclasses: timm's BatchNormAct2d) or a frozen look-alike."""
    import torch

    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        return True
    return "BatchNorm" in type(module).__name__ and hasattr(module, "running_var")


def count_bn(model: Any) -> int:
    """BatchNorm-like modules in ``model``."""
    return sum(1 for m in model.modules() if is_bn_like(m))


def randomize_bn(model: Any, seed: int) -> None:
    """Give every BatchNorm-like module random non-trivial statistics and affine parameters."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not is_bn_like(m):
                continue
            c = m.running_var.numel()
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)


def build(name: str) -> Any:
    """Build ``name`` offline in eval mode; ``+frozen`` freezes its BatchNorms timm's way."""
    import timm
    import torch
    from timm.layers import freeze_batch_norm_2d

    base, _, variant = name.partition("+")
    seed = sum(map(ord, name))
    torch.manual_seed(seed)  # timm initialises the weights from torch's global generator
    model = timm.create_model(base, pretrained=False).eval()
    if variant == "frozen":
        model = freeze_batch_norm_2d(model).eval()
    randomize_bn(model, seed=seed)
    return model


def tensors(out: Any) -> list[Any]:
    """The tensors of a model output (tensor, tuple, list or dict), in order."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in tensors(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in tensors(v)]
    return []


def max_rel(ref: Any, got: Any) -> float:
    """``max|a-b| / max|a|`` over the outputs, in float64 (inf on a shape or count mismatch)."""
    a_list, b_list = tensors(ref), tensors(got)
    if not a_list or len(a_list) != len(b_list):
        return float("inf")
    worst = 0.0
    for a, b in zip(a_list, b_list, strict=True):
        if a.shape != b.shape:
            return float("inf")
        a64, b64 = a.detach().double(), b.detach().double()
        diff = (a64 - b64).abs().max().item()
        scale = a64.abs().max().item()
        if diff != diff:  # NaN
            return float("inf")
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def error(refs: list[Any], candidate: Callable[[Any], Any], xs: list[Any]) -> float:
    """Worst relative error of ``candidate`` over the inputs ``xs`` vs the outputs ``refs``."""
    import torch

    with torch.no_grad():
        return max(max_rel(ref, candidate(x)) for ref, x in zip(refs, xs, strict=True))


def kept_summary(entries: list[Any]) -> tuple[str, list[tuple[str, str]]]:
    """``"rule n, rule m"`` for the skipped entries, and their distinct (rule, reason) pairs."""
    skipped = [e for e in entries if e.action != "folded"]
    counts = Counter(str(e.rule) for e in skipped)
    reasons = sorted({(str(e.rule), reason_pattern(e)) for e in skipped})
    return ", ".join(f"{r} {n}" for r, n in counts.most_common()), reasons


def reason_pattern(entry: Any) -> str:
    """An entry's reason with the names in it replaced, so that equal reasons group."""
    text = entry.reason
    for name, mark in ((entry.bn, "<bn>"), (entry.target, "<producer>")):
        if name:
            text = text.replace(name, mark)
    text = re.sub(r"\b(module|node|modules|nodes) [\w.@]+", r"\1 <name>", text)
    text = re.sub(r"\b(\w+) \(\1(?:_\d+)?\)", r"\1", text)  # "cat (cat_12)" -> "cat"
    return re.sub(r"\b[A-Za-z_]\w*(?:\.\w+)*\.\d+(?:\.\w+)*", "<path>", text)


def short(text: str, limit: int = 160) -> str:
    """One line of at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def exc_text(exc: BaseException) -> str:
    """``Type: message``, short."""
    return short(f"{type(exc).__name__}: {exc}")


def fold_measured(obj: Any, args: tuple[Any, ...] | None) -> tuple[Any, Any, float, list[str]]:
    """``bnfold.fold(obj, args, return_report=True)``: result, report, seconds, warnings."""
    import bnfold

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        _in_fold[0] = True
        try:
            if args is None:
                folded, report = bnfold.fold(obj, return_report=True)
            else:
                folded, report = bnfold.fold(obj, args, return_report=True)
        finally:
            _in_fold[0] = False
        seconds = time.perf_counter() - start
    # bnfold warns with the caller's frame: this file, or bnfold's own when it warns from within
    ours = [w for w in caught if w.filename == __file__ or "bnfold" in w.filename]
    texts = sorted({short(str(w.message), 120) for w in ours})
    return folded, report, seconds, texts


def fold_status(exc: BaseException) -> str:
    """Status of a row whose ``bnfold.fold`` raised."""
    import bnfold

    kind = "refused" if isinstance(exc, bnfold.BnfoldError) else "crashed"
    return f"FAILED: bnfold {kind}: {exc_text(exc)}"


def reparam_check(
    model: Any, xs: list[Any], refs: list[Any], n_bn: int, eager_folded: int | None
) -> str:
    """timm's ``reparameterize_model``: BatchNorms left, its error, what bnfold folds after.

    ``reparameterize_model`` rewrites only modules with a ``fuse``, ``reparameterize`` or
    ``switch_to_deploy`` method; a model without any comes back as a plain copy, and bnfold's
    eager count (``eager_folded``) stands for "bnfold after" instead of folding it twice.
    """
    from timm.utils.model import reparameterize_model

    hooks = ("fuse", "reparameterize", "switch_to_deploy")
    rewrites = any(hasattr(m, h) for m in list(model.modules())[1:] for h in hooks)

    try:
        rep = reparameterize_model(copy.deepcopy(model)).eval()
    except Exception as exc:  # timm's own failure, reported as theirs
        return f"reparameterize_model raises {exc_text(exc)}"
    left = count_bn(rep)
    err = error(refs, rep, xs)
    text = f"reparameterize_model: {left} BN left of {n_bn} (err {err:.1e})"
    if left and not rewrites and eager_folded is not None:
        text += f"; nothing to rewrite, bnfold after: {eager_folded} of {left}"
    elif left:
        try:
            _, report, _, _ = fold_measured(rep, (xs[0],))
            done = sum(1 for e in report.batch_norms if e.action == "folded")
            text += f"; bnfold after: {done} of {left}"
        except Exception as exc:
            text += f"; bnfold after raises {exc_text(exc)}"
    return text


def row(case: str, status: str, **fields: Any) -> dict[str, Any]:
    """One output row with every key of the contract."""
    return common_row(CLIENT, case, status, **fields)


def check_model(
    name: str,
    what: str,
    reasons: dict[tuple[str, str], list[str]],
    emit: Callable[[dict[str, Any]], None],
) -> None:
    """Emit the eager and export rows of one model; ``reasons`` collects kept (rule, reason)."""
    import torch

    eager_case, export_case = f"{name} (eager)", f"{name} (export)"
    try:
        model = build(name)
        gen = torch.Generator().manual_seed(1)
        xs = [torch.randn(1, 3, SIZE, SIZE, generator=gen) for _ in range(2)]
        with torch.no_grad():
            refs = [model(x) for x in xs]
    except Exception as exc:
        why = f"not run: timm cannot build it: {exc_text(exc)}"
        emit(row(eager_case, why))
        emit(row(export_case, why))
        return
    n_bn = count_bn(model)
    args = (xs[0],)
    # 1. eager
    try:
        folded, report, secs, warned = fold_measured(model, args)
    except Exception as exc:
        theirs = reparam_check(model, xs, refs, n_bn, None)
        emit(row(eager_case, fold_status(exc), bn=n_bn, theirs=theirs, notes=what))
    else:
        err = error(refs, folded, xs)
        kept, pairs = kept_summary(report.batch_norms)
        for pair in pairs:
            reasons.setdefault(pair, []).append(eager_case)
        done = sum(1 for e in report.batch_norms if e.action == "folded")
        theirs = reparam_check(model, xs, refs, n_bn, done)
        notes = [what]
        if len(report.batch_norms) != n_bn:
            listed = {e.bn for e in report.batch_norms}
            unlisted = Counter(
                type(m).__name__
                for n, m in model.named_modules()
                if is_bn_like(m) and n not in listed
            )
            notes.append(
                "not in the report: " + ", ".join(f"{n} {k}" for k, n in unlisted.most_common())
            )
        left = count_bn(folded)
        if left != n_bn - done:
            notes.append(f"{left} BN modules left in the folded model")
        notes += [f"note: {short(n, 100)}" for n in report.notes] + warned
        status = "ok" if err <= TOLERANCE else f"FAILED: error {err:.2e} > {TOLERANCE:g}"
        emit(
            row(
                eager_case,
                status,
                bn=n_bn,
                folded=done,
                kept=kept,
                err=err,
                fold_s=round(secs, 3),
                theirs=theirs,
                notes="; ".join(notes),
            )
        )

    # 2. torch.export
    try:
        start = time.perf_counter()
        program = torch.export.export(model, args)
        export_s = time.perf_counter() - start
    except Exception as exc:
        emit(row(export_case, f"not run: torch.export fails: {exc_text(exc)}", bn=n_bn))
        return
    try:
        folded_ep, report, secs, warned = fold_measured(program, None)
    except Exception as exc:
        emit(row(export_case, fold_status(exc), bn=n_bn))
        return
    err = error(refs, folded_ep.module(), xs)
    kept, pairs = kept_summary(report.batch_norms + report.affines)
    for pair in pairs:
        reasons.setdefault(pair, []).append(export_case)
    done = sum(1 for e in report.batch_norms if e.action == "folded")
    affine = sum(1 for e in report.affines if e.action == "folded")
    notes = [f"export {export_s:.1f} s"]
    if affine:
        ops = Counter(e.bn_type for e in report.affines if e.action == "folded")
        notes.append("affine: " + ", ".join(f"{k} {n}" for k, n in ops.most_common()))
    if len(report.batch_norms) != n_bn:
        notes.append(f"{len(report.batch_norms)} batch_norm ops in the program")
    notes += [f"note: {short(n, 100)}" for n in report.notes] + warned
    status = "ok" if err <= TOLERANCE else f"FAILED: error {err:.2e} > {TOLERANCE:g}"
    moved = error(refs[:1], model, xs[:1])  # the original after both folds: must be untouched
    if moved != 0.0:
        status = f"FAILED: the original model changed (rel {moved:.1e})"
    emit(
        row(
            export_case,
            status,
            bn=n_bn,
            folded=done,
            kept=kept,
            affine=affine,
            err=err,
            fold_s=round(secs, 3),
            notes="; ".join(notes),
        )
    )


def main(argv: list[str] | None = None) -> int:
    """Run the models, append one JSON row per case to ``--out``, print the kept reasons."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="JSON-lines file to append to")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--models", help="comma-separated subset of the model names")
    parser.add_argument(
        "--case-seconds", type=float, default=CASE_SECONDS, help="time limit of one model"
    )
    opts = parser.parse_args(argv)

    import timm
    import torch

    print(f"timm {timm.__version__}, torch {torch.__version__}", file=sys.stderr, flush=True)
    models = MODELS
    if opts.quick:
        models = [m for m in MODELS if m[0] in QUICK]
    if opts.models:
        wanted = opts.models.split(",")
        models = [m for m in MODELS if m[0] in wanted]
    reasons: dict[tuple[str, str], list[str]] = {}
    statuses: list[str] = []  # of the current model's rows
    with opts.out.open("a", encoding="utf-8") as out:

        def emit(r: dict[str, Any]) -> None:
            out.write(json.dumps(r) + "\n")
            out.flush()
            statuses.append(r["status"])

        for name, what in models:
            start = time.perf_counter()
            statuses.clear()
            try:
                with time_limit(opts.case_seconds, CaseTimeout):
                    check_model(name, what, reasons, emit)
            except CaseTimeout as exc:
                form = "export" if statuses else "eager"
                if _in_fold[0]:
                    emit(row(f"{name} ({form})", f"FAILED: bnfold.fold still running, {exc}"))
                else:
                    emit(row(f"{name} ({form})", f"not run: time limit: {exc}"))
                _in_fold[0] = False
            took = time.perf_counter() - start
            print(f"{name}: {took:.1f} s, {statuses}", file=sys.stderr, flush=True)
    for (rule, reason), cases in sorted(reasons.items()):
        print(f"kept [{rule}] {reason}\n    in {', '.join(sorted(set(cases)))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
