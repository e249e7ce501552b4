"""pt2e quantization-aware training: the conv/BatchNorm chains torchao's ``convert_pt2e`` leaves
when the quantizer quantizes the conv output (``conv -> q -> dq -> div -> [add] -> batch_norm``).

Every case runs a real flow (export in train mode, ``prepare_qat_pt2e`` with
:class:`~tests.helpers.qat.ConvOutputQuantizer`, a few SGD steps, ``convert_pt2e``) on a model
with non-trivial BatchNorm statistics, folds the converted graph, and compares the folded graph
with the converted one on random and calibration-like inputs:

- ``qat="exact"``: equal up to float rounding, no BatchNorm left, the report names the eps;
- ``qat="bias"``: folded into the conv's bias only where the report claims a bound, and the
  measured difference, in output quantization steps, is within it; elsewhere the exact form and
  a reason. The converted graphs of real flows have output ranges calibrated to the conv's
  output, so the bias fold is proven only when the output range has headroom: the tests widen
  the output quantization of converted graphs to get such chains (as a wider calibration would).
"""

from __future__ import annotations

import copy
import functools
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import fx, nn

import bnfold
import bnfold.torch
from bnfold.core import rules
from tests.helpers import qat as flows
from tests.helpers.qat import ConvBN, ConvOutputQuantizer, SharedConv, Stacked, build, in_eval

QD = torch.ops.quantized_decomposed
BATCH_NORM_OPS = ("batch_norm", "_native_batch_norm_legit_no_training", "cudnn_batch_norm")


# --------------------------------------------------------------------------------------------
# Helpers


def converted(model: nn.Module, x: torch.Tensor, *, seed: int = 0, **flow) -> fx.GraphModule:
    per_channel = flow.pop("per_channel", False)
    bias = flow.pop("qbias", "float")
    return flows.qat_convert(
        model, (x,), ConvOutputQuantizer(per_channel=per_channel, bias=bias), seed=seed, **flow
    )


def bn_count(gm: fx.GraphModule) -> int:
    return sum(
        1
        for n in gm.graph.nodes
        if n.op == "call_function" and getattr(n.target, "_opname", "") in BATCH_NORM_OPS
    )


def divisions_of_activations(gm: fx.GraphModule) -> list[fx.Node]:
    """``div`` nodes that divide a dequantized value (a QAT tail), not a constant."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and getattr(n.target, "_opname", "") == "div"
        and isinstance(n.args[0], fx.Node)
        and "dequantize" in str(n.args[0].target)
    ]


def conv_output_quantizes(gm: fx.GraphModule) -> list[fx.Node]:
    """The quantize nodes that read a convolution's output."""
    found = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == QD.quantize_per_tensor.default:
            src = n.args[0]
            if isinstance(src, fx.Node) and "conv" in getattr(src.target, "_opname", ""):
                found.append(n)
    return found


def widen_outputs(gm: fx.GraphModule, factor: float) -> fx.GraphModule:
    """A copy whose conv outputs are quantized with ``factor`` times the scale (quantize and
    dequantize alike): a converted graph calibrated on wider data."""
    gm = copy.deepcopy(gm)
    for q in conv_output_quantizes(gm):
        for n in [q, *q.users]:
            n.args = (n.args[0], n.args[1] * factor, *n.args[2:])
    gm.recompile()
    return gm


def state(gm: nn.Module) -> dict:
    """Everything a fold must not change in its input: the code and every tensor's values."""
    tensors = {k: v.detach().clone() for k, v in gm.state_dict(keep_vars=True).items()}
    for name, value in vars(gm).items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().clone()
    return {"code": gm.code, "tensors": tensors}


