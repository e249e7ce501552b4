"""Draw ``docs/benchmarks.png`` and write ``benchmarks/out/tables.md`` from the last results.

Reads the JSON files the other scripts leave in ``benchmarks/out/``; any that is missing is left
out. The figure has two panels: fold time against model size (the five models and the scaling
chains, log-log), and eager latency at batch 1 before and after folding, with the no-BatchNorm
floor. matplotlib is only needed here (``make bench`` installs it).

Run ``python -m benchmarks.plot``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from . import common

DOCS = common.HERE.parent / "docs"


def _load(name: str) -> dict[str, Any] | None:
    path = common.OUT / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _parameters() -> dict[str, int]:
    import torch

    from . import models

    torch.manual_seed(0)
    return {
        n: sum(p.numel() for p in build(True).parameters()) for n, build in models.MODELS.items()
    }


def figure(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fold, scaling, latency = _load("fold_torch"), _load("scaling"), _load("latency")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    if fold is not None:
        sizes = _parameters()
        names = [n for n in fold["results"] if n in sizes]
        order = sorted(names, key=lambda n: sizes[n])
        for method, style in (
            ("bnfold inplace", "o-"),
            ("bnfold", "s-"),
            ("fx fuse", "^--"),
            ("fx fuse inplace", "v--"),
            ("floor", "k:"),
        ):
            xs, ys = [], []
            for n in order:
                r = fold["results"][n].get(method, {})
                if "times" in r:
                    xs.append(sizes[n] / 1e6)
                    ys.append(statistics.median(r["times"]) * 1e3)
            if xs:
                left.plot(xs, ys, style, label=method)
        for n in order:
            left.annotate(n, (sizes[n] / 1e6, 4), rotation=60, fontsize=7, ha="center")
        left.set_xscale("log")
        left.set_yscale("log")
        left.set_xlabel("parameters (millions)")
        left.set_ylabel("fold time, median (ms)")
        left.set_title("Fold time, PyTorch eager")
        left.legend(fontsize=8)
        left.grid(True, which="both", alpha=0.3)
    if scaling is not None:
        inset = left.inset_axes([0.62, 0.08, 0.35, 0.3])
        for form, by_n in scaling["results"].items():
            pts = [
                (int(n), statistics.median(r["times"]) / int(n) * 1e6)
                for n, r in by_n.items()
                if "times" in r
            ]
            if pts:
                inset.plot(*zip(*sorted(pts), strict=True), "o-", ms=3, label=form)
        inset.set_xscale("log")
        inset.set_ylim(bottom=0)
        inset.set_title("µs per conv/BN block vs N", fontsize=7)
        inset.tick_params(labelsize=6)
    if latency is not None and "eager" in latency["results"]:
        rows = latency["results"]["eager"]
        names = [n for n, r in rows.items() if "times" in r.get("1x224", {})]
        width = 0.27
        for i, variant in enumerate(("unfolded", "folded", "floor")):
            ys = [statistics.median(rows[n]["1x224"]["times"][variant]) * 1e3 for n in names]
            xs = [j + (i - 1) * width for j in range(len(names))]
            label = {"floor": "no-BatchNorm floor"}.get(variant, variant)
            right.bar(xs, ys, width, label=label)
        right.set_xticks(range(len(names)), names, fontsize=8)
        right.set_ylabel("latency, median (ms)")
        right.set_title("Eager inference, batch 1 at 224×224")
        right.legend(fontsize=8)
        right.grid(True, axis="y", alpha=0.3)
    machine = (fold or latency or scaling or {}).get("machine", "")
    fig.suptitle(f"bnfold benchmarks — {machine}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def tables() -> str:
    """Every table of the last results, as Markdown."""
    from . import fold_onnx, fold_torch, latency, scaling

    parts = []
    for name, module in (
        ("fold_torch", fold_torch),
        ("fold_onnx", fold_onnx),
        ("scaling", scaling),
        ("latency", latency),
    ):
        data = _load(name)
        if data is not None:
            parts.append(f"## {name} ({data['machine']})\n\n{module.report(data['results'])}\n")
    return "\n".join(parts)


def main() -> None:
    figure(DOCS / "benchmarks.png")
    (common.OUT / "tables.md").write_text(tables())
    print(f"wrote {DOCS / 'benchmarks.png'} and {common.OUT / 'tables.md'}")


if __name__ == "__main__":
    main()
