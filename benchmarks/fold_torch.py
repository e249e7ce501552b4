"""Fold time and peak memory on PyTorch eager models: bnfold against the alternatives.

Per model, each method runs in its own process: one warm-up call, then ``--runs`` measured calls
(median reported), each on a fresh model where the method changes it. The methods:

- ``bnfold``: ``bnfold.fold(model)``, the default: a new model, the input untouched;
- ``bnfold inplace``: ``bnfold.fold(model, inplace=True)``;
- ``fx fuse``: ``torch.fx.experimental.optimization.fuse(model)`` as documented (it copies the
  model first), and ``fx fuse inplace`` (``inplace=True``);
- ``deepcopy``: a bare ``copy.deepcopy(model)``: what any copying fold pays at least;
- ``floor``: the least a fold can do: one ``torch.fx.symbolic_trace`` to find the data flow,
  then one in-place multiply of each folded weight (no checks, no bias, no report).

Each result is checked once, outside the clock: the BatchNorm calls left per forward, and the
largest error against the original model on a random input, relative to the output's size.

Run ``python -m benchmarks.fold_torch`` (``--models``, ``--runs``).
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

from . import common

METHODS = ["bnfold", "bnfold inplace", "fx fuse", "fx fuse inplace", "deepcopy", "floor"]
INPLACE = {"bnfold inplace", "fx fuse inplace", "floor"}


def floor_fold(model: Any) -> Any:
    """One fx trace, then each Conv -> BatchNorm weight scaled in place: the fold's floor."""
    import torch
    from torch import nn

    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    with torch.no_grad():
        for node in graph.nodes:
            bn = modules.get(node.target) if node.op == "call_module" else None
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                continue
            prev = node.args[0]
            conv = modules.get(prev.target) if prev.op == "call_module" else None
            if isinstance(conv, nn.Conv2d) and len(prev.users) == 1:
                s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                conv.weight.mul_(s.reshape(-1, 1, 1, 1))
    return model


def _method(name: str) -> Any:
    from torch.fx.experimental.optimization import fuse

    import bnfold

    return {
        "bnfold": bnfold.fold,
        "bnfold inplace": lambda m: bnfold.fold(m, inplace=True),
        "fx fuse": fuse,
        "fx fuse inplace": lambda m: fuse(m, inplace=True),
        "deepcopy": copy.deepcopy,
        "floor": floor_fold,
    }[name]


