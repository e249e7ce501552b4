"""How fold time grows with the model: N blocks of (3x3 Conv, BatchNorm, ReLU), N = 100 to 10,000.

The blocks are 8 channels wide, so the weights are tiny and the time is the per-block
bookkeeping: a fold that is linear in the model shows the same time per block at every N.
Forms, each in a process of its own per N:

- ``eager inplace`` / ``eager copy``: ``bnfold.fold`` on the ``nn.Sequential``;
- ``fx fuse inplace``: ``torch.fx.experimental.optimization.fuse(model, inplace=True)``, for
  comparison (not run by default: ``--forms`` adds it);
- ``floor``: one ``torch.fx.symbolic_trace`` plus one in-place multiply per weight;
- ``export``: ``bnfold.fold`` on the ``torch.export`` program;
- ``onnx``: ``bnfold.fold`` on an ONNX ``ModelProto`` of the same network.

At N = 10,000 only ``eager inplace`` and ``onnx`` run (see ``LIMITS``: exporting
10,000 blocks takes torch.export itself several minutes, and the others would take the run past
its time budget). Run ``python -m benchmarks.scaling`` (``--sizes``, ``--forms``).
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

from . import common

FORMS = ["eager inplace", "eager copy", "floor", "export", "onnx"]
SIZES = [100, 1000, 10000]
# Largest N per form, to keep `make bench` within ten minutes (--all lifts them): exporting
# 1,000 blocks takes torch.export itself 20 s (10,000: minutes); the copying fold at 10,000 is
# mostly deepcopy (15-20 s); the floor is the reference, measured where the others are.
LIMITS = {"export": 100, "eager copy": 1000, "fx fuse inplace": 1000, "floor": 1000}
CHANNELS = 8


def runs_for(n: int) -> int:
    """Measured runs per size: the median of 5 where that is cheap, fewer at the top."""
    return 5 if n <= 100 else 3 if n <= 1000 else 1


def onnx_chain(blocks: int, seed: int = 0) -> Any:
    """The scaling network as an ONNX model (Conv, BatchNormalization, Relu per block)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c = CHANNELS
    nodes, inits = [], []
    x = "input"
    for i in range(blocks):
        w = rng.standard_normal((c, c, 3, 3), dtype=np.float32) * 0.1
        stats = {
            "scale": rng.uniform(0.5, 1.5, c),
            "bias": rng.normal(0, 0.2, c),
            "mean": rng.normal(0, 0.5, c),
            "var": np.exp(rng.uniform(-1.386, 1.386, c)),
        }
        inits.append(numpy_helper.from_array(w, f"conv{i}.weight"))
        for k, v in stats.items():
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"bn{i}.{k}"))
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.weight"], [f"c{i}"], pads=[1] * 4))
        names = [f"c{i}", *(f"bn{i}.{k}" for k in stats)]
        nodes.append(helper.make_node("BatchNormalization", names, [f"b{i}"]))
        x = f"y{i}" if i < blocks - 1 else "output"
        nodes.append(helper.make_node("Relu", [f"b{i}"], [x]))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, c, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, c, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _setup(form: str, n: int) -> tuple[Any, Any]:
    """(fold call, fresh-argument maker) for ``form`` on an ``n``-block network."""
    import torch

    import bnfold

    from . import models
    from .fold_torch import floor_fold

    if form == "onnx":
        model: Any = onnx_chain(n)
        return bnfold.fold, lambda: model  # the fold copies
    model = models.with_statistics(models.chain(n, CHANNELS))
    if form == "export":
        with torch.no_grad():
            model = torch.export.export(model, (torch.randn(1, CHANNELS, 8, 8),))
    from torch.fx.experimental.optimization import fuse

    call = {
        "eager inplace": lambda m: bnfold.fold(m, inplace=True),
        "eager copy": bnfold.fold,
        "fx fuse inplace": lambda m: fuse(m, inplace=True),
        "floor": floor_fold,
        "export": bnfold.fold,
    }[form]
    if form in ("eager inplace", "fx fuse inplace", "floor"):
        return call, lambda: copy.deepcopy(model)
    return call, lambda: model


def work(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(2)
    call, fresh = _setup(job["form"], 10)
    call(fresh())  # warm-up on a small network: lazy imports and first-call caches
    call, fresh = _setup(job["form"], job["n"])
    times = []
    for _ in range(job["runs"]):
        arg = fresh()
        _, seconds, _ = common.measure(lambda arg=arg: call(arg))
        times.append(seconds)
        del arg
    return {"times": times}


def run(sizes: list[int], forms: list[str], limits: bool = True) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for form in forms:
        results[form] = {}
        for n in sizes:
            if limits and n > LIMITS.get(form, n):
                results[form][str(n)] = {"error": "not run"}
                continue
            r = common.run_worker("scaling", {"form": form, "n": n, "runs": runs_for(n)})
            if "error" in r:
                print(f"{form} N={n}: {r['error']}")
            results[form][str(n)] = r
    return results


def report(results: dict[str, Any]) -> str:
    """Time and time per block at each N; linear growth shows as the same time per block. The
    last column compares the two largest N measured (at N = 100 the fixed cost of a call,
    tens of milliseconds, still weighs on the time per block)."""
    sizes = sorted({int(n) for by_n in results.values() for n in by_n})
    rows = []
    for form, by_n in results.items():
        row = [form]
        per_block = {}
        for n in sizes:
            r = by_n.get(str(n), {})
            if "times" not in r:
                row.append(r.get("error", "–"))
                continue
            t = statistics.median(r["times"])
            per_block[n] = t / n
            row.append(f"{common.fmt_ms(t * 1e3)} ms · {t / n * 1e6:,.0f} µs/block")
        top = sorted(per_block)[-2:]
        growth = per_block[top[1]] / per_block[top[0]] if len(top) == 2 else None
        row.append(f"{common.fmt_ratio(growth)} ({top[0]:,} → {top[1]:,})" if growth else "–")
        rows.append(row)
    headers = ["form", *(f"N = {n:,}" for n in sizes), "µs/block growth"]
    note = "\n\nRuns per size (median): " + ", ".join(f"{n:,}: {runs_for(n)}" for n in sizes) + "."
    return common.table(headers, rows, right=range(1, len(sizes) + 2)) + note


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__, models=False)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--all", action="store_true", help="every form at every size")
    args = parser.parse_args(argv)
    results = run([int(n) for n in args.sizes.split(",")], args.forms.split(","), not args.all)
    common.publish("scaling", "Scaling: fold time per block", results, report)


if __name__ == "__main__" and not common.worker_main(work):
    main()