def assert_unchanged(gm: nn.Module, before: dict) -> None:
    after = state(gm)
    assert after["code"] == before["code"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k


def inputs(x: torch.Tensor, seed: int) -> list[torch.Tensor]:
    shape = tuple(x.shape)
    return flows.random_inputs(shape, 3, seed) + flows.calibration_inputs(shape, 6, seed + 1)


@torch.no_grad()
def max_rel(ref: nn.Module, folded: nn.Module, xs: list[torch.Tensor]) -> float:
    worst = 0.0
    for x in xs:
        a, b = ref(x), folded(x)
        scale = max(float(a.abs().max()), 1e-6)
        worst = max(worst, float((a - b).abs().max()) / scale)
    return worst


@torch.no_grad()
def max_steps(ref: nn.Module, folded: nn.Module, xs: list[torch.Tensor], scale: float) -> float:
    return max(flows.output_steps(ref(x), folded(x), scale) for x in xs)


def claimed_steps(note: str) -> float:
    found = re.search(r"at most ([0-9.]+) output steps", note)
    assert found, note
    return float(found.group(1))


# --------------------------------------------------------------------------------------------
# Every chain torchao leaves, exact


# (kind, conv bias, per-channel weights, bias quantization, fold_quantize, to_eval): every value
# of every option meets every conv kind, and each option meets the others (pairwise).
CONFIGS = [
    ("conv2d", True, False, "float", True, True),
    ("conv2d", False, True, "float", False, False),
    ("conv2d", True, True, "int32", False, True),
    ("conv2d", True, False, "int32", True, False),
    ("conv1d", True, True, "int32", True, True),
    ("conv1d", False, False, "float", True, False),
    ("conv1d", True, False, "float", False, True),
    ("conv_transpose2d", True, False, "int32", True, True),
    ("conv_transpose2d", False, True, "float", True, True),
    ("conv_transpose2d", True, True, "int32", False, False),
    ("conv_transpose1d", True, False, "float", False, False),
    ("conv_transpose1d", True, True, "int32", True, True),
    ("conv_transpose1d", False, False, "float", True, True),
]


def _id(c) -> str:
    kind, bias, pc, qbias, fq, ev = c
    return "-".join(
        [
            kind,
            "bias" if bias else "nobias",
            "perchannel" if pc else "pertensor",
            f"{qbias}bias",
            "foldq" if fq else "nofoldq",
            "eval" if ev else "train",
        ]
    )


@pytest.fixture(scope="module", params=CONFIGS, ids=_id)
def case(request):
    kind, bias, per_channel, qbias, fold_quantize, to_eval = request.param
    seed = CONFIGS.index(request.param)
    model = build(ConvBN, kind, bias=bias, eps=1e-3, relu=seed % 2 == 0, seed=seed)
    x = flows.random_inputs(flows.input_shape(kind), 1, seed)[0]
    gm = converted(
        model,
        x,
        seed=seed,
        per_channel=per_channel,
        qbias=qbias,
        fold_quantize=fold_quantize,
        to_eval=to_eval,
    )
    return gm, x, to_eval, seed


def test_torchao_leaves_the_chain(case):
    gm, _, _, _ = case
    names = flows.op_names(gm)
    assert bn_count(gm) == 1
    assert "div" in names  # the division by the scale factor: torchao did not fold it


def test_exact_fold_equals_the_converted_graph(case):
    gm, x, to_eval, seed = case
    before = state(gm)
    folded, report = bnfold.fold(gm, return_report=True)
    assert_unchanged(gm, before)
    (entry,) = report.entries
    assert entry.folded and entry.target == "conv", report
    assert "eps 1e-05 as the graph carries it" in entry.note  # torchao's eps, not the model's
    assert "became one per-channel add" in entry.note
    assert ("training mode" in entry.note) == (not to_eval)
    assert bn_count(folded) == 0
    assert not divisions_of_activations(folded)
    ref = gm if to_eval else in_eval(gm)
    assert max_rel(ref, folded, inputs(x, seed + 100)) < 1e-5
    assert bnfold.analyze(gm).to_list() == report.to_list()


def test_bias_fold_is_bounded_or_falls_back(case):
    """On the converted graph as calibrated: the bound rarely holds, and the fallback is exact;
    with a widened output range the chain folds into the bias within the bound it claims."""
    gm, x, to_eval, seed = case
    ref = gm if to_eval else in_eval(gm)
    folded, report = bnfold.fold(gm, return_report=True, qat="bias")
    (entry,) = report.entries
    assert entry.folded
    if "kept exact, not folded into the bias" in entry.note:
        assert max_rel(ref, folded, inputs(x, seed + 200)) < 1e-5
    (q,) = conv_output_quantizes(gm)
    wide = widen_outputs(gm, 64.0)
    ref_wide = wide if to_eval else in_eval(wide)
    before = state(wide)
    folded, report = bnfold.fold(wide, return_report=True, qat="bias")
    assert_unchanged(wide, before)
    (entry,) = report.entries
    assert entry.folded, report
    assert "bias before the output quantize" in entry.note, entry.note
    bound = claimed_steps(entry.note)
    assert 1.0 <= bound <= 1.5
    assert bn_count(folded) == 0 and not divisions_of_activations(folded)
    (q_folded,) = conv_output_quantizes(folded)  # the conv feeds the output quantize directly
    assert q_folded.next.target == QD.dequantize_per_tensor.default
    steps = max_steps(ref_wide, folded, inputs(x, seed + 300), q.args[1] * 64.0)
    assert steps <= bound + 1e-3, (steps, bound)


# --------------------------------------------------------------------------------------------
# Graph shapes around the chain


@pytest.fixture(scope="module")
def shared():
    model = build(SharedConv, "conv2d", seed=11)
    x = flows.random_inputs(flows.input_shape("conv2d"), 1, 11)[0]
    # float bias: torchao's prepare fails on an int32 bias derived from a shared weight
    return converted(model, x, seed=11), x


def test_shared_conv_weight_gets_separate_folds(shared):
    gm, x = shared
    assert bn_count(gm) == 2
    for mode, g in (("exact", gm), ("bias", widen_outputs(gm, 64.0))):
        before = state(g)
        folded, report = bnfold.fold(g, return_report=True, qat=mode)
        assert_unchanged(g, before)
        assert [e.folded for e in report] == [True, True], report
        assert bn_count(folded) == 0
        if mode == "exact":
            assert max_rel(g, folded, inputs(x, 12)) < 1e-5
            continue
        convs = [n for n in folded.graph.nodes if getattr(n.target, "_opname", "") == "conv2d"]
        biases = {n.args[2].target for n in convs}  # each conv reads its own new bias
        assert biases == {"conv.bias_folded", "conv.bias_folded_2"}  # next to conv.bias
        scale = max(q.args[1] for q in conv_output_quantizes(g))
        bound = max(claimed_steps(e.note) for e in report)
        # the model adds the two chains: each may move by its bound
        assert max_steps(g, folded, inputs(x, 13), scale) <= 2 * bound + 1e-3


def test_stacked_chains_fold_in_one_call():
    model = build(Stacked, "conv2d", seed=21)
    x = flows.random_inputs(flows.input_shape("conv2d"), 1, 21)[0]
    gm = converted(model, x, seed=21, per_channel=True)
    folded, report = bnfold.fold(gm, return_report=True)
    assert [(e.bn, e.target, e.folded) for e in report] == [
        ("block1.bn", "block1.conv", True),
        ("block2.bn", "block2.conv", True),
    ]
    assert bn_count(folded) == 0
    assert max_rel(gm, folded, inputs(x, 22)) < 1e-5


def test_exported_program_of_a_converted_graph(case):
    gm, x, to_eval, seed = case
    ep = torch.export.export(gm, (x,))
    folded, report = bnfold.fold(ep, return_report=True)
    (entry,) = report.entries
    if not to_eval:
        # the program mutates the running statistics: kept, and told what to do
        assert not entry.folded and entry.rule == rules.CONSTANT_PARAMS
        assert "move_exported_model_to_eval" in entry.reason
        return
    assert entry.folded, report
    assert bn_count(folded.module()) == 0
    assert max_rel(ep.module(), folded.module(), inputs(x, seed + 400)) < 1e-5


# --------------------------------------------------------------------------------------------
# Variants torchao's own fold misses, and what is not a chain


@pytest.fixture(scope="module")
def plain():
    model = build(ConvBN, "conv2d", bias=True, seed=31)
    x = flows.random_inputs(flows.input_shape("conv2d"), 1, 31)[0]
    return converted(model, x, seed=31), x


def _node(gm: fx.GraphModule, opname: str) -> fx.Node:
    (n,) = [n for n in gm.graph.nodes if getattr(n.target, "_opname", "") == opname]
    return n


def test_padding_overload_producer(plain):
    # padding=1 with a 3-wide kernel is padding="same": the same chain with aten.conv2d.padding
    gm, x = plain
    same = copy.deepcopy(gm)
    conv = _node(same, "conv2d")
    conv.target = torch.ops.aten.conv2d.padding
    conv.args = (*conv.args[:3], [1, 1], "same")
    same.recompile()
    assert torch.equal(same(x), gm(x))
    folded, report = bnfold.fold(same, return_report=True)
    assert report.entries[0].folded, report
    assert max_rel(same, folded, inputs(x, 32)) < 1e-5


def test_cudnn_batch_norm(plain):
    # torch.export on CUDA emits cudnn_batch_norm; the fold removes it, so the result runs here
    gm, x = plain
    cudnn = copy.deepcopy(gm)
    bn = _node(cudnn, "batch_norm")
    inp, w, b, mean, var, _, momentum, eps, _ = bn.args
    with cudnn.graph.inserting_before(bn):
        new = cudnn.graph.call_function(
            torch.ops.aten.cudnn_batch_norm.default, (inp, w, b, mean, var, False, momentum, eps)
        )
        out = cudnn.graph.call_function(__import__("operator").getitem, (new, 0))
    out.meta = dict(bn.meta)
    bn.replace_all_uses_with(out)
    cudnn.graph.erase_node(bn)
    cudnn.recompile()
    folded, report = bnfold.fold(cudnn, return_report=True)
    assert report.entries[0].folded, report
    assert bn_count(folded) == 0
    assert max_rel(gm, folded, inputs(x, 33)) < 1e-5


def test_a_chain_broken_by_another_op_is_named(plain):
    gm, x = plain
    broken = copy.deepcopy(gm)
    (q,) = conv_output_quantizes(broken)
    conv = q.args[0]
    with broken.graph.inserting_after(conv):
        relu = broken.graph.call_function(torch.ops.aten.relu.default, (conv,))
    q.replace_input_with(conv, relu)
    broken.recompile()
    before = state(broken)
    folded, report = bnfold.fold(broken, return_report=True, qat="bias")
    assert_unchanged(broken, before)
    (entry,) = report.entries
    assert not entry.folded and entry.rule == rules.NO_PRODUCER
    assert "the chain stops at node relu" in entry.reason, entry.reason
    assert torch.equal(folded(x), broken(x))


def test_padding_same_is_not_rewritten_by_torchao_and_is_kept():
    # torchao's QAT rewrite does not match aten.conv2d.padding: the BatchNorm reads the
    # dequantized conv output directly, and its scale cannot be folded
    model = build(ConvBN, "conv2d", padding="same", seed=41)
    x = flows.random_inputs(flows.input_shape("conv2d"), 1, 41)[0]
    gm = converted(model, x, seed=41)
    assert "div" not in flows.op_names(gm) and bn_count(gm) == 1
    folded, report = bnfold.fold(gm, return_report=True)
    (entry,) = report.entries
    assert not entry.folded and entry.rule == rules.NO_PRODUCER
    assert "scale would change the output quantization" in entry.reason
    assert torch.equal(folded(x), gm(x))


def test_zero_gamma_is_refused(plain):
    # gamma = 0 makes torchao's scale factor 0: the graph divides by zero there, and a fold
    # would replace its NaNs with numbers
    gm, x = plain
    zero = copy.deepcopy(gm)
    with torch.no_grad():
        zero.bn.weight[2] = 0.0
    assert not torch.isfinite(zero(x)).all()
    folded, report = bnfold.fold(zero, return_report=True)
    (entry,) = report.entries
    assert not entry.folded and entry.rule == rules.VALID_VALUES
    assert "divides by 0 at channel 2" in entry.reason
    a, b = zero(x), folded(x)
    assert torch.equal(torch.isnan(a), torch.isnan(b))


def test_qat_argument_is_checked(plain):
    gm, _ = plain
    with pytest.raises(bnfold.InvalidArgumentError, match="qat must be one of"):
        bnfold.fold(gm, qat="int")
    with pytest.raises(bnfold.InvalidArgumentError, match="pt2e quantized graphs"):
        bnfold.fold(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), qat="bias")


