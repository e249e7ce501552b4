"""Keras through tf2onnx: keras.applications networks converted to ONNX, then folded by bnfold.

MobileNetV2, EfficientNetB0 and ResNet50 from ``keras.applications`` (``weights=None``, input
224x224x3, ``classifier_activation=None`` so that the outputs compared are logits), every
BatchNormalization layer given seeded random but trained-looking statistics (moving_mean
~ N(0, 0.5), moving_variance ~ U(0.5, 2), gamma ~ U(0.5, 1.5), beta ~ N(0, 0.5)), are converted
with ``tf2onnx.convert.from_keras`` (tf2onnx's default opset unless ``--opset``) in four modes:

- ``k3``: Keras 3 (the ``keras`` package), TensorFlow's grappler pass as tf2onnx runs it
  (``tf_loader.tf_optimize``: constfold, function, dependency);
- ``k3-nogr``: Keras 3, grappler off. tf2onnx has no switch for it: every loader calls
  ``tf2onnx.tf_loader.tf_optimize(input_names, output_names, graph_def)``, which this script
  replaces by the identity. The freezing (``convert_variables_to_constants_v2``, which inlines
  functions) and tf2onnx's own ONNX optimizers still run;
- ``tfk``, ``tfk-nogr``: the same with tf-keras (Keras 2, ``import tf_keras``, with
  ``TF_USE_LEGACY_KERAS=1`` set in the worker before TensorFlow is imported).

Each conversion runs in a process of its own (``common.run_worker``), which also runs Keras on
two random inputs (batch 1, N(0, 1)); each fold runs in another process that imports no
TensorFlow: ``onnx_ir.load``, then ``bnfold.fold(model, return_report=True)`` (with
``affine=True`` where this bnfold's ``fold`` accepts it), median of ``--rounds`` folds.

Columns: conversion time; nodes of the graph, BatchNormalization nodes and Mul/Add/Sub/Div
nodes, before -> after; BatchNorms folded; affine chains folded (report entries whose ``kind``
is ``"affine"``; every entry counts as a BatchNorm where the report has no ``kind``); the kept
entries by rule; fold time; the largest absolute and relative error (``max |a - b| / max |a|``)
of the folded model against the converted one, and of the converted one against Keras, both in
onnxruntime (CPUExecutionProvider, graph optimizations off, so that the graphs run as written).
A conversion or fold that fails gives a row ``not run: <reason>``.

The converter stack does not go with the project's ``.venv`` (TensorFlow pins its own protobuf
and numpy), so it has an environment of its own, from the project's root::

    python3.11 -m venv .venv-keras
    .venv-keras/bin/pip install "tensorflow-cpu==2.21.*" "tf2onnx==1.17.*"
    .venv-keras/bin/pip install --no-deps "tf-keras==2.21.*"
    .venv-keras/bin/pip install onnx onnxruntime onnx-ir numpy ml-dtypes
    .venv-keras/bin/pip install -e ".[onnx]"

Run ``.venv-keras/bin/python -m benchmarks.keras_onnx`` (``--models``, ``--modes``,
``--opset``, ``--rounds``, ``--keep DIR`` to keep the ONNX files).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import common

MODELS = ("MobileNetV2", "EfficientNetB0", "ResNet50")
MODES = {  # name: (tf-keras, grappler)
    "k3": (False, True),
    "k3-nogr": (False, False),
    "tfk": (True, True),
    "tfk-nogr": (True, False),
}
ARITHMETIC = ("Mul", "Add", "Sub", "Div")
SIZE = 224
INPUTS = 2


# -- conversion worker (TensorFlow) ------------------------------------------------------------


def _keras(legacy: bool) -> Any:
    if legacy:
        os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow is imported
        import tf_keras

        return tf_keras
    import keras

    return keras


def _trained_looking(model: Any, keras: Any, seed: int) -> int:
    """Give every BatchNormalization layer random statistics; return how many there are."""
    rng = np.random.default_rng(seed)
    draw = {
        "moving_mean": lambda shape: rng.normal(0, 0.5, shape),
        "moving_variance": lambda shape: rng.uniform(0.5, 2.0, shape),
        "gamma": lambda shape: rng.uniform(0.5, 1.5, shape),
        "beta": lambda shape: rng.normal(0, 0.5, shape),
    }
    count = 0
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        values = []
        for weight in layer.weights:
            name = weight.name.split("/")[-1].split(":")[0]
            values.append(draw[name](tuple(weight.shape)).astype(np.float32))
        layer.set_weights(values)
        count += 1
    return count


def convert(job: dict[str, Any]) -> dict[str, Any]:
    """Build, randomize, run and convert one network; save the ONNX file and Keras's outputs."""
    legacy, grappler = MODES[job["mode"]]
    keras = _keras(legacy)
    import tensorflow as tf
    import tf2onnx
    import tf2onnx.tf_loader

    if not grappler:
        tf2onnx.tf_loader.tf_optimize = lambda input_names, output_names, graph_def: graph_def

    build = getattr(keras.applications, job["model"])
    model = build(weights=None, input_shape=(SIZE, SIZE, 3), classifier_activation=None)
    bns = _trained_looking(model, keras, job["seed"])
    rng = np.random.default_rng(job["seed"] + 1)
    inputs = rng.standard_normal((INPUTS, 1, SIZE, SIZE, 3)).astype(np.float32)
    outputs = np.stack([np.asarray(model(x, training=False)) for x in inputs])

    spec = (tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32, name="input"),)
    start = time.perf_counter()
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=job["opset"])
    seconds = time.perf_counter() - start
    path = Path(job["path"])
    path.write_bytes(proto.SerializeToString())
    np.savez(path.with_suffix(".npz"), inputs=inputs, outputs=outputs)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"convert_s": seconds, "keras_bns": bns, "opset": opset, "tf": tf.__version__}


