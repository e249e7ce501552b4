"""Keras → tf2onnx → the ``bnfold`` command line, end to end, in the ``.integration/keras`` venv.

What is checked, and why: tf2onnx is how Keras models reach ONNX, and what it writes for a
BatchNormalization depends on the Keras flavour and on whether TensorFlow's grappler ran (a
``BatchNormalization`` node, a ``Mul``/``Add`` chain, or nothing because it was folded into a
Conv already). Each model is converted in the four modes of ``benchmarks/keras_onnx.py`` (``k3``,
``k3-nogr``: Keras 3, grappler on / off; ``tfk``, ``tfk-nogr``: tf-keras), then folded by the
installed command line exactly as a user would: ``bnfold MODEL.onnx -o FOLDED.onnx --verify
--report``. The row takes the counts from its summary line ("N of M BatchNorms folded, K kept;
A of B affine chains folded"), the kept rules from its table and the error from its verify line;
``bnfold.fold`` on the same file must give the same summary (its time is the ``fold s``). The
folded file is also run in onnxruntime on Keras's own inputs against the converted one.

Models: ``keras.applications`` MobileNetV2, EfficientNetB0 and ResNet50 (``weights=None``,
random trained-looking BatchNorm statistics: ``benchmarks.keras_onnx.convert``, one process per
conversion), and small Dense, Dense on 3-D input, Conv2D, Conv2DTranspose and DepthwiseConv2D
models followed by a BatchNormalization, with random biases as after training
(``tests/keras/convert_models.py``, one process per mode). TensorFlow runs only in those
converter processes; this one imports onnx, onnxruntime and bnfold.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import Rows

REQUIREMENTS: list[list[str]] = [
    ["tensorflow-cpu==2.21.*", "tf2onnx==1.17.*"],
    ["--no-deps", "tf-keras==2.21.*"],
    ["-e", ".[onnx]"],
]

CLIENT = "Keras → ONNX"
ROOT = Path(__file__).resolve().parent.parent
MODES = ("k3", "k3-nogr", "tfk", "tfk-nogr")  # benchmarks.keras_onnx.MODES
SMALL_MODE = {  # the same modes, as tests/keras/convert_models.py names them
    "k3": "k3_grappler",
    "k3-nogr": "k3_nograppler",
    "tfk": "tfk_grappler",
    "tfk-nogr": "tfk_nograppler",
}
SMALL = ("dense", "dense3d", "conv2d_relu", "conv2d_transpose", "depthwise_relu")
APPS = ("MobileNetV2", "EfficientNetB0", "ResNet50")
QUICK_SMALL = ("dense", "conv2d_transpose")
QUICK_APPS = (("MobileNetV2", "k3"),)
CONVERT_TIMEOUT = 300  # seconds, per converter process
FOLD_TIMEOUT = 300  # seconds, per bnfold command
TOLERANCE = 1e-4  # relative, folded against converted on Keras's inputs (as --verify's)

SUMMARY = re.compile(
    r"(\d+) of (\d+) BatchNorms? folded, (\d+) kept(?:; (\d+) of (\d+) affine chains? folded)?"
)
REL_ERR = re.compile(r"max rel err ([-+0-9.eE]+|nan|inf)")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


# -- conversion (TensorFlow, in other processes) -------------------------------------------------


def convert_small(mode: str, out: Path, models: tuple[str, ...]) -> str | None:
    """Convert the small models in one mode; None when the converter ran, else why not."""
    script = ROOT / "tests" / "keras" / "convert_models.py"
    items = [f"{m}:random" for m in models]
    try:
        proc = subprocess.run(
            [sys.executable, str(script), SMALL_MODE[mode], str(out), *items],
            capture_output=True,
            text=True,
            timeout=CONVERT_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return f"conversion took over {CONVERT_TIMEOUT} s"
    if proc.returncode != 0:
        return f"converter exited {proc.returncode}: {_last_line(proc.stderr)}"
    return None


def convert_app(model: str, mode: str, path: Path) -> dict[str, Any]:
    """Convert one keras.applications network (``benchmarks.keras_onnx.convert``)."""
    from benchmarks import common

    job = {"step": "convert", "model": model, "mode": mode, "opset": None, "seed": 0}
    try:
        return common.run_worker("keras_onnx", {**job, "path": str(path)}, CONVERT_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"error": f"conversion took over {CONVERT_TIMEOUT} s"}


# -- the fold (the command line) -----------------------------------------------------------------


def _kept_rules(report: str) -> collections.Counter[str]:
    """Kept entries by rule, from the table ``--report`` prints (columns from its dash line)."""
    lines = report.splitlines()
    rules: collections.Counter[str] = collections.Counter()
    dash = next((i for i, line in enumerate(lines) if re.fullmatch(r"-+( +-+)+", line)), None)
    if dash is None:
        return rules
    spans = [m.span() for m in re.finditer(r"-+", lines[dash])]
    if len(spans) != 4:
        return rules
    for line in lines[dash + 1 :]:
        if line.startswith(("bnfold:", "note:")):
            break
        action = line[spans[2][0] : spans[2][1]].strip()
        if action == "folded":
            continue
        found = re.match(r"\[([^\]]*)\]", line[spans[3][0] :])
        rules[found.group(1) if found else "?"] += 1
    return rules


def _run(path: Path, batches: list[Any]) -> Any:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x})[0] for x in batches])


def _rel(reference: Any, other: Any) -> float:
    import numpy as np

    reference = np.asarray(reference, dtype=np.float64)
    return float(np.abs(reference - other).max() / np.abs(reference).max())


def fold_case(
    rows: Rows, case: str, path: Path, batches: list[Any], keras_out: Any, keras_bns: int
) -> None:
    """Fold one converted model with the ``bnfold`` command, check it, write its row."""
    import onnx

    import bnfold

    folded_path = path.with_name(path.stem + ".folded.onnx")
    command = [str(Path(sys.executable).with_name("bnfold")), str(path), "-o", str(folded_path)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [*command, "--verify", "--report"],
            capture_output=True,
            text=True,
            timeout=FOLD_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        rows.write(case, f"FAILED: bnfold took over {FOLD_TIMEOUT} s")
        return
    cli_s = time.perf_counter() - start

    model = onnx.load(str(path))
    ops = collections.Counter(node.op_type for node in model.graph.node)
    summary = SUMMARY.search(proc.stdout)
    affines = int(summary.group(5) or 0) if summary else 0
    theirs = (
        f"tf2onnx left {ops['BatchNormalization']} BatchNormalization, "
        f"{affines} Mul/Add chains ({keras_bns} BN layers)"
    )
    error = REL_ERR.search(proc.stdout + proc.stderr)
    err = float(error.group(1)) if error else None
    if proc.returncode != 0:
        why = _last_line(proc.stderr).removeprefix("bnfold: ")
        rows.write(case, f"FAILED: {why}", err=err, theirs=theirs)
        return
    if summary is None:
        rows.write(case, "FAILED: no summary line in bnfold's output", theirs=theirs)
        return
    bn_folded, bns, kept_n, affine_folded, _ = (int(g or 0) for g in summary.groups())
    rules = _kept_rules(proc.stdout)
    kept = ", ".join(f"{rule} {n}" for rule, n in sorted(rules.items()))

    # the API on the same file: same decisions, and the fold time without the process around it
    times = []
    for _ in range(2):  # the first fold of the process also imports bnfold's ONNX frontend
        start = time.perf_counter()
        _, report = bnfold.fold(model, return_report=True)
        times.append(time.perf_counter() - start)
    fold_s = min(times)

    folded = onnx.load(str(folded_path))
    converted_out = _run(path, batches)
    folded_err = _rel(converted_out, _run(folded_path, batches))
    keras_err = _rel(keras_out, converted_out)
    notes = (
        f"nodes {len(model.graph.node)} → {len(folded.graph.node)}; "
        f"ONNX vs Keras {keras_err:.0e}; CLI {cli_s:.1f} s"
    )
    values = dict(
        bn=bns,
        folded=bn_folded,
        kept=kept,
        affine=affine_folded,
        err=err,
        fold_s=fold_s,
        theirs=theirs,
        notes=notes,
    )
    if report.summary() != summary.group(0):
        status = f"FAILED: bnfold.fold says {report.summary()!r}, the command line otherwise"
    elif sum(rules.values()) != kept_n + (affines - affine_folded):
        status = f"FAILED: {sum(rules.values())} kept rows in --report, summary says otherwise"
    elif not folded_err <= TOLERANCE:
        status = f"FAILED: folded vs converted {folded_err:.1e} on Keras's inputs"
    else:
        status = "ok"
    rows.write(case, status, **values)


def fold_guarded(rows: Rows, case: str, *args: Any) -> None:
    """``fold_case``, where an unexpected exception fails that case only."""
    try:
        fold_case(rows, case, *args)
    except Exception as e:  # noqa: BLE001 - reported in the row, the next case goes on
        rows.write(case, f"FAILED: {type(e).__name__}: {_last_line(str(e))}")


# -- main ----------------------------------------------------------------------------------------


def run_small(rows: Rows, work: Path, models: tuple[str, ...]) -> None:
    import numpy as np

    for mode in MODES:
        out = work / SMALL_MODE[mode]
        why = convert_small(mode, out, models)
        for model in models:
            case = f"{model} {mode}"
            error = out / f"{model}-random.error"
            if why is not None or error.exists():
                reason = why or _last_line(error.read_text())
                rows.write(case, f"not run: {reason}")
                continue
            data = np.load(out / f"{model}-random.npz")
            path = out / f"{model}-random.onnx"
            fold_guarded(rows, case, path, [data["x"]], data["y"], 1)
        shutil.rmtree(out, ignore_errors=True)


def run_apps(rows: Rows, work: Path, cases: list[tuple[str, str]]) -> None:
    import numpy as np

    for model, mode in cases:
        case = f"{model} {mode}"
        directory = work / mode
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{model}.onnx"
        converted = convert_app(model, mode, path)
        if "error" in converted:
            rows.write(case, f"not run: {_last_line(converted['error'])}")
        else:
            data = np.load(path.with_suffix(".npz"))
            batches, keras_out = list(data["inputs"]), np.concatenate(list(data["outputs"]))
            bns = converted["keras_bns"]
            fold_guarded(rows, case, path, batches, keras_out, bns)
        shutil.rmtree(directory, ignore_errors=True)  # ResNet50: about 100 MB a file


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSONL file the rows go to")
    parser.add_argument("--quick", action="store_true", help="MobileNetV2 k3, Dense, ConvT")
    args = parser.parse_args()
    os.environ.pop("TF_USE_LEGACY_KERAS", None)  # the converters set it for tf-keras only
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT))  # benchmarks, run from anywhere
    rows = Rows(CLIENT, args.out)
    apps = list(QUICK_APPS) if args.quick else [(m, mode) for m in APPS for mode in MODES]
    with tempfile.TemporaryDirectory(prefix="bnfold-keras-") as tmp:
        run_small(rows, Path(tmp), QUICK_SMALL if args.quick else SMALL)
        run_apps(rows, Path(tmp), apps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
