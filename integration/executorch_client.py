"""ExecuTorch: fold a ``torch.export`` program with bnfold, lower it, run the ``.pte``.

What is checked, and why: ExecuTorch lowers ``torch.export`` programs to ``.pte`` files, either
delegated to XNNPACK (whose own ``FuseBatchNormPass`` fuses conv/linear + BatchNorm inside the
delegate, and decomposes the rest into 1x1 depthwise convolutions) or for the portable kernels
(which run every BatchNorm as an op). bnfold claims its folded program lowers everywhere and runs
the same numbers with fewer ops. For small models defined here (conv + BN, Linear +
BatchNorm1d, a ResNet basic block with a projection shortcut, a MobileNetV2 inverted residual
with its depthwise conv, a grouped ``ConvTranspose2d(groups=3)`` + BN), in eval mode with random
non-trivial BatchNorm statistics, each case:

1. exports the model and folds the program: ``bnfold.fold(ep, return_report=True)``;
2. lowers the unfolded and the folded program both ways, ``to_edge_transform_and_lower`` with
   ``XnnpackPartitioner`` and without a partitioner (portable), then ``to_executorch()``;
3. runs each ``.pte`` with the ExecuTorch runtime and compares it with eager PyTorch;
4. counts the BatchNorm ops left outside delegates (the edge program's graph) and handed to
   XNNPACK (each delegate's ``original_module``; fused by its pass or decomposed), and the
   ``.pte`` sizes, unfolded against folded.

One row per (model, lowering). ``err`` is the folded ``.pte`` against eager; a failure of the
*unfolded* program (XNNPACK's ``FuseBatchNormPass`` on the grouped transposed conv) is
ExecuTorch's and goes to ``theirs``. Status is "FAILED" only when bnfold raises or its result is
wrong, "not run" when ExecuTorch cannot lower or run the folded program for its own reasons.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import CaseTimeout, time_limit
from .common import row as common_row

REQUIREMENTS: list[list[str]] = [
    ["torch==2.14.1"],
    ["executorch==1.5.1"],
    ["-e", ".[torch]"],
]

CLIENT = "ExecuTorch"
TOLERANCE = 1e-4  # relative, float32
CASE_SECONDS = 150  # per model: export, fold, four lowerings, eight runs
LOWERINGS = ("XNNPACK", "portable")
WRITTEN: set[str] = set()  # the cases of the rows written so far
DELEGATE_PLUMBING = {"executorch_call_delegate", "getitem"}  # not ops left outside


# --- models -----------------------------------------------------------------------------------


def make_models() -> dict[str, tuple[Callable[[], Any], tuple[int, ...], str]]:
    """Model factories by case name, with the input shape and a short note."""
    import torch
    from torch import nn

    class ConvBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 32, 3, padding=1)
            self.bn = nn.BatchNorm2d(32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.bn(self.conv(x)))

    class LinearBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(64, 128)
            self.bn = nn.BatchNorm1d(128)
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.bn(self.fc1(x))))

    class BasicBlock(nn.Module):
        """ResNet basic block, stride 2, with a 1x1 conv + BN projection shortcut."""

        def __init__(self, cin: int = 32, cout: int = 64) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + self.down(x))

    class InvertedResidual(nn.Module):
        """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, residual add."""

        def __init__(self, c: int = 32, expand: int = 6) -> None:
            super().__init__()
            h = c * expand
            self.block = nn.Sequential(
                nn.Conv2d(c, h, 1, bias=False),
                nn.BatchNorm2d(h),
                nn.ReLU6(),
                nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False),
                nn.BatchNorm2d(h),
                nn.ReLU6(),
                nn.Conv2d(h, c, 1, bias=False),
                nn.BatchNorm2d(c),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.block(x)

    class GroupedConvTransposeBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.deconv = nn.ConvTranspose2d(
                6, 6, 3, stride=2, padding=1, output_padding=1, groups=3
            )
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.deconv(x))

    return {
        "conv+BN": (ConvBN, (1, 3, 32, 32), "Conv2d(3,32,3) + BatchNorm2d + ReLU"),
        "Linear+BatchNorm1d": (LinearBN, (8, 64), "Linear(64,128) + BatchNorm1d + ReLU + Linear"),
        "ResNet basic block": (BasicBlock, (1, 32, 16, 16), "stride 2, projection shortcut"),
        "MobileNetV2 inverted residual": (
            InvertedResidual,
            (1, 32, 16, 16),
            "expand 6, depthwise 3x3, residual",
        ),
        "ConvTranspose2d(groups=3)+BN": (
            GroupedConvTransposeBN,
            (1, 6, 8, 8),
            "ConvTranspose2d(6,6,3,stride 2,groups 3) + BatchNorm2d",
        ),
    }


QUICK = ("conv+BN", "ConvTranspose2d(groups=3)+BN")


def randomize(model: Any, seed: int) -> None:
    """Random non-trivial BatchNorm statistics and affine parameters, as after training."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.25)
                m.weight.copy_(torch.randn(c, generator=gen) * 0.5 + 1.0)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)


