"""pt2e quantization flows for the tests (torchao): a quantizer that leaves conv + BatchNorm
unfoldable for torchao, small conv + BatchNorm models, the QAT and PTQ flows, calibration-like
inputs, and differences counted in quantization steps.

**ConvOutputQuantizer** annotates only convolutions, and quantizes their *output* (and, if asked,
their bias as int32 derived from the input and weight scales), as ExecuTorch's Cadence and
Qualcomm quantizers do. Under such a quantizer torchao's QAT flow cannot fold conv + BatchNorm:
``prepare_qat_pt2e`` rewrites conv -> batch_norm into conv(scaled weight) -> div(scale factor)
-> add(bias) -> batch_norm, the conv output is fake-quantized in between, and ``convert_pt2e``'s
fold, which looks for conv -> div -> add -> batch_norm, no longer matches: the converted graph
keeps ``conv -> quantize -> dequantize -> div -> add -> batch_norm``.

**What torchao's QAT flow does to these models** (torchao 0.18, measured):

- its conv + BatchNorm rewrite and ``move_exported_model_to_eval`` match with literals ignored
  and put their own: every BatchNorm of the converted graph has eps 1e-5, whatever the
  model's;
- it rewrites only ``conv1d/conv2d/conv_transpose1d/conv_transpose2d`` in their default
  overloads: a ``padding="same"`` conv (``.padding``) keeps conv -> quantize -> dequantize ->
  batch_norm;
- a grouped ConvTranspose fails in the first training step (the rewrite scales the weight's
  axis 1, out / groups wide, by all output channels' factors); so does torchao's PTQ fold of it
  in ``prepare_pt2e``;
- :class:`SharedConv` under ``ConvOutputQuantizer(bias="int32")`` fails in
  ``prepare_qat_pt2e`` (KeyError on a derived-spec edge: both rewrites map the shared weight,
  the last one wins); ``bias="float"`` works;
- BatchNorm1d leaves ``num_batches_tracked.add_(1)`` in the converted graph (torchao removes it
  only under BatchNorm2d modules);
- the training steps move the BatchNorms' running statistics towards the batch statistics and
  change the weights: compare a converted model with other converted models, not with the float
  model it came from.

**Speed.** torchao builds the graphs it matches (conv + BatchNorm, dropout, ... in every variant)
by a strict ``torch.export`` of each, every time: about 110 exports in a ``convert_pt2e`` of a
graph with a BatchNorm left, 20 s, and 4 s more in ``prepare_qat_pt2e``. The flows here run
torchao with those pattern graphs exported non-strict and kept for the process
(:func:`cached_patterns`): the same graphs (the code of all 126 pattern graphs these flows use
was compared with torchao's strict exports: identical), built once. A flow then takes a fraction
of a second, after one start-up of a few seconds per process.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torchao.quantization.pt2e import move_exported_model_to_eval
from torchao.quantization.pt2e.fake_quantize import FakeQuantize, FusedMovingAvgObsFakeQuantize
from torchao.quantization.pt2e.observer import (
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
)
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer import (
    DerivedQuantizationSpec,
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
)

from tests.helpers.support import randomize_all

# --------------------------------------------------------------------------------------------
# The quantizer


def _overloads(*names: str) -> frozenset:
    ops = set()
    for name in names:
        packet = getattr(torch.ops.aten, name)
        ops.update(getattr(packet, o) for o in packet.overloads())
    return frozenset(ops)


CONV_OPS = _overloads("conv1d", "conv2d", "conv3d")  # .default and .padding
CONV_TRANSPOSE_OPS = _overloads("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")

INT8_MIN, INT8_MAX = -128, 127
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
EPS = 2**-12  # smallest scale an observer may choose

ACT_SPEC = QuantizationSpec(
    dtype=torch.int8,
    quant_min=INT8_MIN,
    quant_max=INT8_MAX,
    qscheme=torch.per_tensor_affine,
    observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver, eps=EPS
    ),
)


def weight_spec(per_channel: bool, ch_axis: int) -> QuantizationSpec:
    """int8 symmetric weights in [-127, 127], per tensor or per output channel on ``ch_axis``.
    (torch's fused observer + fake quant kernel takes per-channel axis 0 only: a transposed
    conv's weight, channels on axis 1, gets the unfused FakeQuantize.)"""
    kwargs: dict[str, Any] = {"eps": EPS}
    fake_quant: Any = FusedMovingAvgObsFakeQuantize
    if per_channel:
        qscheme = torch.per_channel_symmetric
        kwargs.update(observer=MovingAveragePerChannelMinMaxObserver, ch_axis=ch_axis)
        if ch_axis != 0:
            fake_quant = FakeQuantize
    else:
        qscheme = torch.per_tensor_symmetric
        kwargs.update(observer=MovingAverageMinMaxObserver)
    return QuantizationSpec(
        dtype=torch.int8,
        quant_min=-INT8_MAX,
        quant_max=INT8_MAX,
        qscheme=qscheme,
        ch_axis=ch_axis if per_channel else None,
        observer_or_fake_quant_ctr=fake_quant.with_args(**kwargs),
    )


def _bias_qparams(obs_or_fqs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Bias scale = input scale * weight scale (per tensor or per channel), zero point 0."""
    act, weight = obs_or_fqs
    act_scale, _ = act.calculate_qparams()
    weight_scale, _ = weight.calculate_qparams()
    scale = (act_scale * weight_scale).to(torch.float32)
    return scale, torch.zeros(scale.shape, dtype=torch.int32)


class ConvOutputQuantizer(Quantizer):
    """Annotates only convolutions (``aten.conv1d/2d/3d`` in every overload, ``.padding``
    included, and ``aten.conv_transpose1d/2d/3d``): the input activation (int8 per-tensor
    affine), the weight (int8 symmetric, per tensor or per output channel: axis 0 of a conv
    weight, axis 1 of a transposed conv weight, which is ``(in, out / groups, ...)``), the bias
    (``"float"``: left alone; ``"int32"``: int32 with scale input scale * weight scale and zero
    point 0, per tensor or per channel like the weight) and the conv output (int8 per-tensor
    affine). Observers are FusedMovingAvgObsFakeQuantize (QAT; under ``prepare_pt2e`` they
    observe as well)."""

    def __init__(self, per_channel: bool = False, bias: Literal["float", "int32"] = "float"):
        super().__init__()
        if bias not in ("float", "int32"):
            raise ValueError(f"bias must be 'float' or 'int32', not {bias!r}")
        self.per_channel = per_channel
        self.bias = bias

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        for node in model.graph.nodes:
            if node.op != "call_function":
                continue
            transposed = node.target in CONV_TRANSPOSE_OPS
            if not (transposed or node.target in CONV_OPS):
                continue
            if "quantization_annotation" in node.meta:
                continue
            x, w = node.args[0], node.args[1]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            # insertion order matters: torchao's QAT rewrite maps input, weight, bias by position
            qspecs = {x: ACT_SPEC, w: weight_spec(self.per_channel, 1 if transposed else 0)}
            if isinstance(bias, fx.Node) and self.bias == "int32":
                qspecs[bias] = DerivedQuantizationSpec(
                    derived_from=[(x, node), (w, node)],
                    derive_qparams_fn=_bias_qparams,
                    dtype=torch.int32,
                    quant_min=INT32_MIN,
                    quant_max=INT32_MAX,
                    qscheme=(
                        torch.per_channel_symmetric
                        if self.per_channel
                        else torch.per_tensor_symmetric
                    ),
                    ch_axis=0 if self.per_channel else None,
                )
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map=qspecs, output_qspec=ACT_SPEC, _annotated=True
            )
        return model

    def validate(self, model: fx.GraphModule) -> None:
        pass


def xnnpack_quantizer(per_channel: bool = False, is_qat: bool = False) -> Quantizer:
    """torchao's test XNNPACKQuantizer with its symmetric int8 configuration."""
    import warnings

    from torchao.testing.pt2e._xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "XNNPACKQuantizer is deprecated!"
        quantizer = XNNPACKQuantizer()
    return quantizer.set_global(
        get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=is_qat)
    )


# --------------------------------------------------------------------------------------------
# Models: conv + BatchNorm with non-trivial statistics

CONV = {
    "conv1d": nn.Conv1d,
    "conv2d": nn.Conv2d,
    "conv_transpose1d": nn.ConvTranspose1d,
    "conv_transpose2d": nn.ConvTranspose2d,
}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
SPATIAL = {1: (12,), 2: (6, 5)}
C_IN = 4


def dims_of(kind: str) -> int:
    return int(kind[-2])


def input_shape(kind: str, batch: int = 2, channels: int = C_IN) -> tuple[int, ...]:
    """The input shape of a model built on a ``kind`` conv (see :data:`CONV`)."""
    return (batch, channels, *SPATIAL[dims_of(kind)])


def conv(
    kind: str,
    c_in: int = C_IN,
    c_out: int = 6,
    *,
    bias: bool = True,
    groups: int = 1,
    padding: int | str = 1,
) -> nn.Module:
    """A 3-wide ``kind`` conv; ``padding="same"`` only for (non-transposed) convs."""
    return CONV[kind](c_in, c_out, 3, padding=padding, groups=groups, bias=bias)


class ConvBN(nn.Module):
    """conv -> BatchNorm (-> ReLU)."""

    def __init__(
        self,
        kind: str = "conv2d",
        c_in: int = C_IN,
        c_out: int = 6,
        *,
        bias: bool = True,
        groups: int = 1,
        padding: int | str = 1,
        eps: float = 1e-5,
        relu: bool = False,
    ) -> None:
        super().__init__()
        self.conv = conv(kind, c_in, c_out, bias=bias, groups=groups, padding=padding)
        self.bn = BN[dims_of(kind)](c_out, eps=eps)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class SharedConv(nn.Module):
    """One conv module called twice (shared weight), a different BatchNorm after each call."""

    def __init__(self, kind: str = "conv2d", c_in: int = C_IN, c_out: int = 6, bias: bool = True):
        super().__init__()
        self.conv = conv(kind, c_in, c_out, bias=bias)
        self.bn1 = BN[dims_of(kind)](c_out)
        self.bn2 = BN[dims_of(kind)](c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x.flip(-1)))


