"""Constant values of an ONNX graph, as the fold needs them.

Two questions are answered here:

* *Is this operand a constant, and what is it?* Initializers and ``Constant`` outputs are, and
  so is the result of a small subgraph of deterministic operators fed only by constants: the
  new PyTorch exporter gives a bias-less Conv a bias of ``Expand(CastLike(0, x), Shape(w))``.
  Such subgraphs are evaluated here with numpy, reading only what they need: ``Shape`` of a
  stored tensor reads its header, ``CastLike`` only the declared type of its second input.
* *Where is this weight stored?* A weight is folded where it is stored, possibly behind
  ``Identity`` and ``Transpose`` nodes (``x @ W.T`` exports as ``MatMul(x, Transpose(W))``), so
  the folded tensor keeps its name, dtype and layout.

An initializer that is also a graph input (IR version 4 and later) is a default a caller may
override, so it is not a constant. IR version 3 lists every initializer as an input; there the
listing means nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ..core.pipeline import StoredOperand
from ..errors import BnfoldError, UnsupportedModelError

DEFAULT_DOMAINS = ("", "ai.onnx")

# A constant subgraph is evaluated only when it is small; a bias or a BatchNorm statistic is
# a handful of nodes, and nothing large is ever materialised on the way.
MAX_SUBGRAPH_NODES = 32
MAX_ELEMENTS = 1 << 24
# numpy holds at most 64 dimensions: longer shapes and axis lists are refused before a Python
# list of them is made (a stored tensor of millions of "axes" would take gigabytes as one).
MAX_RANK = 64
# Bytes the arrays computed from constants may take in one fold of a model (until
# :meth:`Constants.clear`). Stored tensors are the file's own data and do not count; what a
# subgraph computes does, before it is allocated: a ~1 KB file can ask for Expand, Concat or
# ConstantOfShape results of gigabytes, while real biases and statistics are per-channel vectors.
# Per model, not per BatchNorm: computed values stay cached for the whole fold, so a subgraph
# that many BatchNorms share is computed once and its size counted once.
MAX_COMPUTED_BYTES = 64 * 2**20
# Stored tensors read as arrays are cached up to this size; a larger one (a weight on the left
# of a MatMul) is read again when asked for, so the cache holds no copies of whole weights.
_MAX_CACHED_STORED_BYTES = 2**20


_LIBRARIES = ("onnx", "onnx_ir")


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Drop what onnx and onnx_ir log meanwhile: the command line promises one line of stderr,
    and what they log about a model (a string attribute that is not UTF-8, as it is read and
    written) is harmless to the fold or refused by bnfold with a message of its own
    (:func:`bnfold.core.logs.quiet_logs`: safe in several threads at once)."""
    from ..core.logs import quiet_logs as quiet_loggers

    with quiet_loggers(*map(logging.getLogger, _LIBRARIES)):
        yield


class NotConstant(Exception):
    """A value is not a constant bnfold can read; the message says why."""


def opset_version(model: ir.Model, node: ir.Node) -> int:
    """The version of the operator set ``node`` is read in."""
    if node.version is not None:
        return int(node.version)
    opsets = model.opset_imports
    for domain in (node.domain, *(DEFAULT_DOMAINS if node.domain in DEFAULT_DOMAINS else ())):
        if domain in opsets:
            return int(opsets[domain])
    return 0


def describe(value: ir.Value) -> str:
    """A value's name for messages."""
    return repr(value.name) if value.name else "an unnamed value"


def describe_node(node: ir.Node) -> str:
    """``Op 'name'`` for messages (the first output's name when the node has none)."""
    name = node.name or (node.outputs[0].name if node.outputs else "") or "?"
    return f"{node.op_type} {name!r}"


def is_default_domain(node: ir.Node) -> bool:
    return node.domain in DEFAULT_DOMAINS


def defining_graph(value: ir.Value) -> ir.Graph | None:
    """The graph (scope) that defines ``value``: its producer's, or the one it is an input or
    initializer of."""
    node = value.producer()
    if node is not None:
        return node.graph
    return value.graph


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    found: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.is_ref() or attr.value is None:
            continue
        if attr.type == ir.AttributeType.GRAPH:
            found.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            found.extend(attr.value)
    return found


