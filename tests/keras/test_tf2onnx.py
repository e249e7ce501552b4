"""Keras models converted by tf2onnx inside the test, then folded by bnfold.

Runs only where TensorFlow and tf2onnx are installed (``make test-keras``, in ``.venv-keras``);
the project's test environment skips this module. Each conversion mode runs in a process of its
own (``convert_models.py``, once per session for all the models of that mode): Keras 3 or
tf-keras (which needs ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is imported), TensorFlow's
grappler pass on or off (off replaces ``tf2onnx.tf_loader.tf_optimize``). This process only
reads the ONNX files, folds them with ``bnfold.fold`` (an ``onnx.ModelProto`` in, one out) and
runs them in onnxruntime with graph optimizations off, so that the graphs run as written.

Every model exists twice: with the biases Keras initializes (zeros: grappler then drops the
bias and moves the BatchNorm into Conv2D/Conv3D filters itself) and with random biases (as after
training: grappler changes nothing here). What reaches bnfold per mode, with tf2onnx 1.17 and
TensorFlow 2.21, is the ``found`` column of ``CASES``.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import bnfold  # noqa: E402

MODES = ("k3_grappler", "k3_nograppler", "tfk_grappler", "tfk_nograppler")
CONVERTER = Path(__file__).with_name("convert_models.py")
ARITHMETIC = ("Mul", "Add", "Sub", "Div")
PRODUCERS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
FOLD_TOL = 1e-5  # folded against converted, relative: max|a - b| / max|a|
KERAS_TOL = 1e-4  # converted against Keras, relative

# What bnfold finds after the layer, per mode in MODES order:
#   A  a Mul/Add chain (Keras 3 has no fused BatchNorm; tf-keras uses one on 4-D/5-D inputs
#      only), reported as one folded entry of kind "affine";
#   B  a BatchNormalization node, one folded entry of kind "batchnorm";
#   K  a Mul/Add chain bnfold must keep (one entry of kind "affine", skipped, rule ``kept``);
#   -  nothing: tf2onnx (or grappler) already folded the BatchNorm; the report is empty.


@dataclass(frozen=True)
class Case:
    model: str
    bias: str  # "init" (Keras's zeros) or "random"
    found: str  # one letter per mode, see above
    # Mul/Add/Sub/Div nodes that must be left after the fold (None: the graph is left as it is)
    left: dict[str, int] | None = field(default_factory=dict)
    kept: str | None = None  # the rule of the K entries

    @property
    def id(self) -> str:
        return f"{self.model}-{self.bias}"


# Dense: MatMul (no bias input) then the bias Add, which stays (the fold puts the BatchNorm's
# shift into it); grappler merges a zero bias into the BatchNorm's Add (MatMul -> Mul -> Add),
# and bnfold makes it the bias Add. The (N, 5, 20) Dense is Reshape -> MatMul -> Reshape.
# BatchNormalization(axis=1) on (N, 5, 16) scales axis 1 (constant [1, 5, 1]), not the Dense's
# output channels: kept, channel-axis. Conv1D is Unsqueeze -> Conv -> Squeeze -> Add -> Mul -> Add.
CASES = [
    Case("dense", "init", "AAAA", {"Add": 1}),
    Case("dense", "random", "AAAA", {"Add": 1}),
    Case("dense3d", "init", "AAAA", {"Add": 1}),
    Case("dense3d", "random", "AAAA", {"Add": 1}),
    Case("bn_axis1_dense3d", "init", "KKKK", None, kept="channel-axis"),
    Case("bn_axis1_dense3d", "random", "KKKK", None, kept="channel-axis"),
    Case("conv2d_relu", "init", "-A--"),
    Case("conv2d_relu", "random", "AA--"),
    Case("conv2d_nobias", "init", "----"),
    Case("conv2d_transpose", "init", "AABB"),
    Case("conv2d_transpose", "random", "AABB"),
    Case("depthwise_relu", "init", "AA--"),
    Case("depthwise_relu", "random", "AA--"),
    Case("separable", "init", "-ABB"),
    Case("separable", "random", "AABB"),
    Case("conv1d", "init", "AAAA"),
    Case("conv1d", "random", "AAAA"),
    Case("conv3d", "init", "-ABB"),
    Case("conv3d", "random", "AABB"),
]
KINDS = {"A": "affine", "B": "batchnorm", "K": "affine"}

# Cases where a bnfold bug makes the test fail: (case id, mode) -> reason (xfail, strict).
BUGS: dict[tuple[str, str], str] = {}


# -- helpers ------------------------------------------------------------------------------------


class _Converted:
    """The ONNX files of every case, converted per mode on first use (one process per mode)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, Path | str] = {}  # mode: its folder, or why its converter failed

    def __call__(self, mode: str, case: Case) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
        if mode not in self.done:
            self.done[mode] = self._convert(mode)
        out = self.done[mode]
        if isinstance(out, str):
            pytest.fail(out)
        error = out / f"{case.id}.error"
        if error.exists():
            pytest.fail(f"conversion of {case.id} in {mode} failed:\n{error.read_text()}")
        data = np.load(out / f"{case.id}.npz")
        return onnx.load(str(out / f"{case.id}.onnx")), data["x"], data["y"]

    def _convert(self, mode: str) -> Path | str:
        out = self.root / mode
        items = sorted({f"{c.model}:{c.bias}" for c in CASES})
        env = dict(os.environ)
        env.pop("TF_USE_LEGACY_KERAS", None)  # the converter sets it for tf-keras only
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"
        proc = subprocess.run(
            [sys.executable, str(CONVERTER), mode, str(out), *items],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            return f"converter for {mode} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
        return out


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> _Converted:
    return _Converted(tmp_path_factory.mktemp("keras_onnx"))


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    return sess.run(None, {inp.name: x})


def _rel(ref: np.ndarray, got: np.ndarray) -> float:
    assert ref.shape == got.shape, (ref.shape, got.shape)
    scale = float(np.abs(ref).max())
    assert scale > 0, "the reference output is all zeros"
    return float(np.abs(ref.astype(np.float64) - got).max()) / scale


def _random_inputs(x: np.ndarray, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, *x.shape[1:])).astype(np.float32)