class Stacked(nn.Module):
    """Two conv -> BatchNorm -> ReLU blocks in a row."""

    def __init__(self, kind: str = "conv2d", c_in: int = C_IN, bias: bool = True) -> None:
        super().__init__()
        self.block1 = ConvBN(kind, c_in, 6, bias=bias, relu=True)
        self.block2 = ConvBN(kind, 6, 5, bias=bias, relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))


def build(model_cls: Callable[..., nn.Module], *args, seed: int = 0, **kwargs) -> nn.Module:
    """``model_cls(*args, **kwargs)`` with weights drawn from ``seed`` and non-trivial
    BatchNorm statistics and affine parameters; in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(*args, **kwargs)
    return randomize_all(model, seed=seed)


# --------------------------------------------------------------------------------------------
# Inputs


def calibration_inputs(shape: Sequence[int], n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` inputs shaped like calibration data rather than N(0, 1): normals of varying scale
    and offset per channel, uniforms, and mixtures with a few large values."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:  # scaled normal, an offset per channel
            offset = torch.randn(1, shape[1], *([1] * (len(shape) - 2)), generator=g) * 0.5
            x = torch.randn(shape, generator=g) * (0.5 + 1.5 * torch.rand((), generator=g))
            x = x + offset
        elif kind == 1:  # uniform
            x = (torch.rand(shape, generator=g) * 2 - 1) * (1 + torch.rand((), generator=g))
        else:  # mostly small, a few large values
            x = torch.randn(shape, generator=g) * 0.3
            mask = torch.rand(shape, generator=g) < 0.05
            x = torch.where(mask, torch.randn(shape, generator=g) * 3, x)
        out.append(x)
    return out


def random_inputs(shape: Sequence[int], n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` standard normal inputs."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tuple(shape), generator=g) for _ in range(n)]


def batches_like(example_inputs: tuple, n: int, seed: int = 0) -> list[tuple]:
    """``n`` argument tuples of calibration-like inputs shaped like ``example_inputs``."""
    per_arg = [
        calibration_inputs(x.shape, n, seed + 7919 * i) for i, x in enumerate(example_inputs)
    ]
    return [tuple(args) for args in zip(*per_arg, strict=True)]


def _args(batch: Any) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


# --------------------------------------------------------------------------------------------
# The flows


_PATTERNS: dict = {}


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    return value


def _pattern_key(pattern: Any, example_inputs: tuple, is_cuda: bool, kwargs: dict) -> Any:
    """What a pattern graph depends on: the code of the pattern function, the values it closes
    over (conv function, flags), the example inputs' shapes and dtypes; None if unhashable."""
    fn = getattr(pattern, "fn", pattern)
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    try:
        cells = tuple(c.cell_contents for c in fn.__closure__ or ())
        key = (
            code,
            cells,
            tuple(_signature(x) for x in example_inputs),
            is_cuda,
            tuple(sorted((k, _signature(v)) for k, v in kwargs.items())),
        )
        hash(key)
    except (TypeError, ValueError):
        return None
    return key