def shadowed_values(graph: ir.Graph) -> set[ir.Value]:
    """The values of ``graph`` and its subgraphs whose name a subgraph defines again while the
    outer value is in scope: both the inner and the outer definitions. Runtimes disagree which
    one a subgraph's reader gets (onnxruntime binds an outer initializer, onnx_ir and the
    reference evaluator the inner one), so neither has one meaning to fold with."""
    shadowed: set[ir.Value] = set()
    work: list[tuple[ir.Graph, dict[str, list[ir.Value]]]] = [(graph, {})]
    while work:
        g, outer = work.pop()
        local: dict[str, list[ir.Value]] = {}
        values = [*g.inputs, *g.initializers.values()]
        values += [o for node in g for o in node.outputs]
        for v in values:
            if v.name:
                local.setdefault(v.name, []).append(v)
        scope = {name: list(vs) for name, vs in outer.items()}
        for name, vs in local.items():
            if name in outer:
                shadowed.update(vs)
                shadowed.update(outer[name])
            scope.setdefault(name, []).extend(vs)
        for node in g:
            work.extend((sub, scope) for sub in _subgraphs(node))
    return shadowed


_INVALID = "the model is invalid (onnxruntime refuses to load it)"


def attribute(node: ir.Node, name: str, kind: ir.AttributeType, default: Any = None) -> Any:
    """The value of ``node``'s attribute ``name``, which ONNX types ``kind``; ``default`` when
    the node does not set it.

    An attribute of another type, or one that refers to a function's attribute outside any
    function (and so has no value), is not something to guess a meaning for:
    :class:`UnsupportedModelError`.
    """
    attr = node.attributes.get(name)
    if attr is None:
        return default
    if attr.is_ref():
        raise UnsupportedModelError(
            f"{describe_node(node)}'s attribute {name!r} refers to the attribute "
            f"{attr.ref_attr_name!r} of a function, but the node is not in a function: {_INVALID}"
        )
    if attr.type != kind or attr.value is None:
        raise UnsupportedModelError(
            f"{describe_node(node)}'s attribute {name!r} is of type {attr.type.name}, not "
            f"{kind.name}: {_INVALID}"
        )
    return attr.value


_A = ir.AttributeType
# The attributes bnfold reads, by operator, with the type every version of it gives them.
# (Cast's ``to`` is not here: Cast-1 has a STRING ``to``, which the evaluator declines.)
ATTRIBUTE_TYPES: dict[str, dict[str, ir.AttributeType]] = {
    "BatchNormalization": {"epsilon": _A.FLOAT, "training_mode": _A.INT, "spatial": _A.INT},
    "Conv": {"group": _A.INT},
    "ConvTranspose": {"group": _A.INT},
    "Gemm": {"transB": _A.INT, "beta": _A.FLOAT},
    "Transpose": {"perm": _A.INTS},
    "Squeeze": {"axes": _A.INTS},
    "Unsqueeze": {"axes": _A.INTS},
    "Concat": {"axis": _A.INT},
    "Shape": {"start": _A.INT, "end": _A.INT},
    "Reshape": {"allowzero": _A.INT},
    "ConstantOfShape": {"value": _A.TENSOR},
    "Constant": {
        "value": _A.TENSOR,
        "value_float": _A.FLOAT,
        "value_floats": _A.FLOATS,
        "value_int": _A.INT,
        "value_ints": _A.INTS,
    },
}
# The operators whose inputs and outputs bnfold indexes (the producers, the layout operators
# between them and a BatchNorm, the constant Add after a producer, the evaluator's operators):
# each must have the inputs and outputs its specification requires, checked once up front.
READ_OPS = frozenset(
    {
        "BatchNormalization",
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "Identity",
        "Transpose",
        "Unsqueeze",
        "Squeeze",
        "Add",
    }
)
# The ranks the specification allows the operands bnfold indexes: input position -> (name,
# lowest rank, highest rank). Checked where the operand is stored (its header tells the rank),
# so that the fold never indexes a shape too short for it.
_PARAMS_1D = {i: (name, 1, 1) for i, name in enumerate(("scale", "B", "mean", "var"), 1)}
OPERAND_RANKS: dict[str, dict[int, tuple[str, int, int]]] = {
    "Conv": {1: ("the weight", 3, MAX_RANK)},
    "ConvTranspose": {1: ("the weight", 3, MAX_RANK)},
    "Gemm": {0: ("A", 2, 2), 1: ("B", 2, 2)},
    "MatMul": {0: ("A", 1, MAX_RANK), 1: ("B", 1, MAX_RANK)},
    "BatchNormalization": _PARAMS_1D,
}


