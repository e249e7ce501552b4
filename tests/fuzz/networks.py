"""Random networks, folded in every form bnfold supports, checked against a float64 reference.

``draw_case`` builds a random network with hypothesis: sequential or branchy (residual adds,
channel concatenation and slicing), Conv1d/2d/3d and ConvTranspose (grouped, depthwise, strided,
dilated, padded), Linear heads on 2-D activations and on 3-D ones (acting on the last axis, or
between two transposes), BatchNorm before and after layers, affine or not, ``eps`` from 0 to
0.1, extreme running statistics (variance 1e-8 and 1e4, means far from 0, zero scales, and now
and then invalid ones: NaN, negative variance, ``var + eps == 0``), modules called twice and
activations used twice, in float32, float16 or bfloat16. Affine chains (``AffineChain``): 1 to
4 of ``mul``, ``div``, ``add``, ``sub`` (either order) and ``neg`` by Python numbers, buffers or
parameters (scalar, per channel along the value's channel axis, now and then varying along
another axis or several, or viewed in forward), of both signs, 0.5 to 2 in magnitude, now and
then tiny, huge, zero (in a divisor too) or NaN, now and then computed in float32 on a half
activation or with an intermediate value read again; after layers, before, after and around
their BatchNorms (the value before the last one now and then read again), and anywhere else.
``check_case`` folds it as an eager
module, a torch.export program (as exported or decomposed), the program's GraphModule, an
ONNX model (a ``ModelProto`` or an ``onnx_ir.Model``) and a JAX program (a
``jax.export.Exported`` or its StableHLO text), and checks each result.

**What "matches" means.** Every output is compared with the float64 evaluation of the original
model; the bound (a few times the original's own rounding error, plus a term for the one
rounding a fold adds to each weight, scaled by the condition of the folds) is that of
``tests/helpers/forms.py``, which the contract suite (``tests/contract``) checks too.

Every BatchNorm must be either folded (gone from the result) or kept with a rule and a reason;
``fold`` must not change its input (hashes of every tensor and of the graph before and after),
and any exception must be a ``bnfold.BnfoldError``. The BatchNorm counts read the entries of
kind ``batchnorm`` only. Affine chains have entries of kind ``affine`` (none in the eager form,
which folds no arithmetic; none for a chain with no layer behind it, a chain whose values have
other readers, or a single bias add after a layer without a bias operand): each folded or kept
with a rule and a reason, none twice, a folded one's nodes gone from the torch and ONNX graphs
(but for the bias ``Add`` after a ``MatMul``, which the fold writes the bias into), a kept one's
all there. The condition of the folds is also measured where the folded chains end
(``chain_condition``): a fold rounds ``k*W`` and ``k*b + c`` for a chain ``k*z + c``, and where
the shift cancels most of the output the producer's own condition does not see it.

``python tests/fuzz/networks.py --examples 10000 --jobs 2`` (``make fuzz``) runs many examples
and prints the counts; ``tests/fuzz/test_networks.py`` runs a few in ``make test``.

**StableHLO** (``stablehlo``, in the default forms: about 0.17 s of CPU a network, as much as
the four torch and ONNX forms together). ``tests/helpers/jax_forms.py`` translates the network
into a JAX function in the torch layout, its parameters closed over in the network's dtype
(float32, float16 or bfloat16, which the program then computes in; float64 networks are not
drawn, and JAX would need ``jax_enable_x64`` for them), each layer call in the named scopes of
its module path; the ReLU a ``_ReLUOnCall`` BatchNorm adds is translated too. A network the
translation cannot express (a forward hook on the root, which runs Python on the outputs) is
counted as not run, by reason. The function is exported with ``jax.export`` and the
``Exported`` folded (one time in four, its StableHLO text), and both run by ``Exported.call``
(text by XLA's CPU client). The checks: the input's fingerprint unchanged, ``analyze`` equal to
``fold``, the folded ``Exported`` calling like the original (calling convention, avals,
platforms), every BatchNorm accounted for (``_check_stablehlo_entries``: each BatchNorm multiply
left in a program is named by the layer path of its location; each layer has an entry, no
entry twice, and the folded program computes exactly the skipped layers' BatchNorms), and the
outputs within the bound against the float64 torch reference, the unfolded program's own error
setting it. The unfolded program is also held to that bound, with torch's eager outputs as the
original (``_translation_agrees``): a translation computing another function would make the
comparison meaningless, so that fails as a finding, with one exception counted apart (where a
BatchNorm's scale is infinite, torch's formula gives NaN where the translation's gives an
infinity). StableHLO has no BatchNorm op: a BatchNorm over one channel is arithmetic by a
scalar there, and JAX drops the values no output reads, so this form sees fewer BatchNorms
than the torch forms; a chain that multiplies or divides by a vector is a BatchNorm there (an
``AffineChain``'s layer path named as one, ``jax_forms.bn_paths``), other chains are affine.
JAX's caches are cleared after each network (they grow by megabytes a program), and XLA runs
one thread a process, as torch does.

**torch.compile** (``--forms compile,compile_pass``, not in the default forms: a dynamo compile
takes about a second a network). ``compile`` runs ``torch.compile(model,
backend=bnfold.torch.Backend(inner="eager"), dynamic=False)`` and reads the folds from the
backend's reports; ``compile_pass`` runs ``FoldPass`` in a dynamo backend that runs the
rewritten graph eagerly, its decisions named by the module paths dynamo records. Both run
under ``no_grad``, twice (the same outputs), are held to the same bound, must not change the
model's tensors, and must account for every BatchNorm of every graph. A model dynamo cannot
compile without bnfold either (backend ``"eager"``) is counted as not run; a wrong
``compile_pass`` result from a folded BatchNorm whose values do not fold (the pass reads no
values; see ``docs/compile.md``) is counted apart, as documented.

**pt2e QAT** (``--forms qat,qat_bias``, not in the default forms: torchao's flow takes about a
second a network). The network, in float32 (a BatchNorm eps <= 0 made 1e-5, two samples at
least), goes through torchao's QAT flow as ``tests/helpers/qat.py`` runs it (``qat_convert``:
export in train mode, ``prepare_qat_pt2e`` with ``ConvOutputQuantizer``, three SGD steps,
``move_exported_model_to_eval`` or not, ``convert_pt2e``), with per-channel weights or not, a
float or an int32 bias and ``fold_quantize`` drawn. A network torch.export or torchao fails on
(grouped ConvTranspose, NaN statistics that reach the observers, ...) is counted as "torchao
refused", not as a finding; one whose BatchNorms without affine parameters torchao's conv +
BatchNorm rewrite cannot read is run again with them made affine (gamma 1, beta 0), and one in
which no parameter reaches the output has nothing to train (the flow's SGD needs one). ``qat``
folds the converted graph with ``qat="exact"``, ``qat_bias`` with ``qat="bias"`` and again on a
copy whose conv outputs are quantized 16 times wider (as ``test_pt2e_qat.widen_outputs``: chains
then fold into the bias). Each fold must raise nothing, leave the converted graph as it was
(code and every tensor), account for every BatchNorm (folded: gone from the graph; kept: a rule
and a reason), agree with ``analyze``, and give the converted graph's values
(``_check_qat_fold``), compared in eval mode (the training flags of the ``batch_norm`` nodes
set to False in copies of both):

- **attributed per chain.** The folded graph runs next to the converted one, node by node. Where
  a node read a folded BatchNorm in the converted graph, the value the folded graph gives it is
  checked against that BatchNorm's output and then replaced by it; so each chain is judged on
  its own output (a rounding difference that flips a later quantize, or a bias fold's step, goes
  no further), and the graph outputs must then equal the converted graph's bit for bit;
- **exact folds and float producers** (a Linear + BatchNorm the quantizer left in float): within
  ``_float_tolerance``, 32 float32 roundings of the magnitudes the tail handles, per channel
  (``|z|``, the dequantized conv output; ``|s| (|v| + |mean|)``, the BatchNorm's input and mean
  at its scale; ``|beta|``; the output), plus the accumulation of a float producer's products;
- **bias folds**: within the bound the report's note claims ("at most X output steps", at most
  1.5), in steps of the chain's output quantization, plus that float term; a ``qat="bias"`` fold
  with no chain in a bias must give the ``qat="exact"`` fold's outputs bit for bit.

The summary counts, per form, the flows' options, the folds (as an exact add, into the bias,
into a float producer), the BatchNorms kept by rule and those left reading a conv's dequantized
output (torchao did not rewrite the conv: conv3d, a conv output with other users, ...), the bias
folds by measured steps, and the refusals by torchao's stage and error.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import operator
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from torch import nn

if __package__ in (None, ""):  # run as a script: the repository root makes ``tests`` importable
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))

import bnfold  # noqa: E402
from bnfold.errors import first_line  # noqa: E402
from tests.helpers.forms import (  # noqa: E402
    UNIT_ROUNDOFF,
    WrongResult,
    check_entries,
    compare_to_reference,
    condition,
    float64_copy,
    graph_bn_count,
    graph_bn_nodes,
    hash_module,
    hash_program,
    outputs,
    producers_of,
    quiet,
    reference,
)
from tests.helpers.torch_models import StepNet as Net  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# StableHLO: the network translated to JAX (tests/helpers/jax_forms.py), exported with
# jax.export and folded as the Exported or its text; in the default forms (about 0.17 s of CPU
# a network, as much as the four others together: the two XLA compiles are most of it)
STABLEHLO_FORMS = ("stablehlo",)
FORMS = ("eager", "export", "graph_module", "onnx") + STABLEHLO_FORMS
# torch.compile: the bnfold dynamo backend (eager after the fold) and the Inductor pre-grad pass
# run in a dynamo backend; only with ``--forms`` (dynamo compiles take a second or two a network)
COMPILE_FORMS = ("compile", "compile_pass")
# pt2e QAT: torchao's flow under a conv-output quantizer, its converted graph folded with
# qat="exact" or qat="bias"; only with ``--forms`` (a flow takes about a second a network)
QAT_FORMS = ("qat", "qat_bias")
ALL_FORMS = FORMS + COMPILE_FORMS + QAT_FORMS
MAX_CHANNELS = 12


# --------------------------------------------------------------------------------------------
# The network


@dataclass
class Case:
    """A generated network with its input and what it is made of (for the counts)."""

    model: Net
    x: torch.Tensor
    dtype: str
    features: list[str] = field(default_factory=list)
    bad_stats: bool = False
    seed: int = 0  # the seed the network's numbers were drawn from

    def describe(self) -> str:
        steps = "\n".join(f"  {s}" for s in self.model.steps)
        return (
            f"dtype {self.dtype}, input {tuple(self.x.shape)}, outputs {self.model.outputs}\n"
            f"{self.model.layers}\nsteps:\n{steps}"
        )


_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class _ReLUOnCall:
    """Mixed into a BatchNorm class: calling it applies a ReLU after its forward."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.relu(super().__call__(*args, **kwargs))


_BN_RELU_ON_CALL = {
    r: type(f"ReLUOnCall{cls.__name__}", (_ReLUOnCall, cls), {}) for r, cls in _BN.items()
}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


class AffineChain(nn.Module):
    """Elementwise arithmetic by constants: what the ONNX, StableHLO and ATen frontends fold
    into the layer before it as an affine chain (the eager frontend leaves it alone).

    ``chain_ops`` lists ``(op, operand, chain_first, alpha)``: ``op`` one of ``mul``, ``div``,
    ``add``, ``sub``, ``neg``; ``operand`` the name of a buffer or parameter of the module, a
    Python number, or ``None`` (``neg``); ``chain_first`` False computes ``a * z``, ``a + z``,
    ``a - z`` (the value second); ``alpha`` scales the operand of ``add``/``sub``
    (``torch.add(z, a, alpha=alpha)``, 1: the plain operator). ``views`` maps an operand name
    to the shape its value is viewed as in ``forward`` (a computed operand: ``a.view(...)``).
    ``wide`` computes the chain in float32 and casts back (mixed precision); ``reread`` is the
    index of the op whose output is added to the chain's result again (a value read twice).
    ``tests/helpers/jax_forms.py`` translates any module with ``chain_ops``.
    """

    def __init__(
        self,
        chain_ops: list[tuple[str, Any, bool, float]],
        tensors: dict[str, tuple[torch.Tensor, bool]],
        views: dict[str, tuple[int, ...]] | None = None,
        wide: bool = False,
        reread: int | None = None,
    ) -> None:
        super().__init__()
        for name, (value, parameter) in tensors.items():
            if parameter:
                self.register_parameter(name, nn.Parameter(value, requires_grad=False))
            else:
                self.register_buffer(name, value)
        self.chain_ops = tuple(chain_ops)
        self.views = dict(views or {})
        self.wide = wide
        self.reread = reread

    def operand(self, key: Any) -> Any:
        if not isinstance(key, str):
            return key
        value = getattr(self, key)
        return value.view(self.views[key]) if key in self.views else value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() if self.wide else x
        again = None
        for i, (op, key, first, alpha) in enumerate(self.chain_ops):
            a = self.operand(key)
            if op == "neg":
                y = -y
            elif op == "mul":
                y = y * a if first else a * y
            elif op == "div":
                y = y / a
            elif op == "add" and alpha != 1:
                y = torch.add(y, a, alpha=alpha)
            elif op == "add":
                y = y + a if first else a + y
            elif op == "sub" and alpha != 1:
                y = torch.sub(y, a, alpha=alpha)
            elif op == "sub":
                y = y - a if first else a - y
            else:
                raise AssertionError(op)
            if i == self.reread:
                again = y
        if again is not None:
            y = y + again
        return y.to(x.dtype) if self.wide else y

    def extra_repr(self) -> str:
        parts = []
        for op, key, first, alpha in self.chain_ops:
            if op == "neg":
                parts.append("neg")
                continue
            a = key if isinstance(key, str) else f"{key:g}"
            if isinstance(key, str):
                view = f".view{self.views[key]}" if key in self.views else ""
                a = f"{key}{list(getattr(self, key).shape)}{view}"
            args = f"z, {a}" if first else f"{a}, z"
            parts.append(f"{op}({args}{f', alpha={alpha:g}' * (alpha != 1)})")
        wide = ", in float32" if self.wide else ""
        again = f", output of op {self.reread} read again" if self.reread is not None else ""
        return " -> ".join(parts) + wide + again