def _pattern_graph(pattern: Any, example_inputs: tuple, is_cuda: bool = False, **kwargs):
    """torchao's ``_get_aten_graph_module_for_pattern``, exported non-strict and kept (each
    caller gets its own copy)."""
    key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
    if key is not None and key in _PATTERNS:
        return copy.deepcopy(_PATTERNS[key])  # a copy: torchao changes some patterns it uses
    if is_cuda:
        example_inputs = tuple(x.cuda() if torch.is_tensor(x) else x for x in example_inputs)
    gm = torch.export.export(pattern, tuple(example_inputs), kwargs, strict=False).module()
    gm.graph.eliminate_dead_code()
    for node in list(gm.graph.nodes):  # ep.module() copies mutated inputs back: not a pattern
        if node.op == "call_function" and node.target == torch.ops.aten.copy_.default:
            if not node.users:
                gm.graph.erase_node(node)
    gm.recompile()
    if key is not None:
        _PATTERNS[key] = copy.deepcopy(gm)
    return gm


@contextlib.contextmanager
def cached_patterns() -> Iterator[None]:
    """Within the block, torchao builds its pattern graphs with :func:`_pattern_graph`."""
    import torchao.quantization.pt2e.qat_utils as qat_utils
    import torchao.quantization.pt2e.utils as pt2e_utils
    import torchao.testing.pt2e._xnnpack_quantizer_utils as xnnpack_utils

    modules = [qat_utils, pt2e_utils, xnnpack_utils]
    saved = [m._get_aten_graph_module_for_pattern for m in modules]
    for m in modules:
        m._get_aten_graph_module_for_pattern = _pattern_graph
    try:
        yield
    finally:
        for m, fn in zip(modules, saved, strict=True):
            m._get_aten_graph_module_for_pattern = fn