# --- ExecuTorch ---------------------------------------------------------------------------------


@dataclass
class Lowered:
    """The outcome of lowering one program one way and running its ``.pte``."""

    error: str = ""  # the first line of the root error when lowering or running failed
    stage: str = ""  # "lower" or "run", where it failed
    bn_outside: int = 0
    bn_inside: int = 0
    bn_fused_by_xnnpack: int = 0  # of bn_inside: FuseBatchNormPass; the rest are decomposed
    delegates: int = 0
    ops_outside: collections.Counter[str] = field(default_factory=collections.Counter)
    pte_bytes: int = 0
    err: float | None = None  # max relative error of the .pte against eager


def reraise_timeout(exc: BaseException) -> None:
    """Raise the case's :class:`CaseTimeout` again when a library wrapped it in its own error."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, CaseTimeout):
            raise e
        seen.add(id(e))
        e = e.__cause__ or e.__context__


def root_message(exc: BaseException) -> str:
    """The first line of the innermost cause of ``exc``, with its type."""
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__ or exc.__context__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        exc = nxt
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def failing_pass(exc: BaseException) -> str:
    """The pass named by ExecuTorch's "An error occurred when running the 'X' pass", or ""."""
    e: BaseException | None = exc
    while e is not None:
        msg = str(e)
        marker = "when running the '"
        if marker in msg:
            return msg.split(marker, 1)[1].split("'", 1)[0]
        e = e.__cause__ or e.__context__
    return ""


def op_name(target: Any) -> str:
    """``convolution`` for ``aten.convolution.default`` (ATen, edge), ``getitem``, HOP names."""
    name = str(getattr(target, "__name__", target))
    parts = name.split(".")
    return parts[1] if len(parts) == 3 and parts[0] == "aten" else name


def is_bn_node(node: Any) -> bool:
    """An ATen/edge batch-norm call."""
    return node.op == "call_function" and "batch_norm" in str(node.target)


def rel_err(ref: list[Any], out: list[Any]) -> float:
    """``max|a-b| / max|a|`` over all outputs."""
    num = max(float((a.detach() - b.detach()).abs().max()) for a, b in zip(ref, out, strict=True))
    den = max(float(a.detach().abs().max()) for a in ref)
    return num / den if den else num


