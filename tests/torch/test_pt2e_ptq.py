"""bnfold with torchao's pt2e quantization.

**Fold before PTQ.** The recipe ``ep = torch.export.export(model.eval(), x)``, ``bnfold.fold(ep)``
(or ``bnfold.fold(ep.module())``), then ``prepare_pt2e`` with the XNNPACK quantizer, calibration
and ``convert_pt2e``: every conv (1-D, 2-D with ``padding="same"``, 3-D), ConvTranspose2d
(grouped too) and 2-D Linear + BatchNorm is folded before an observer is inserted (the report
says so, the converted graph has no BatchNorm, and every quantized weight is the folded weight
rounded to its grid), and the quantized folded model computes what torchao's own flow computes
on the unfolded model (torchao folds conv / Linear + BatchNorm itself in ``prepare_pt2e``),
counted in output quantization steps, and is as close to the float model. A Linear on a 3-D
input followed by BatchNorm1d (the BatchNorm normalises another axis than the Linear's
features) is kept under ``channel-axis``, and the quantized model is then torchao's unchanged.

**After torchao's QAT.** When torchao's QAT flow (XNNPACK quantizer with ``is_qat=True``,
``prepare_qat_pt2e``, a few training steps, ``move_exported_model_to_eval``, ``convert_pt2e``)
already folded every BatchNorm, ``bnfold.fold`` of the converted graph finds nothing: an empty
report, the same graph, bit-identical outputs.

All BatchNorms have non-trivial statistics; weights and inputs are seeded. The flows are in
``tests.helpers.qat``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import fx, nn
from torch.export import ExportedProgram

import bnfold
from bnfold.core import rules
from tests.helpers import qat
from tests.helpers.check import (
    assert_same_outputs,
    assert_snapshot_equal,
    check_report,
    snapshot,
    torch_outputs,
)
from tests.helpers.forms import check_entries, graph_bn_count

FORMS = ["program", "graph_module"]

# Folded vs unfolded, both quantized (same quantizer, same calibration data): both flows quantize
# the same float model, folded once by bnfold and once by torchao's prepare_pt2e, and the two
# folds agree to float32 rounding (a few ulps per weight). The input is quantized identically (the
# same observer sees the same data); a weight or an observed range an ulp apart can at most move
# a value across a rounding boundary: one step in the output of the layer where it happens.
# (Measured: 0 steps, every output of every case; bit-identical quantized models.)
FOLDED_VS_UNFOLDED_STEPS = 1.0
# Quantized vs float, on the calibration batches (every value inside the observed ranges, so
# nothing saturates): half a step from rounding the output, plus the input's and the weights'
# rounding errors (each at most half a step of its own grid) carried through the products of
# each output: a few steps. Measured: up to 4.1 steps (two quantized layers in a row; 9 steps
# were seen for the depthwise ConvTranspose2d with other calibration data, where a channel of
# small range on the activation's per-tensor grid meets a large folded weight). A BatchNorm
# folded wrongly or not at all moves these outputs by 96-225 steps (measured, and asserted,
# against the float model without its BatchNorms): 16 steps (6 % of the 256-step output range)
# lies well between the two.
FLOAT_STEPS = 16.0

# --------------------------------------------------------------------------------------------
# Models and flows


class Zoo(nn.Module):
    """Every producer the XNNPACK quantizer quantizes, each with a BatchNorm, each branch ending
    in an op whose output is quantized (so each output is on a quantization grid)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(4, 6, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(6)
        self.same = nn.Conv2d(4, 6, 3, padding="same", bias=False)  # aten.conv2d.padding
        self.bn_same = nn.BatchNorm2d(6, eps=1e-3)
        self.conv1d = nn.Conv1d(4, 6, 3, padding=1)
        self.bn1d = nn.BatchNorm1d(6)
        self.conv3d = nn.Conv3d(4, 5, 3, padding=1, bias=False)
        self.bn3d = nn.BatchNorm3d(5)
        self.linear = nn.Linear(4, 5)
        self.bn_linear = nn.BatchNorm1d(5)
        self.convt = nn.ConvTranspose2d(6, 6, 3, stride=2, padding=1)
        self.bn_t = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = torch.relu(self.bn2d(self.conv2d(x)))
        b = torch.relu(self.bn_same(self.same(x)))
        c = torch.relu(self.bn1d(self.conv1d(x.flatten(2))))
        d = torch.relu(self.bn3d(self.conv3d(x.unsqueeze(2).expand(-1, -1, 3, -1, -1))))
        e = torch.relu(self.bn_linear(self.linear(x.mean((2, 3)))))  # 2-D Linear + BatchNorm1d
        f = torch.relu(self.bn_t(self.convt(a)))  # quantized conv -> quantized conv_transpose
        return a, b, c, d, e, f


ZOO_FOLDED = {
    "bn2d": ("folded", "conv2d"),
    "bn_same": ("folded", "same"),
    "bn1d": ("folded", "conv1d"),
    "bn3d": ("folded", "conv3d"),
    "bn_linear": ("folded", "linear"),
    "bn_t": ("folded", "convt"),
}
ZOO_SHAPE = (2, 4, 6, 5)


class GroupedTranspose(nn.Module):
    """conv -> BatchNorm -> ReLU -> grouped ConvTranspose2d -> BatchNorm -> ReLU. (torchao's own
    conv + BatchNorm fold in prepare_pt2e cannot take a grouped ConvTranspose: it scales the
    weight's axis 1, out / groups wide, by all the output channels' factors.)"""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.convt = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, groups=groups)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.convt(torch.relu(self.bn1(self.conv(x))))))


