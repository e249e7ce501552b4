"""Fold time and peak memory on ONNX files: bnfold against the tools users have today.

Each benchmark model is exported once with ``torch.onnx.export`` (TorchScript exporter, opset
17, BatchNorms kept as ``BatchNormalization`` nodes, see ``models.onnx_file``) to
``benchmarks/out/onnx/``. Every method then goes from that file to a new file, as a user would:

- ``bnfold cli``: ``bnfold model.onnx -o folded.onnx`` (checked loading, atomic write);
- ``bnfold api``: ``onnx.load``, ``bnfold.fold``, ``onnx.save``;
- ``onnxscript``: ``onnx_ir.load``, onnxscript's rewriter with its three BatchNorm fusion rules,
  ``onnx_ir.save``;
- ``ort basic``: an onnxruntime session at ``ORT_ENABLE_BASIC`` writing its optimized model
  (``optimized_model_filepath``); it also does onnxruntime's other basic rewrites;
- ``onnxoptimizer``: ``onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])``;
- ``onnxsim``: ``onnxsim.simplify`` (it also folds constants and runs the model to check);
- ``load + save``: ``onnx.load`` and ``onnx.save`` alone, what any of them pays at least.

Each model file is measured in a process of its own: every method once on a small model (to
import it and warm its caches), then ``--runs`` rounds in which every method runs once,
interleaved, each call from a trimmed heap with the peak counter reset (``common.measure``), so
each call's peak memory is its own. Medians are reported. The first round's outputs are
checked: the BatchNormalization nodes left, and the largest error against the original in
onnxruntime (relative to the output's size). Tools that are not installed are reported so.

Run ``python -m benchmarks.fold_onnx`` (``--models``, ``--runs``).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any

from . import common

METHODS = [
    "bnfold cli",
    "bnfold api",
    "onnxscript",
    "ort basic",
    "onnxoptimizer",
    "onnxsim",
    "load + save",
]


def _available(method: str) -> bool:
    module = {"onnxoptimizer": "onnxoptimizer", "onnxsim": "onnxsim", "onnxscript": "onnxscript"}
    if method not in module:
        return True
    try:
        __import__(module[method])
    except ImportError:
        return False
    return True


def _fold(method: str, src: Path, dst: Path) -> None:
    import onnx

    if method == "bnfold cli":
        from bnfold import cli

        with contextlib.redirect_stdout(io.StringIO()):
            status = cli.main([str(src), "-o", str(dst)])
        if status != 0:
            raise RuntimeError(f"bnfold exited with {status}")
    elif method == "bnfold api":
        import bnfold

        onnx.save(bnfold.fold(onnx.load(str(src))), str(dst))
    elif method == "onnxscript":
        import onnx_ir as ir
        from onnxscript.rewriter import rewrite
        from onnxscript.rewriter.rules.common import (
            fuse_batchnorm_into_conv_rule,
            fuse_batchnorm_into_conv_transpose_rule,
            fuse_batchnorm_into_gemm_rule,
        )

        model = ir.load(str(src))
        rules = [
            fuse_batchnorm_into_conv_rule,
            fuse_batchnorm_into_conv_transpose_rule,
            fuse_batchnorm_into_gemm_rule,
        ]
        ir.save(rewrite(model, pattern_rewrite_rules=rules), str(dst))
    elif method == "ort basic":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(dst)
        options.log_severity_level = 3
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    elif method == "onnxoptimizer":
        import onnxoptimizer

        onnx.save(onnxoptimizer.optimize(onnx.load(str(src)), ["fuse_bn_into_conv"]), str(dst))
    elif method == "onnxsim":
        import onnxsim

        with contextlib.redirect_stdout(io.StringIO()):
            model, ok = onnxsim.simplify(onnx.load(str(src)))
        if not ok:
            raise RuntimeError("onnxsim could not validate its result")
        onnx.save(model, str(dst))
    elif method == "load + save":
        onnx.save(onnx.load(str(src)), str(dst))
    else:
        raise ValueError(method)


def _run(path: Path) -> Any:
    """``path``'s output in onnxruntime, optimizations off (the file as written: onnxruntime
    must not fold the original itself), on a fixed random image."""
    import numpy as np
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224), dtype=np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def check(want: Any, dst: Path) -> dict[str, Any]:
    """BatchNormalization nodes left in ``dst`` and its error against the original's output."""
    import numpy as np
    import onnx

    left = sum(
        n.op_type == "BatchNormalization"
        for n in onnx.load(str(dst), load_external_data=False).graph.node
    )
    got = _run(dst)
    return {"bn_left": int(left), "err": float(np.abs(got - want).max() / np.abs(want).max())}