def lower_and_run(ep: Any, x: Any, ref: list[Any], lowering: str) -> Lowered:
    """Lower ``ep`` (XNNPACK or portable), count what is left, run the ``.pte``."""
    from executorch.backends.xnnpack._passes.fuse_batch_norm import FuseBatchNormPass
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.lowered_backend_module import get_lowered_backend_modules
    from executorch.runtime import Runtime

    res = Lowered()
    try:
        partitioner = [XnnpackPartitioner()] if lowering == "XNNPACK" else None
        edge = to_edge_transform_and_lower(ep, partitioner=partitioner)
        gm = edge.exported_program().graph_module
        for node in gm.graph.nodes:
            if node.op == "call_function":
                res.ops_outside[op_name(node.target)] += 1
        res.bn_outside = sum(1 for n in gm.graph.nodes if is_bn_node(n))
        producers = (exir_ops.edge.aten.convolution.default, exir_ops.edge.aten.linear.default)
        for lm in get_lowered_backend_modules(gm):
            res.delegates += 1
            sub = lm.original_module
            for bn in (n for n in sub.graph.nodes if is_bn_node(n)):
                res.bn_inside += 1
                prod = bn.args[0]
                try:
                    fused = (
                        prod.target in producers
                        and len(prod.users) == 1
                        and FuseBatchNormPass.can_fuse(prod, bn, sub)
                    )
                except Exception:  # noqa: BLE001 - a classification only
                    fused = False
                res.bn_fused_by_xnnpack += int(fused)
        program = edge.to_executorch()
        res.pte_bytes = len(program.buffer)
    except CaseTimeout:
        raise
    except Exception as exc:  # noqa: BLE001 - ExecuTorch's failures are data here
        reraise_timeout(exc)
        res.stage = "lower"
        where = failing_pass(exc)
        res.error = (f"in {where}: " if where else "") + root_message(exc)
        return res
    try:
        method = Runtime.get().load_program(program.buffer).load_method("forward")
        out = method.execute([x])
        res.err = rel_err(ref, list(out))
    except CaseTimeout:
        raise
    except Exception as exc:  # noqa: BLE001
        reraise_timeout(exc)
        res.stage = "run"
        res.error = root_message(exc)
    return res


# --- rows -------------------------------------------------------------------------------------


def kb(n: int) -> str:
    """A size in KB, one decimal."""
    return f"{n / 1024:.1f} KB"


def describe(low: Lowered, lowering: str) -> str:
    """BatchNorm ops left and the ``.pte`` size of one lowering, short."""
    if low.error:
        verb = "lowering" if low.stage == "lower" else "runtime"
        return f"{lowering} {verb} raises {low.error}"
    if lowering == "XNNPACK":
        inside = f"{low.bn_inside} inside"
        if low.bn_inside:
            decomposed = low.bn_inside - low.bn_fused_by_xnnpack
            parts = [f"{low.bn_fused_by_xnnpack} fused by XNNPACK"]
            if decomposed:
                parts.append(f"{decomposed} as depthwise conv")
            inside += f" ({', '.join(parts)})"
        text = f"{low.bn_outside} BN outside delegates, {inside}"
        rest = {op: n for op, n in low.ops_outside.items() if op not in DELEGATE_PLUMBING}
        if rest:
            text += ", also outside: " + ", ".join(f"{op} {n}" for op, n in sorted(rest.items()))
    else:
        text = f"{low.bn_outside} BN op" + ("" if low.bn_outside == 1 else "s")
    return f"{text}, .pte {kb(low.pte_bytes)}"


def theirs_text(unf: Lowered, fol: Lowered, lowering: str) -> str:
    """The ``theirs`` column: unfolded against folded."""
    text = f"unfolded: {describe(unf, lowering)}"
    if unf.err is not None and unf.err > TOLERANCE:
        text += f" (wrong: err {unf.err:.2g})"
    text += f"; folded: {describe(fol, lowering)}"
    if not unf.error and not fol.error and unf.pte_bytes:
        text += f" ({(fol.pte_bytes - unf.pte_bytes) / unf.pte_bytes:+.1%})"
    return text


def write_row(out: Path, row: dict[str, Any]) -> None:
    """Append one JSON row and flush."""
    base = common_row(CLIENT, "", "")
    base.update(row)
    WRITTEN.add(base["case"])
    with out.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(base) + "\n")
        fh.flush()
    print(json.dumps(base), file=sys.stderr, flush=True)