GROUPED_FOLDED = {"bn1": ("folded", "conv"), "bn2": ("folded", "convt")}


class Linear3d(nn.Module):
    """Linear on (N, L, C) -> BatchNorm1d(L): the BatchNorm normalises axis 1 (the L positions),
    the Linear's features are on axis 2; L equals the Linear's width, so every shape fits."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))


LINEAR3D_SHAPE = (2, 6, 4)


@functools.cache
def exported(name: str) -> tuple[nn.Module, ExportedProgram]:
    """The float model (eval mode, non-trivial BatchNorms) and its export on a seeded input."""
    if name == "zoo":
        model, shape = qat.build(Zoo, seed=1), ZOO_SHAPE
    elif name.startswith("grouped"):
        model, shape = qat.build(GroupedTranspose, int(name[len("grouped") :]), seed=2), ZOO_SHAPE
    else:
        model, shape = qat.build(Linear3d, seed=3), LINEAR3D_SHAPE
    return model, torch.export.export(model, (qat.random_inputs(shape, 1, seed=4)[0],))


def fold_checked(model: ExportedProgram | fx.GraphModule, expected: dict):
    """Fold ``model``, checking that fold and analyze leave it as it was, that analyze reports
    what fold did, and the report against ``expected`` (as ``check.check_report``)."""
    before = snapshot(model)
    analyzed = bnfold.analyze(model)
    assert_snapshot_equal(before, snapshot(model))
    folded, report = bnfold.fold(model, return_report=True)
    assert folded is not model
    assert isinstance(
        folded, ExportedProgram if isinstance(model, ExportedProgram) else fx.GraphModule
    )
    assert_snapshot_equal(before, snapshot(model))
    assert analyzed.to_list() == report.to_list(), f"analyze:\n{analyzed}\nfold:\n{report}"
    check_entries(report)
    check_report(report, expected)
    return folded, report


def without_batchnorms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm replaced by the identity."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, nn.Identity())
    return model


def of_form(ep: ExportedProgram, form: str) -> ExportedProgram | fx.GraphModule:
    return ep if form == "program" else ep.module()


def calibration(shape: tuple[int, ...]) -> list[torch.Tensor]:
    return qat.calibration_inputs(shape, 4, seed=10)


def fresh(shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Inputs no observer saw: calibration-like ones and a standard normal."""
    return qat.calibration_inputs(shape, 3, seed=20) + qat.random_inputs(shape, 1, seed=21)


@functools.cache
def torchao_flow(name: str, per_channel: bool) -> fx.GraphModule:
    """torchao's PTQ flow on the program as exported, BatchNorms and all (prepare_pt2e folds
    conv / Linear + BatchNorm itself where it can), calibrated on ``calibration``."""
    model, ep = exported(name)
    shape = LINEAR3D_SHAPE if name == "linear3d" else ZOO_SHAPE
    return qat.ptq_convert(ep, None, qat.xnnpack_quantizer(per_channel), calibration(shape))


def steps(quantized: fx.GraphModule, other, inputs: list[torch.Tensor]) -> list[float]:
    """Per output of ``quantized`` (each a dequantize): the largest difference from ``other``'s
    output over ``inputs``, in steps of that output's scale."""
    scales = qat.output_scales(quantized)
    assert scales and all(s is not None and s > 0 for s in scales), scales
    worst = [0.0] * len(scales)
    for x in inputs:
        mine, theirs = torch_outputs(quantized, (x,)), torch_outputs(other, (x,))
        assert len(mine) == len(theirs) == len(scales)
        for i, (a, b, s) in enumerate(zip(mine, theirs, scales, strict=True)):
            worst[i] = max(worst[i], qat.output_steps(a, b, s))
    return worst