def work(job: dict[str, Any]) -> dict[str, Any]:
    """A worker for one model file: every method once on a small model (imports, first-call
    caches), then ``runs`` interleaved rounds of every method on the file, each call from a
    trimmed heap with the peak counter reset. The first round's outputs are checked."""
    import onnx

    src = Path(job["src"])
    methods = job["methods"]
    out: dict[str, Any] = {m: {"times": [], "peaks": []} for m in methods}
    before = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(src)).graph.node)
    want = _run(src)
    with tempfile.TemporaryDirectory(dir=common.OUT) as tmp:
        small = Path(tmp) / "small.onnx"
        onnx.save(_small_model(), str(small))
        for m in methods:
            _fold(m, small, Path(tmp) / "small-out.onnx")
        for round_ in range(job["runs"]):
            for m in methods:
                dst = Path(tmp) / f"{methods.index(m)}.onnx"
                _, seconds, peak = common.measure(lambda m=m, dst=dst: _fold(m, src, dst))
                out[m]["times"].append(seconds)
                out[m]["peaks"].append(peak)
                if round_ == 0:
                    out[m].update(bn_before=before, **check(want, dst))
                dst.unlink()
    return out


def _small_model() -> Any:
    from .scaling import onnx_chain

    return onnx_chain(4)


# onnxoptimizer and onnxsim take 1.3-1.7 s per call on the 98 MiB ResNet-50 file and 6-7 s on
# the 507 MiB VGG file (measured with every method at 5 runs: onnxoptimizer 6.8 s / 3.2 GiB,
# onnxsim 6.3 s / 2.6 GiB, bnfold 2.6 s / 1.7 GiB); over this size they are left out so that
# `make bench` stays within ten minutes (--big-files runs them too).
SLOW_TOOLS = {"onnxoptimizer", "onnxsim"}
SLOW_TOOLS_MAX_MIB = 50


def run(
    model_names: list[str], runs: int, methods: list[str] = METHODS, big_files: bool = False
) -> dict[str, Any]:
    from . import models  # torch: in the parent only, the workers read files

    results: dict[str, Any] = {}
    for name in model_names:
        src = models.onnx_file(name)
        size = src.stat().st_size / common.MIB
        usable = [m for m in methods if _available(m)]
        if size > SLOW_TOOLS_MAX_MIB and not big_files:
            usable = [m for m in usable if m not in SLOW_TOOLS]
        job = {"src": str(src), "methods": usable, "runs": runs}
        r = common.run_worker("fold_onnx", job)
        if "error" in r:
            print(f"{name}: {r['error']}")
        results[name] = {"size_mib": size}
        for m in methods:
            why = r.get("error")
            if m not in usable:
                why = "not installed" if not _available(m) else "skipped: file over 50 MiB"
            results[name][m] = r.get(m, {"error": why})
    return results


def report(results: dict[str, Any]) -> str:
    out = []
    for name, by_method in results.items():
        by_method = dict(by_method)
        size = by_method.pop("size_mib")
        ms = {m: common.median_ms(r["times"]) for m, r in by_method.items() if "times" in r}
        base = ms.get("bnfold api")
        rows = []
        for m, r in by_method.items():
            if "times" not in r:
                rows.append([m, r.get("error", "failed").splitlines()[0][:40], "", "", "", "", ""])
                continue
            lo, hi = min(r["times"]) * 1e3, max(r["times"]) * 1e3
            rows.append(
                [
                    m,
                    common.fmt_ms(ms[m]),
                    f"{common.fmt_ms(lo)}–{common.fmt_ms(hi)}",
                    common.fmt_ratio(ms[m] / base if base else None),
                    common.fmt_mib(common.median_peak(r["peaks"])),
                    f"{r['bn_left']} of {r['bn_before']}",
                    f"{r['err']:.1e}",
                ]
            )
        headers = ["method", "median ms", "range ms", "÷ bnfold api", "peak MiB"]
        headers += ["BNs left", "max rel err"]
        out.append(f"**{name}** ({size:,.0f} MiB)\n")
        out.append(common.table(headers, rows, right=[1, 2, 3, 4, 5, 6]))
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--big-files", action="store_true", help="onnxoptimizer and onnxsim on big files too"
    )
    args = parser.parse_args(argv)
    results = run(args.models.split(","), args.runs, args.methods.split(","), args.big_files)
    common.publish("fold_onnx", "Fold time, ONNX files", results, report, runs=args.runs)


if __name__ == "__main__" and not common.worker_main(work):
    main()
