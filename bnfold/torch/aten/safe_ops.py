"""What bnfold agrees to run from a program it read from a file: the allowlist.

A ``.pt2`` archive is untrusted input, and its graph is a list of calls: ``aten.from_file``
maps a file of the author's choosing, ``aten._print`` and custom ops do whatever they were
written to do. Folding only rewrites the graph and never runs it; ``--verify`` (and
``bnfold.verify`` of a program read by :func:`bnfold.torch.pt2.load`) runs it, so every call in
the program, nested graphs included, must first be found here. Anything else is refused.

The list names ATen operators (by their overload packet, ``aten.conv2d``) that compute tensors
from tensors and nothing else: no files, processes, network, printing, profiling, random
number generator state, or global settings. It is written out by hand rather than taken from
``torch.Tag.core``, so that a new torch cannot widen it silently. In-place and ``out=``
variants of a listed op (``relu_``, ``add.out``) are allowed only where what they write is the
program's own (a parameter, a buffer, an intermediate value), never a caller's input. Ops
tagged ``nondeterministic_seeded`` draw from (and advance) torch's global generator, so they
are refused, except where an argument turns the randomness off (dropout with ``train=False``,
as a model in eval mode exports it; attention with ``dropout_p=0.0``).

Beyond ATen, the quantize and dequantize ops of pt2e quantization (``quantized_decomposed``,
what torchao's ``convert_pt2e`` leaves in a graph) are listed by their exact overloads, and no
other op of their namespace.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from ...errors import VerificationError

# ATen overload packets, as exported (composite ops) and after run_decompositions() (core ATen).
PURE_ATEN_OPS = frozenset(
    """
    conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d convolution
    _convolution conv_tbc linear bilinear matmul mm bmm addmm addmv addbmm baddbmm mv dot vdot
    einsum tensordot outer ger kron

    batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training
    _native_batch_norm_legit_functional native_batch_norm _batch_norm_with_update
    _batch_norm_with_update_functional _batch_norm_no_update instance_norm layer_norm
    native_layer_norm group_norm native_group_norm rms_norm _fused_rms_norm

    relu relu6 leaky_relu elu selu celu gelu silu mish hardtanh hardsigmoid hardswish
    hardshrink softshrink softplus sigmoid prelu _prelu_kernel rrelu
    glu threshold softmax log_softmax _softmax _log_softmax _safe_softmax
    scaled_dot_product_attention _scaled_dot_product_flash_attention_for_cpu
    _scaled_dot_product_attention_math

    dropout feature_dropout alpha_dropout feature_alpha_dropout native_dropout

    max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices
    max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
    adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d
    adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
    upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_linear1d
    upsample_bilinear2d upsample_bicubic2d upsample_trilinear3d _upsample_nearest_exact1d
    _upsample_nearest_exact2d _upsample_nearest_exact3d _upsample_bilinear2d_aa
    _upsample_bicubic2d_aa pixel_shuffle pixel_unshuffle channel_shuffle grid_sampler
    grid_sampler_2d grid_sampler_3d affine_grid_generator im2col col2im
    constant_pad_nd pad reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d
    replication_pad2d replication_pad3d
    _pad_circular

    add sub rsub mul div true_divide floor_divide remainder fmod pow float_power neg
    positive abs sign sgn reciprocal sqrt rsqrt exp exp2 expm1 log log2 log10 log1p sin cos
    tan asin acos atan atan2 arctan2 sinh cosh tanh asinh acosh atanh erf erfc erfinv floor
    ceil round trunc frac fix clamp clamp_min clamp_max clip maximum minimum fmax fmin
    lerp addcmul addcdiv xlogy logit hypot copysign nan_to_num square sinc deg2rad rad2deg
    logaddexp logaddexp2 i0 special_erfcx heaviside nextafter
    eq ne lt le gt ge equal isclose allclose isnan isinf isfinite isposinf isneginf signbit
    logical_and logical_or logical_xor logical_not bitwise_and bitwise_or bitwise_xor
    bitwise_not bitwise_left_shift bitwise_right_shift __and__ __or__ __xor__ __lshift__
    __rshift__ where masked_fill masked_scatter masked_select

    sum mean nansum nanmean prod amax amin max min argmax argmin aminmax any all var std
    var_mean std_mean norm linalg_vector_norm frobenius_norm logsumexp cumsum cumprod
    cummax cummin logcumsumexp count_nonzero median nanmedian mode kthvalue topk sort
    argsort msort unique_consecutive _unique2 bincount histc searchsorted bucketize
    cdist _cdist_forward pdist _pdist_forward cosine_similarity pairwise_distance dist

    view view_as reshape reshape_as _reshape_alias _unsafe_view flatten unflatten squeeze
    unsqueeze permute transpose swapaxes swapdims movedim moveaxis t numpy_T mT adjoint
    expand expand_as expand_copy broadcast_to broadcast_tensors contiguous clone detach alias
    lift_fresh lift_fresh_copy view_copy permute_copy squeeze_copy unsqueeze_copy
    transpose_copy t_copy alias_copy select select_copy slice slice_copy narrow narrow_copy
    diagonal diagonal_copy as_strided as_strided_copy unfold unfold_copy split split_with_sizes
    split_copy split_with_sizes_copy tensor_split chunk unsafe_chunk unsafe_split
    unsafe_split_with_sizes unbind unbind_copy cat concat concatenate stack hstack vstack
    dstack repeat repeat_interleave tile flip fliplr flipud roll rot90 triu tril diag
    diag_embed diagflat trace index index_select gather take take_along_dim scatter
    scatter_add scatter_reduce index_add index_copy index_fill index_put _unsafe_index
    _unsafe_index_put select_scatter slice_scatter diagonal_scatter
    as_strided_scatter embedding embedding_bag _embedding_bag one_hot nonzero nonzero_static
    argwhere meshgrid cartesian_prod combinations atleast_1d atleast_2d atleast_3d
    _to_copy to type_as real imag view_as_real view_as_complex conj
    _conj _conj_physical conj_physical resolve_conj resolve_neg complex polar angle
    fft_fft fft_ifft fft_rfft fft_irfft fft_fft2 fft_ifft2 fft_rfft2 fft_irfft2 fft_fftn
    fft_ifftn fft_rfftn fft_irfftn fft_hfft fft_ihfft fft_fftshift fft_ifftshift _fft_r2c
    _fft_c2r _fft_c2c

    empty empty_like empty_strided new_empty new_empty_strided zeros zeros_like ones
    ones_like full full_like new_zeros new_ones new_full fill zero scalar_tensor arange
    linspace logspace eye copy _local_scalar_dense item
    sym_size sym_stride sym_numel sym_storage_offset size stride numel dim
    _assert_async _assert_scalar _assert_tensor_metadata _functional_assert_async
    _functional_assert_scalar sym_constrain_range sym_constrain_range_for_size
    _functional_sym_constrain_range _functional_sym_constrain_range_for_size
    _make_dep_token

    """.split()
)

# pt2e quantization's quantize and dequantize ops (torch.ao.quantization.fx._decomposed, which
# torchao uses too), by overload: each is round / clamp / scale arithmetic on its operands into
# a new tensor. quantize: clamp(round(x * (1 / scale)) + zero_point, quant_min, quant_max)
# .to(dtype); dequantize: (x.to(out_dtype) - zero_point) * scale; the per-channel forms do the
# same on x permuted to put ``axis`` first, with the scales and zero points viewed along it and
# the result permuted back; the ``.tensor``/``.tensor2`` overloads take the scalars as
# one-element tensors and read them with ``.item()``. None writes into an argument or returns
# one (their schemas declare no aliasing), and none draws random numbers. Listed by hand, as
# the ATen ops are: the namespace holds a dozen more (choose_qparams*, the per-token and
# per-group forms, fake_quant_per_channel) that converted programs do not call, and a new op or
# overload is allowed only once it has been read.
PURE_QUANTIZED_OPS = frozenset(
    f"quantized_decomposed.{name}"
    for name in """
    quantize_per_tensor.default quantize_per_tensor.tensor quantize_per_tensor.tensor2
    dequantize_per_tensor.default dequantize_per_tensor.tensor dequantize_per_tensor.tensor2
    quantize_per_channel.default dequantize_per_channel.default
    """.split()
)

# Higher-order operators whose bodies are graphs of the program (checked like the rest).
# Grad mode and autocast are thread-local settings the operator restores when it returns.
PURE_HIGHER_ORDER_OPS = frozenset(
    "cond scan map_impl invoke_subgraph wrap_with_set_grad_enabled wrap_with_autocast".split()
)

# Pure, but running as long as the data says: nothing bounds how often the body runs
# (``while i < 10**15``), so a program read from a file with one of these is not run.
UNBOUNDED_HIGHER_ORDER_OPS = frozenset({"while_loop", "while_loop_stack_output"})

# Python functions torch.export puts in graphs for symbolic sizes (what its reader restores).
PURE_PYTHON_FUNCTIONS = frozenset(
    {
        operator.getitem,
        *(getattr(operator, n) for n in "eq ne le ge lt gt neg pos mul add sub".split()),
        *(getattr(operator, n) for n in "floordiv mod pow truediv and_ or_ lshift".split()),
        operator.rshift,
        math.trunc,
        math.ceil,
        math.floor,
        torch.sym_not,
        torch.sym_int,
        torch.sym_float,
        torch.sym_ite,
        torch.sym_max,
        torch.sym_min,
        torch.sym_sqrt,
    }
)

# Arguments whose value turns a random op's randomness off (dropout in eval mode, attention
# without dropout, RReLU in eval mode): such a call draws nothing.
_NO_DRAW = {"train": False, "training": False, "dropout_p": 0.0}


def _aten_name(op: torch._ops.OpOverload) -> str:
    """The functional packet name of an ATen op: ``relu_`` is ``relu``'s in-place variant."""
    name = op.overloadpacket.__name__
    if name.endswith("_") and not name.endswith("__") and torch.Tag.inplace in op.tags:
        return name[:-1]
    return name