def test_eps_recipe_keeps_the_float_model():
    # the README's recipe before prepare_qat_pt2e: torchao uses eps 1e-5, so move the
    # difference into running_var; in inference the model computes the same
    model = build(ConvBN, "conv2d", eps=1e-3, seed=51)
    x = flows.random_inputs(flows.input_shape("conv2d"), 1, 51)[0]
    expected = model(x)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.eps != 1e-5:
            with torch.no_grad():
                m.running_var += m.eps - 1e-5
            m.eps = 1e-5
    got = model(x)
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    assert not math.isclose(float(model.bn.running_var.min()), 0.0)


# --------------------------------------------------------------------------------------------
# Any tail of per-channel arithmetic: the matcher's algebra (operand order, signs, shapes)


@functools.lru_cache(maxsize=1)
def _plain_chain() -> tuple[fx.GraphModule, torch.Tensor]:
    model = build(ConvBN, "conv2d", bias=True, seed=61)
    x = flows.random_inputs(flows.input_shape("conv2d"), 1, 61)[0]
    return converted(model, x, seed=61), x


TAIL_OPS = ["add", "sub", "rsub", "mul", "div"]
# constant shapes for a (N, C=6, H, W) activation: per channel, scalar, 0-d, and two that are not
# per channel (along H, along W)
SHAPES = {"channel": (1, 6, 1, 1), "channel3": (6, 1, 1), "scalar": (1,), "0d": (),
          "h": (1, 1, 6, 1), "w": (5,), "full": (1, 6, 1, 1)}  # fmt: skip