# An AffineChain operand: a Python number, a 0-D tensor, a tensor of ones' shape ([1], [1, 1],
# ...), per channel ([C, 1, ...], [1, C, 1, ...], or [C] viewed as [C, 1, ...] in forward),
# varying along another axis than the channels, or along several (the value's own shape)
OPERAND_FORMS = ["number", "scalar", "one", "channel", "channel", "channel", "channel-batch-axis",
                 "channel-viewed", "other", "full"]  # fmt: skip


class _Builder:
    """Draws steps one at a time, keeping every value's shape (without the batch axis)."""

    def __init__(self, data: Any, rng: np.random.Generator) -> None:
        self.data = data
        self.rng = rng
        self.shapes: list[tuple[int, ...]] = []
        self.layers: dict[str, nn.Module] = {}
        self.steps: list = []
        self.features: list[str] = []
        self.bad_stats = False
        # the channel axis of each value (of its shape without the batch axis): 0, or the last
        # for a Linear's output on a 3-D activation; what an affine chain's operands vary along
        self.channel: dict[int, int] = {}

    def draw(self, strategy: Any) -> Any:
        return self.data.draw(strategy)

    def add(
        self, kind: str, arg: Any, ins: list[int], shape: tuple[int, ...], channel: int = -1
    ) -> int:
        if channel < 0:  # the input's, where the rank stays (a transpose swaps axes 0 and 1)
            same = bool(ins) and len(self.shapes[ins[0]]) == len(shape)
            channel = self.channel.get(ins[0], 0) if same else 0
            if kind == "transpose":
                channel = 1 - channel
        self.steps.append((kind, arg, ins))
        self.shapes.append(shape)
        self.channel[len(self.shapes) - 1] = channel
        return len(self.shapes) - 1

    def call(self, layer: nn.Module, prefix: str, src: int, shape: tuple[int, ...]) -> int:
        name = f"{prefix}{len(self.layers)}"
        self.layers[name] = layer
        return self.add("call", name, [src], shape, self._channel_of(layer, src, shape))

    def _channel_of(self, layer: nn.Module, src: int, shape: tuple[int, ...]) -> int:
        if isinstance(layer, nn.Linear):
            return len(shape) - 1
        if isinstance(layer, nn.modules.conv._ConvNd):
            return 0
        return -1  # the input's

    # -- layers --------------------------------------------------------------------------

    def conv(self, src: int) -> int | None:
        c, *sp = self.shapes[src]
        r = len(sp)
        groups = self.draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
        depthwise = groups == c and c > 1
        cout = groups * self.draw(st.integers(1, max(1, MAX_CHANNELS // groups)))
        k = self.draw(st.integers(1, 3))
        stride = self.draw(st.sampled_from([1, 1, 2]))
        dilation = self.draw(st.sampled_from([1, 1, 2]))
        padding = self.draw(st.sampled_from([0, k // 2, k - 1]))
        mode = self.draw(st.sampled_from(["zeros"] * 6 + ["reflect", "circular"]))
        if mode != "zeros" and (padding == 0 or any(padding >= n for n in sp)):
            mode = "zeros"
        out = [(n + 2 * padding - dilation * (k - 1) - 1) // stride + 1 for n in sp]
        if min(out) < 1:
            return None
        bias = self.draw(st.booleans())
        layer = _CONV[r](c, cout, k, stride, padding, dilation, groups, bias, mode)
        self.features.append(
            f"conv{r}d" + ("-depthwise" if depthwise else "-grouped" * (groups > 1))
        )
        return self.call(layer, "conv", src, (cout, *out))

    def conv_transpose(self, src: int) -> int | None:
        c, *sp = self.shapes[src]
        r = len(sp)
        groups = self.draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
        cout = groups * self.draw(st.integers(1, max(1, MAX_CHANNELS // groups)))
        k = self.draw(st.integers(1, 3))
        stride = self.draw(st.sampled_from([1, 2])) if max(sp) <= 6 else 1
        dilation = self.draw(st.sampled_from([1, 1, 2]))
        padding = self.draw(st.integers(0, max(0, (k - 1) * dilation)))
        output_padding = self.draw(st.integers(0, max(stride, dilation) - 1))
        out = [(n - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1 for n in sp]
        if min(out) < 1 or max(out) > 16:
            return None
        bias = self.draw(st.booleans())
        layer = _CONV_T[r](c, cout, k, stride, padding, output_padding, groups, bias, dilation)
        self.features.append(f"conv_transpose{r}d" + "-grouped" * (groups > 1))
        return self.call(layer, "convt", src, (cout, *out))

    def linear(self, src: int) -> int | None:
        shape = self.shapes[src]
        if len(shape) == 1:
            f_out = self.draw(st.integers(1, MAX_CHANNELS))
            layer = nn.Linear(shape[0], f_out, bias=self.draw(st.booleans()))
            self.features.append("linear-2d")
            return self.call(layer, "fc", src, (f_out,))
        if len(shape) == 2:  # (C, L): on the last axis, or on the channels between transposes
            c, n = shape
            if self.draw(st.booleans()):
                n_out = self.draw(st.integers(1, 8))
                layer = nn.Linear(n, n_out, bias=self.draw(st.booleans()))
                self.features.append("linear-3d-last-axis")
                return self.call(layer, "fc", src, (c, n_out))
            t = self.add("transpose", None, [src], (n, c))
            c_out = self.draw(st.integers(1, MAX_CHANNELS))
            layer = nn.Linear(c, c_out, bias=self.draw(st.booleans()))
            self.features.append("linear-3d-transposed")
            y = self.call(layer, "fc", t, (n, c_out))
            return self.add("transpose", None, [y], (c_out, n))
        return None

    def batchnorm(self, src: int) -> int | None:
        shape = self.shapes[src]
        c = shape[0]
        r = max(1, len(shape) - 1)
        affine = self.draw(st.booleans()) or self.draw(st.booleans())
        eps = self.draw(st.sampled_from([1e-5, 1e-5, 1e-3, 0.1, 0.0, -1.0]))
        if eps < 0:  # any value in the range
            eps = self.draw(st.floats(0.0, 0.1))
        relu_on_call = self.draw(st.sampled_from([False] * 15 + [True]))
        bn = (_BN_RELU_ON_CALL if relu_on_call else _BN)[r](c, eps=eps, affine=affine)
        self._statistics(bn)
        self.features.append(f"batchnorm{r}d" + "-no-affine" * (not affine))
        if relu_on_call:
            self.features.append("batchnorm-overriding-__call__")
        return self.call(bn, "bn", src, shape)

    def _statistics(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        c = bn.num_features
        rng = self.rng
        kind = self.draw(
            st.sampled_from(["normal"] * 6 + ["tiny-var", "huge-var", "far-mean", "mixed", "bad"])
        )
        mean = rng.normal(0, 0.5, c)
        var = rng.uniform(0.2, 2.0, c)
        if kind == "tiny-var":
            var = np.full(c, 1e-8)
        elif kind == "huge-var":
            var = np.full(c, 1e4)
        elif kind == "far-mean":
            mean = rng.choice([-1.0, 1.0], c) * 10.0 ** rng.uniform(1, 3, c)
        elif kind == "mixed":
            var = rng.choice([1e-8, 1e-2, 1.0, 1e2, 1e4], c)
            mean = rng.normal(0, 1, c) * rng.choice([1.0, 100.0], c)
        elif kind == "bad":
            bad = self.draw(st.sampled_from(["nan-mean", "inf-var", "negative-var", "zero-var"]))
            i = int(rng.integers(c))
            if bad == "nan-mean":
                mean[i] = np.nan
            elif bad == "inf-var":
                var[i] = np.inf
            elif bad == "negative-var":
                var[i] = -0.5
            else:
                var[i] = -bn.eps if self.draw(st.booleans()) else 0.0
                bn.eps = 0.0 if var[i] == 0.0 else bn.eps
            self.bad_stats = True
        self.features.append(f"stats-{kind}")
        with torch.no_grad():
            bn.running_mean.copy_(torch.from_numpy(mean))
            bn.running_var.copy_(torch.from_numpy(var))
            if bn.affine:
                gamma = rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c)
                gamma[rng.random(c) < 0.1] = 0.0  # pruned channels
                bn.weight.copy_(torch.from_numpy(gamma))
                bn.bias.copy_(torch.from_numpy(rng.normal(0, 0.5, c)))

    # -- affine chains ----------------------------------------------------------------------

    def affine(self, src: int) -> int:
        """An ``AffineChain`` of 1 to 4 ops on ``src``: operands Python numbers, buffers or
        parameters, scalar, per channel (along ``src``'s channel axis: axis 1, or the last for
        a Linear's output) or, now and then, varying along another axis or several (not a
        chain: kept); values of both signs, 0.5 to 2 in magnitude, now and then tiny, huge,
        zero (in a divisor too) or NaN."""
        shape = self.shapes[src]
        n_ops = self.draw(st.integers(1, 4))
        chain_ops: list[tuple[str, Any, bool, float]] = []
        tensors: dict[str, tuple[torch.Tensor, bool]] = {}
        views: dict[str, tuple[int, ...]] = {}
        kinds = []
        for i in range(n_ops):
            op = self.draw(st.sampled_from(["mul", "mul", "div", "add", "add", "sub", "neg"]))
            if op == "neg":
                chain_ops.append(("neg", None, True, 1.0))
                kinds.append("neg")
                continue
            first = op == "div" or self.draw(st.sampled_from([True, True, False]))
            alpha = 1.0
            if op in ("add", "sub") and first and self.draw(st.sampled_from([False] * 7 + [True])):
                alpha = float(self.rng.choice([-1.0, 0.5, 3.0]))
                self.features.append("affine-alpha")
            form = self.draw(st.sampled_from(OPERAND_FORMS))
            arr_shape = self._operand_shape(src, form)
            if arr_shape is None:
                form, arr_shape = "scalar", ()
            values = self._operand_values(op, int(np.prod(arr_shape, dtype=np.int64)))
            kinds.append(f"{op}-{form}")
            if form == "number":
                chain_ops.append((op, float(values[0]), first, alpha))
                continue
            name = f"a{i}"
            stored = values.reshape(arr_shape)
            if form == "channel-viewed":  # stored as [C], viewed as [C, 1, ...] in forward
                views[name] = tuple(arr_shape)
                stored = values.reshape(-1)
            parameter = self.draw(st.sampled_from([False, False, True]))
            tensors[name] = (torch.from_numpy(stored.copy()), parameter)
            chain_ops.append((op, name, first, alpha))
        wide = self.draw(st.sampled_from([False] * 9 + [True]))
        reread = self.draw(st.sampled_from([None] * 7 + list(range(n_ops))))
        layer = AffineChain(chain_ops, tensors, views, wide, reread)
        self.features += [f"affine-{k}" for k in kinds]
        self.features += ["affine-in-float32"] * wide + ["affine-value-read-twice"] * (
            reread is not None
        )
        out = self._output_shape(layer, shape)
        assert out is not None, layer
        return self.call(layer, "affine", src, out)

    def _operand_shape(self, src: int, form: str) -> tuple[int, ...] | None:
        """The shape of an operand (``form``, see :meth:`affine`) on the value ``src`` (its
        shape without the batch axis), broadcasting to that value's shape."""
        shape = self.shapes[src]
        rank = len(shape)
        ch = self.channel.get(src, 0)
        if form in ("number", "scalar"):
            return ()
        if form == "one":
            return (1,) * self.draw(st.integers(1, rank + 1))
        if form in ("channel", "channel-viewed", "channel-batch-axis"):
            trailing = (shape[ch],) + (1,) * (rank - 1 - ch)
            return (1,) * (ch + 1) + trailing if form == "channel-batch-axis" else trailing
        others = [j for j in range(rank) if j != ch and shape[j] > 1]
        if form == "other":
            if not others:
                return None
            j = self.draw(st.sampled_from(others))
            return (shape[j],) + (1,) * (rank - 1 - j)
        # full: the value's own shape (varying along two axes at least), or none
        return tuple(shape) if sum(n > 1 for n in shape) >= 2 else None

    def _operand_values(self, op: str, n: int) -> np.ndarray:
        rng = self.rng
        if op in ("mul", "div"):
            values = rng.uniform(0.5, 2.0, n) * rng.choice([-1.0, 1.0], n)
        else:
            values = rng.normal(0, 1, n) * rng.choice([0.5, 1.0, 2.0])
        extreme = self.draw(
            st.sampled_from(["none"] * 10 + ["tiny", "huge", "zero", "nan", "tiny-one", "huge-one"])
        )
        i = int(rng.integers(n))
        if extreme == "tiny":
            values = values * 1e-4
        elif extreme == "huge":
            values = values * 1e4
        elif extreme == "tiny-one":
            values[i] = 1e-30 * np.sign(values[i])
        elif extreme == "huge-one":
            values[i] = 1e30 * np.sign(values[i])
        elif extreme == "zero":
            values[i] = 0.0
        elif extreme == "nan":
            values[i] = np.nan
        if extreme != "none":
            self.features.append(f"affine-{extreme}-value")
        return values

    # -- reuse and tensor functions ------------------------------------------------------

    def reuse(self, src: int) -> int | None:
        """Call an existing layer again on another value of the shape it takes."""
        shape = self.shapes[src]
        for name, layer in self.layers.items():
            out = self._output_shape(layer, shape)
            if out is not None and self.draw(st.booleans()):
                self.features.append(f"called-twice-{type(layer).__name__}")
                return self.add("call", name, [src], out, self._channel_of(layer, src, out))
        return None

    def _output_shape(self, layer: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        if isinstance(layer, nn.modules.conv._ConvNd) and len(shape) != layer.weight.ndim - 1:
            return None  # a conv also takes unbatched input, of one rank less
        probe = torch.zeros(2, *shape)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return tuple(layer.eval()(probe).shape[1:])
        except Exception:  # noqa: BLE001 - the layer does not take this shape
            return None

    def elementwise(self, src: int) -> int:
        kind = self.draw(st.sampled_from(["relu", "tanh"]))
        return self.add(kind, None, [src], self.shapes[src])

    def add_values(self, src: int) -> int | None:
        same = [i for i, s in enumerate(self.shapes) if s == self.shapes[src]]
        other = self.draw(st.sampled_from(same))  # may be src itself: x + x
        self.features.append("residual-add")
        return self.add("add", None, [src, other], self.shapes[src])

    def concat(self, src: int) -> int | None:
        c, *sp = self.shapes[src]
        fits = [i for i, s in enumerate(self.shapes) if list(s[1:]) == sp and s[0] + c <= 16]
        if not fits or not sp:
            return None
        other = self.draw(st.sampled_from(fits))
        self.features.append("concat")
        return self.add("cat", None, [src, other], (c + self.shapes[other][0], *sp))

    def slice(self, src: int) -> int | None:
        c, *sp = self.shapes[src]
        if c < 2:
            return None
        lo = self.draw(st.integers(0, c - 1))
        hi = self.draw(st.integers(lo + 1, c))
        self.features.append("slice")
        return self.add("slice", (lo, hi), [src], (hi - lo, *sp))

    # -- forward code a user writes around the layers -------------------------------------

    def probe(self, src: int) -> int | None:
        """Look at a layer (its type, whether it has a bias) and compute differently."""
        if not self.layers:
            return None
        name = self.draw(st.sampled_from(sorted(self.layers)))
        what = self.draw(st.sampled_from(["isinstance", "bias"]))
        self.features.append(f"forward-reads-{what}")
        return self.add("probe", (name, what), [src], self.shapes[src])

    def is_tensor(self, src: int) -> int | None:
        self.features.append("forward-asks-isinstance-tensor")
        return self.add("is_tensor", None, [src], self.shapes[src])

    def alias(self, src: int) -> int | None:
        """Register a layer under a second name and call it by that name."""
        shape = self.shapes[src]
        for layer in list(self.layers.values()):
            out = self._output_shape(layer, shape)
            if out is not None and self.draw(st.booleans()):
                second = f"alias{len(self.layers)}"
                self.layers[second] = layer
                self.features.append("layer-under-two-names")
                return self.add("call", second, [src], out, self._channel_of(layer, src, out))
        return None

    def pool(self, src: int) -> int | None:
        c, *sp = self.shapes[src]
        if not sp:
            return None
        self.features.append("global-pool")
        return self.add("pool", tuple(range(2, 2 + len(sp))), [src], (c,))


OPS = ["conv", "conv", "conv", "conv_transpose", "linear", "linear", "batchnorm", "reuse",
       "elementwise", "add_values", "concat", "slice", "pool", "affine"]  # fmt: skip
# What follows a layer: a BatchNorm (the usual pair), nothing, or affine chains (``AffineChain``)
# before, after and around a BatchNorm
AFTER_LAYER = ["bn"] * 5 + [""] * 2 + ["affine", "affine bn", "bn affine", "affine bn affine"]
# Now and then, forward code that looks at the layers or at its values (rarer: they keep folds)
HOSTILE_OPS = ["probe", "is_tensor", "alias"]


def draw_case(data: Any) -> Case:
    """Draw a random network and input (``data`` is hypothesis' ``st.data()``)."""
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    b = _Builder(data, rng)
    dtype = data.draw(st.sampled_from(["float32"] * 4 + ["float16", "bfloat16"]), label="dtype")
    rank = data.draw(st.sampled_from([0, 1, 1, 2, 2, 2, 3]), label="rank")
    c = data.draw(st.integers(1, 6))
    size = data.draw(st.integers(2, 8 if rank < 3 else 5))
    batch = data.draw(st.integers(1, 3))
    b.shapes.append((c, *[size] * rank))
    if data.draw(st.booleans()):  # BatchNorm on the input, before any layer
        b.batchnorm(0)
    n = data.draw(st.integers(1, 10), label="steps")
    for _ in range(n):
        src = data.draw(st.sampled_from(range(len(b.shapes))[-4:]))
        hostile = data.draw(st.sampled_from([False] * 11 + [True]))
        op = data.draw(st.sampled_from(HOSTILE_OPS if hostile else OPS))
        if op in ("conv", "conv_transpose") and len(b.shapes[src]) == 1:
            op = "linear"
        y = getattr(b, op)(src)
        if y is not None and op in ("conv", "conv_transpose", "linear"):
            after = data.draw(st.sampled_from(AFTER_LAYER)).split()
            for then in after:
                y = b.batchnorm(y) if then == "bn" else b.affine(y)
            if (
                "affine" in after
                and b.shapes[y - 1] == b.shapes[y]
                and data.draw(st.sampled_from([False] * 7 + [True]))
            ):  # the value before the last BatchNorm or chain read again: not single-consumer
                b.add("add", None, [y, y - 1], b.shapes[y])
                b.features.append("affine-after-layer-input-read-again")
    last = len(b.shapes) - 1
    extra = data.draw(st.lists(st.integers(1, last), max_size=2)) if last > 0 else []
    outputs = [last] + [i for i in extra if i != last]
    model = Net(b.layers, b.steps, outputs).eval()
    if b.layers and data.draw(st.sampled_from([False] * 31 + [True])):  # a hook on the root
        first = next(iter(b.layers))
        model.register_forward_hook(
            lambda m, _args, out: (
                (out[0] + m.layers[first].weight.mean(), *out[1:])
                if getattr(m.layers[first], "weight", None) is not None
                else out
            )
        )
        b.features.append("root-forward-hook")
    torch_dtype = DTYPES[dtype]
    model = model.to(torch_dtype)
    x = torch.from_numpy(rng.normal(0, 1, (batch, *b.shapes[0]))).to(torch_dtype)
    return Case(model, x, dtype, sorted(set(b.features)), b.bad_stats, seed)


# --------------------------------------------------------------------------------------------
# Checking


@dataclass
class Outcome:
    """What one form did with one case."""

    form: str
    folded: int = 0  # BatchNorms (entries of kind "batchnorm")
    refused: Counter = field(default_factory=Counter)
    affine_folded: int = 0  # affine chains (entries of kind "affine")
    affine_refused: Counter = field(default_factory=Counter)
    note: str = ""  # why the form did not run (an exporter that failed, say)
    # counted apart from findings: wrong results a form documents (compile_pass: values that
    # do not fold), graphs the backend compiled unfolded (by reason: their BatchNorm count)
    limits: Counter = field(default_factory=Counter)
    err: float = 0.0
    tol: float = 0.0
    dtype: str = ""  # the dtype the form ran in, when not the case's (QAT: float32)
    worst: dict = field(default_factory=dict)  # other closest-to-bound figures, by name


def check_case(case: Case, forms: tuple[str, ...] = FORMS, draw: Any = None) -> list[Outcome]:
    """Fold ``case`` in each form and check every result; return what each form did."""
    model, x = case.model, case.x
    with torch.no_grad():
        ref = reference(model, x)
        eager_out = outputs(model(x))
    outcomes = []
    exported: Any = None
    cond_cache: dict[frozenset, float] = {}
    qat_cache: dict = {}  # the converted graph, shared by the QAT forms

    def cond_for(report: bnfold.FoldReport) -> float:
        key = frozenset(producers_of(report))
        if key not in cond_cache:
            cond_cache[key] = max(
                condition(case.model, case.x, set(key)),
                chain_condition(case.model, case.x, set(key)),
            )
        return cond_cache[key]

    for form in forms:
        if form in QAT_FORMS:  # checked against the converted graph, not the float model
            outcomes.append(_qat_form(case, form, draw, qat_cache))
            continue
        oc = Outcome(form)
        outcomes.append(oc)
        if form == "eager":
            with_example = draw is None or draw(st.booleans())
            before = hash_module(model)
            with quiet():
                folded, report = bnfold.fold(
                    model, (x,) if with_example else None, return_report=True
                )
            assert hash_module(model) == before, "eager fold changed its input"
            _check_eager_structure(model, folded, report)
            with torch.no_grad():
                got = outputs(folded(x))
            original = eager_out
            example = (x,) if with_example else None
            with quiet():
                analyzed = bnfold.analyze(model, example)
            assert analyzed.to_list() == report.to_list(), "analyze disagrees with fold"
            if draw is not None and draw(st.sampled_from([False, False, False, True])):
                copy_ = float64_copy(model).to(DTYPES[case.dtype])
                with quiet():
                    same = bnfold.fold(copy_, example, inplace=True)
                assert same is copy_
                with torch.no_grad():
                    in_place = outputs(same(x))
                for a, b in zip(got, in_place, strict=True):
                    torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)
        elif form in ("export", "graph_module"):
            if exported is None:
                exported = _export(model, x, draw)
            if isinstance(exported, str):
                oc.note = exported
                continue
            ep, ep_module = exported
            subject = ep if form == "export" else ep_module
            before = hash_program(ep)
            with quiet():
                folded, report = bnfold.fold(subject, return_report=True)
            assert hash_program(ep) == before, f"{form} fold changed its input"
            runner = folded.module() if form == "export" else folded
            with torch.no_grad():
                got = outputs(runner(x))
                original = outputs(ep_module(x))
            _check_graph_structure(folded, report, form)
        elif form in COMPILE_FORMS:
            result = _compile_form(case, form)
            if isinstance(result, str):
                oc.note = result
                continue
            report, got, unfolded = result
            oc.limits.update(unfolded)
            original = eager_out
        elif form in STABLEHLO_FORMS:
            result = _stablehlo_form(case, draw, ref, eager_out)
            if isinstance(result, str):
                oc.note = result
                continue
            report, original, got, limits = result
            oc.limits.update(limits)
        else:
            result = _onnx_form(case, draw)
            if isinstance(result, str):
                oc.note = result
                continue
            report, original, got, limits = result
            oc.limits.update(limits)
        check_entries(report, form)
        _check_kinds(report, form)
        _count(oc, report)
        cond = cond_for(report) if report.folded else 1.0
        try:
            oc.err, oc.tol = compare_to_reference(form, case.dtype, ref, original, got, cond)
        except WrongResult:
            if form != "compile_pass" or not (why := _pass_folded_invalid_values(case, report)):
                raise
            oc.limits[f"documented, not counted as wrong: {why}"] += 1
    return outcomes


def chain_condition(model: Net, x: torch.Tensor, folded_layers: set[str]) -> float:
    """The condition of the folds measured where the folded chains end (float64): a fold
    writes ``k*W`` and ``k*b + c`` for the affine map ``k*z + c`` of the BatchNorms and
    ``AffineChain``s after a layer, each rounded once, so its error is about ``u * (|k| |W|
    |x| + |k*b + c|)`` where the chain's output is ``k*(W*x + b) + c``. For each call of a
    folded layer (a name in ``model.layers``), ``max(|k| |W| |x| + |k*b + c|) / max|k*(W*x +
    b) + c|`` after each BatchNorm or chain that follows it alone (through transposes), ``k``
    and ``c`` read elementwise from the modules (``f(1) - f(0)``, ``f(0)``); the largest.
    ``tests/helpers/forms.condition`` measures at the layer's output (``k = 1``, ``c = 0``);
    where the shift cancels most of the output (a BatchNorm's mean close to its input, a chain
    subtracting what the layer computes), the fold's rounding of the shift is not in it."""
    model64 = float64_copy(model)
    layers = model64.layers
    targets = {id(layers[n]) for n in folded_layers if n in layers}
    if not targets:
        return 1.0
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    hook = lambda m, args, out: calls.append((m, args[0], out))  # noqa: E731
    handles = [m.register_forward_hook(hook) for m in {id(m): m for m in layers.values()}.values()]
    try:
        with torch.no_grad():
            model64(x.double())
    finally:
        for h in handles:
            h.remove()
    steps = model64.steps
    call_steps = [i for i, step in enumerate(steps) if step[0] == "call"]
    if len(calls) != len(call_steps):  # a hook or layer called otherwise: no measure
        return 1.0
    record = dict(zip(call_steps, calls, strict=True))
    readers = Counter(v for step in steps for v in step[2]) + Counter(model64.outputs)
    worst = 1.0
    bn_type = nn.modules.batchnorm._BatchNorm
    with torch.no_grad():
        for i, (kind, name, _) in enumerate(steps):
            if kind != "call" or id(layers[name]) not in targets:
                continue
            layer, inp, z = record[i]
            a = _bare_copy(layer, absolute=True)(inp.abs())  # |W| |x|
            b = z - _bare_copy(layer)(inp)  # the bias, broadcast
            k, c = torch.ones_like(z), torch.zeros_like(z)
            v = i + 1  # the value the step computes
            while readers[v] == 1 and v not in model64.outputs:  # one step reads it
                j, step = next((j, st_) for j, st_ in enumerate(steps) if v in st_[2])
                if step[0] == "transpose":
                    k, c, a, b, z = (t.transpose(1, 2) for t in (k, c, a, b, z))
                    v = j + 1
                    continue
                f = layers[step[1]] if step[0] == "call" else None
                if step[2] != [v] or not (
                    isinstance(f, AffineChain)
                    or (isinstance(f, bn_type) and not isinstance(f, _ReLUOnCall))
                ):
                    break
                c0 = f(torch.zeros_like(z))
                k1 = f(torch.ones_like(z)) - c0
                if k1.shape != z.shape:
                    break
                k, c = k1 * k, k1 * c + c0
                v = j + 1
                num = k.abs() * a + (k * b + c).abs()
                den = (k * z + c).abs()
                ok = torch.isfinite(num) & torch.isfinite(den)
                if ok.any() and float(den[ok].max()) > 0:
                    worst = max(worst, float(num[ok].max()) / float(den[ok].max()))
    return worst


def _bare_copy(layer: nn.Module, absolute: bool = False) -> nn.Module:
    """A copy of ``layer`` without its bias and hooks (its weights made ``|W|`` if
    ``absolute``)."""
    out = copy.deepcopy(layer)
    out._forward_hooks.clear()
    with torch.no_grad():
        if absolute:
            for p in out.parameters():
                p.abs_()
        if getattr(out, "bias", None) is not None:
            out.bias.zero_()
    return out


def _count(oc: Outcome, report: bnfold.FoldReport) -> None:
    """The BatchNorm and the affine-chain entries of ``report``, folded and kept by rule."""
    oc.folded = sum(e.folded for e in report.batch_norms)
    oc.refused = Counter(e.rule for e in report.batch_norms if not e.folded)
    oc.affine_folded = sum(e.folded for e in report.affines)
    oc.affine_refused = Counter(e.rule for e in report.affines if not e.folded)


def _check_kinds(report: bnfold.FoldReport, form: str) -> None:
    """Every entry a BatchNorm or an affine chain, none of them twice (an affine chain is named
    by its nodes); the eager frontend folds no arithmetic."""
    kinds = Counter(e.kind for e in report)
    assert set(kinds) <= {"batchnorm", "affine"}, (form, kinds)
    if form == "eager":
        assert not kinds["affine"], f"the eager frontend reports affine chains: {report}"
    names = [e.bn for e in report.affines]
    assert len(set(names)) == len(names), f"{form}: an affine chain reported twice: {report}"
    assert len(report.batch_norms) + len(names) == len(report.entries), report


def _link_names(entry: Any) -> list[str]:
    """The node names of an affine entry: ``mul -> add`` (ONNX, StableHLO), ``layers.affine3
    (mul) -> layers.affine3 (add)`` (ATen: module path, node name)."""
    names = []
    for part in entry.bn.split(" -> "):
        found = re.fullmatch(r".* \(([^()]*)\)", part)
        names.append(found.group(1) if found else part)
    return names


def _export(model: Net, x: torch.Tensor, draw: Any) -> Any:
    """The program torch.export makes of ``model`` (decomposed now and then: decomposing is
    slow), or why there is none."""
    try:
        with quiet():
            ep = torch.export.export(model, (x,))
            if draw is not None and draw(st.sampled_from([False] * 19 + [True])):
                ep = ep.run_decompositions()
    except Exception as e:  # noqa: BLE001 - torch could not export this network
        return f"torch.export failed: {type(e).__name__}"
    return ep, ep.module()


def _check_eager_structure(model: Net, folded: Net, report: bnfold.FoldReport) -> None:
    bn_type = nn.modules.batchnorm._BatchNorm
    for e in report:
        name = e.bn.split(".")[-1]
        layer = folded.layers[name]
        if e.folded:
            assert not isinstance(layer, bn_type), f"{e.bn} folded but still a BatchNorm"
        else:
            assert isinstance(layer, bn_type), f"{e.bn} kept but replaced"
    bns = {id(m) for m in model.layers.values() if isinstance(m, bn_type)}
    assert len(report.entries) == len(bns), "a BatchNorm missing from the report, or twice"


def _check_graph_structure(folded: Any, report: bnfold.FoldReport, form: str) -> None:
    gm = folded.graph_module if form == "export" else folded
    kept = graph_bn_count(gm)
    # a decomposed BatchNorm is one node: kept BatchNorms are exactly the skipped entries
    skipped = [e for e in report.batch_norms if not e.folded]
    assert kept == len(skipped), (kept, report.summary())
    # a folded affine chain's nodes are gone, a kept one's are all there
    nodes = {n.name for n in gm.graph.nodes}
    for e in report.affines:
        left = [n for n in _link_names(e) if n in nodes]
        if e.folded:
            assert not left, f"{form}: affine chain {e.bn} folded, {left} still in the graph"
        else:
            assert len(left) == len(_link_names(e)), f"{form}: affine chain {e.bn} kept, not there"


# --------------------------------------------------------------------------------------------
# torch.compile: the bnfold backend, and the Inductor pre-grad pass in a dynamo backend


def _compile_form(case: Case, form: str) -> str | tuple[bnfold.FoldReport, list, Counter]:
    """Compile ``case.model`` (``dynamic=False``, under ``no_grad``) with the bnfold backend
    (``compile``: ``Backend(inner="eager")``) or with a dynamo backend running ``FoldPass`` on
    each graph (``compile_pass``); return a report of the folds and the outputs, or why the
    form did not run (dynamo could not compile the model even without bnfold), and the
    BatchNorms of graphs the backend compiled unfolded, by reason.

    The pass makes no FoldReport: its decisions become one, each BatchNorm and producer named
    by the module path dynamo recorded for its node, so that the error bound takes the
    condition of exactly the layers the pass folded into (all of them when a producer has no
    module path)."""
    model, x = case.model, case.x
    before = hash_module(model)
    graphs: list = []
    torch._dynamo.reset()
    try:
        with quiet(), torch.no_grad():
            if form == "compile":
                backend, be = _recording_backend(graphs)
            else:
                backend, be = _recording_pass(graphs)
            compiled = torch.compile(model, backend=be, dynamic=False)
            got = outputs(compiled(x))
            again = outputs(compiled(x))  # the guarded call path, with nothing changed
    except AssertionError:
        raise
    except Exception as e:  # noqa: BLE001 - dynamo's failure, or a finding
        unsupported = _dynamo_unsupported(case)
        if unsupported:
            return unsupported
        raise e  # dynamo compiles the model without bnfold: a finding
    finally:
        torch._dynamo.reset()
    assert hash_module(model) == before, f"{form} changed the model's tensors"
    for a, b in zip(got, again, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=f"{form}: 2nd call")
    if form == "compile":
        report, unfolded = _check_compiled(backend, graphs)
    else:
        report, unfolded = _check_pass(backend, graphs, model), Counter()
    return report, got, unfolded


def _recording_backend(graphs: list) -> tuple[Any, Any]:
    """``Backend(inner="eager")``, called through a function that keeps, per graph, its count
    of BatchNorms whose result is used (the ATen trace drops the others), the report and what
    the backend returned."""
    import bnfold.torch

    backend = bnfold.torch.Backend(inner="eager")

    def be(gm: Any, example_inputs: list) -> Any:
        n_bns = len(_live(graph_bn_nodes(gm.graph)))
        result = backend(gm, example_inputs)
        graphs.append((n_bns, backend.reports[-1] if backend.reports else None, result))
        return result

    return backend, be


def _live(nodes: list) -> list:
    """The ``nodes`` the graph's output depends on."""
    if not nodes:
        return []
    live: set = set()
    todo = [nodes[0].graph.output_node()]
    while todo:
        node = todo.pop()
        if node not in live:
            live.add(node)
            todo.extend(node.all_input_nodes)
    return [n for n in nodes if n in live]


def _check_compiled(backend: Any, graphs: list) -> tuple[bnfold.FoldReport, Counter]:
    """Every graph with BatchNorms has a report with an entry for each (or says why it was
    not folded); a folded graph keeps exactly its skipped BatchNorms and was not folded again
    on the second call. The reports of every graph, as one, and the BatchNorms of graphs
    compiled unfolded, by reason."""
    unfolded: Counter = Counter()
    for n_bns, r, result in graphs:
        assert r is not None, "a graph compiled without a report"
        if r.skipped:
            assert n_bns > 0 and not r.report.entries, r
            unfolded[f"graph compiled unfolded: {first_line(r.skipped)[:80]}"] += n_bns
            continue
        assert len(r.report.batch_norms) == n_bns, (n_bns, str(r))
        handed = getattr(result, "handed", None)
        if handed is not None:  # folded: the graph given to the inner backend
            assert r.report.folded, str(r)
            kept = len(graph_bn_nodes(handed.graph))
            assert kept == sum(not e.folded for e in r.report.batch_norms), (kept, str(r))
            assert result.refolds == 0 and not result.fallback, "folded again, nothing changed"
        else:
            assert not r.report.folded, f"folds reported, graph compiled unfolded: {r}"
    entries = [e for r in backend.reports for e in r.report.entries]
    return bnfold.FoldReport(entries, "compile"), unfolded


def _recording_pass(graphs: list) -> tuple[Any, Any]:
    """A dynamo backend that runs ``FoldPass`` on each graph and runs the graph eagerly,
    keeping per graph the module path of every node, its BatchNorm count before and after
    and the pass' decisions."""
    import bnfold.torch

    pass_ = bnfold.torch.FoldPass()

    def be(gm: Any, example_inputs: list) -> Any:
        paths = {n.name: _module_path(n) for n in gm.graph.nodes}
        n_bns = len(graph_bn_nodes(gm.graph))
        start = len(pass_.decisions)
        pass_(gm.graph)
        gm.graph.lint()
        gm.recompile()
        after = len(graph_bn_nodes(gm.graph))
        graphs.append((paths, n_bns, after, pass_.decisions[start:]))
        return gm.forward

    return pass_, be


def _module_path(node: Any) -> str:
    """The module path dynamo recorded for ``node`` (``L['self'].layers.conv0`` or
    ``L['self']._modules['layers']._modules['conv0']`` → ``layers.conv0``), or ``""``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^[LG]\['[^']*'\]", "", str(path))
    path = re.sub(r"\._(?:modules|parameters|buffers)\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    return path.lstrip(".")


def _check_pass(pass_: Any, graphs: list, model: Net) -> bnfold.FoldReport:
    """One decision per BatchNorm of each graph; the pass removed exactly the folded ones and
    counted them in ``matches``. The decisions as a FoldReport (module paths as names)."""
    from bnfold.core.report import FoldEntry

    entries = []
    layers = sorted(f"layers.{n}" for n in model.layers)
    for paths, n_bns, after, decisions in graphs:
        assert len(decisions) == n_bns, (n_bns, decisions)
        assert after == sum(not d.folded for d in decisions), (after, decisions)
        for d in decisions:
            bn = paths.get(d.bn) or d.bn
            if d.folded:
                target = paths.get(d.producer) or ".".join(layers)  # unknown: every layer
                entries.append(FoldEntry(bn, target, "folded"))
            else:
                entries.append(FoldEntry(bn, None, "skipped", d.reason, d.rule))
    folded = sum(e.folded for e in entries)
    assert pass_.matches == folded, (pass_.matches, folded)
    return bnfold.FoldReport(entries, "compile_pass")


def _pass_folded_invalid_values(case: Case, report: bnfold.FoldReport) -> str:
    """Why a wrong compile_pass result is the documented limit of the pass ("" if it is
    not): it folded a BatchNorm whose values do not fold, which it cannot see (it reads no
    values): non-finite statistics or scales, ``var + eps <= 0``, or a scale that takes the
    producer's weights, bias or the shift past the dtype's range. The values are read here
    directly: ``bnfold.fold`` may refuse such a BatchNorm under another rule first (a
    subclass overriding ``__call__``, which dynamo inlines)."""
    model = case.model
    top = torch.finfo(DTYPES[case.dtype]).max
    for e in report.folded:
        try:
            bn = model.get_submodule(e.bn)
        except AttributeError:
            continue
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        state = [bn.running_mean, bn.running_var]
        state += [bn.weight, bn.bias] if bn.affine else []
        if not all(bool(torch.isfinite(t.detach().double()).all()) for t in state):
            return "pass folded a BatchNorm with non-finite values"
        var = bn.running_var.detach().float() + bn.eps  # as the pass computes it
        if bool((var <= 0).any()):
            return "pass folded a BatchNorm with var + eps <= 0"
        scale = torch.rsqrt(var)
        if bn.affine:
            scale = scale * bn.weight.detach().float().abs()
        sizes = [float(bn.running_mean.detach().float().abs().max())]
        try:
            producer = model.get_submodule(e.target or "")
        except AttributeError:
            producer = None
        for t in (getattr(producer, "weight", None), getattr(producer, "bias", None)):
            if isinstance(t, torch.Tensor):
                sizes.append(float(t.detach().float().abs().max()))
        if not bool(torch.isfinite(scale).all()) or float(scale.max()) * max(sizes) > top:
            return "pass folded a scale that overflows the dtype"
    return ""


def _dynamo_unsupported(case: Case) -> str:
    """Why dynamo cannot compile the model without bnfold (backend "eager"), or ""; a dtype
    that only fails is named."""

    def fails(model: Net, x: torch.Tensor) -> str:
        torch._dynamo.reset()
        try:
            with quiet(), torch.no_grad():
                torch.compile(model, backend="eager", dynamic=False)(x)
        except Exception as e:  # noqa: BLE001 - dynamo's own failure
            return type(e).__name__
        finally:
            torch._dynamo.reset()
        return ""

    why = fails(case.model, case.x)
    if not why:
        return ""
    if case.dtype != "float32" and not fails(float64_copy(case.model).float(), case.x.float()):
        return f"dynamo cannot run {case.dtype}: {why}"
    return f"unsupported by dynamo: {why}"


_QUIET_RUN: Any = None


def _onnx_form(case: Case, draw: Any) -> str | tuple:
    """Export ``case`` to ONNX, fold (a ModelProto or an onnx_ir.Model), run both in
    onnxruntime (through float32 for bfloat16, which it cannot run)."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    from tests.helpers.onnx_models import BFLOAT16, FLOAT16, convert, export_torch, session

    global _QUIET_RUN
    if _QUIET_RUN is None:  # a model onnxruntime rejects is counted, not printed
        _QUIET_RUN = ort.RunOptions()
        _QUIET_RUN.log_severity_level = 4

    opset = draw(st.sampled_from([9, 13, 17, 18])) if draw is not None else 17
    try:
        with quiet():
            proto = export_torch(case.model, case.x, dynamo=False, opset_version=opset)
    except Exception as e:  # noqa: BLE001 - the exporter could not export this network
        return f"onnx export failed: {type(e).__name__}"
    before = proto.SerializeToString()
    as_ir = draw is not None and draw(st.sampled_from([False, False, True]))
    with quiet():
        if as_ir:
            model = ir.from_proto(proto)
            folded_ir, report = bnfold.fold(model, return_report=True)
            folded = ir.to_proto(folded_ir)
        else:
            folded, report = bnfold.fold(proto, return_report=True)
        analyzed = bnfold.analyze(proto)
    assert proto.SerializeToString() == before, "ONNX fold changed its input"
    assert analyzed.to_list() == report.to_list(), "analyze disagrees with fold"
    try:  # the exporter writes some invalid models (bfloat16 Relu before opset 14)
        onnx.checker.check_model(proto, full_check=True)
    except Exception:  # noqa: BLE001 - then the result cannot be held to the full check
        pass
    else:
        onnx.checker.check_model(folded, full_check=True)
    kept = sum(1 for n in folded.graph.node if n.op_type == "BatchNormalization")
    assert kept == sum(not e.folded for e in report.batch_norms), (kept, report.summary())
    written = _check_onnx_affines(proto, folded, report)
    original_run, folded_run = proto, folded
    if case.dtype == "bfloat16":
        original_run, folded_run = convert(proto, BFLOAT16), convert(folded, BFLOAT16)
    feeds_x = case.x.float().numpy()
    if case.dtype == "float16":
        feeds_x = feeds_x.astype(np.float16)
    try:
        s_orig = session(original_run)
    except Exception:  # noqa: BLE001 - no float16 kernel for some op: run through float32
        original_run, folded_run = convert(proto, FLOAT16), convert(folded, FLOAT16)
        feeds_x = case.x.float().numpy()
        s_orig = session(original_run)
    name = s_orig.get_inputs()[0].name
    try:
        original = s_orig.run(None, {name: feeds_x}, _QUIET_RUN)
    except Exception:  # noqa: BLE001 - torch allows output_padding < dilation, onnxruntime not
        return "onnxruntime cannot run the exported model"
    got = session(folded_run).run(None, {name: feeds_x}, _QUIET_RUN)
    return report, original, got, Counter({_WRITTEN_BIAS_NAMED: written} if written else {})


# counted apart (reported): the entry of a chain after a MatMul whose BatchNorm folded in a first
# pass starts with the bias Add that fold wrote (``/fc/MatMul_bias``), not a node of the input
_WRITTEN_BIAS_NAMED = "affine entry names the bias Add a first pass wrote after a MatMul"


def _check_onnx_affines(proto: Any, folded: Any, report: bnfold.FoldReport) -> int:
    """A folded affine chain's nodes are gone but for the first when it is the bias ``Add``
    after a ``MatMul`` (which has no bias input: the fold writes the bias into that ``Add``);
    a kept one's are all there. Returns how many entries name a bias ``Add`` the fold wrote
    (:data:`_WRITTEN_BIAS_NAMED`)."""
    before = {n.name: n for n in proto.graph.node}
    after = {n.name: n for n in folded.graph.node}
    written = 0
    for e in report.affines:
        names = _link_names(e)
        unknown = [n for n in names if n not in before]
        written_add = after.get(unknown[0]) if unknown == names[:1] else None
        if written_add is not None and written_add.op_type == "Add" and e.target_type == "MatMul":
            written += 1
        else:
            assert not unknown, f"affine chain {e.bn}: {unknown} are not nodes of the model"
        left = [n for n in names if n in after]
        if not e.folded:
            assert left == names, f"affine chain {e.bn} kept, {sorted(set(names) - set(left))} gone"
        elif left:
            first = after[names[0]]
            bias_add = left == names[:1] and first.op_type == "Add" and e.target_type == "MatMul"
            assert bias_add, f"affine chain {e.bn} folded, {left} still in the graph"
    return written


# --------------------------------------------------------------------------------------------
# StableHLO: the network translated to JAX, exported with jax.export


def _stablehlo_form(case: Case, draw: Any, ref: list, eager_out: list) -> str | tuple:
    """Translate ``case`` to JAX (``tests/helpers/jax_forms.py``, the network's own dtype),
    export it with ``jax.export``, fold the ``Exported`` (now and then its StableHLO text), and
    run both; or say why the form did not run (a layer or hook the translation lacks, JAX not
    installed). The translation itself is first held to the fold's bound against the float64
    reference, with torch's eager outputs as the original: a translation that computed another
    function would make the comparison below meaningless."""
    try:
        from tests.helpers import jax_forms
    except ImportError:
        return "JAX not installed"
    try:
        return _stablehlo_fold(case, draw, ref, eager_out, jax_forms)
    finally:
        jax_forms.forget()


def _stablehlo_fold(case: Case, draw: Any, ref: list, eager_out: list, jax_forms: Any) -> Any:
    try:
        with quiet():
            exported = jax_forms.export(
                case.model, case.x, check=False, after_call={_ReLUOnCall: _jax_relu()}
            )
    except NotImplementedError as e:
        return f"no JAX translation: {_generic(first_line(e))}"
    limits: Counter = Counter()
    as_text = draw is not None and draw(st.sampled_from([False, False, False, True]))
    model = exported.mlir_module() if as_text else exported
    before = jax_forms.fingerprint(model)
    with quiet():
        folded, report = bnfold.fold(model, return_report=True)
        analyzed = bnfold.analyze(model)
    assert jax_forms.fingerprint(model) == before, "stablehlo fold changed its input"
    a, f = analyzed.to_list(), report.to_list()
    reordered = sorted(map(str, a)) == sorted(map(str, f))
    assert a == f, (
        f"analyze disagrees with fold: analyze only {_only(a, f)}, fold only {_only(f, a)}"
        + (", the same entries in another order" if reordered else "")
    )
    if as_text:
        limits["folded as StableHLO text"] += 1
        assert isinstance(folded, str), type(folded)
    else:
        assert type(folded) is type(exported), type(folded)
        for name in ("fun_name", "in_tree", "out_tree", "in_avals", "out_avals", "platforms"):
            assert getattr(folded, name) == getattr(exported, name), f"folded {name} differs"
    _check_stablehlo_entries(jax_forms.bn_paths(model), jax_forms.bn_paths(folded), report)
    original = jax_forms.run(model, case.x)
    got = jax_forms.run(folded, case.x)
    try:
        if not _translation_agrees(case, ref, eager_out, original):
            limits[_TORCH_NAN] += 1
    except _NotCompared as e:
        return str(e)
    return report, original, got, limits


class _NotCompared(Exception):
    """The translation differs from torch for a reason of XLA's or JAX's, not bnfold's: the
    network is counted as not compared (the fold's own checks have run)."""


class _HalfOverflow(_NotCompared):
    """The translation overflows in float16 or bfloat16 where torch does not: torch computes a
    half-precision BatchNorm in float32, the translation in the network's dtype. The network
    is not compared (the fold's own checks above have run)."""


_TORCH_NAN = (
    "the translation is finite where torch's reference is not (a BatchNorm with var + eps = 0: "
    "torch computes x * inf + (b - mean * inf), JAX (x - mean) * inf + b)"
)


def _translation_agrees(case: Case, ref: list, eager_out: list, original: list) -> bool:
    """Hold the unfolded JAX program to the fold's bound against the float64 reference, with
    torch's eager outputs as the original; raise if it fails. One difference is allowed, in a
    network with invalid statistics: where a BatchNorm's scale is infinite, torch's
    ``x * alpha + (b - mean * alpha)`` gives NaN (inf - inf) where the translation's ``(x -
    mean) * alpha + b`` gives an infinity (0 after a ReLU): the program is then compared only
    where the reference is finite, and False is returned."""
    try:
        compare_to_reference("JAX translation", case.dtype, ref, eager_out, original, 1.0)
        return True
    except WrongResult as e:
        if case.dtype in ("float16", "bfloat16") and "non-finite values the original" in str(e):
            raise _HalfOverflow(
                f"not compared: the translation overflows in {case.dtype} (torch computes its "
                "BatchNorms in float32)"
            ) from None
        _flushed_subnormals(case.dtype, ref, str(e))
        if not (case.bad_stats and "is finite where the reference is not" in str(e)):
            raise AssertionError(f"the JAX translation is not the torch network: {e}") from None
    masked = [
        np.where(torch.isfinite(r).numpy(), np.asarray(o, np.float64), np.nan)
        for r, o in zip(ref, original, strict=True)
    ]
    try:
        compare_to_reference("JAX translation", case.dtype, ref, eager_out, masked, 1.0)
    except WrongResult as e:
        raise AssertionError(f"the JAX translation is not the torch network: {e}") from None
    return False


def _flushed_subnormals(dtype: str, ref: list, message: str) -> None:
    """Raise :class:`_NotCompared` when the output a translation check failed on is so small
    that XLA's CPU client, which flushes subnormal results to zero (torch does not), can be off
    by more than the bound: its largest finite reference value below ``tiny / u`` (an
    ``AffineChain`` multiplying by 1e-30 makes such outputs)."""
    found = re.search(r"output (\d+) error", message)
    if not found:
        return
    r = ref[int(found.group(1))]
    finite = r[torch.isfinite(r)]
    top = float(finite.abs().max()) if finite.numel() else 0.0
    info = torch.finfo(DTYPES[dtype])
    if top < info.tiny / UNIT_ROUNDOFF[dtype]:
        raise _NotCompared(
            "not compared: an output below the smallest normal over the unit roundoff (XLA "
            "flushes subnormal results to zero, torch does not)"
        )


def _check_stablehlo_entries(paths: list[str], kept: list[str], report: Any) -> None:
    """Every BatchNorm accounted for, from the layer path JAX recorded for each BatchNorm
    multiply of the program (``paths``) and of the folded program (``kept``). An entry is one
    chain's layer (``layers/bn1``, or ``layers/bn1 (@main:%7)`` when that layer's name was
    taken by another chain): a chain of several BatchNorms has an entry per layer it holds, so
    a layer called twice in one chain has one entry for two multiplies. Hence: no more entries
    than BatchNorm calls, no two alike, every layer named, and the folded program computes the
    BatchNorms of exactly the skipped entries' layers, at least one each."""
    summary = report.summary()
    names = [e.bn for e in report.batch_norms]
    assert len(names) <= len(paths), f"{len(names)} entries for {len(paths)} BatchNorms: {summary}"
    assert len(set(names)) == len(names), f"a BatchNorm named twice: {summary}"
    assert "" not in paths, "a BatchNorm of the translation without its layer's name"
    layer = lambda name: re.sub(r" \(@[^)]*\)$", "", name)  # noqa: E731
    missing = set(paths) - {layer(n) for n in names}
    assert not missing, f"BatchNorms {sorted(missing)} missing from the report: {summary}"
    invented = {layer(n) for n in names} - set(paths)
    assert not invented, f"entries {sorted(invented)} name no BatchNorm: {summary}"
    skipped = [layer(e.bn) for e in report.batch_norms if not e.folded]
    assert set(kept) == set(skipped), f"the folded program computes {sorted(kept)}: {summary}"
    assert len(kept) >= len(skipped), (kept, summary)


def _only(entries: list, others: list) -> list:
    """The entries of a report that ``others`` lacks, as many times as they are missing."""
    rest = list(others)
    only = []
    for e in entries:
        if e in rest:
            rest.remove(e)
        else:
            only.append(e)
    return only


def _jax_relu() -> Any:
    import jax

    return jax.nn.relu


def _generic(message: str) -> str:
    """A translation failure's message without the layer's numbers, for counting."""
    return re.sub(r"\d+", "N", message)


# --------------------------------------------------------------------------------------------
# pt2e QAT: torchao's flow under a conv-output quantizer, the converted graph folded

QAT_STEPS = 3  # SGD steps of the flow
WIDEN = 16.0  # qat_bias also folds a copy whose conv outputs are quantized this much wider
FLOAT_FACTOR = 32.0  # float bound of a tail: this many float32 roundings of its magnitudes
U32 = 2.0**-24
_LAYOUT_OPS = {"permute", "transpose", "view", "reshape", "_unsafe_view", "clone", "contiguous",
               "t", "squeeze", "unsqueeze", "alias", "expand"}  # fmt: skip
_FLOAT_PRODUCERS = {"linear", "addmm", "mm", "matmul", "bmm", "baddbmm", "conv1d", "conv2d",
                    "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
                    "conv_transpose3d"}  # fmt: skip


@dataclass
class _Converted:
    """A converted graph of torchao's QAT flow, the inputs it is compared on and the flow."""

    gm: Any
    xs: list[torch.Tensor]
    flow: str  # the options, for a finding's report
    options: list[str] = field(default_factory=list)  # the same, counted


def _qat_model(case: Case) -> tuple[nn.Module, torch.Tensor, list[str]]:
    """The drawn network in float32 (torchao's observers and the flow's SGD run in float32),
    with a BatchNorm eps of 0 or less made 1e-5 (torch refuses eps <= 0 in training, and torchao
    writes 1e-5 into every BatchNorm it rewrites anyway), and an input of at least two samples
    (BatchNorm1d on ``(1, C)`` cannot train)."""
    model = float64_copy(case.model).float()
    options = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.eps > 0:
            m.eps = 1e-5
            options = ["flow: a BatchNorm's eps <= 0 made 1e-5"]
    x = case.x.float()
    if x.shape[0] < 2:
        x = torch.cat([x, 0.5 - x], 0)
    return model, x, options


def _make_affine(model: nn.Module) -> bool:
    """Give every BatchNorm without affine parameters gamma 1 and beta 0; whether any had
    none."""
    changed = False
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.affine:
            m.affine = True
            m.weight = nn.Parameter(torch.ones(m.num_features))
            m.bias = nn.Parameter(torch.zeros(m.num_features))
            changed = True
    return changed


def _flow_stage(e: BaseException) -> str:
    """Which step of ``qat_convert`` raised ``e`` (the export, torchao's prepare, a training
    step, ``move_exported_model_to_eval``, ``convert_pt2e``)."""
    import traceback

    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        if frame.name == "qat_convert":
            line = frame.line or ""
            for key, stage in (("export", "export"), ("prepare_qat_pt2e", "prepare_qat_pt2e"),
                               ("SGD", "optimizer"), ("backward", "training step"),
                               ("prepared(", "training step"),
                               ("move_exported_model_to_eval", "move_exported_model_to_eval"),
                               ("convert_pt2e", "convert_pt2e")):  # fmt: skip
                if key in line:
                    return stage
            return "flow"
    return "flow"


def _qat_convert(case: Case, draw: Any) -> _Converted | str:
    """torchao's QAT flow on the drawn network (``tests.helpers.qat.qat_convert`` with
    ``ConvOutputQuantizer``: per-channel weights or not, a float or an int32 bias,
    ``fold_quantize`` and ``move_exported_model_to_eval`` drawn), or why there is none."""
    from tests.helpers import qat as flows

    if draw is None:  # the options from the case's seed
        rng = np.random.default_rng(case.seed + 17)
        draw = lambda strategy: _from_rng(rng, strategy)  # noqa: E731
    per_channel = draw(st.booleans())
    qbias = draw(st.sampled_from(["float", "int32"]))
    fold_quantize = draw(st.booleans())
    to_eval = draw(st.sampled_from([True, True, False]))
    seed = draw(st.integers(0, 2**16))
    flow = (
        f"per_channel={per_channel}, bias={qbias!r}, fold_quantize={fold_quantize}, "
        f"to_eval={to_eval}, seed={seed}"
    )
    model, x, options = _qat_model(case)
    chosen = {
        "flow: per-channel weights": per_channel,
        "flow: int32 bias": qbias == "int32",
        "flow: fold_quantize=False": not fold_quantize,
        "flow: no move_exported_model_to_eval": not to_eval,
    }
    options += [o for o, on in chosen.items() if on]
    nothing = "nothing to train (no parameter reaches the output: the flow's SGD needs one)"
    if not any(p.requires_grad for p in model.parameters()):
        return nothing
    quantizer = flows.ConvOutputQuantizer(per_channel=per_channel, bias=qbias)
    kwargs = {"steps": QAT_STEPS, "to_eval": to_eval, "fold_quantize": fold_quantize, "seed": seed}
    for attempt in range(2):
        try:
            with quiet():
                gm = flows.qat_convert(model, (x,), quantizer, **kwargs)
            break
        except Exception as e:  # noqa: BLE001 - torch.export or torchao failed on the network
            stage = _flow_stage(e)
            if stage == "optimizer" or "does not require grad" in str(e):
                return nothing  # no parameter reaches the loss: the harness's SGD, not torchao
            if attempt == 0 and "but got None" in str(e) and _make_affine(model):
                # torchao's conv + BatchNorm rewrite reads the BatchNorm's weight: without
                # affine parameters its first training step fails. The same network with
                # gamma 1 and beta 0 (the same function) still tests bnfold.
                options.append("flow: torchao refused a BatchNorm without affine: made affine")
                flow += ", BatchNorms without affine made affine"
                continue
            why = re.sub(r"tensor\(\[[^\]]*\]?\)?", "tensor(...)", first_line(e))
            why = re.sub(r"\d+", "N", why)[:60]
            return f"torchao refused: {stage}: {type(e).__name__}: {why}"
    shape = tuple(x.shape)
    xs = [x, *flows.random_inputs(shape, 1, seed), *flows.calibration_inputs(shape, 3, seed + 1)]
    return _Converted(gm, xs, flow, options)


def _from_rng(rng: np.random.Generator, strategy: Any) -> Any:
    """The few strategies ``_qat_convert`` draws, drawn from ``rng`` (no hypothesis data)."""
    text = repr(strategy)
    if "booleans" in text:
        return bool(rng.integers(2))
    if "integers" in text:
        return int(rng.integers(0, 2**16))
    options = list(strategy.elements)
    return options[int(rng.integers(len(options)))]


def _widened(gm: Any, factor: float) -> Any:
    """A copy of ``gm`` whose conv outputs are quantized with ``factor`` times the scale (each
    quantize reading a conv and its dequantizes): as if calibrated on wider data (as
    ``tests/torch/test_pt2e_qat.widen_outputs``)."""
    import copy

    qd = torch.ops.quantized_decomposed
    gm = copy.deepcopy(gm)
    for q in list(gm.graph.nodes):
        if q.op != "call_function" or q.target != qd.quantize_per_tensor.default:
            continue
        src = q.args[0]
        if not (isinstance(src, torch.fx.Node) and "conv" in _opname(src)):
            continue
        for n in [q, *q.users]:
            n.args = (n.args[0], n.args[1] * factor, *n.args[2:])
    gm.recompile()
    return gm


def _opname(node: Any) -> str:
    schema = getattr(node.target, "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else ""


def _in_eval(gm: Any) -> Any:
    """``tests.helpers.qat.in_eval``, imported when a QAT form runs (it imports torchao)."""
    from tests.helpers.qat import in_eval

    return in_eval(gm)


def _gm_state(gm: Any) -> str:
    """A hash of what a fold must not change in a GraphModule: its code and every tensor it
    holds (parameters, buffers, constants read by ``get_attr``), with the training flags."""
    import hashlib

    h = hashlib.sha256(gm.code.encode())
    tensors = dict(gm.state_dict(keep_vars=True))
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            value: Any = gm
            for part in str(n.target).split("."):
                value = getattr(value, part, None)
            if isinstance(value, torch.Tensor):
                tensors[f"attr:{n.target}"] = value
    for name, value in vars(gm).items():
        if isinstance(value, torch.Tensor):
            tensors[f"var:{name}"] = value
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    h.update(str([m.training for m in gm.modules()]).encode())
    return h.hexdigest()


_BN_ARG_NAMES = {"input": "input", "weight": "weight", "bias": "bias",
                 "running_mean": "mean", "running_var": "var", "eps": "eps",
                 "epsilon": "eps"}  # fmt: skip


def _bn_parts(node: Any, env: dict) -> dict:
    """A BatchNorm node's input node and its weight, bias, mean, var (values) and eps."""
    names = [a.name for a in node.target._schema.arguments]
    given = dict(zip(names, node.args, strict=False))
    given.update(node.kwargs)
    parts: dict = {}
    for name, role in _BN_ARG_NAMES.items():
        if name in given:
            a = given[name]
            parts[role] = env[a] if isinstance(a, torch.fx.Node) else a
    parts["input_node"] = given["input"]
    return parts


def _channel_max(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """max|t| per channel (axis 1) over its finite values, shaped to broadcast on axis 1."""
    t = t.detach().double()
    t = torch.where(torch.isfinite(t), t.abs(), torch.zeros((), dtype=t.dtype))
    if t.ndim < 2:
        return t.reshape(1, -1, *([1] * (ndim - 2))) if t.numel() > 1 else t.reshape(())
    dims = [d for d in range(t.ndim) if d != 1]
    return t.amax(dim=dims).reshape(1, -1, *([1] * (ndim - 2)))


def _per_channel(value: Any, ndim: int, default: float) -> torch.Tensor:
    if value is None:
        return torch.tensor(default, dtype=torch.float64)
    t = torch.as_tensor(value).detach().double().reshape(-1)
    return t.reshape(1, -1, *([1] * (ndim - 2))) if t.numel() > 1 else t.reshape(())


class _Activations:
    """Which nodes of a graph carry activations (depend on a placeholder), not constants."""

    def __init__(self, graph: Any) -> None:
        self.nodes: set = set()
        for n in graph.nodes:
            if n.op == "placeholder" or any(a in self.nodes for a in n.all_input_nodes):
                self.nodes.add(n)

    def source(self, node: Any) -> Any:
        """The one activation argument of ``node``, or None."""
        acts = [a for a in node.all_input_nodes if a in self.nodes]
        return acts[0] if len(set(acts)) == 1 else None


def _float_tolerance(bn: Any, env: dict, acts: _Activations) -> torch.Tensor:
    """The most float rounding may move a folded BatchNorm's output (per element, float64).

    The tail computes ``batch_norm(tail(z))``; every float32 op of it, in the unfolded graph
    and in the fold, rounds once relative to the magnitudes it handles, and those are bounded
    per channel ``c`` by ``|z|`` (the dequantized conv output: the tail's gain ``k`` is 1),
    ``|s_c| * (|v| + |mean_c|)`` (``v`` the BatchNorm's input, which contains the conv bias
    the tail adds, ``s_c = |gamma_c| / sqrt(var_c + eps)``), ``|beta_c|`` and ``|y|`` (the
    output); the fold's shift ``c`` is one float32 rounding of a float64 value of at most these
    magnitudes. A BatchNorm folded into a float Linear (not quantized by the conv-output
    quantizer) adds the rounding of the accumulation of its ``n`` products, each of at most
    ``|s_c| * |W| |x|``: ``2 n u |s_c| (|W| |x| + |b|)``, ``|W| |x| + |b|`` evaluated with the
    absolute values. The bound is ``FLOAT_FACTOR`` (32) such roundings of the per-channel
    maxima, ``u = 2**-24``: a few times the dozen roundings the two computations hold."""
    parts = _bn_parts(bn, env)
    v = env[parts["input_node"]]
    out = env[bn]
    out = out[0] if isinstance(out, (tuple, list)) else out
    nd = v.ndim
    var = _per_channel(parts.get("var"), nd, 1.0)
    eps = float(parts.get("eps") or 0.0)
    gamma = _per_channel(parts.get("weight"), nd, 1.0)
    s = gamma.abs() / torch.sqrt((var + eps).clamp_min(0.0))
    s = torch.where(torch.isfinite(s), s, torch.zeros((), dtype=s.dtype))
    mean = _per_channel(parts.get("mean"), nd, 0.0).abs()
    beta = _per_channel(parts.get("bias"), nd, 0.0).abs()
    mean = torch.where(torch.isfinite(mean), mean, torch.zeros((), dtype=mean.dtype))
    scale = _channel_max(out, nd) + s * (_channel_max(v, nd) + mean) + beta
    # up the tail: the dequantize (a QAT chain) or a float producer through layout ops
    node, path = parts["input_node"], []
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        name = _opname(node)
        if "dequantize" in name:
            scale = scale + _channel_max(env[node], nd)
            break
        if name in _FLOAT_PRODUCERS:
            a, n_acc = _absolute(node, path, env)
            if a is not None and a.shape == v.shape:
                scale = scale + 2 * n_acc / FLOAT_FACTOR * s * _channel_max(a, nd)
            break
        if name in _LAYOUT_OPS:
            path.append(node)
        elif name.rstrip("_") not in ("add", "sub", "mul", "div"):
            break
        node = acts.source(node)
    return FLOAT_FACTOR * U32 * scale


def _absolute(producer: Any, path: list, env: dict) -> tuple[torch.Tensor | None, int]:
    """``|W| |x| + |b|`` of a float producer (its op on the absolute values, in float64),
    carried through the layout ops ``path`` (from the BatchNorm back), and the length of its
    sums."""

    def absolute(a: Any) -> Any:
        v = env[a] if isinstance(a, torch.fx.Node) else a
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.detach().double().abs()
        return v

    try:
        args = torch.fx.node.map_aggregate(producer.args, absolute)
        kwargs = torch.fx.node.map_aggregate(producer.kwargs, absolute)
        value = producer.target(*args, **kwargs)
        prev = producer
        for node in reversed(path):
            rest = [prev if a is prev else a for a in node.args]
            args = [value if a is prev else absolute(a) for a in rest]
            value = node.target(*args, **{k: absolute(v) for k, v in node.kwargs.items()})
            prev = node
    except Exception:  # noqa: BLE001 - an op that does not take float64: no such term
        return None, 1
    tensors = [env[a] for a in producer.all_input_nodes if isinstance(env.get(a), torch.Tensor)]
    n_acc = max([int(t.shape[-1]) for t in tensors if t.ndim == 2] or [1])
    if "conv" in _opname(producer):
        n_acc = max(int(t[0].numel()) for t in tensors if t.ndim >= 3)
    return value, n_acc


@dataclass
class _Edge:
    """The worst difference of a folded BatchNorm's output, over the inputs."""

    bn: str
    mode: str  # "float": a float bound; "bias": the report's claim in output steps
    ratio: float = 0.0  # max |folded - unfolded| / bound
    err: float = 0.0
    tol: float = 0.0
    steps: float = 0.0  # bias: max |folded - unfolded| in output steps
    claim: float = 0.0


class _Attributing(torch.fx.Interpreter):
    """Runs the folded graph with every folded BatchNorm's output checked where it is read.

    Each node of the folded graph that has a counterpart in the unfolded graph (the same name
    and op) and reads, in the unfolded graph, a BatchNorm the fold removed, is an *edge*: the
    value the folded graph gives it (the exact fold's add, the bias fold's dequantize, a float
    producer) is checked against the BatchNorm's output in the unfolded graph, and then
    replaced by it. Every difference is thus attributed to the one chain it comes from: a
    rounding that flips a later quantize, or a chain whose bias fold moves an output by a step,
    does not reach the later chains or the outputs, and the outputs must then equal the
    unfolded graph's bit for bit."""

    def __init__(self, gm: Any, ref: Any, ref_env: dict, removed: set, check: Any) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.ref_nodes = {n.name: n for n in ref.graph.nodes}
        self.ref_env = ref_env
        self.removed = removed
        self.check = check
        self.diverged: list[str] = []
        self.out_pairs: list = []

    def _removed_bn(self, b: Any) -> Any:
        if not isinstance(b, torch.fx.Node):
            return None
        if b in self.removed:
            return b
        if b.target is operator.getitem and b.args[0] in self.removed:
            return b.args[0] if b.args[1] == 0 else None
        return None

    def run_node(self, n: Any) -> Any:
        m = self.ref_nodes.get(n.name)
        if m is None or m.op != n.op or m.target != n.target:
            return super().run_node(n)
        f_leaves, f_spec = torch.utils._pytree.tree_flatten((n.args, n.kwargs))
        r_leaves, r_spec = torch.utils._pytree.tree_flatten((m.args, m.kwargs))
        subs: dict = {}
        if f_spec == r_spec:
            for a, b in zip(f_leaves, r_leaves, strict=True):
                bn = self._removed_bn(b)
                if bn is not None and isinstance(a, torch.fx.Node):
                    assert subs.get(a, b) is b, f"{a.name} stands for two unfolded values"
                    self.check(self, a, bn, self.env[a], self.ref_env[b])
                    subs[a] = b
        if n.op == "output":
            for a, b in zip(f_leaves, r_leaves, strict=True):
                if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node):
                    got = self.ref_env[subs[a]] if a in subs else self.env[a]
                    self.out_pairs.append((a.name, got, self.ref_env[b]))
            return super().run_node(n)
        args, kwargs = torch.fx.node.map_arg(
            (n.args, n.kwargs), lambda a: self.ref_env[subs[a]] if a in subs else self.env[a]
        )
        value = getattr(self, n.op)(n.target, args, kwargs)
        if not _same(value, self.ref_env.get(m)):
            self.diverged.append(n.name)
        return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point():
            return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and (not isinstance(a, torch.Tensor)) and a == b


_CLAIM = re.compile(r"folded into (\S+)'s \w+ bias .*at most ([0-9.]+) output steps")


def _bias_claims(report: bnfold.FoldReport) -> dict[str, float]:
    """The producer node named by each bias fold's note, and its claimed bound in steps."""
    claims = {}
    for e in report.folded:
        found = _CLAIM.search(e.note or "")
        if found:
            claims[found.group(1)] = float(found.group(2))
    return claims


def _check_qat_fold(
    gm: Any, folded: Any, report: bnfold.FoldReport, xs: list, cache: dict
) -> tuple[dict[str, _Edge], int]:
    """Check every folded BatchNorm's output where it is read (``_Attributing``) on ``xs``, the
    float bound for exact folds and float producers, the report's claim for bias folds; the
    outputs must then equal the unfolded graph's. Returns the edges and how many bias claims no
    edge checked (a BatchNorm whose output nothing reads)."""
    qd = torch.ops.quantized_decomposed
    dq_ops = (qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor)
    ref = cache.get(id(gm))
    if ref is None or ref[0] is not gm:  # the unfolded graph in eval mode, its values per input
        ref_gm = _in_eval(gm)
        envs = []
        for x in xs:
            it = torch.fx.Interpreter(ref_gm, garbage_collect_values=False)
            with torch.no_grad():
                it.run(x)
            envs.append(it.env)
        ref = cache[id(gm)] = (gm, ref_gm, envs, _Activations(ref_gm.graph))
    _, ref_gm, envs, acts = ref
    run = _in_eval(folded)
    names = {(n.name, n.target) for n in run.graph.nodes}
    removed = {b for b in graph_bn_nodes(ref_gm.graph) if (b.name, b.target) not in names}
    assert len(removed) == len(report.folded), (
        f"{len(removed)} BatchNorm nodes gone, {len(report.folded)} reported folded"
    )
    claims = _bias_claims(report)
    edges: dict[str, _Edge] = {}
    checked: set[str] = set()

    for x, env in zip(xs, envs, strict=True):

        def check(run: _Attributing, a: Any, bn: Any, got: Any, want: Any) -> None:
            tol = _float_tolerance(bn, run.ref_env, acts)
            mode, claim, step = "float", 0.0, 0.0
            if a.target in dq_ops:  # a bias fold: conv -> quantize -> this dequantize
                q = a.args[0]
                producer = q.args[0] if isinstance(q, torch.fx.Node) else None
                if isinstance(producer, torch.fx.Node) and producer.name in claims:
                    mode, claim = "bias", claims[producer.name]
                    scale = a.args[1]
                    step = float(run.env[scale] if isinstance(scale, torch.fx.Node) else scale)
                    tol = tol + claim * step
                    checked.add(producer.name)
            got64, want64 = got.detach().double(), want.detach().double()
            assert got64.shape == want64.shape, (bn.name, got64.shape, want64.shape)
            finite = torch.isfinite(want64)
            assert not bool(torch.isfinite(got64[~finite]).any()), (
                f"{bn.name}: the fold is finite where the unfolded graph is not"
            )
            diff = (got64 - want64).abs()
            assert bool(torch.isfinite(diff[finite]).all()), (
                f"{bn.name}: the fold is not finite where the unfolded graph is"
            )
            tol_all = torch.broadcast_to(tol, diff.shape)
            ratio = (diff / tol_all.clamp_min(1e-300))[finite]
            e = edges.setdefault(bn.name, _Edge(bn.name, mode, claim=claim))
            if ratio.numel():
                i = int(ratio.argmax())
                r = float(ratio[i])
                if r >= e.ratio:
                    e.ratio, e.err, e.tol = r, float(diff[finite][i]), float(tol_all[finite][i])
                if mode == "bias":
                    e.steps = max(e.steps, float(diff[finite].max()) / step)
            if bool((ratio > 1.0).any()):
                what = (
                    f"more than the claimed {claim:.3f} output steps ({e.steps:.3f} steps)"
                    if mode == "bias"
                    else "more than float rounding"
                )
                raise WrongResult(
                    f"{bn.name}: the folded output differs from the unfolded graph's by {what}: "
                    f"max ratio to the bound {float(ratio.max()):.3g}, |diff| {e.err:.3g} at a "
                    f"bound of {e.tol:.3g} (read through {a.name})"
                )

        interp = _Attributing(run, ref_gm, env, removed, check)
        with torch.no_grad():
            interp.run(x)
        for name, got, want in interp.out_pairs:
            if not _same(got, want):
                d = (got.double() - want.double()).abs()
                raise WrongResult(
                    f"output {name} differs from the unfolded graph's (max {float(d.max()):.3g}) "
                    "where no folded BatchNorm explains it; first differing nodes: "
                    f"{interp.diverged[:4]}"
                )
    return edges, len(set(claims) - checked)


def _qat_form(case: Case, form: str, draw: Any, cache: dict) -> Outcome:
    """Fold torchao's converted graph of ``case`` with ``qat="exact"`` (``qat``) or
    ``qat="bias"`` (``qat_bias``, also on a copy widened ``WIDEN`` times), and check it."""
    with quiet():
        return _qat_form_quietly(case, form, draw, cache)


def _qat_form_quietly(case: Case, form: str, draw: Any, cache: dict) -> Outcome:
    oc = Outcome(form, dtype="float32")
    if "converted" not in cache:
        cache["converted"] = _qat_convert(case, draw)
    conv = cache["converted"]
    if isinstance(conv, str):
        oc.note = conv
        return oc
    oc.limits.update(conv.options)
    try:
        return _qat_folds(conv, form, cache, oc)
    except Exception as e:
        e.add_note(f"QAT flow: {conv.flow}")
        raise


def _qat_folds(conv: _Converted, form: str, cache: dict, oc: Outcome) -> Outcome:
    mode = "exact" if form == "qat" else "bias"
    report = _qat_fold_once(conv.gm, conv.xs, mode, cache, oc, "")
    oc.folded = len(report.folded)
    oc.refused = Counter(e.rule for e in report.skipped)
    for e in report.skipped:  # BatchNorms torchao's QAT rewrite left after a quantized conv
        found = re.search(r"node \S+ \(aten\.(\w+)\)'s quantized output directly", e.reason)
        if found:
            oc.limits[f"kept: reads a {found.group(1)}'s dequantized output (not rewritten)"] += 1
    if mode != "bias":
        return oc
    if report.folded and not _bias_claims(report):  # then the same graph as the exact fold
        exact = cache.get(("folded", id(conv.gm), "exact"))
        if exact is None:
            with quiet():
                exact = bnfold.fold(conv.gm, return_report=True, affine=False)[0]
        bias_folded = cache[("folded", id(conv.gm), "bias")]
        exact, bias_folded = _in_eval(exact), _in_eval(bias_folded)
        for x in conv.xs:
            with torch.no_grad():
                a, b = outputs(exact(x)), outputs(bias_folded(x))
            assert _same(a, b), "qat='bias' with no chain in a bias differs from qat='exact'"
    if any("QAT tail" in (e.note or "") for e in report.folded):
        _qat_fold_once(_widened(conv.gm, WIDEN), conv.xs, mode, cache, oc, f"widened x{WIDEN:g}: ")
    return oc


def _qat_fold_once(
    gm: Any, xs: list, mode: str, cache: dict, oc: Outcome, label: str
) -> bnfold.FoldReport:
    """Fold ``gm`` in ``mode`` and check it: the input unchanged, ``analyze`` agreeing, every
    BatchNorm accounted for, the outputs (``_check_qat_fold``); counts go to ``oc.limits``,
    the float edge closest to its bound to ``oc.err``/``oc.tol``, the bias fold closest to its
    claim to ``oc.worst``."""
    before = _gm_state(gm)
    with quiet():  # BatchNorms only: the checks attribute every change to a folded BatchNorm
        folded, report = bnfold.fold(gm, return_report=True, qat=mode, affine=False)
    assert _gm_state(gm) == before, f"qat={mode!r} fold changed its input"
    cache[("folded", id(gm), mode)] = folded
    check_entries(report, f"qat {mode}")
    n_bns = len(graph_bn_nodes(gm.graph))
    assert len(report.entries) == n_bns, (n_bns, report.summary())
    kept = len(graph_bn_nodes(folded.graph))
    assert kept == len(report.skipped), (kept, report.summary())
    with quiet():
        analyzed = bnfold.analyze(gm, qat=mode, affine=False)
    assert analyzed.to_list() == report.to_list(), "analyze disagrees with fold"
    claims = _bias_claims(report)
    if mode == "exact":
        assert not claims, f"qat='exact' folded into a bias: {report.summary()}"
    for claim in claims.values():
        assert claim <= 1.5 + 1e-9, f"a bias fold claims {claim} output steps (at most 1.5)"
    edges, unchecked = _check_qat_fold(gm, folded, report, xs, cache)
    for e in report.folded:
        if "QAT tail" not in (e.note or ""):
            oc.limits[f"{label}folded: into a float producer (no QAT tail)"] += 1
        elif "bias before the output quantize" in e.note:
            oc.limits[f"{label}folded: QAT tail into the conv's bias"] += 1
        else:
            oc.limits[f"{label}folded: QAT tail as an exact add"] += 1
    for edge in edges.values():
        if edge.mode == "bias":
            key = f"{oc.form}/float32 bias claim (steps)"
            if edge.steps / edge.claim >= oc.worst.get(key, (0.0,))[0]:
                oc.worst[key] = (edge.steps / edge.claim, edge.steps, edge.claim)
            bucket = "<= 0.5" if edge.steps <= 0.5 else "<= 1" if edge.steps <= 1 else "> 1"
            oc.limits[f"{label}bias folds: claimed {edge.claim:.3f}, measured {bucket} step"] += 1
        elif edge.tol > 0 and (not oc.tol or edge.err / edge.tol >= oc.err / oc.tol):
            oc.err, oc.tol = edge.err, edge.tol
    if unchecked:
        oc.limits[f"{label}bias folds whose output nothing reads (not measured)"] += unchecked
    return report


# --------------------------------------------------------------------------------------------
# Running many


def _form_counts() -> dict:
    return {"models": 0, "folded": 0, "refused": Counter(), "not run": Counter(),
            "limits": Counter(), "affine folded": 0, "affine refused": Counter()}  # fmt: skip


def _fingerprint(case: Case) -> str:
    """What tells networks apart (hypothesis draws the same network more than once, with
    other later draws: the forms' options, the QAT flow's)."""
    import hashlib

    return hashlib.sha256(f"{case.seed} {case.describe()}".encode()).hexdigest()[:16]


@dataclass
class Tally:
    """Counts over a run: per form, models, folds done, folds refused by rule, problems."""

    models: int = 0
    seconds: float = 0.0
    per_form: dict = field(default_factory=dict)
    features: Counter = field(default_factory=Counter)
    dtypes: Counter = field(default_factory=Counter)
    worst: dict = field(default_factory=dict)
    networks: set = field(default_factory=set)  # fingerprints: hypothesis repeats networks

    def add(self, case: Case, outcomes: list[Outcome]) -> None:
        self.models += 1
        self.dtypes[case.dtype] += 1
        self.features.update(case.features)
        self.networks.add(_fingerprint(case))
        for oc in outcomes:
            for k, w in oc.worst.items():
                if w[0] >= self.worst.get(k, (0.0, 0.0, 0.0))[0]:
                    self.worst[k] = w
            f = self.per_form.setdefault(oc.form, _form_counts())
            f["limits"].update(oc.limits)
            if oc.note:
                f["not run"][oc.note] += 1
                continue
            f["models"] += 1
            f["folded"] += oc.folded
            f["refused"].update(oc.refused)
            f["affine folded"] += oc.affine_folded
            f["affine refused"].update(oc.affine_refused)
            if oc.tol > 0:
                key = f"{oc.form}/{oc.dtype or case.dtype}"
                ratio = oc.err / oc.tol
                if ratio >= self.worst.get(key, (0.0, 0.0, 0.0))[0]:
                    self.worst[key] = (ratio, oc.err, oc.tol)

    def to_json(self) -> dict:
        return {
            "models": self.models,
            "seconds": self.seconds,
            "per_form": {
                k: {
                    **v,
                    "refused": dict(v["refused"]),
                    "affine refused": dict(v["affine refused"]),
                    "not run": dict(v["not run"]),
                    "limits": dict(v["limits"]),
                }
                for k, v in self.per_form.items()
            },
            "features": dict(self.features),
            "dtypes": dict(self.dtypes),
            "worst": self.worst,
            "networks": sorted(self.networks),
        }


def merge(parts: list[dict]) -> dict:
    total: dict = {"models": 0, "seconds": 0.0, "per_form": {}, "features": Counter(),
                   "dtypes": Counter(), "worst": {}, "networks": set()}  # fmt: skip
    for p in parts:
        total["models"] += p["models"]
        total["networks"].update(p.get("networks", ()))
        total["seconds"] = max(total["seconds"], p["seconds"])
        total["features"].update(p["features"])
        total["dtypes"].update(p["dtypes"])
        for form, v in p["per_form"].items():
            t = total["per_form"].setdefault(form, _form_counts())
            t["models"] += v["models"]
            t["folded"] += v["folded"]
            t["refused"].update(v["refused"])
            t["affine folded"] += v.get("affine folded", 0)
            t["affine refused"].update(v.get("affine refused", {}))
            t["not run"].update(v["not run"])
            t["limits"].update(v["limits"])
        for k, w in p["worst"].items():
            if w[0] >= total["worst"].get(k, (0.0,))[0]:
                total["worst"][k] = w
    return total


def print_table(total: dict, wrong: int, errors: int, out: Any = sys.stdout) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    distinct = f" ({len(total['networks'])} distinct networks)" if total.get("networks") else ""
    p(f"random networks: {total['models']} models{distinct} in {total['seconds']:.0f} s "
      f"({', '.join(f'{k} {v}' for k, v in sorted(total['dtypes'].items()))})")  # fmt: skip
    p("")
    p(f"{'form':<13} {'models':>7} {'BNs folded':>11} {'BNs kept':>9}  kept by rule")
    for form in ALL_FORMS:
        v = total["per_form"].get(form)
        if v is None:
            continue
        kept = sum(v["refused"].values())
        rules = ", ".join(f"{r} {n}" for r, n in sorted(v["refused"].items(), key=lambda x: -x[1]))
        p(f"{form:<13} {v['models']:>7} {v['folded']:>11} {kept:>9}  {rules}")
        if v["affine folded"] or v["affine refused"]:
            a_kept = sum(v["affine refused"].values())
            a_rules = ", ".join(
                f"{r} {n}" for r, n in sorted(v["affine refused"].items(), key=lambda x: -x[1])
            )
            p(f"{'':<13} {'affine':>7} {v['affine folded']:>11} {a_kept:>9}  {a_rules}")
        for note, n in sorted(v["not run"].items()):
            p(f"{'':<13} {'':>7} not run: {n} ({note})")
        for note, n in sorted(v["limits"].items()):
            p(f"{'':<13} {'':>7} {note}: {n}")
    p("")
    p("closest to the tolerance (error / tolerance, error, tolerance):")
    for k, (ratio, err, tol) in sorted(total["worst"].items()):
        p(f"  {k:<24} {ratio:.3f}  {err:.3g}  {tol:.3g}")
    p("")
    p("features: " + ", ".join(f"{k} {v}" for k, v in sorted(total["features"].items())))
    p("")
    p(f"wrong results: {wrong}    exceptions: {errors}")


def _worker(args: tuple[int, int, str, tuple[str, ...]]) -> dict:
    """Run ``n`` examples with hypothesis seed ``seed``; a failing example is written to
    ``findings`` with its network and counted, and the run goes on (no shrinking: it is slow
    on these networks; the description is enough to rebuild the case)."""
    n, seed, findings, forms = args
    import traceback

    from hypothesis import Phase

    tally = Tally()
    start = time.perf_counter()
    problems: list[str] = []

    @hypothesis_seed(seed)
    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def run(data: Any) -> None:
        case = draw_case(data)
        try:
            outcomes = check_case(case, forms, draw=data.draw)
        except Exception as e:  # noqa: BLE001 - every failure is a finding to count
            kind = "wrong result" if isinstance(e, AssertionError) else "exception"
            problems.append(f"{kind}: {type(e).__name__}: {first_line(e)}")
            saved = f"{findings}.{seed}.{len(problems)}.pt"  # the case, to rebuild it exactly
            try:
                torch.save({"model": case.model, "x": case.x, "dtype": case.dtype}, saved)
            except Exception:  # noqa: BLE001 - a hook on the root (a lambda) does not pickle
                saved = "(not saved)"
            with open(findings, "a") as f:
                f.write(f"=== {kind} (seed {seed}, case {saved}): {type(e).__name__}: {e}\n")
                f.write(case.describe() + "\n")
                f.write("".join(traceback.format_exception(e)[-6:]) + "\n")
            return
        tally.add(case, outcomes)

    run()
    tally.seconds = time.perf_counter() - start
    result = tally.to_json()
    result["problems"] = problems
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=10_000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--findings", default="fuzz-findings/networks.txt")
    ap.add_argument(
        "--forms",
        default=",".join(FORMS),
        help=f"comma-separated forms among {', '.join(ALL_FORMS)} (default: {','.join(FORMS)})",
    )
    args = ap.parse_args(argv)
    forms = tuple(f.strip() for f in args.forms.split(",") if f.strip())
    unknown = [f for f in forms if f not in ALL_FORMS]
    if unknown or not forms:
        ap.error(f"unknown forms {unknown}: choose among {', '.join(ALL_FORMS)}")
    torch.set_num_threads(1)
    _one_xla_thread()
    import os

    os.makedirs(os.path.dirname(os.path.abspath(args.findings)), exist_ok=True)
    per = [args.examples // args.jobs + (i < args.examples % args.jobs) for i in range(args.jobs)]
    jobs = [(n, args.seed * 1000 + i, args.findings, forms) for i, n in enumerate(per)]
    if args.jobs == 1:
        parts = [_worker(jobs[0])]
    else:
        with multiprocessing.get_context("spawn").Pool(args.jobs, initializer=_init) as pool:
            parts = pool.map(_worker, jobs)
    problems = [p for part in parts for p in part["problems"]]
    total = merge(parts)
    wrong = sum(1 for p in problems if p.startswith("wrong result"))
    print_table(total, wrong, len(problems) - wrong)
    for p in problems:
        print(f"PROBLEM: {p}")
    if problems:
        print(f"the failing networks are described in {args.findings}")
    print(json.dumps({"models": total["models"], "problems": len(problems)}))
    return 1 if problems else 0


def _init() -> None:
    torch.set_num_threads(1)


def _one_xla_thread() -> None:
    """XLA's CPU client in one thread a process, as torch is here (set before JAX is imported:
    workers inherit it): two workers on two cores otherwise compete, the stablehlo form then
    runs 1.5 to 2 times slower)."""
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()


if __name__ == "__main__":
    sys.exit(main())