def _argument(node: fx.Node, op: torch._ops.OpOverload, index: int) -> Any:
    """The value passed for the schema argument ``index`` of ``op`` at ``node``."""
    arg = op._schema.arguments[index]
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(arg.name, arg.default_value)


def _nodes_in(value: Any) -> Iterator[fx.Node]:
    if isinstance(value, fx.Node):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _nodes_in(item)


def _draws_random_numbers(node: fx.Node, op: torch._ops.OpOverload) -> bool:
    """Whether ``op`` draws from torch's global generator at ``node`` (dropout with a literal
    ``train=False`` does not: see :data:`_NO_DRAW`)."""
    if torch.Tag.nondeterministic_seeded not in op.tags:
        return False
    for i, arg in enumerate(op._schema.arguments):
        if arg.name in _NO_DRAW:
            value = _argument(node, op, i)
            off = _NO_DRAW[arg.name]
            return not (type(value) is type(off) and value == off)
    return True


def _overload_name(op: torch._ops.OpOverload) -> str:
    """``namespace.op.overload``, as :data:`PURE_QUANTIZED_OPS` lists it."""
    return f"{op.namespace}.{op._opname}.{op._overloadname}"


def _refusal_of_op(node: fx.Node, op: torch._ops.OpOverload, inputs: dict[fx.Node, str]) -> str:
    """Why ``op`` may not run at ``node`` ("" when it may)."""
    if op.namespace == "aten":
        if _draws_random_numbers(node, op):
            return "draws random numbers (advancing torch's global generator)"
        if _aten_name(op) not in PURE_ATEN_OPS:
            return "is not on the list"
    elif _overload_name(op) not in PURE_QUANTIZED_OPS:
        return "is not on the list"
    for i, arg in enumerate(op._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            written = [inputs[n] for n in _nodes_in(_argument(node, op, i)) if n in inputs]
            if written:
                return f"writes into the caller's input {written[0]}"
    return ""


def _refusal(node: fx.Node, inputs: dict[fx.Node, str]) -> str:
    """Why ``node`` may not run ("" when it may)."""
    if node.op in ("placeholder", "output", "get_attr"):
        return ""
    target = node.target
    if node.op != "call_function":
        return f"is a {node.op} node, which bnfold does not run from files"
    if isinstance(target, torch._ops.OpOverload):
        return _refusal_of_op(node, target, inputs)
    if isinstance(target, torch._ops.HigherOrderOperator):
        if target.name() in UNBOUNDED_HIGHER_ORDER_OPS:
            return "loops as long as its condition holds, and no bound on that is known"
        return "" if target.name() in PURE_HIGHER_ORDER_OPS else "is not on the list"
    try:
        if target in PURE_PYTHON_FUNCTIONS:
            return ""
    except TypeError:  # an unhashable target
        pass
    return "is not on the list"


def _aliased_input(node: fx.Node, inputs: dict[fx.Node, str]) -> str | None:
    """The caller's input whose memory ``node``'s value may share (as a view, an in-place
    result, or an item of a list of views), so that writing into it writes into the input."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        if all(r.alias_info is None for r in target._schema.returns):
            return None
        # Only the arguments the schema marks as aliased (``Tensor(a)``) can be returned.
        args = target._schema.arguments
        values = [_argument(node, target, i) for i, a in enumerate(args) if a.alias_info]
    else:  # getitem, higher-order operators: any argument, to be safe
        values = list(node.args) + list(node.kwargs.values())
    return next((inputs[n] for n in _nodes_in(values) if n in inputs), None)


def _describe(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return _overload_name(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    return f"{getattr(target, '__module__', '')}.{name}" if name else repr(target)[:80]


def _check_graph(gm: fx.GraphModule, caller_inputs: set[str] | None) -> None:
    """Refuse the first node of ``gm``'s graph that may not run.

    ``caller_inputs`` names the placeholders holding a caller's tensors; ``None`` (a nested
    body) counts every placeholder as one.
    """
    inputs: dict[fx.Node, str] = {}  # node -> the caller's input it may alias
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if caller_inputs is None or node.name in caller_inputs:
                inputs[node] = node.name
            continue
        why = _refusal(node, inputs)
        if why:
            raise _unsafe(f"calls {_describe(node)} (node {node.name}), which {why}")
        source = _aliased_input(node, inputs) if node.op == "call_function" else None
        if source is not None:
            inputs[node] = source


def runs_on_fake_tensors(node: fx.Node, owner: fx.GraphModule) -> bool:
    """Whether ``node`` (of ``owner``'s graph) may run on fake tensors, which compute shapes
    only: its op is on the allowlist, nested graphs included; a loop may, since on fake tensors
    its body runs once. An op off the list might do what it does even there."""
    if node.op != "call_function":
        return node.op in ("placeholder", "output", "get_attr")
    target = node.target
    if not isinstance(target, torch._ops.HigherOrderOperator):
        return _refusal(node, {}) == ""
    if target.name() not in PURE_HIGHER_ORDER_OPS | UNBOUNDED_HIGHER_ORDER_OPS:
        return False
    for arg in node.all_input_nodes:
        sub = getattr(owner, arg.target, None) if arg.op == "get_attr" else None
        if isinstance(sub, fx.GraphModule) and not all(
            runs_on_fake_tensors(n, sub) for n in sub.graph.nodes
        ):
            return False
    return True


def _unsafe(what: str) -> VerificationError:
    return VerificationError(
        f"cannot verify: the program {what}; bnfold runs a program read from a file only when "
        "every op is on its list of pure tensor computations (others may read or write files, "
        "run code or change global state): fold without --verify"
    )


def check_program(program: ExportedProgram) -> None:
    """Raise :class:`VerificationError` unless every call in ``program`` (nested graphs too)
    is on the allowlist and nothing writes into the caller's inputs."""
    signature = program.graph_signature
    for spec in signature.output_specs:
        if spec.kind == OutputKind.USER_INPUT_MUTATION:
            raise _unsafe(f"writes into the caller's input {spec.target}")
    for spec in signature.input_specs:
        if spec.kind not in (
            InputKind.USER_INPUT,
            InputKind.PARAMETER,
            InputKind.BUFFER,
            InputKind.CONSTANT_TENSOR,
        ):
            name = getattr(spec.arg, "name", "")
            raise _unsafe(f"takes an input of kind {spec.kind.name} ({name})")
    user = {s.arg.name for s in signature.input_specs if s.kind == InputKind.USER_INPUT}
    root = program.graph_module
    for name, module in root.named_modules():
        if not isinstance(module, fx.GraphModule):
            raise _unsafe(f"holds the module {name}, a {type(module).__name__}, not a graph")
        _check_graph(module, user if module is root else None)


__all__ = [
    "PURE_ATEN_OPS",
    "PURE_HIGHER_ORDER_OPS",
    "PURE_PYTHON_FUNCTIONS",
    "PURE_QUANTIZED_OPS",
    "UNBOUNDED_HIGHER_ORDER_OPS",
    "check_program",
    "runs_on_fake_tensors",
]