# "full": a per-channel constant stored at the activation's full shape (as an expand leaves it)
PER_CHANNEL = {"channel", "channel3", "scalar", "0d", "full"}


def _retail(gm: fx.GraphModule, ops: list[tuple[str, str, float]], seed: int) -> fx.GraphModule:
    """A copy of ``gm`` whose conv output reaches the BatchNorm through ``ops`` instead of
    torchao's div/add (constants as buffers, magnitudes in [0.5, 2], random signs)."""
    gm = copy.deepcopy(gm)
    g = torch.Generator().manual_seed(seed)
    bn = _node(gm, "batch_norm")
    (q,) = conv_output_quantizes(gm)
    value = next(iter(q.users))
    for i, (op, shape, sign) in enumerate(ops):
        const = (torch.rand(SHAPES[shape], generator=g) * 1.5 + 0.5) * sign
        if shape == "full":
            const = const.expand(1, 6, 6, 5).contiguous()
        gm.register_buffer(f"tail_{i}", const)
        with gm.graph.inserting_before(bn):
            c = gm.graph.get_attr(f"tail_{i}")
            target = getattr(torch.ops.aten, "sub" if op == "rsub" else op).Tensor
            args = (c, value) if op == "rsub" else (value, c)
            value = gm.graph.call_function(target, args)
    bn.args = (value, *bn.args[1:])
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(TAIL_OPS), st.sampled_from(sorted(SHAPES)), st.sampled_from([1.0, -1.0])
        ),
        max_size=5,
    ),
    seed=st.integers(0, 2**16),
)
@example(ops=[("mul", "full", -1.0), ("rsub", "full", 1.0), ("div", "0d", 1.0)], seed=1)
@example(ops=[("add", "w", 1.0)], seed=2)
def test_any_per_channel_tail_folds_exactly(ops, seed):
    base, x = _plain_chain()
    gm = _retail(base, ops, seed)
    with torch.no_grad():
        expected = gm(x)
    folded, report = bnfold.fold(gm, return_report=True)
    (entry,) = report.entries
    if not ops:
        assert not entry.folded and entry.rule == rules.NO_PRODUCER  # the BatchNorm's own scale
    elif any(shape not in PER_CHANNEL for _, shape, _ in ops):
        assert not entry.folded and entry.rule == rules.CHANNEL_AXIS, entry
        assert "not only along the channel axis" in entry.reason
    else:
        assert entry.folded, entry
        assert bn_count(folded) == 0
        for xs in inputs(x, seed)[2:5]:  # a random and two calibration-like inputs
            with torch.no_grad():
                a, b = gm(xs), folded(xs)
            assert float((a - b).abs().max()) <= 1e-5 * max(float(a.abs().max()), 1.0)
        return
    with torch.no_grad():
        assert torch.equal(folded(x), expected)


