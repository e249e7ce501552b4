"""Values of constant subexpressions of an ATen graph.

pt2e graphs compute some of their constants in the graph: torchao's QAT form divides by a
``scale_factor = gamma / sqrt(running_var + eps)`` made of ``add``, ``sqrt`` and ``div`` nodes,
and a quantized weight reaches its convolution as ``dequantize(int8 tensor, scales, ...)``.
:class:`Constants` evaluates such a node from the stored tensors it reads, with a short list of
pure ops (reshapes, arithmetic, square roots, quantize and dequantize), either as the graph
computes it (its own dtypes) or in float64 for the fold's arithmetic. Anything else — a graph
input, an op outside the list, a tensor the program writes while it runs — is not constant, and
:meth:`Constants.why` says which node stopped the evaluation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from .ops import describe, may_be_written, shape_value
from .store import ModuleStore, Store

# Ops whose result depends on their operands only (no state, no randomness, no aliasing that
# matters: results are never written into).
_ATEN_PURE = {
    "reshape",
    "view",
    "_unsafe_view",
    "unsqueeze",
    "squeeze",
    "flatten",
    "permute",
    "t",
    "transpose",
    "expand",
    "clone",
    "contiguous",
    "alias",
    "detach",
    "lift_fresh_copy",
    "_to_copy",
    "to",
    "sqrt",
    "rsqrt",
    "reciprocal",
    "neg",
    "zeros_like",
    "ones_like",
    "full_like",
}
# Arithmetic: only the overloads without rounding modes.
_ATEN_ARITHMETIC = {"add": {"Tensor", "Scalar"}, "sub": {"Tensor", "Scalar"},
                    "mul": {"Tensor", "Scalar"}, "div": {"Tensor", "Scalar"}}  # fmt: skip
_QUANT_PURE = {
    "quantize_per_tensor",
    "dequantize_per_tensor",
    "quantize_per_channel",
    "dequantize_per_channel",
}

# The most elements the evaluations of one fold step may create together (a dequantized weight
# is as large as the weight): 2**26 float64 values are 512 MiB, counted as results are made
# (checked before an op runs when its shape metadata is known, and after it otherwise).
MAX_ELEMENTS = 1 << 26


def is_pure(node: Node) -> bool:
    """Whether ``node`` is an op :class:`Constants` evaluates (its result depends on its operands
    only)."""
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return False
    if t.namespace == "aten":
        name = t._opname
        if name in _ATEN_ARITHMETIC:
            return t._overloadname in _ATEN_ARITHMETIC[name]
        return name in _ATEN_PURE
    return t.namespace == "quantized_decomposed" and t._opname in _QUANT_PURE


class Constants:
    """Evaluate constant nodes of ``store``'s graph.

    ``float64``: floating values are computed in float64 (stored tensors and every result are
    widened; a cast to a narrower float type still rounds to it, as the graph does); quantize
    ops are then not evaluated, since their rounding belongs to the graph's own dtype. A node
    the program writes into in place (through any view) is not constant. ``ignore``: a node
    whose writes into stored tensors do not count (a training-mode BatchNorm the fold removes).
    """

    def __init__(self, store: Store, *, float64: bool = False, ignore: Node | None = None) -> None:
        self.store = store
        self.float64 = float64
        self.ignore = ignore
        self._values: dict[Node, Any] = {}
        self._native_evaluator: Constants | None = None
        self._why: dict[Node, str] = {}
        self.elements = 0

    def _native(self) -> Constants:
        """The same evaluator in the graph's own dtypes (for results that are not floats)."""
        if self._native_evaluator is None:
            self._native_evaluator = Constants(self.store, ignore=self.ignore)
        return self._native_evaluator

    def why(self, node: Any) -> str:
        """Why ``node`` is not constant (the first node that stopped the evaluation)."""
        if not isinstance(node, Node):
            return f"{node!r} is not a tensor"
        return self._why.get(node, f"{describe(node)} is not constant")

    def value(self, node: Any) -> Any:
        """The value of ``node`` (a tensor, or the number it is), or ``None``."""
        if not isinstance(node, Node):
            return node if isinstance(node, (bool, int, float)) else None
        if node in self._values:
            return self._values[node]
        if node in self._why:
            return None
        result = self._evaluate(node)
        if result is None:
            self._why.setdefault(node, f"{describe(node)} is not constant")
        else:
            self._values[node] = result
        return result

    def _fail(self, node: Node, why: str) -> None:
        self._why[node] = why
        return None

    def _evaluate(self, node: Node) -> Any:
        stored = self.store.tensor(node)
        if stored is not None:
            if self._written(node):
                return self._fail(node, f"{describe(node)} is written while the program runs")
            if stored.is_meta:
                return self._fail(node, f"{describe(node)} has no values (meta device)")
            value = stored.detach()
            if self.float64 and value.is_floating_point():
                value = value.to(torch.float64)
            return value
        if node.op != "call_function":
            return self._fail(node, f"{describe(node)} is computed at run time")
        if not is_pure(node):
            return self._fail(node, f"{describe(node)} is not an op bnfold evaluates")
        if may_be_written(node, self.ignore):  # w = p.clone(); w.add_(1): not p's values
            why = f"{describe(node)} is written in place while the program runs"
            return self._fail(node, why)
        if self.float64 and node.target.namespace == "quantized_decomposed":
            return self._fail(node, f"{describe(node)} rounds in the graph's dtype")
        planned = shape_value(node)  # refuse a huge result (an expand) before allocating it
        if isinstance(planned, torch.Tensor) and isinstance(planned.numel(), int):
            if self.elements + planned.numel() > MAX_ELEMENTS:
                why = f"evaluating {describe(node)} would exceed {MAX_ELEMENTS} values"
                return self._fail(node, why)
        missing: list[Node] = []

        def read(arg: Node) -> Any:
            v = self.value(arg)
            if v is None:
                missing.append(arg)
            return v

        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), read)
        if missing:
            self._why[node] = self.why(missing[0])
            return None
        try:
            with torch.no_grad():
                out = node.target(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - an op refusing its operands is "not constant"
            return self._fail(node, f"{describe(node)} cannot be evaluated ({type(e).__name__})")
        if not isinstance(out, torch.Tensor):
            return self._fail(node, f"{describe(node)} does not return one tensor")
        if self.float64 and out.is_floating_point():
            # A cast to a narrower type rounds as the graph does; everything else widens.
            out = out.to(torch.float64)
        elif self.float64:
            # An integer or boolean result (a cast, a comparison) depends on the rounding of
            # its operands: computed in the graph's own dtypes, as the graph computes it.
            out = self._native().value(node)
            if out is None:
                return self._fail(node, self._native().why(node))
        self.elements += out.numel()
        if self.elements > MAX_ELEMENTS:
            return self._fail(
                node, f"evaluating {describe(node)} would exceed {MAX_ELEMENTS} values"
            )
        return out

    def _written(self, node: Node) -> bool:
        if not self.store.mutated(node):
            return False
        if self.ignore is None or not isinstance(self.store, ModuleStore):
            return True
        # A GraphModule writes its tensors through in-place nodes only: discount the ignored one.
        return any(may_be_written(n, self.ignore) for n in self.store.storage_aliases(node))


__all__ = ["Constants", "MAX_ELEMENTS", "is_pure"]
