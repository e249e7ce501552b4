"""Inference latency before and after folding, against the same network built without BatchNorm.

Three variants of each model: ``unfolded`` (as trained, BatchNorms in eval mode), ``folded``
(``bnfold.fold``) and ``floor`` (the network built without the BatchNorms a fold removes,
holding exactly the folded weights, see ``models.floor_like``). Three runtimes:

- ``eager``: PyTorch eager under ``torch.inference_mode``;
- ``compile``: ``torch.compile`` (Inductor, default mode, static shapes); compiling costs 10 to
  30 s per model, variant and shape here, so by default only ResNet-18 is compiled
  (``--compile-models``);
- ``ort``: onnxruntime with default options (``ORT_ENABLE_ALL``: it fuses Conv+BatchNorm
  itself), and ``ort noopt`` with graph optimizations off, as a runtime without that fusion runs
  the file. ``unfolded`` and ``floor`` are exported by ``torch.onnx.export`` (TorchScript
  exporter, opset 17, BatchNorms kept); ``folded`` is bnfold's fold of the unfolded file.

Batch 1 at 224x224 and batch 32 at ``--size32`` (64x64 by default: 32 images at 224x224 take
1 to 6 s per forward pass on two cores). Each worker (one per model and runtime) warms every
variant up, then times single forward passes in interleaved rounds (unfolded, folded, floor,
unfolded, ...) and reports the median per variant.

Run ``python -m benchmarks.latency`` (``--models``, ``--runtimes``, ``--compile-models``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from . import common

VARIANTS = ["unfolded", "folded", "floor"]
RUNTIMES = ["eager", "compile", "ort"]  # "ort" runs both onnxruntime configurations
ROUNDS_1, ROUNDS_32 = 7, 5
COMPILE_MODELS = ["resnet18"]


def _variants(name: str) -> dict[str, Any]:
    import bnfold

    from . import models

    unfolded = models.build(name)
    folded = bnfold.fold(unfolded)
    return {"unfolded": unfolded, "folded": folded, "floor": models.floor_like(name, folded)}


def _onnx_files(name: str, nets: dict[str, Any], tmp: Path) -> dict[str, Path]:
    """The variants as ONNX files: ``unfolded`` and ``floor`` exported by torch.onnx.export
    (once, shared with fold_onnx, see ``models.onnx_file``), ``folded`` made by bnfold from the
    unfolded file (what an ONNX user runs)."""
    import onnx

    import bnfold

    from . import models

    paths = {
        "unfolded": models.onnx_file(name),
        "folded": tmp / "folded.onnx",
        "floor": models.onnx_file(name, "floor", nets["floor"]),
    }
    onnx.save(bnfold.fold(onnx.load(str(paths["unfolded"]))), str(paths["folded"]))
    return paths


def _runners(nets: dict[str, Any], runtime: str, x: Any, files: dict[str, Path]) -> dict:
    """(runtime, variant) -> a function running one forward pass on ``x``.

    For ``ort`` both onnxruntime configurations run the same files. Spinning worker threads are
    off: with several sessions taking turns, one session's spinning threads would slow the next.
    """
    import torch

    if runtime in ("eager", "compile"):

        def runner(net: Any) -> Any:
            def forward() -> Any:
                with torch.inference_mode():
                    return net(x)

            return forward

        return {(runtime, k): runner(v) for k, v in nets.items()}
    import onnxruntime as ort

    runners = {}
    feed = {"input": x.numpy()}
    for k, path in files.items():
        for config in ("ort", "ort noopt"):
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if config == "ort noopt":
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            runners[config, k] = lambda s=session: s.run(None, feed)
    return runners


def work(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    result: dict[str, Any] = {}
    runtime = job["runtime"]
    configs = ("ort", "ort noopt") if runtime == "ort" else (runtime,)
    nets = _variants(job["model"])
    if runtime == "compile":
        nets = {k: torch.compile(v, dynamic=False) for k, v in nets.items()}
    with tempfile.TemporaryDirectory() as tmp:
        files: dict[str, Path] = {}
        static = False
        if runtime == "ort":
            from . import models

            files = _onnx_files(job["model"], nets, Path(tmp))
            static = models.onnx_is_static(files["unfolded"])
        for batch, size, rounds in job["shapes"]:
            shape = f"{batch}x{size}"
            x = torch.randn(batch, 3, size, size)
            runners = _runners(nets, runtime, x, files)
            first_s = {}
            try:
                for key, forward in runners.items():
                    start = time.perf_counter()
                    forward()  # compiles (torch.compile) or allocates (onnxruntime)
                    first_s[key] = time.perf_counter() - start
                    forward()
            except Exception as e:  # noqa: BLE001 - reported in the table, the rest goes on
                message = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                if static and (batch, size) != (1, 224):
                    message = "exported for 224x224 only (adaptive pooling to 7x7)"
                for config in configs:
                    result.setdefault(config, {})[shape] = {"error": message}
                continue
            times: dict[tuple, list[float]] = {key: [] for key in runners}
            for _ in range(rounds):
                for key, forward in runners.items():
                    start = time.perf_counter()
                    forward()
                    times[key].append(time.perf_counter() - start)
            for (config, variant), t in times.items():
                by_shape = result.setdefault(config, {})
                entry = by_shape.setdefault(shape, {"times": {}, "first_s": {}})
                entry["times"][variant] = t
                entry["first_s"][variant] = first_s[config, variant]
            del runners
    return result


def run(
    model_names: list[str], runtimes: list[str], compile_models: list[str], size32: int
) -> dict[str, Any]:
    """results[runtime][model][shape] = {"times": {variant: [s, ...]}, ...} or {"error": ...}"""
    shapes = [(1, 224, ROUNDS_1), (32, size32, ROUNDS_32)]
    results: dict[str, Any] = {}
    for runtime in runtimes:
        configs = ["ort", "ort noopt"] if runtime == "ort" else [runtime]
        for name in model_names:
            if runtime == "compile" and name not in compile_models:
                continue
            job = {"model": name, "runtime": runtime, "shapes": shapes}
            r = common.run_worker("latency", job, timeout=1800)
            if "error" in r:
                print(f"{runtime} / {name}: {r['error']}")
            for config in configs:
                results.setdefault(config, {})[name] = r.get(config, {"error": r.get("error")})
    return results


def report(results: dict[str, Any]) -> str:
    out = []
    for runtime, by_model in results.items():
        shapes = sorted(
            {s for r in by_model.values() for s in r if s != "error"},
            key=lambda s: tuple(map(int, s.split("x"))),
        )
        for shape in shapes:
            rows = []
            for name, r in by_model.items():
                entry = r.get(shape, {"error": r.get("error", "not run")})
                if "times" not in entry:
                    rows.append([name, f"not run: {entry['error'][:60]}", "", "", "", ""])
                    continue
                ms = {k: statistics.median(v) * 1e3 for k, v in entry["times"].items()}
                rows.append(
                    [
                        name,
                        common.fmt_ms(ms["unfolded"]),
                        common.fmt_ms(ms["folded"]),
                        common.fmt_ms(ms["floor"]),
                        f"{ms['unfolded'] / ms['folded']:.2f}×",
                        f"{(ms['folded'] / ms['floor'] - 1) * 100:+.1f} %",
                    ]
                )
            batch, size = shape.split("x")
            out.append(f"**{runtime}, batch {batch} at {size}×{size}** (median ms per forward)\n")
            headers = ["model", "unfolded", "folded", "no-BN floor", "speed-up", "folded vs floor"]
            out.append(common.table(headers, rows, right=[1, 2, 3, 4, 5]))
            out.append("")
    out.append(
        f"Rounds: {ROUNDS_1} at batch 1, {ROUNDS_32} at batch 32. "
        "Target: folded within 2 % of the no-BatchNorm floor."
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--compile-models", default=",".join(COMPILE_MODELS))
    parser.add_argument("--size32", type=int, default=64)
    args = parser.parse_args(argv)
    results = run(
        args.models.split(","),
        args.runtimes.split(","),
        args.compile_models.split(","),
        args.size32,
    )
    common.publish("latency", "Inference latency", results, report)


if __name__ == "__main__" and not common.worker_main(work):
    main()