# --------------------------------------------------------------------------------------------
# Hand-built quantized graphs: what converters other than torchao's flows can emit


def q(x, s, zp, lo=-128, hi=127, dtype=torch.int8):
    return QD.quantize_per_tensor.default(x, s, zp, lo, hi, dtype)


def dq(x, s, zp, lo=-128, hi=127, dtype=torch.int8, **kwargs):
    return QD.dequantize_per_tensor.default(x, s, zp, lo, hi, dtype, **kwargs)


class HandBuilt(nn.Module):
    """x -> q/dq -> conv2d (int8 weight, float bias) -> q/dq -> [tail] -> BatchNorm2d, with
    the tail and the steps before the BatchNorm chosen by ``variant``."""

    def __init__(self, variant: str = "", out_scale: float = 0.05) -> None:
        super().__init__()
        self.variant, self.out_scale = variant, out_scale
        g = torch.Generator().manual_seed(71)
        self.register_buffer("wq", torch.randint(-60, 61, (4, 3, 3, 3), generator=g).to(torch.int8))
        self.register_buffer("b0", torch.zeros(4))
        self.register_buffer("cb", torch.tensor([0.3, -0.3, 0.2, 0.1]))
        self.bn = randomize_bn(nn.BatchNorm2d(4), g)
        if variant == "int8_input":  # positive weights: a constant input reaches the extremes
            self.wq = self.wq.abs()
        if variant == "fp16_out":
            with torch.no_grad():
                self.bn.weight.fill_(1.0)
                self.bn.running_var.fill_(1.0 - 1e-5)

    def scale_factor(self) -> torch.Tensor:
        return (self.bn.weight / torch.sqrt(self.bn.running_var + 1e-5)).reshape(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.variant
        # int8_input: an int8 graph input whose dequantize declares a range it does not enforce
        half_conv = {"out_dtype": torch.float16} if v == "fp16_conv" else {}  # a float16 conv
        if v == "int8_input":
            xd = dq(x, 0.02, 0, -2, 2)
        else:
            xd = dq(q(x, 0.02, 0), 0.02, 0, **half_conv)
        w = dq(self.wq, 0.01, 0, -127, 127, **half_conv)
        b0 = self.b0.half() if half_conv else self.b0
        y = torch.ops.aten.conv2d.default(xd, w, b0, [1, 1], [1, 1])
        out_dtype = {"out_dtype": torch.float16} if v == "fp16_out" else {}
        z = dq(q(y, self.out_scale, 0), self.out_scale, 0, **out_dtype)
        cb = self.cb
        if v == "half_constant":
            cb = cb.half().float()
        if v == "int_cast":  # 1/41*41 is 0.99999994 in float32: the int cast gives 0, not 1
            cb = cb + (torch.ones_like(cb) / 41 * 41).to(torch.int32).to(cb.dtype)
        if v == "written_clone":
            cb = cb.clone()
            cb.add_(1.0)
        # fp16_out: the tail and the BatchNorm in float16, without a division (a BatchNorm of
        # scale 1, below): float16 scale factors would leave a scale, not a shift
        half = v == "fp16_out"
        sf, cb = (self.scale_factor(), cb.reshape(1, -1, 1, 1))
        if v == "alpha":
            z = torch.sub(z / sf, cb, alpha=2)
        elif half:
            z = z + cb.half()
        else:
            z = z / sf + cb
        if v in ("computed_stats", "fp16_out"):  # no BatchNorm operand is a stored tensor
            bn = self.bn
            stats = [t * 1.0 for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)]
            if half:
                stats = [t.half() for t in stats]
            return torch.nn.functional.batch_norm(z, *stats[:2], *stats[2:])
        return self.bn(z)


