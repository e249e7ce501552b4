"""An ONNX model object as bnfold reads it: ``onnx.ModelProto`` or ``onnx_ir.Model``.

What the graph frontend (:mod:`bnfold.onnx.adapter`) and the file frontend
(:mod:`bnfold.onnx.files`) both need: a model object made an ``onnx_ir.Model`` (refusing what
bnfold cannot read or keep), and walks over its nodes and stored tensors. Nothing here reads or
writes a file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import onnx
import onnx_ir as ir

from ..core.logs import quiet_warnings
from ..errors import UnsupportedModelError, first_line
from ..onnx.constants import quiet_logs


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """:func:`~bnfold.onnx.constants.quiet_logs`, and no warnings either: onnx warns of unknown
    external-data keys as onnx_ir reads a model (harmless: they are ignored). Warnings filters
    are global state, so overlapping calls in several threads take turns
    (:func:`bnfold.core.logs.quiet_warnings`)."""
    with quiet_logs(), quiet_warnings():
        yield


def node_label(n: onnx.NodeProto) -> str:
    """A node's name for messages."""
    return f"node {n.name!r} ({n.op_type})" if n.name else f"a {n.op_type} node"


def all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node: in the graph, its subgraphs, and the model's functions."""
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def attribute_tensors(attr: ir.Attr) -> Iterator[ir.TensorProtocol]:
    """The tensors an attribute holds (none for a reference to a function's attribute)."""
    if attr.is_ref() or attr.value is None:
        return
    if attr.type == ir.AttributeType.TENSOR:
        yield attr.value
    elif attr.type == ir.AttributeType.TENSORS:
        yield from attr.value


def all_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every tensor the model stores: initializers of all graphs and attribute tensors."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
    for node in all_nodes(model):
        for attr in node.attributes.values():
            yield from attribute_tensors(attr)


def has_external(model: ir.Model) -> bool:
    """Whether any tensor of the model is stored in an external data file."""
    return any(isinstance(t, ir.ExternalTensor) for t in all_tensors(model))


def refuse_sparse(proto: onnx.ModelProto, what: str) -> None:
    """:class:`UnsupportedModelError` if the model holds sparse tensors (``what`` names it)."""
    if _sparse_tensors(proto):
        raise UnsupportedModelError(
            f"{what} has sparse tensors, which bnfold cannot keep; store them as dense tensors "
            "(onnx.numpy_helper) and try again"
        )


def _sparse_tensors(proto: onnx.ModelProto) -> bool:
    graphs = [proto.graph, *(g for f in proto.functions for n in f.node for g in graphs_of(n))]
    while graphs:
        g = graphs.pop()
        if len(g.sparse_initializer):
            return True
        for node in g.node:
            if any(a.HasField("sparse_tensor") for a in node.attribute):
                return True
            graphs.extend(graphs_of(node))
    return False


def refuse_attribute_references(proto: onnx.ModelProto, what: str) -> None:
    """An attribute that refers to a function's attribute (``ref_attr_name``) outside a function
    makes the model invalid, and onnx_ir cannot walk a subgraph given that way."""
    graphs = [proto.graph]
    while graphs:
        g = graphs.pop()
        for node in g.node:
            ref = next((a for a in node.attribute if a.ref_attr_name), None)
            if ref is not None:
                raise UnsupportedModelError(
                    f"{what} is invalid: attribute {ref.name!r} of node {node.name!r} "
                    f"({node.op_type}) refers to the attribute {ref.ref_attr_name!r} of a "
                    "function, but the node is not in a function"
                )
            graphs.extend(graphs_of(node))


def _check_tensor_types(proto: onnx.ModelProto, what: str) -> None:
    """Refuse a tensor of an element type onnx_ir does not know before it is wrapped: onnx_ir
    reads it lazily and fails only when the model is serialized (or a runtime loads it)."""
    graphs = [proto.graph]
    nodes = [n for f in proto.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            g = graphs.pop()
            tensors = [(t, f"initializer {t.name!r}") for t in g.initializer]
            nodes.extend(g.node)
        else:
            tensors = []
        while nodes:
            n = nodes.pop()
            for a in n.attribute:
                label = f"the tensor in attribute {a.name!r} of {node_label(n)}"
                tensors += [(a.t, label)] if a.HasField("t") else []
                tensors += [(t, label) for t in a.tensors]
            graphs.extend(graphs_of(n))
        for t, label in tensors:
            try:
                known = ir.DataType(t.data_type) != ir.DataType.UNDEFINED
            except ValueError:
                known = False
            if not known:
                raise UnsupportedModelError(
                    f"{what}'s {label} has the unknown element type {t.data_type}; it may be "
                    "damaged, or written by a newer ONNX"
                )


def graphs_of(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The subgraphs in a node's attributes."""
    return [g for a in node.attribute for g in ([a.g] if a.HasField("g") else [*a.graphs])]


def as_ir_model(model: Any, which: str = "") -> ir.Model:
    """``model`` as an ``onnx_ir.Model``: an ir.Model as it is, a ModelProto wrapped (its tensors
    are not copied). :class:`UnsupportedModelError` for what bnfold cannot read or keep: sparse
    tensors, and external data a ModelProto does not hold (it does not know its directory, so
    the data would be looked for in the current one)."""
    which = f"the {which} " if which else "the "
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        refuse_sparse(model, f"{which}model")
        refuse_attribute_references(model, f"{which}model")
        _check_tensor_types(model, f"{which}model")
        try:
            with quiet_libraries():
                converted = ir.serde.deserialize_model(model)
        except Exception as e:  # a malformed proto
            raise UnsupportedModelError(
                f"{which}model cannot be read as ONNX: {first_line(e)}"
            ) from e
        if has_external(converted):
            raise UnsupportedModelError(
                f"{which}ModelProto refers to external data it does not hold; load it with "
                "onnx.load(path) (which reads external data), pass onnx_ir.load(path), or fold "
                "the file with the bnfold command"
            )
        return converted
    raise UnsupportedModelError(
        f"{which}model is a {type(model).__module__}.{type(model).__name__}; pass an "
        "onnx.ModelProto or an onnx_ir.Model"
    )


__all__ = [
    "all_nodes",
    "all_tensors",
    "as_ir_model",
    "attribute_tensors",
    "graphs_of",
    "has_external",
    "node_label",
    "quiet_libraries",
    "refuse_attribute_references",
    "refuse_sparse",
]


# A serialized ModelProto cannot exceed 2 GiB (protobuf's limit); tensors adding up to more
# than this leave room for the graph itself and go to an external data file.
MAX_INLINE_BYTES = 1_800_000_000


def _nbytes(tensor: ir.TensorProtocol) -> int:
    """A tensor's size from its shape and type (no data is read)."""
    try:
        return tensor.nbytes
    except (TypeError, ValueError):  # string tensors have no fixed element size
        return 0


def tensor_bytes(model: ir.Model) -> int:
    """Bytes the model's tensors take, from their shapes and types (no data is read)."""
    return sum(_nbytes(t) for t in all_tensors(model))