# -- fold worker (no TensorFlow) ---------------------------------------------------------------


def _counts(model: Any) -> dict[str, int]:
    ops = collections.Counter(node.op_type for node in model.graph)
    return {
        "nodes": sum(ops.values()),
        "bn": ops["BatchNormalization"],
        "arith": sum(ops[op] for op in ARITHMETIC),
    }


def _run(path: Path, inputs: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.stack([session.run(None, {name: x})[0] for x in inputs])


def _error(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    err = float(np.abs(other.astype(np.float64) - reference).max())
    return err, err / float(np.abs(reference).max())


def fold(job: dict[str, Any]) -> dict[str, Any]:
    """Fold one converted network with bnfold; count, time and check it."""
    import onnx_ir as ir

    import bnfold

    path = Path(job["path"])
    data = np.load(path.with_suffix(".npz"))
    model = ir.load(str(path))
    extra = {"affine": True} if "affine" in inspect.signature(bnfold.fold).parameters else {}

    times = []
    for _ in range(job["rounds"]):
        (folded, report), seconds, _ = common.measure(
            lambda: bnfold.fold(model, return_report=True, **extra)
        )
        times.append(seconds)
    folded_path = path.with_name(path.stem + ".folded.onnx")
    ir.save(folded, str(folded_path))

    kinds = collections.Counter()
    kept = collections.Counter()
    for entry in report:
        if entry.folded:
            kinds[getattr(entry, "kind", "batchnorm")] += 1
        else:
            kept[entry.rule or "?"] += 1
    original = _run(path, data["inputs"])
    result = _run(folded_path, data["inputs"])
    return {
        "before": _counts(model),
        "after": _counts(folded),
        "bn_folded": kinds["batchnorm"],
        "affine_folded": kinds["affine"],
        "kept": dict(kept),
        "affine_arg": bool(extra),
        "fold_s": statistics.median(times),
        "fold_err": _error(original, result),
        "keras_err": _error(data["outputs"].astype(np.float64), original),
    }


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    return convert(job) if job["step"] == "convert" else fold(job)


# -- driver ------------------------------------------------------------------------------------


def _reason(result: dict[str, Any]) -> str:
    lines = [line for line in result["error"].splitlines() if line.strip()]
    return lines[-1][:160] if lines else "failed"


def _row(model: str, mode: str, convert: dict[str, Any], folded: dict[str, Any]) -> list[str]:
    def pair(key: str) -> str:
        return f"{folded['before'][key]} → {folded['after'][key]}"

    kept = ", ".join(f"{rule} {n}" for rule, n in sorted(folded["kept"].items())) or "–"
    return [
        model,
        mode,
        f"{convert['convert_s']:.1f}",
        pair("nodes"),
        pair("bn"),
        pair("arith"),
        str(folded["bn_folded"]),
        str(folded["affine_folded"]) if folded["affine_arg"] else "– (no affine=)",
        kept,
        common.fmt_ms(folded["fold_s"] * 1e3),
        f"{folded['fold_err'][0]:.1e} / {folded['fold_err'][1]:.1e}",
        f"{folded['keras_err'][0]:.1e} / {folded['keras_err'][1]:.1e}",
    ]


HEAD = (
    "model",
    "mode",
    "convert s",
    "nodes",
    "BN nodes",
    "Mul/Add/Sub/Div",
    "BN folded",
    "affine folded",
    "kept (rule n)",
    "fold ms",
    "folded vs ONNX abs / rel",
    "ONNX vs Keras abs / rel",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--opset", type=int, default=None, help="tf2onnx's default if not given")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="keep the ONNX files here")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    for mode in modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}: one of {', '.join(MODES)}")

    with tempfile.TemporaryDirectory(prefix="bnfold-keras-") as tmp:
        root = args.keep or Path(tmp)
        rows = []
        versions = ""
        for model in models:
            for mode in modes:
                directory = root / mode
                directory.mkdir(parents=True, exist_ok=True)
                job = {
                    "model": model,
                    "mode": mode,
                    "opset": args.opset,
                    "seed": args.seed,
                    "rounds": args.rounds,
                    "path": str(directory / f"{model}.onnx"),
                }
                converted = common.run_worker("keras_onnx", {**job, "step": "convert"})
                if "error" in converted:
                    rows.append([model, mode, f"not run: {_reason(converted)}"])
                    continue
                versions = f"TensorFlow {converted['tf']}, opset {converted['opset']}"
                folded = common.run_worker("keras_onnx", {**job, "step": "fold"})
                if "error" in folded:
                    rows.append(
                        [
                            model,
                            mode,
                            f"{converted['convert_s']:.1f}",
                            f"fold failed: {_reason(folded)}",
                        ]
                    )
                    continue
                rows.append(_row(model, mode, converted, folded))
                print(f"{model} {mode}: done", flush=True)
    width = len(HEAD)
    rows = [r + [""] * (width - len(r)) for r in rows]
    print(f"\n## Keras → tf2onnx → bnfold ({versions}, {os.cpu_count()} cores)\n")
    print(common.table(HEAD, rows, right=(2, 6, 7, 9)))


if __name__ == "__main__":
    if not common.worker_main(_worker):
        main()