def check_nodes(graphs: Any, constants: Constants) -> None:
    """Refuse, before anything is changed, a node bnfold would read that no runtime accepts:
    an attribute of the wrong type or without a value, fewer inputs or outputs than its
    specification requires (so that nothing later indexes a missing one), a stored operand of a
    rank the operator does not take."""
    for graph in graphs:
        for node in graph:
            if not is_default_domain(node):
                continue
            for name, kind in ATTRIBUTE_TYPES.get(node.op_type, {}).items():
                attribute(node, name, kind)
            if node.op_type in READ_OPS or node.op_type in _OPS:
                _check_arity(node, opset_version(constants.model, node))
            _check_operand_ranks(node, constants)


def _check_arity(node: ir.Node, version: int) -> None:
    """The inputs and outputs the specification of ``node``'s operator requires are there."""
    try:
        schema = onnx.defs.get_schema(node.op_type, max(version, 1), "")
    except Exception:  # noqa: BLE001 - an opset with no such operator: onnxruntime refuses it
        raise UnsupportedModelError(
            f"{describe_node(node)} is not an operator of ONNX operator set {version}: {_INVALID}"
        ) from None
    inputs = node.inputs
    missing = [i for i in range(schema.min_input) if i >= len(inputs) or inputs[i] is None]
    if missing:
        i = missing[0]
        role = repr(schema.inputs[min(i, len(schema.inputs) - 1)].name)
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            role = f"{role}, {'the weight' if i == 1 else 'the activation'}"
        raise UnsupportedModelError(
            f"{describe_node(node)} lacks its required input {i} ({role}; "
            f"{node.op_type}-{schema.since_version} takes at least {schema.min_input}): "
            f"{_INVALID}"
        )
    if len([o for o in node.outputs if o is not None]) < max(schema.min_output, 1):
        raise UnsupportedModelError(
            f"{describe_node(node)} has no output ({node.op_type}-{schema.since_version} "
            f"gives at least {max(schema.min_output, 1)}): {_INVALID}"
        )


def _check_operand_ranks(node: ir.Node, constants: Constants) -> None:
    ranks = OPERAND_RANKS.get(node.op_type, {})
    if node.op_type == "BatchNormalization" and not _per_channel_batch_norm(node, constants):
        return  # read by nobody: bnfold keeps it with a reason of its own
    for i, (role, low, high) in ranks.items():
        rank = _rank_of_stored(constants, node.inputs[i] if i < len(node.inputs) else None)
        if rank is not None and not low <= rank <= high:
            allowed = f"{low}-D" if low == high else f"at least {low}-D"
            raise UnsupportedModelError(
                f"{describe_node(node)}'s input {i} ({role}) is {rank}-D, but "
                f"{node.op_type} takes {allowed}: {_INVALID}"
            )


def _per_channel_batch_norm(node: ir.Node, constants: Constants) -> bool:
    """Whether the BatchNorm's parameters are one value per channel by its specification (not
    the per-activation ``spatial=0`` form of version 7, nor the versions before it)."""
    version = opset_version(constants.model, node)
    return version >= 9 or (version >= 7 and attribute(node, "spatial", _A.INT, 1) != 0)