def dequantized_weight(gm: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor]:
    """A producer's weight as its op reads it (the dequantize of the stored int8 values), and the
    scale broadcast to the weight's shape."""
    dq = node.args[1]
    assert isinstance(dq, fx.Node) and "dequantize" in str(dq.target), dq
    weight = constant(gm, dq)
    scale = constant(gm, dq.args[1]) if isinstance(dq.args[1], fx.Node) else dq.args[1]
    scale = torch.as_tensor(scale, dtype=torch.float64)
    if scale.ndim == 1:  # per channel, on the axis the dequantize names
        shape = [1] * weight.ndim
        shape[dq.args[3]] = -1
        scale = scale.reshape(shape)
    return weight, scale.expand(weight.shape)


def constant(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The value of a node computed from stored tensors and literals only."""
    if node.op == "get_attr":
        return _attr(gm, node.target)
    assert node.op == "call_function", node

    def value(a):
        return constant(gm, a) if isinstance(a, fx.Node) else a

    args = torch.utils._pytree.tree_map(value, node.args)
    kwargs = torch.utils._pytree.tree_map(value, node.kwargs)
    return node.target(*args, **kwargs)


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj.detach()


def producers(gm: fx.GraphModule) -> list[fx.Node]:
    """The conv, conv_transpose and linear nodes, in graph order."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and (
            n.target in qat.CONV_OPS
            or n.target in qat.CONV_TRANSPOSE_OPS
            or n.target == torch.ops.aten.linear.default
        )
    ]


def check_quantized_weights_are_folded(
    folded: ExportedProgram | fx.GraphModule, quantized: fx.GraphModule
) -> None:
    """Every producer of the quantized graph reads the folded model's weight rounded to its
    grid: within half a step of it (symmetric int8 in [-127, 127] with scale max|w| / 127:
    nothing is clipped)."""
    float_gm = folded.module() if isinstance(folded, ExportedProgram) else folded
    mine, theirs = producers(float_gm), producers(quantized)
    assert [n.target for n in mine] == [n.target for n in theirs]
    for f_node, q_node in zip(mine, theirs, strict=True):
        w = constant(float_gm, f_node.args[1]).double()
        wq, scale = dequantized_weight(quantized, q_node)
        err = (wq.double() - w).abs() / scale
        assert float(err.max()) <= 0.5 + 1e-4, (q_node.name, float(err.max()))


# --------------------------------------------------------------------------------------------
# Fold before PTQ


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("form", FORMS)
def test_fold_before_ptq_matches_torchao_flow(form, per_channel):
    """Every BatchNorm of the zoo is folded before prepare_pt2e sees the graph; the quantized
    folded model computes what torchao's flow on the unfolded program computes, and is as close
    to the float model."""
    model, ep = exported("zoo")
    folded, _ = fold_checked(of_form(ep, form), ZOO_FOLDED)
    assert graph_bn_count(folded) == 0
    calib = calibration(ZOO_SHAPE)
    quantized = qat.ptq_convert(folded, None, qat.xnnpack_quantizer(per_channel), calib)
    assert "batch_norm" not in " ".join(qat.op_names(quantized))
    check_quantized_weights_are_folded(folded, quantized)
    baseline = torchao_flow("zoo", per_channel)
    assert len(qat.output_scales(baseline)) == len(qat.output_scales(quantized)) == 6
    inputs = fresh(ZOO_SHAPE)
    vs_baseline = steps(quantized, baseline, inputs)
    assert max(vs_baseline) <= FOLDED_VS_UNFOLDED_STEPS, vs_baseline
    # against the float model, on data inside the observed ranges
    vs_float = steps(quantized, model, calib)
    baseline_vs_float = steps(baseline, model, calib)
    assert max(vs_float) <= FLOAT_STEPS, vs_float
    for mine, theirs in zip(vs_float, baseline_vs_float, strict=True):
        assert mine <= theirs + FOLDED_VS_UNFOLDED_STEPS, (vs_float, baseline_vs_float)
    # ... and the bound tells a folded model from one that lost its BatchNorms
    vs_no_bn = steps(quantized, without_batchnorms(model), calib)
    assert min(vs_no_bn) > FLOAT_STEPS, vs_no_bn