def randomize_bn(bn: nn.BatchNorm2d, g: torch.Generator) -> nn.BatchNorm2d:
    with torch.no_grad():
        bn.running_mean.uniform_(-0.3, 0.3, generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.uniform_(-0.3, 0.3, generator=g)
    return bn.eval()


def hand_built(variant: str = "", *, decompose: bool = False, **kwargs):
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(72))
    if variant == "int8_input":
        x = torch.randint(-128, 128, (2, 3, 6, 6), dtype=torch.int8)
    ep = torch.export.export(HandBuilt(variant, **kwargs).eval(), (x,))
    if decompose:
        ep = ep.run_decompositions()
    return ep.module(), x


def _same_inputs(x: torch.Tensor, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(73)
    if x.dtype == torch.int8:  # any int8 value, the extremes included
        extremes = [torch.full(tuple(x.shape), v, dtype=torch.int8) for v in (-128, 127)]
        return [torch.randint(-128, 128, tuple(x.shape), generator=g).to(torch.int8), *extremes]
    return [torch.randn(tuple(x.shape), generator=g) * 3 for _ in range(n)]


def test_hand_built_chain_folds_in_both_modes():
    gm, x = hand_built(out_scale=0.5)  # a wide output range: the bias fold is proven
    for mode in ("exact", "bias"):
        folded, report = bnfold.fold(gm, return_report=True, qat=mode)
        (entry,) = report.entries
        assert entry.folded and bn_count(folded) == 0
        if mode == "exact":
            assert max_rel(gm, folded, _same_inputs(x)) < 1e-5
        else:
            assert "float bias" in entry.note, entry.note
            assert max_steps(gm, folded, _same_inputs(x), 0.5) <= claimed_steps(entry.note)


def test_input_range_is_the_integers_a_dequantize_can_read():
    # the input dequantize declares [-2, 2] but reads any int8 a caller passes: the bound must
    # take [-128, 127], and the conv output can then reach far beyond the output range
    gm, x = hand_built("int8_input", out_scale=0.1)
    folded, report = bnfold.fold(gm, return_report=True, qat="bias")
    (entry,) = report.entries
    if "kept exact" not in entry.note:
        assert max_steps(gm, folded, _same_inputs(x), 0.1) <= claimed_steps(entry.note)
    else:
        assert "outside the output quantization range" in entry.note
        assert max_rel(gm, folded, _same_inputs(x)) < 1e-5


def test_a_producer_without_bias_operand_stays_exact_in_bias_mode():
    # Linear without bias, decomposed: permute + mm, which has no bias operand
    class LinearBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(74)
            self.register_buffer("wq", torch.randint(-20, 21, (4, 8), generator=g).to(torch.int8))
            self.bn = randomize_bn(nn.BatchNorm1d(4), g)

        def forward(self, x):
            y = torch.nn.functional.linear(dq(q(x, 0.01, 0), 0.01, 0), dq(self.wq, 0.01, 0))
            sf = self.bn.weight / torch.sqrt(self.bn.running_var + 1e-5)
            return self.bn(dq(q(y, 2.0, 0), 2.0, 0) / sf)

    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(75))
    ep = torch.export.export(LinearBN().eval(), (x,)).run_decompositions()
    assert "mm" in flows.op_names(ep.module())
    for model in (ep, ep.module()):
        folded, report = bnfold.fold(model, return_report=True, qat="bias")
        (entry,) = report.entries
        assert entry.folded and "has no bias operand" in entry.note, entry.note
        run = (lambda m: m.module()) if model is ep else (lambda m: m)
        xs = [torch.randn(3, 8, generator=torch.Generator().manual_seed(s)) for s in (76, 77)]
        assert max_rel(run(model), run(folded), xs) < 1e-5