class Constants:
    """Reads constant values of one model; results are cached per value until :meth:`clear`
    (the cache may hold views of the model's memory-mapped data), or until :meth:`changed` says
    a stored tensor they were computed from was rewritten."""

    def __init__(
        self,
        model: ir.Model,
        inferred_dtype: Callable[[ir.Value], ir.DataType | None] | None = None,
    ) -> None:
        self.model = model
        self.overridable = (model.ir_version or 0) >= 4
        # The type of a value the model does not annotate, by ONNX type inference.
        self.inferred_dtype = inferred_dtype or (lambda value: None)
        self._cache: dict[ir.Value, np.ndarray] = {}
        self._computed = 0  # bytes allocated for computed values since the last clear()
        # Which stored values each computed value was made from, and the reverse.
        self._sources: dict[ir.Value, frozenset[ir.Value]] = {}
        self._dependents: dict[ir.Value, set[ir.Value]] = {}
        self._shadowed: set[ir.Value] | None = None

    def shadowed(self, value: ir.Value) -> bool:
        """Whether ``value``'s name is defined both in a subgraph and in a scope enclosing it
        (:func:`shadowed_values`): not a constant, and never folded into."""
        if self._shadowed is None:
            self._shadowed = shadowed_values(self.model.graph)
        return value in self._shadowed

    def clear(self) -> None:
        self._shadowed = None
        self._cache.clear()
        self._sources.clear()
        self._dependents.clear()
        self._computed = 0

    def changed(self, value: ir.Value) -> None:
        """Forget ``value`` (whose stored tensor was replaced) and what was computed from it.
        The bytes they took stay counted: the budget only grows within a fold."""
        self._cache.pop(value, None)
        for dependent in self._dependents.pop(value, ()):
            self._cache.pop(dependent, None)
            self._sources.pop(dependent, None)

    def _remember(self, value: ir.Value, node: ir.Node, result: np.ndarray) -> None:
        """Cache a computed ``result`` with the stored values it was made from."""
        sources: set[ir.Value] = set()
        for v in node.inputs:
            if v is None:
                continue
            if v in self._sources:
                sources |= self._sources[v]
            elif self.stored(v) is not None:
                sources.add(v)
        self._sources[value] = frozenset(sources)
        for source in sources:
            self._dependents.setdefault(source, set()).add(value)
        self._cache[value] = result

    def allocate(self, nbytes: int, node: ir.Node) -> None:
        """Account for ``nbytes`` that evaluating ``node`` is about to allocate; refuse when
        that passes :data:`MAX_COMPUTED_BYTES` (checked before numpy allocates anything)."""
        if self._computed + nbytes > MAX_COMPUTED_BYTES:
            used = f", {_size(self._computed)} of it used already" if self._computed else ""
            raise NotConstant(
                f"{describe_node(node)} would compute {_size(nbytes)}, past the "
                f"{MAX_COMPUTED_BYTES // 2**20} MiB bnfold evaluates for the constants of a "
                f"model{used}"
            )
        self._computed += nbytes

    # ----------------------------------------------------------------------------------------
    # Stored tensors

    def stored(self, value: ir.Value) -> ir.TensorProtocol | None:
        """The tensor stored for ``value`` (an initializer or a ``Constant`` tensor), if any."""
        if self.shadowed(value):
            return None
        if value.is_initializer():
            if value.is_graph_input() and self.overridable:
                return None
            return value.const_value
        node = value.producer()
        if node is not None and node.op_type == "Constant" and is_default_domain(node):
            return attribute(node, "value", ir.AttributeType.TENSOR)
        return None

    def why_not_stored(self, value: ir.Value) -> str:
        """Why ``value`` is not a stored constant, in words."""
        if self.shadowed(value):
            return (
                f"{describe(value)} is defined both in a subgraph and in a scope enclosing it; "
                "runtimes disagree which of the two the subgraph reads (onnxruntime takes the "
                "outer one, onnx_ir the inner one), so bnfold folds with neither (rename one)"
            )
        if value.is_initializer() and value.is_graph_input() and self.overridable:
            return (
                f"initializer {describe(value)} is also a graph input, so a caller may override "
                "it; to fold, remove the initializers from the inputs (export with "
                "keep_initializers_as_inputs=False, or onnx_ir's RemoveInitializersFromInputsPass)"
            )
        if value.is_initializer():
            return f"initializer {describe(value)} holds no data"
        if value.is_graph_input():
            return f"{describe(value)} is a graph input"
        node = value.producer()
        if node is None:
            return f"{describe(value)} is defined outside the graph"
        return f"{describe(value)} is computed by {describe_node(node)}"

    def weight(self, value: ir.Value) -> StoredOperand[ir.Value]:
        """Where the weight operand ``value`` is stored: a stored tensor seen through
        ``Identity``/``Transpose``, or else ``value`` itself when the evaluator can compute it
        from stored constants (``stored(source)`` is then ``None``: the fold writes a new
        initializer); :class:`NotConstant` otherwise."""
        path: list[ir.Node] = []
        perms: list[tuple[int, ...]] = []
        current = value
        while self.stored(current) is None:
            node = current.producer()
            if node is None or not is_default_domain(node) or self.shadowed(current):
                raise NotConstant(self.why_not_stored(current))
            if node.op_type == "Identity":
                pass
            elif node.op_type == "Transpose":
                rank = _rank_of_stored(self, node.inputs[0])
                perm = attribute(node, "perm", ir.AttributeType.INTS)
                if perm is None:
                    if rank is None:
                        raise NotConstant(self.why_not_stored(current))
                    perm = tuple(reversed(range(rank)))
                perms.append(tuple(int(p) for p in perm))
            else:
                # Computed from stored constants (tf2onnx writes depthwise weights as
                # Reshape -> Transpose of an initializer): the fold materialises the result.
                try:
                    self.value(value)
                except NotConstant as e:
                    raise NotConstant(
                        f"the weight is computed by {describe_node(node)}, which bnfold cannot "
                        f"evaluate ({e})"
                    ) from e
                return StoredOperand(value)
            path.append(node)
            current = node.inputs[0]
            if current is None:
                raise NotConstant(f"{describe_node(node)} has no input")
        return StoredOperand(current, tuple(reversed(path)), tuple(reversed(perms)))

    # ----------------------------------------------------------------------------------------
    # Constant evaluation

    def value(self, value: ir.Value) -> np.ndarray:
        """The constant ``value`` as a numpy array; :class:`NotConstant` if it is not one."""
        return self._value(value, [0])

    def _value(self, value: ir.Value, budget: list[int]) -> np.ndarray:
        if self.shadowed(value):
            raise NotConstant(self.why_not_stored(value))
        cached = self._cache.get(value)
        if cached is not None:
            return cached
        tensor = self.stored(value)
        if tensor is not None:
            result = _as_array(tensor, value)
            if result.nbytes <= _MAX_CACHED_STORED_BYTES:
                self._cache[value] = result
            return result
        node = value.producer()
        if node is None or value.is_graph_input() or value.is_initializer():
            raise NotConstant(self.why_not_stored(value))
        budget[0] += 1
        if budget[0] > MAX_SUBGRAPH_NODES:
            raise NotConstant(
                f"{describe(value)} is computed by more than {MAX_SUBGRAPH_NODES} nodes"
            )
        op = _OPS.get(node.op_type) if is_default_domain(node) else None
        if op is None or len(node.outputs) != 1:
            raise NotConstant(self.why_not_stored(value))
        try:
            result = op(_Call(self, node, budget))
        except (NotConstant, BnfoldError):
            raise
        except Exception as e:  # an odd or damaged node: not a constant bnfold can read
            raise NotConstant(f"{describe_node(node)} cannot be evaluated: {e}") from e
        if result.size > MAX_ELEMENTS:
            raise NotConstant(f"{describe(value)} would have {result.size} elements")
        self._remember(value, node, result)
        return result

    def looks_constant(self, value: ir.Value) -> bool:
        """Whether ``value`` is stored, or computed by the evaluator's operators from stored
        values only (at most :data:`MAX_SUBGRAPH_NODES` of them), told from the graph alone:
        nothing is evaluated (:meth:`value` may still refuse it, for its numbers or size)."""
        seen: set[ir.Value] = set()
        work = [value]
        while work:
            v = work.pop()
            if v in seen:
                continue
            seen.add(v)
            if self.shadowed(v):
                return False
            if self.stored(v) is not None:
                continue
            node = v.producer()
            if (
                node is None
                or v.is_graph_input()
                or v.is_initializer()
                or not is_default_domain(node)
                or node.op_type not in _OPS
                or len(node.outputs) != 1
                or len(seen) > MAX_SUBGRAPH_NODES
            ):
                return False
            work.extend(i for i in node.inputs if i is not None)
        return True

    def uniform(self, value: ir.Value) -> np.ndarray | None:
        """The one value of ``Expand(c, shape)`` with a constant one-element ``c`` and a shape
        known only at run time (as a 0-d array), or ``None``."""
        node = value.producer()
        if node is None or node.op_type != "Expand" or not is_default_domain(node):
            return None
        if not node.inputs or node.inputs[0] is None:
            return None
        try:
            fill = self.value(node.inputs[0])
        except NotConstant:
            return None
        return fill.reshape(()) if fill.size == 1 else None

    def shape(self, value: ir.Value, budget: list[int]) -> tuple[int, ...]:
        """The shape of a constant, reading a stored tensor's header only."""
        tensor = self.stored(value)
        if tensor is not None:
            return tuple(int(d) for d in tensor.shape)
        return tuple(self._value(value, budget).shape)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**17 else f"{nbytes} bytes"