@pytest.mark.parametrize("groups", [2, 8], ids=["groups2", "depthwise"])
@pytest.mark.parametrize("form", FORMS)
def test_fold_before_ptq_grouped_conv_transpose(form, groups):
    """A grouped ConvTranspose2d + BatchNorm folds before observers are inserted; the quantized
    model stays within the quantization error of the float model (there is no unfolded flow to
    compare with: torchao's prepare_pt2e fails on this fold itself)."""
    model, ep = exported(f"grouped{groups}")
    folded, _ = fold_checked(of_form(ep, form), GROUPED_FOLDED)
    assert graph_bn_count(folded) == 0
    calib = calibration(ZOO_SHAPE)
    for per_channel in (False, True):
        quantized = qat.ptq_convert(folded, None, qat.xnnpack_quantizer(per_channel), calib)
        assert "batch_norm" not in " ".join(qat.op_names(quantized))
        assert qat.op_names(quantized).count("conv_transpose2d") == 1
        check_quantized_weights_are_folded(folded, quantized)
        vs_float = steps(quantized, model, calib)
        assert max(vs_float) <= FLOAT_STEPS, (per_channel, vs_float)
        vs_no_bn = steps(quantized, without_batchnorms(model), calib)
        assert min(vs_no_bn) > FLOAT_STEPS, (per_channel, vs_no_bn)


@pytest.mark.filterwarnings("ignore:Not fusing linear\\+bn")  # torchao refuses it too
def test_linear_on_3d_input_is_kept():
    """Linear on a 3-D input -> BatchNorm1d is kept under channel-axis, in both forms; the model
    computes exactly what it computed, and quantizes to exactly what the unfolded model
    quantizes to. (Both forms in one test: the BatchNorm left makes convert_pt2e build its
    conv + BatchNorm patterns, a few seconds once per process.)"""
    model, ep = exported("linear3d")
    inputs = fresh(LINEAR3D_SHAPE)
    calib = calibration(LINEAR3D_SHAPE)
    baseline = torchao_flow("linear3d", False)
    assert "batch_norm" in qat.op_names(baseline)
    # against the float model: the Linear's output is quantized, then the BatchNorm (float)
    # scales each position l by gamma_l / sqrt(var_l + eps): FLOAT_STEPS of the Linear's output
    # grid, so scaled
    (bn,) = [n for n in baseline.graph.nodes if "batch_norm" in str(n.target)]
    assert bn.args[0].target in qat.DQ_PER_TENSOR
    with torch.no_grad():
        gain = float((model.bn.weight / (model.bn.running_var + model.bn.eps).sqrt()).abs().max())
    bound = FLOAT_STEPS * float(bn.args[0].args[1]) * gain
    for form in FORMS:
        kept, _ = fold_checked(of_form(ep, form), {"bn": ("skipped", rules.CHANNEL_AXIS)})
        assert graph_bn_count(kept) == 1
        for x in inputs:
            assert_same_outputs(torch_outputs(ep, (x,)), torch_outputs(kept, (x,)))
        quantized = qat.ptq_convert(kept, None, qat.xnnpack_quantizer(), calib)
        assert qat.op_names(quantized) == qat.op_names(baseline)
        for x in inputs:
            assert_same_outputs(torch_outputs(baseline, (x,)), torch_outputs(quantized, (x,)))
        for x in calib:
            (want,), (got,) = torch_outputs(model, (x,)), torch_outputs(quantized, (x,))
            assert float((got - want).abs().max()) <= bound, form


# --------------------------------------------------------------------------------------------
# After torchao's QAT fold


QAT_CASES = {
    "conv2d-relu-per-channel": (dict(kind="conv2d", relu=True), True),
    "conv1d-nobias": (dict(kind="conv1d", bias=False), False),
    "conv_transpose2d-relu": (dict(kind="conv_transpose2d", relu=True), False),
}


@pytest.mark.parametrize("case", list(QAT_CASES))
def test_nothing_left_after_torchao_qat(case):
    """torchao's QAT convert folded every BatchNorm: bnfold's report is empty, the graph the
    same, the outputs bit-identical."""
    kwargs, per_channel = QAT_CASES[case]
    model = qat.build(qat.ConvBN, seed=5, **kwargs)
    shape = qat.input_shape(kwargs["kind"])
    (x,) = qat.random_inputs(shape, 1, seed=6)
    converted = qat.qat_convert(
        model, (x,), qat.xnnpack_quantizer(per_channel, is_qat=True), steps=3, seed=7
    )
    assert graph_bn_count(converted) == 0  # torchao folded it: else this test proves nothing
    folded, report = fold_checked(converted, {})
    assert len(report) == 0 and not report.folded and not report.skipped
    assert report.notes == ["the graph has no BatchNorm left: nothing to fold"]
    assert "nothing to fold" in str(report)
    assert str(folded.graph) == str(converted.graph)
    assert folded.code == converted.code
    for x in qat.calibration_inputs(shape, 2, seed=8) + qat.random_inputs(shape, 1, seed=9):
        assert_same_outputs(torch_outputs(converted, (x,)), torch_outputs(folded, (x,)))