def check(original: Any, result: Any) -> dict[str, Any]:
    """BatchNorm calls per forward left in ``result``, and its error against ``original``."""
    import torch
    from torch import nn

    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = original(x)
        handles = [
            m.register_forward_pre_hook(count)
            for m in result.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        got = result(x)
        for h in handles:
            h.remove()
    err = float((got - want).abs().max() / want.abs().max())
    return {"bn_calls": calls[0], "err": err}


def work(job: dict[str, Any]) -> dict[str, Any]:
    """A worker: ``time`` runs every method on one model in interleaved rounds (after a warm-up
    round), so that the machine's slow and fast moments fall on all of them alike; ``memory``
    runs one method once after a warm-up, alone in its process, and checks its result."""
    import torch

    from . import models

    torch.set_num_threads(2)
    model = models.build(job["model"])

    def fresh(method: str) -> Any:
        return copy.deepcopy(model) if method in INPLACE else model

    if job["kind"] == "time":
        methods = job["methods"]
        times: dict[str, list[float]] = {m: [] for m in methods}
        for round_ in range(job["runs"] + 1):
            for m in methods:
                arg = fresh(m)
                _, seconds, _ = common.measure(lambda m=m, arg=arg: _method(m)(arg))
                if round_:  # round 0 warms up
                    times[m].append(seconds)
                del arg
        return {"times": times}
    method = job["method"]
    reference = copy.deepcopy(model) if method in INPLACE else model
    _method(method)(fresh(method))
    arg = fresh(method)
    result, _, peak = common.measure(lambda: _method(method)(arg))
    # deepcopy and the floor do not fold (the floor leaves the BatchNorms in): nothing to check
    checked = {} if method in ("deepcopy", "floor") else check(reference, result)
    return {"peak": peak, "bn_before": check(reference, reference)["bn_calls"], **checked}


def run(model_names: list[str], runs: int, methods: list[str] = METHODS) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in model_names:
        timed = common.run_worker(
            "fold_torch", {"kind": "time", "model": name, "methods": methods, "runs": runs}
        )
        results[name] = {}
        for method in methods:
            r = common.run_worker("fold_torch", {"kind": "memory", "model": name, "method": method})
            if "error" in timed or "error" in r:
                r = {"error": timed.get("error") or r["error"]}
                print(f"{name} / {method}: {r['error']}")
            else:
                r["times"] = timed["times"][method]
            results[name][method] = r
    return results


def report(results: dict[str, Any]) -> str:
    """The per-model tables and the targets table, as Markdown."""
    out = []
    targets = []
    for name, by_method in results.items():
        ms = {m: common.median_ms(r["times"]) for m, r in by_method.items() if "times" in r}
        base = ms.get("bnfold inplace")
        rows = []
        for m, r in by_method.items():
            if "times" not in r:
                rows.append([m, "failed", "", "", "", "", ""])
                continue
            left = f"{r['bn_calls']} of {r['bn_before']}" if "bn_calls" in r else "–"
            err = f"{r['err']:.1e}" if "err" in r else "–"
            ratio = ms[m] / base if base else None
            lo, hi = min(r["times"]) * 1e3, max(r["times"]) * 1e3
            rows.append(
                [
                    m,
                    common.fmt_ms(ms[m]),
                    f"{common.fmt_ms(lo)}–{common.fmt_ms(hi)}",
                    common.fmt_ratio(ratio),
                    common.fmt_mib(r["peak"]),
                    left,
                    err,
                ]
            )
        out.append(f"**{name}**\n")
        out.append(
            common.table(
                [
                    "method",
                    "median ms",
                    "range ms",
                    "÷ bnfold inplace",
                    "peak MiB",
                    "BN calls left",
                    "max rel err",
                ],
                rows,
                right=[1, 2, 3, 4, 5, 6],
            )
        )
        out.append("")
        if {"bnfold", "bnfold inplace", "floor", "deepcopy"} <= ms.keys():
            targets.append(
                [
                    name,
                    f"{ms['bnfold inplace'] / ms['floor']:.2f}× (≤ 1.5)",
                    f"{ms['bnfold'] / (ms['deepcopy'] + ms['floor']):.2f}× (≤ 1.3)",
                    f"{ms['fx fuse'] / ms['bnfold inplace']:.1f}×" if "fx fuse" in ms else "–",
                    f"{ms['fx fuse inplace'] / ms['bnfold inplace']:.1f}×"
                    if "fx fuse inplace" in ms
                    else "–",
                ]
            )
    out.append("**Targets** (medians of the same run)\n")
    out.append(
        common.table(
            [
                "model",
                "inplace ÷ floor",
                "default ÷ (deepcopy + floor)",
                "fx fuse ÷ bnfold inplace",
                "fx fuse inplace ÷ bnfold inplace",
            ],
            targets,
            right=[1, 2, 3, 4],
        )
    )
    out.append(
        "\nTargets: in-place ≤ 1.5× the floor; default ≤ 1.3× (deepcopy + floor); bnfold in-place "
        "≥ 3× faster than fx fuse on resnet50 and ≥ 10× on vgg11_bn."
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    from . import models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(models.MODELS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    results = run(args.models.split(","), args.runs, args.methods.split(","))
    common.save("fold_torch", {"machine": common.machine(), "runs": args.runs, "results": results})
    print(f"## Fold time, PyTorch eager ({common.machine()})\n")
    print(report(results))


if __name__ == "__main__" and not common.worker_main(work):
    main()