def _rank_of_stored(constants: Constants, value: ir.Value | None) -> int | None:
    if value is None:
        return None
    tensor = constants.stored(value)
    if tensor is not None:
        return len(tensor.shape)
    node = value.producer()
    if node is not None and node.op_type in ("Identity", "Transpose") and is_default_domain(node):
        return _rank_of_stored(constants, node.inputs[0])
    return None


def _as_array(tensor: ir.TensorProtocol, value: ir.Value) -> np.ndarray:
    if math.prod(int(d) for d in tensor.shape) > MAX_ELEMENTS:
        raise NotConstant(f"{describe(value)} is too large to read as a per-channel constant")
    try:
        return np.asarray(tensor.numpy())
    except Exception as e:  # a damaged tensor: not something bnfold can fold with
        raise NotConstant(f"{describe(value)} cannot be read: {e}") from e


# --------------------------------------------------------------------------------------------
# The operators a constant subgraph may use


class _Call:
    """One node being evaluated: its inputs on demand, its attributes, its opset."""

    def __init__(self, constants: Constants, node: ir.Node, budget: list[int]) -> None:
        self.constants = constants
        self.node = node
        self.budget = budget
        self.version = opset_version(constants.model, node)

    def input(self, i: int) -> np.ndarray:
        value = self.node.inputs[i] if i < len(self.node.inputs) else None
        if value is None:
            raise NotConstant(f"{describe_node(self.node)} lacks input {i}")
        return self.constants._value(value, self.budget)

    def optional(self, i: int) -> np.ndarray | None:
        if i >= len(self.node.inputs) or self.node.inputs[i] is None:
            return None
        return self.input(i)

    def input_shape(self, i: int) -> tuple[int, ...]:
        value = self.node.inputs[i]
        if value is None:
            raise NotConstant(f"{describe_node(self.node)} lacks input {i}")
        return self.constants.shape(value, self.budget)

    def input_dtype(self, i: int) -> np.dtype:
        value = self.node.inputs[i]
        dtype = None if value is None else value.dtype
        if dtype is None and value is not None:
            dtype = self.constants.inferred_dtype(value)
        if dtype is None:
            raise NotConstant(f"the type of {describe_node(self.node)}'s input {i} is not known")
        return _numpy_dtype(dtype)

    def axes(self, attribute_until: int) -> list[int] | None:
        """Axes given as an attribute (opsets before ``attribute_until``) or as input 1."""
        if self.version < attribute_until:
            axes = self.attr("axes", ir.AttributeType.INTS)
            return None if axes is None else [int(a) for a in axes]
        given = self.optional(1)
        if given is None:
            return None
        if given.size > MAX_RANK:
            raise NotConstant(f"{describe_node(self.node)} has {given.size} axes")
        return [int(a) for a in given.reshape(-1)]

    def attr(self, name: str, kind: ir.AttributeType, default: Any = None) -> Any:
        return attribute(self.node, name, kind, default)

    def int_attr(self, name: str, default: int | None = None) -> int | None:
        return self.attr(name, ir.AttributeType.INT, default)

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        """Refuse a result of ``shape`` and ``dtype`` too large to compute, before it is."""
        n = math.prod(shape)
        if any(d < 0 for d in shape):
            raise NotConstant(f"{describe_node(self.node)} would make the shape {list(shape)}")
        if n > MAX_ELEMENTS:
            raise NotConstant(f"{describe_node(self.node)} would make {n} elements")
        self.constants.allocate(n * np.dtype(dtype).itemsize, self.node)