def _loss(out: Any) -> torch.Tensor:
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    return sum(o.float().square().mean() for o in outs)


def qat_convert(
    model: nn.Module,
    example_inputs: tuple,
    quantizer: Quantizer,
    *,
    steps: int = 3,
    to_eval: bool = True,
    fold_quantize: bool = True,
    seed: int = 0,
    lr: float = 1e-3,
) -> fx.GraphModule:
    """torchao's QAT flow on a copy of ``model`` (``model`` is left as it was): export in train
    mode, ``prepare_qat_pt2e``, ``steps`` SGD steps (loss: mean square of the outputs) on
    calibration-like inputs drawn from ``seed``, ``move_exported_model_to_eval`` (unless
    ``to_eval=False``), ``convert_pt2e``. Deterministic for a given seed."""
    model = copy.deepcopy(model).train()  # the exported module shares the model's tensors
    with torch.random.fork_rng(), cached_patterns():
        torch.manual_seed(seed)
        gm = torch.export.export(model, tuple(example_inputs)).module()
        prepared = prepare_qat_pt2e(gm, quantizer)
        optimizer = torch.optim.SGD(prepared.parameters(), lr=lr)
        for args in batches_like(tuple(example_inputs), steps, seed):
            optimizer.zero_grad()
            _loss(prepared(*args)).backward()
            optimizer.step()
        if to_eval:
            move_exported_model_to_eval(prepared)
        return convert_pt2e(prepared, fold_quantize=fold_quantize)


