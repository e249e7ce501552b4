"""Draw ``docs/benchmarks.png`` and refresh the tables in ``docs/benchmarks.md`` from the last
results (between ``<!-- begin:NAME -->`` and ``<!-- end:NAME -->`` markers; the prose around
them is left alone), and write every table to ``benchmarks/out/tables.md``.

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
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 5))
    if fold is not None:
        sizes = _parameters()
        names = [n for n in fold["results"] if n in sizes]
        for method, marker in (
            ("bnfold inplace", "o"),
            ("bnfold", "s"),
            ("fx fuse", "^"),
            ("fx fuse inplace", "v"),
            ("deepcopy", "x"),
            ("floor", "_"),
        ):
            xs, ys = [], []
            for n in names:
                r = fold["results"][n].get(method, {})
                if "times" in r:
                    xs.append(sizes[n] / 1e6)
                    ys.append(statistics.median(r["times"]) * 1e3)
            if xs:
                left.scatter(xs, ys, marker=marker, s=45, label=method)
        for n in names:
            left.annotate(
                n,
                (sizes[n] / 1e6, left.get_ylim()[0]),
                fontsize=7,
                rotation=90,
                ha="center",
                va="bottom",
                alpha=0.6,
            )
        left.set_xscale("log")
        left.set_yscale("log")
        left.set_xlabel("parameters (millions)")
        left.set_ylabel("fold time, median (ms)")
        left.set_title("Fold time by model, PyTorch eager")
        left.legend(fontsize=8)
        left.grid(True, which="both", alpha=0.3)
    if scaling is not None:
        for form, by_n in scaling["results"].items():
            pts = [
                (int(n), statistics.median(r["times"]) / int(n) * 1e6)
                for n, r in by_n.items()
                if "times" in r
            ]
            if pts:
                middle.plot(*zip(*sorted(pts), strict=True), "o-", label=form)
        middle.set_xscale("log")
        middle.set_ylim(bottom=0)
        middle.set_xlabel("conv/BatchNorm blocks N")
        middle.set_ylabel("fold time per block (µs)")
        middle.set_title("Scaling: flat = linear")
        middle.legend(fontsize=8)
        middle.grid(True, which="both", alpha=0.3)
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
    fig.savefig(path, dpi=100)


def _tables() -> dict[str, str]:
    """Script name -> its tables of the last results, as Markdown."""
    from . import fold_onnx, fold_torch, latency, scaling

    found = {}
    for name, module in (
        ("fold_torch", fold_torch),
        ("fold_onnx", fold_onnx),
        ("scaling", scaling),
        ("latency", latency),
    ):
        data = _load(name)
        if data is not None:
            found[name] = f"Measured on {data['machine']}.\n\n{module.report(data['results'])}"
    return found


def update_docs(path: Path, tables: dict[str, str]) -> list[str]:
    """Replace each marked table block of ``path``; returns the names replaced."""
    text = path.read_text()
    done = []
    for name, table in tables.items():
        begin, end = f"<!-- begin:{name} -->", f"<!-- end:{name} -->"
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            text = f"{head}{begin}\n{table}\n{end}{tail}"
            done.append(name)
    path.write_text(text)
    return done


def main() -> None:
    figure(DOCS / "benchmarks.png")
    tables = _tables()
    common.OUT.mkdir(parents=True, exist_ok=True)
    (common.OUT / "tables.md").write_text("\n\n".join(tables.values()))
    doc = DOCS / "benchmarks.md"
    updated = update_docs(doc, tables) if doc.exists() else []
    print(f"wrote {DOCS / 'benchmarks.png'}, {common.OUT / 'tables.md'}; tables in {doc.name}: ")
    print(", ".join(updated) or "none")


if __name__ == "__main__":
    main()