def _numpy_dtype(dtype: ir.DataType) -> np.dtype:
    try:
        return np.dtype(dtype.numpy())
    except Exception as e:
        raise NotConstant(f"bnfold does not evaluate {dtype.name} constants") from e


def _constant(c: _Call) -> np.ndarray:
    # "value" (a stored tensor) is read by Constants.stored; these are attribute lists.
    for name, kind, dtype in (
        ("value_float", ir.AttributeType.FLOAT, np.float32),
        ("value_floats", ir.AttributeType.FLOATS, np.float32),
        ("value_int", ir.AttributeType.INT, np.int64),
        ("value_ints", ir.AttributeType.INTS, np.int64),
    ):
        found = c.attr(name, kind)
        if found is not None:
            return np.array(found, dtype=dtype)
    raise NotConstant(f"{describe_node(c.node)} holds no numeric tensor")


# The plain numeric types: numpy converts between them as onnxruntime does (strings parse
# differently; 4-bit and 8-bit floats saturate and round differently, so casts to or from
# anything else are left alone).
FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
)
INTEGER_TYPES = frozenset(
    {
        ir.DataType.INT8,
        ir.DataType.INT16,
        ir.DataType.INT32,
        ir.DataType.INT64,
        ir.DataType.UINT8,
        ir.DataType.UINT16,
        ir.DataType.UINT32,
        ir.DataType.UINT64,
    }
)
_CASTABLE = FLOAT_TYPES | INTEGER_TYPES | {ir.DataType.BOOL}