def ptq_convert(
    model: nn.Module | ExportedProgram | fx.GraphModule,
    example_inputs: tuple | None,
    quantizer: Quantizer,
    calib_batches: Sequence[Any],
    *,
    fold_quantize: bool = True,
) -> fx.GraphModule:
    """torchao's PTQ flow: an eager module is exported in eval mode (with ``example_inputs``),
    an ExportedProgram taken through ``module()``, a GraphModule copied; then ``prepare_pt2e``,
    one forward per calibration batch (a tensor or an argument tuple), ``convert_pt2e``. The
    argument is left as it was."""
    if isinstance(model, ExportedProgram):
        gm = copy.deepcopy(model.module())
    elif isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
    else:
        eager = copy.deepcopy(model).eval()
        gm = torch.export.export(eager, tuple(example_inputs)).module()
    with cached_patterns():
        prepared = prepare_pt2e(gm, quantizer)
        with torch.no_grad():
            for batch in calib_batches:
                prepared(*_args(batch))
        return convert_pt2e(prepared, fold_quantize=fold_quantize)


# --------------------------------------------------------------------------------------------
# Graphs and quantization steps

DQ_PER_TENSOR = (
    torch.ops.quantized_decomposed.dequantize_per_tensor.default,
    torch.ops.quantized_decomposed.dequantize_per_tensor.tensor,
)


def op_names(gm: fx.GraphModule) -> list[str]:
    """The ATen op of every call_function node (``conv2d``, ``batch_norm``, ...), in order."""
    names = []
    for node in gm.graph.nodes:
        if node.op == "call_function":
            schema = getattr(node.target, "_schema", None)
            names.append(schema.name.split("::")[-1] if schema else str(node.target))
    return names


def output_scales(gm: fx.GraphModule) -> list[float | None]:
    """Per graph output: the scale of the per-tensor dequantize it is, None if it is not one."""
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    scales = []
    for arg in torch.utils._pytree.tree_leaves(out.args[0]):
        if isinstance(arg, fx.Node) and arg.target in DQ_PER_TENSOR:
            scales.append(float(arg.args[1]))
        else:
            scales.append(None)
    return scales


def in_eval(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose ``aten.batch_norm`` nodes use running statistics (the training flag set to
    False): a graph converted without ``move_exported_model_to_eval`` compared as bnfold folds
    it. Running the copy never changes ``gm``."""
    gm = copy.deepcopy(gm)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == torch.ops.aten.batch_norm.default:
            n.args = n.args[:5] + (False,) + n.args[6:]
    gm.recompile()
    return gm


def output_steps(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """max|a - b| in quantization steps of ``scale``."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).abs().max()) / scale