def test_casts_in_constants_round_as_the_graph_does():
    # after run_decompositions() a .half() is _to_copy(dtype=float16): its rounding counts
    gm, x = hand_built("half_constant", decompose=True)
    folded, report = bnfold.fold(gm, return_report=True)
    assert report.entries[0].folded, report
    assert max_rel(gm, folded, _same_inputs(x)) < 1e-5


def test_integer_casts_in_constants_are_computed_as_the_graph_does():
    gm, x = hand_built("int_cast")
    folded, report = bnfold.fold(gm, return_report=True)
    assert report.entries[0].folded, report
    assert max_rel(gm, folded, _same_inputs(x)) < 1e-5


def test_addmm_alpha_keeps_the_bias_fold_out():
    # the bound is of bias + x @ W; addmm(alpha=3) computes bias + 3 * x @ W
    class AddmmBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(78)
            self.register_buffer("wq", torch.randint(-9, 10, (6, 8), generator=g).to(torch.int8))
            self.register_buffer("b0", torch.zeros(6))
            self.bn = randomize_bn(nn.BatchNorm1d(6), g)

        def forward(self, x):
            y = torch.addmm(self.b0, dq(q(x, 0.01, 0), 0.01, 0), dq(self.wq, 0.002, 0).t(), alpha=3)
            sf = self.bn.weight / torch.sqrt(self.bn.running_var + 1e-5)
            return self.bn(dq(q(y, 0.05, 0), 0.05, 0) / sf)

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(79))
    gm = torch.export.export(AddmmBN().eval(), (x,)).module()
    folded, report = bnfold.fold(gm, return_report=True, qat="bias")
    (entry,) = report.entries
    assert entry.folded and "scales its product by alpha=3" in entry.note, entry.note
    xs = [torch.sign(torch.randn(4, 8, generator=torch.Generator().manual_seed(80))) * 1.28]
    assert max_rel(gm, folded, xs) < 1e-5