def _convert(c: _Call, x: np.ndarray, target: ir.DataType) -> np.ndarray:
    source = ir.DataType.from_numpy(x.dtype) if x.dtype != object else ir.DataType.STRING
    if source not in _CASTABLE or target not in _CASTABLE:
        raise NotConstant(
            f"bnfold does not evaluate {describe_node(c.node)} ({source.name} to {target.name})"
        )
    dtype = _numpy_dtype(target)
    c.allocate(x.shape, dtype)
    sixteen = dtype == np.float16 or dtype.name == "bfloat16"
    if sixteen and source in INTEGER_TYPES:
        # onnxruntime casts an integer to a 16-bit float through float32, rounding twice, and
        # numpy (ml_dtypes) in one step: they agree only where float32 holds the integers
        # exactly, so that only the step to 16 bits rounds.
        if x.size and (int(x.max()) > 2**24 or int(x.min()) < -(2**24)):
            raise NotConstant(
                f"{describe_node(c.node)} casts integers beyond 2**24 to {target.name}, which "
                "onnxruntime rounds through float32 (twice) and numpy in one step"
            )
        c.allocate(x.shape, np.float32)
        with np.errstate(over="ignore"):
            return x.astype(np.float32).astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # inf, as onnxruntime casts too
        result = x.astype(dtype)
    if x.dtype == np.float64 and sixteen:
        c.allocate(x.shape, np.float32)
        c.allocate(x.shape, dtype)
        # Rounding a double to 16 bits directly or through float32 can differ by one step;
        # runtimes differ in which they do, so such a constant has no single value.
        if not np.array_equal(result, x.astype(np.float32).astype(dtype), equal_nan=True):
            raise NotConstant(
                f"{describe_node(c.node)} rounds doubles to {target.name} differently in "
                "different runtimes"
            )
    return result


def _cast(c: _Call) -> np.ndarray:
    to = c.node.attributes.get("to")
    if to is None or to.type != ir.AttributeType.INT:
        raise NotConstant(f"{describe_node(c.node)} has no integer 'to' attribute")
    return _convert(c, c.input(0), ir.DataType(to.value))


def _shape(c: _Call) -> np.ndarray:
    shape = c.input_shape(0)
    rank = len(shape)
    start = c.int_attr("start", 0) or 0
    end = c.int_attr("end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return np.array(shape[start:end], dtype=np.int64)


def _shape_input(c: _Call, i: int) -> tuple[int, ...]:
    """A shape given as input ``i``."""
    dims = c.input(i).reshape(-1)
    if dims.size > MAX_RANK:
        raise NotConstant(f"{describe_node(c.node)} has a shape of {dims.size} dimensions")
    return tuple(int(d) for d in dims)


def _expand(c: _Call) -> np.ndarray:
    x = c.input(0)
    target = _shape_input(c, 1)
    try:
        shape = np.broadcast_shapes(x.shape, target)
    except ValueError as e:
        raise NotConstant(f"{describe_node(c.node)}: {e}") from e
    c.allocate(shape, x.dtype)
    return np.broadcast_to(x, shape).copy()


def _reshape(c: _Call) -> np.ndarray:
    x = c.input(0)
    shape = list(_shape_input(c, 1))
    if not c.int_attr("allowzero", 0):
        shape = [x.shape[i] if d == 0 and i < x.ndim else d for i, d in enumerate(shape)]
    if not x.flags.c_contiguous:  # numpy copies to reshape a transposed or broadcast array
        c.allocate(x.shape, x.dtype)
    try:
        return x.reshape(shape)
    except ValueError as e:
        raise NotConstant(f"{describe_node(c.node)}: {e}") from e


def _unsqueeze(c: _Call) -> np.ndarray:
    x = c.input(0)
    axes = c.axes(13)
    if not axes:
        raise NotConstant(f"{describe_node(c.node)} has no axes")
    rank = x.ndim + len(axes)
    for a in sorted(a + rank if a < 0 else a for a in axes):
        x = np.expand_dims(x, a)
    return x


def _squeeze(c: _Call) -> np.ndarray:
    x = c.input(0)
    axes = c.axes(13)
    if not axes:  # none, or an empty list, which onnxruntime also reads as "every 1-sized axis"
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(a + x.ndim if a < 0 else a for a in axes))