def run_case(name: str, out: Path, seed: int) -> None:
    """Export, fold, lower both ways, run; write one row per lowering."""
    import torch

    import bnfold

    factory, shape, note = make_models()[name]
    torch.manual_seed(seed)
    model = factory().eval()
    randomize(model, seed)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        ref = [model(x)]
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    rows = {low: {"case": f"{name} / {low}", "bn": n_bn, "notes": note} for low in LOWERINGS}

    try:
        ep = torch.export.export(model, (x,))
    except CaseTimeout:
        raise
    except Exception as exc:  # noqa: BLE001
        reraise_timeout(exc)
        for low in LOWERINGS:
            write_row(out, {**rows[low], "status": f"not run: export: {root_message(exc)}"})
        return
    try:
        t0 = time.perf_counter()
        folded, report = bnfold.fold(ep, return_report=True)
        fold_s = time.perf_counter() - t0
    except CaseTimeout:
        raise
    except Exception as exc:  # noqa: BLE001
        reraise_timeout(exc)
        traceback.print_exc()
        for low in LOWERINGS:
            status = f"FAILED: bnfold.fold raises {root_message(exc)}"
            write_row(out, {**rows[low], "status": status})
        return
    bns = report.batch_norms
    kept = collections.Counter(e.rule or "?" for e in bns if not e.folded)
    with torch.no_grad():
        ep_err = rel_err(ref, [folded.module()(x)])  # the folded program itself, in eager
    common = {
        "folded": sum(e.folded for e in bns),
        "kept": ", ".join(f"{rule} {n}" for rule, n in sorted(kept.items())),
        "affine": sum(e.folded for e in report.affines),
        "fold_s": round(fold_s, 3),
    }

    for low in LOWERINGS:
        unf = lower_and_run(ep, x, ref, low)
        fol = lower_and_run(folded, x, ref, low)
        row = {**rows[low], **common, "err": fol.err, "theirs": theirs_text(unf, fol, low)}
        if fol.error:
            if ep_err > TOLERANCE:
                row["status"] = f"FAILED: folded program wrong in eager (err {ep_err:.2g})"
            else:
                verb = "lower" if fol.stage == "lower" else "run"
                row["status"] = f"not run: ExecuTorch cannot {verb} the folded program: {fol.error}"
        elif fol.err is not None and fol.err > TOLERANCE:
            if ep_err <= TOLERANCE and unf.err is not None and unf.err > TOLERANCE:
                row["status"] = (
                    f"not run: ExecuTorch's {low} result is off unfolded too "
                    f"(unfolded {unf.err:.2g}, folded {fol.err:.2g}; folded program in eager "
                    f"{ep_err:.2g})"
                )
            else:
                row["status"] = f"FAILED: folded .pte vs eager err {fol.err:.2g}"
        else:
            row["status"] = "ok"
        if unf.err is not None:
            row["notes"] += f"; unfolded .pte err {unf.err:.1g}"
        elif unf.stage == "lower":
            row["notes"] += "; unfolded: the whole program fails to lower"
        write_row(out, row)


def main(argv: list[str] | None = None) -> int:
    """Run the cases; append rows to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="ROWS.jsonl to append to")
    parser.add_argument("--quick", action="store_true", help="conv+BN and the grouped ConvT")
    args = parser.parse_args(argv)

    names = list(make_models())
    if args.quick:
        names = [n for n in names if n in QUICK]
    try:
        import executorch.exir  # noqa: F401
        import executorch.runtime  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - an environment without a working ExecuTorch
        write_row(args.out, {"case": "all", "status": f"not run: import executorch: {exc}"})
        return 0
    for i, name in enumerate(names):
        start = time.perf_counter()
        print(f"[executorch] {name} ...", file=sys.stderr, flush=True)
        try:
            with time_limit(CASE_SECONDS):
                run_case(name, args.out, seed=100 + i)
        except CaseTimeout as exc:
            for low in LOWERINGS:
                if f"{name} / {low}" not in WRITTEN:
                    status = f"not run: time limit ({exc})"
                    write_row(args.out, {"case": f"{name} / {low}", "status": status})
        print(
            f"[executorch] {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