def _params():
    for case in CASES:
        for i, mode in enumerate(MODES):
            marks = []
            reason = BUGS.get((case.id, mode))
            if reason:
                marks.append(pytest.mark.xfail(reason=reason, strict=True))
            yield pytest.param(case, mode, case.found[i], marks=marks, id=f"{case.id}-{mode}")


# -- the folds ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "mode", "found"), list(_params()))
def test_fold(converted: _Converted, case: Case, mode: str, found: str) -> None:
    model, x, y = converted(mode, case)
    before = _ops(model)

    # the conversion itself: onnxruntime against Keras on the converter's inputs
    (orig_y,) = _run(model, x)
    assert _rel(y, orig_y) <= KERAS_TOL

    # what tf2onnx hands to bnfold
    if found == "B":
        assert before["BatchNormalization"] == 1
    else:
        assert before["BatchNormalization"] == 0
    if found in "AK":
        assert before["Mul"] == 1 and before["Add"] >= 1
    if found == "-":
        assert not any(before[op] for op in ARITHMETIC)

    serialized = model.SerializeToString()
    folded, report = bnfold.fold(model, return_report=True)
    assert isinstance(folded, onnx.ModelProto)
    assert model.SerializeToString() == serialized, "fold changed its input"

    # the report: one entry per BatchNorm bnfold saw, folded unless the case keeps it
    entries = list(report)
    if found == "-":
        assert entries == []
    else:
        assert [e.kind for e in entries] == [KINDS[found]], report
        (entry,) = entries
        if found == "K":
            assert entry.action == "skipped" and entry.rule == case.kept, report
        else:
            assert entry.folded, report
            assert entry.target_type in PRODUCERS, report

    # the graph after the fold
    onnx.checker.check_model(folded, full_check=True)
    after = _ops(folded)
    assert after["BatchNormalization"] == 0
    left = {op: after[op] for op in ARITHMETIC if after[op]}
    if case.left is None:
        assert left == {op: before[op] for op in ARITHMETIC if before[op]}
        assert after == before
    else:
        assert left == case.left, f"{dict(after)}"
    assert {op: after[op] for op in PRODUCERS} == {op: before[op] for op in PRODUCERS}

    # the numbers: folded against converted, on inputs neither has seen
    xr = _random_inputs(x)
    (ref,) = _run(model, xr)
    (got,) = _run(folded, xr)
    assert _rel(ref, got) <= FOLD_TOL


# -- the command line ---------------------------------------------------------------------------


def _bnfold_command() -> list[str]:
    script = Path(sys.executable).with_name("bnfold")
    return [str(script)] if script.exists() else [sys.executable, "-m", "bnfold"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([*_bnfold_command(), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.parametrize(
    ("mode", "found"),
    [("k3_nograppler", "A"), ("tfk_nograppler", "B")],
    ids=["affine-k3_nograppler", "batchnorm-tfk_nograppler"],
)
def test_cli(converted: _Converted, tmp_path: Path, mode: str, found: str) -> None:
    """``bnfold model.onnx -o out.onnx --verify --report``, and with ``--no-affine``: a
    ConvTranspose + BatchNorm (random bias), a Mul/Add chain in Keras 3, a BatchNormalization
    node in tf-keras. ``--no-affine`` leaves the chain and still folds the BatchNorm."""
    case = next(c for c in CASES if c.id == "conv2d_transpose-random")
    model, x, _ = converted(mode, case)
    src = tmp_path / "model.onnx"
    onnx.save(model, str(src))
    before = _ops(model)
    xr = _random_inputs(x)
    (ref,) = _run(model, xr)

    out = tmp_path / "out.onnx"
    proc = _cli(str(src), "-o", str(out), "--verify", "--report")
    if found == "A":
        assert "1 of 1 affine chain folded" in proc.stdout, proc.stdout
    else:
        assert "1 of 1 BatchNorm folded" in proc.stdout, proc.stdout
    assert "bnfold: verified in onnxruntime" in proc.stdout
    assert f"bnfold: wrote {out}" in proc.stdout
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    after = _ops(folded)
    assert not any(after[op] for op in (*ARITHMETIC, "BatchNormalization")), dict(after)
    assert after["ConvTranspose"] == 1
    (got,) = _run(folded, xr)
    assert _rel(ref, got) <= FOLD_TOL

    plain = tmp_path / "plain.onnx"
    proc = _cli(str(src), "-o", str(plain), "--verify", "--report", "--no-affine")
    assert "bnfold: verified in onnxruntime" in proc.stdout
    kept = onnx.load(str(plain))
    onnx.checker.check_model(kept, full_check=True)
    if found == "A":  # the chain stays, and is not even reported
        assert "affine chain" not in proc.stdout, proc.stdout
        assert "0 of 0 BatchNorms folded" in proc.stdout, proc.stdout
        assert _ops(kept) == before
    else:  # a BatchNormalization node is no affine chain: folded all the same
        assert "1 of 1 BatchNorm folded" in proc.stdout, proc.stdout
        assert _ops(kept) == after
    (got,) = _run(kept, xr)
    assert _rel(ref, got) <= FOLD_TOL