def _concat(c: _Call) -> np.ndarray:
    axis = c.int_attr("axis")
    if axis is None:
        raise NotConstant(f"{describe_node(c.node)} has no axis")
    parts = [c.input(i) for i in range(len(c.node.inputs))]
    if not parts:
        raise NotConstant(f"{describe_node(c.node)} has no inputs")
    c.allocate((sum(p.size for p in parts),), np.result_type(*parts))
    return np.concatenate(parts, axis=axis)


def _constant_of_shape(c: _Call) -> np.ndarray:
    shape = _shape_input(c, 0)
    fill = c.attr("value", ir.AttributeType.TENSOR)
    fill_value = np.zeros(1, np.float32) if fill is None else np.asarray(fill.numpy())
    if fill_value.size != 1:
        raise NotConstant(f"{describe_node(c.node)}'s value holds {fill_value.size} elements")
    c.allocate(shape, fill_value.dtype)
    return np.full(shape, fill_value.reshape(-1)[0], dtype=fill_value.dtype)


def _transpose(c: _Call) -> np.ndarray:
    perm = c.attr("perm", ir.AttributeType.INTS)
    return np.transpose(c.input(0), None if perm is None else [int(p) for p in perm])


def _floating(c: _Call, *xs: np.ndarray) -> None:
    for x in xs:
        if not _is_float(x.dtype):
            raise NotConstant(f"bnfold evaluates {c.node.op_type} on floating-point values only")


def _wide(c: _Call, *xs: np.ndarray) -> None:
    """Arithmetic on 16-bit floats is left alone: onnxruntime runs chains of such ops in float32
    and rounds once at the end, numpy rounds after every op."""
    for x in xs:
        if x.dtype.itemsize < 4 and _is_float(x.dtype):
            raise NotConstant(f"bnfold does not evaluate {describe_node(c.node)} in {x.dtype}")


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or "float" in dtype.name


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], floats_only: bool = False):
    def op(c: _Call) -> np.ndarray:
        a, b = c.input(0), c.input(1)
        if a.dtype != b.dtype:
            raise NotConstant(f"{describe_node(c.node)} mixes {a.dtype} and {b.dtype}")
        if floats_only:
            _floating(c, a)
        _wide(c, a)
        shape = np.broadcast_shapes(a.shape, b.shape)
        c.allocate(shape, a.dtype)
        with np.errstate(all="ignore"):
            return np.asarray(fn(a, b)).astype(a.dtype, copy=False)

    return op


def _unary(fn: Callable[[np.ndarray], np.ndarray]):
    def op(c: _Call) -> np.ndarray:
        x = c.input(0)
        _floating(c, x)
        _wide(c, x)
        c.allocate(x.shape, x.dtype)
        with np.errstate(all="ignore"):
            return np.asarray(fn(x)).astype(x.dtype, copy=False)

    return op


_OPS: dict[str, Callable[[_Call], np.ndarray]] = {
    "Constant": _constant,
    "Identity": lambda c: c.input(0),
    "Cast": _cast,
    "CastLike": lambda c: _convert(c, c.input(0), ir.DataType.from_numpy(c.input_dtype(1))),
    "Shape": _shape,
    "Size": lambda c: np.array(math.prod(c.input_shape(0)), dtype=np.int64),
    "Expand": _expand,
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "ConstantOfShape": _constant_of_shape,
    "Transpose": _transpose,
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _binary(np.divide, floats_only=True),
    "Neg": _unary(np.negative),
    "Sqrt": _unary(np.sqrt),
    "Reciprocal": _unary(np.reciprocal),
}

# Inputs whose data an operator never reads (only their shape or type).
METADATA_INPUTS: dict[str, tuple[int, ...]] = {"Shape": (0,), "Size": (0,), "CastLike": (1,)}


def reads_data(node: ir.Node, index: int) -> bool:
    """Whether ``node`` reads the data of its input ``index`` (not only its shape or type)."""
    return not (is_default_domain(node) and index in METADATA_INPUTS.get(node.op_type, ()))