def test_bias_fold_refuses_what_its_bound_leaves_out():
    # a float16 conv rounds the shifted output itself; an input written in place after its
    # quantize is not in the range the quantize gives
    gm, x = hand_built("fp16_conv", out_scale=0.5)
    folded, report = bnfold.fold(gm, return_report=True, qat="bias")
    assert "computes in torch.float16" in report.entries[0].note
    assert max_rel(gm, folded, _same_inputs(x)) < 1e-3  # the exact form, in float16
    gm, x = hand_built(out_scale=0.5)
    (quantize,) = [n for n in gm.graph.nodes if n.target == QD.quantize_per_tensor.default][:1]
    with gm.graph.inserting_after(quantize):  # the dequantize still reads the quantize
        gm.graph.call_function(torch.ops.aten.mul_.Tensor, (quantize, 3))
    gm.recompile()
    folded, report = bnfold.fold(gm, return_report=True, qat="bias")
    assert "written in place" in report.entries[0].note, report.entries[0].note
    assert max_rel(gm, folded, _same_inputs(x)) < 1e-5


def test_a_constant_written_in_place_is_not_constant():
    gm, x = hand_built("written_clone")
    folded, report = bnfold.fold(gm, return_report=True)
    (entry,) = report.entries
    assert not entry.folded and entry.rule == rules.CONSTANT_PARAMS
    assert "add_" in entry.reason  # the clone's in-place add, whichever node reads it
    assert torch.equal(folded(x), gm(x))


def test_batch_norm_operands_computed_in_the_graph():
    gm, x = hand_built("computed_stats", out_scale=0.5)
    for mode in ("exact", "bias"):
        report = bnfold.analyze(gm, qat=mode)
        folded, folded_report = bnfold.fold(gm, return_report=True, qat=mode)
        assert report.to_list() == folded_report.to_list()
        assert folded_report.entries[0].folded, folded_report
        assert max_steps(gm, folded, _same_inputs(x), 0.5) <= 1.0


def test_float16_output_dequantize_keeps_the_conv_bias_in_the_conv_dtype():
    gm, x = hand_built("fp16_out", out_scale=0.5)
    folded, report = bnfold.fold(gm, return_report=True, qat="bias")
    (entry,) = report.entries
    assert entry.folded and "float bias" in entry.note, entry.note
    # float16 rounding of the output adds to the step bound
    assert max_steps(gm, folded, _same_inputs(x), 0.5) <= claimed_steps(entry.note) + 0.01


def test_a_tail_op_that_is_not_a_link_is_named():
    gm, x = hand_built("alpha")
    folded, report = bnfold.fold(gm, return_report=True)
    (entry,) = report.entries
    assert not entry.folded and entry.rule == rules.NO_PRODUCER
    assert "scales its operand by alpha=2" in entry.reason
    assert torch.equal(folded(x), gm(x))


def test_compile_backend_folds_the_chain_and_refolds_after_a_change(plain):
    # torch.compile(converted, backend="bnfold") runs the same adapter: the chain is folded in
    # the captured graph, and a changed running_var is seen on the next call
    gm, x = plain
    gm = copy.deepcopy(gm)
    torch._dynamo.reset()
    backend = bnfold.torch.Backend(inner="eager")  # its own reports: other tests compile too
    compiled = torch.compile(gm, backend=backend)
    with torch.no_grad():
        assert max_rel(gm, compiled, [x]) < 1e-5
        (compiled_report,) = backend.reports
        (entry,) = compiled_report.report.entries
        assert entry.folded and "became one per-channel add" in entry.note
        before = gm(x)
        gm.bn.running_var.mul_(2.0)
        assert not torch.allclose(gm(x), before)
        assert max_rel(gm, compiled, [x]) < 1e-5
    torch._dynamo.reset()
