"""torch.export programs and ATen graph modules: fold BatchNorm where ExecuTorch and pt2e see it.

Two containers hold the same kind of graph:

- an ``ExportedProgram``, whose parameters, buffers and constants are placeholders described by
  its graph signature, with values in ``state_dict`` / ``constants``;
- the ``GraphModule`` of ``ep.module()`` (what pt2e quantization takes), whose tensors are
  ``get_attr`` nodes.

The fold itself only sees "constant tensor nodes" through a :class:`_Store`, one per container,
so finding pairs, deciding (:mod:`bnfold.rules`), computing (:mod:`bnfold.algebra`) and
rewriting the graph are written once. Ops are read through :mod:`bnfold.torch_aten`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import os
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    TensorArgument,
)
from torch.fx import GraphModule, Node

from . import rules
from .algebra import affine_factors, fold_affine_into_producer
from .errors import (
    FoldRefused,
    InvalidArgumentError,
    ModelFileError,
    UnsupportedModelError,
    first_line,
)
from .report import FoldEntry, FoldReport
from .rules import PairFacts
from .torch_aten import (
    BatchNormCall,
    ProducerCall,
    batch_norm_call,
    describe,
    is_pass_through,
    layout,
    may_be_written,
    module_path,
    producer_call,
    set_argument,
    trace_back,
)
from .torch_verify import _fresh, compare, output_tensors, tolerance
from .torch_verify import verify as verify_modules

_RANK_HINT = "export the model again so that its nodes carry shapes (node.meta['val'])"
_CONSTANT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


# --------------------------------------------------------------------------------------------
# Where constant tensors live


class _Store:
    """The constant tensors of a graph: read them, add new ones, replace and drop them."""

    def __init__(self, graph: torch.fx.Graph) -> None:
        self.graph = graph
        self._fake_mode: Any = None
        self._fake_mode_known = False
        self._by_tensor: dict[int, list[Node]] | None = None
        self._by_storage: dict[tuple, list[Node]] | None = None
        self._mutated: dict[Node, bool] = {}

    def tensor(self, node: Node) -> torch.Tensor | None:
        """The constant tensor ``node`` stands for; ``None`` if it is not one."""
        raise NotImplementedError

    def key(self, node: Node) -> str:
        """The name the tensor is stored under (state_dict key / attribute path)."""
        raise NotImplementedError

    def mutated(self, node: Node) -> bool:
        """Whether the program changes the tensor behind ``node`` while it runs: through any
        constant whose tensor shares its memory (tied names, a buffer that is a view of
        another), and through views of those inside the graph."""
        if node not in self._mutated:  # asked once per operand; the graph is read-only then
            self._mutated[node] = any(self._written(n) for n in self.storage_aliases(node))
        return self._mutated[node]

    def changed(self) -> None:
        """Forget what was learnt from the graph: it has been rewritten."""
        self._mutated.clear()

    def _written(self, node: Node) -> bool:
        raise NotImplementedError

    def add(self, like: Node, key_hint: str, value: torch.Tensor, before: Node) -> Node:
        """A new constant node holding ``value``, stored like ``like``'s tensor."""
        raise NotImplementedError

    def replace(self, node: Node, value: torch.Tensor) -> None:
        """Give the constant ``node`` stands for the new value ``value``."""
        raise NotImplementedError

    def drop(self, node: Node) -> None:
        """Remove the unused constant node ``node`` and its tensor."""
        raise NotImplementedError

    def constant_nodes(self) -> list[Node]:
        raise NotImplementedError

    # Shared helpers

    def aliases(self, node: Node) -> list[Node]:
        """Every constant node (``node`` included) that holds the same tensor object as
        ``node``, as of the original graph (tied weights, repeated ``get_attr``)."""
        if self._by_tensor is None:
            self._by_tensor = {}
            for n in self.constant_nodes():
                value = self.tensor(n)
                if value is not None:
                    self._by_tensor.setdefault(id(value), []).append(n)
        value = self.tensor(node)
        found = self._by_tensor.get(id(value), []) if value is not None else []
        return [n for n in found if not n._erased] or [node]

    def written_state(self) -> list[Node]:
        """Constant nodes whose memory the program writes, with all that share it."""
        found: dict[Node, None] = {}
        for node in self.constant_nodes():
            if node not in found and self._written(node):
                found.update(dict.fromkeys(self.storage_aliases(node)))
        return list(found)

    def storage_aliases(self, node: Node) -> list[Node]:
        """Every constant node whose tensor shares memory with ``node``'s (``node`` included)."""
        if self._by_storage is None:
            self._by_storage = {}
            for n in self.constant_nodes():
                key = _storage_key(self.tensor(n))
                if key is not None:
                    self._by_storage.setdefault(key, []).append(n)
        key = _storage_key(self.tensor(node))
        found = self._by_storage.get(key, []) if key is not None else []
        return list(dict.fromkeys([*self.aliases(node), *(n for n in found if not n._erased)]))

    def fake(self, value: torch.Tensor) -> Any:
        """A fake tensor for a new node's ``meta["val"]``, in the graph's own fake mode."""
        if not self._fake_mode_known:
            from torch._guards import detect_fake_mode

            vals = [n.meta.get("val") for n in self.graph.nodes if "val" in n.meta]
            try:
                self._fake_mode = detect_fake_mode(vals)
            except Exception:  # noqa: BLE001 - mixed fake modes: leave the meta out
                self._fake_mode = None
            self._fake_mode_known = True
        if self._fake_mode is None:
            return None
        return self._fake_mode.from_tensor(value.detach(), static_shapes=True)

    def set_meta(self, node: Node, value: torch.Tensor) -> None:
        val = self.fake(value)
        if val is None:
            return
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        node.meta["val"] = val
        node.meta["tensor_meta"] = _extract_tensor_metadata(val)

    def unique_key(self, hint: str, taken: Iterable[str]) -> str:
        taken = set(taken)
        if hint not in taken:
            return hint
        k = 2
        while f"{hint}_{k}" in taken:
            k += 1
        return f"{hint}_{k}"


def _storage_key(value: torch.Tensor | None) -> tuple | None:
    """Identifies the memory a tensor lives in; ``None`` when it has none to share."""
    if value is None or value.is_meta:
        return None
    try:
        storage = value.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return None
    ptr = storage.data_ptr()
    return (str(value.device), ptr) if ptr else None


def _argument_named(arg: Any, name: str) -> Any:
    return dataclasses.replace(arg, name=name) if arg.name != name else arg


def _named(spec: Any, name: str) -> Any:
    """``spec`` (an input or output spec) with its argument renamed to ``name``."""
    if dataclasses.is_dataclass(spec.arg) and hasattr(spec.arg, "name"):
        return dataclasses.replace(spec, arg=_argument_named(spec.arg, name))
    return spec


def _new_value(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` as the same kind of tensor as ``like`` (a Parameter for a Parameter)."""
    if isinstance(like, nn.Parameter):
        return nn.Parameter(value, requires_grad=like.requires_grad)
    return value


class _ProgramStore(_Store):
    """Constants of an ExportedProgram: placeholders with parameter/buffer/constant specs."""

    def __init__(self, ep: ExportedProgram, graph: torch.fx.Graph) -> None:
        super().__init__(graph)
        self.ep = ep
        self.state_dict = dict(ep.state_dict)
        self.constants = dict(ep.constants)
        self.input_specs = list(ep.graph_signature.input_specs)
        self.output_specs = list(ep.graph_signature.output_specs)
        sig = ep.graph_signature
        self._mutated_targets = set(sig.buffers_to_mutate.values()) | set(
            getattr(sig, "parameters_to_mutate", {}).values()
        )
        # Specs by placeholder position: a copied graph may have renamed its nodes (fx renames
        # a placeholder called "input", a builtin, to "input_1").
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self._spec_by_node = dict(zip(placeholders, self.input_specs, strict=True))
        self._spec_of: dict[Node, InputSpec] = {
            n: s
            for n, s in self._spec_by_node.items()
            if s.kind in _CONSTANT_KINDS and isinstance(s.arg, TensorArgument)
        }
        self._last_of_kind = {s.kind: n for n, s in self._spec_by_node.items()}
        self._taken: set[str] | None = None

    def _holder(self, spec: InputSpec) -> dict[str, Any]:
        in_state = spec.kind == InputKind.PARAMETER or (
            spec.kind == InputKind.BUFFER and spec.persistent is not False
        )
        return self.state_dict if in_state else self.constants

    def tensor(self, node: Node) -> torch.Tensor | None:
        spec = self._spec_of.get(node)
        if spec is None:
            return None
        value = self._holder(spec).get(spec.target)
        return value if isinstance(value, torch.Tensor) else None

    def key(self, node: Node) -> str:
        return self._spec_of[node].target

    def _written(self, node: Node) -> bool:
        spec = self._spec_of.get(node)
        if spec is not None and spec.target in self._mutated_targets:
            return True
        return may_be_written(node)

    def constant_nodes(self) -> list[Node]:
        return list(self._spec_of)

    def add(self, like: Node, key_hint: str, value: torch.Tensor, before: Node) -> Node:
        spec = self._spec_of[like]
        old = self._holder(spec)[spec.target]
        key = self.unique_key(key_hint, self._keys())
        value = _new_value(value, old)
        # Keep the placeholder order parameters, buffers, constants, user inputs: place the new
        # one right after the last placeholder of its kind.
        base = {InputKind.PARAMETER: "p_", InputKind.BUFFER: "b_"}.get(spec.kind, "c_")
        with self.graph.inserting_after(self._last_of_kind[spec.kind]):
            node = self.graph.placeholder(base + key.replace(".", "_").replace("@", "_"))
        node.target = node.name
        self._last_of_kind[spec.kind] = node
        self.set_meta(node, value)
        new_spec = InputSpec(
            kind=spec.kind,
            arg=TensorArgument(name=node.name),
            target=key,
            persistent=spec.persistent,
        )
        self._spec_of[node] = new_spec
        self._spec_by_node[node] = new_spec
        self._holder(new_spec)[key] = value
        self._taken.add(key)
        return node

    def _keys(self) -> set[str]:
        if self._taken is None:
            self._taken = set(self.state_dict) | set(self.constants)
        return self._taken

    def replace(self, node: Node, value: torch.Tensor) -> None:
        spec = self._spec_of[node]
        holder = self._holder(spec)
        holder[spec.target] = _new_value(value, holder[spec.target])

    def drop(self, node: Node) -> None:
        spec = self._spec_of.pop(node)
        del self._spec_by_node[node]
        self._holder(spec).pop(spec.target, None)
        if self._last_of_kind.get(spec.kind) is node:
            self._last_of_kind[spec.kind] = node.prev
        self.graph.erase_node(node)

    def program(
        self, root: GraphModule, graph: torch.fx.Graph, renamed: dict[str, str]
    ) -> ExportedProgram:
        """The new ExportedProgram: the folded graph with the store's signature and tensors.

        ``renamed`` maps the original program's node names to this graph's, for nodes whose
        name changed (copying renames some; a folded BatchNorm's output is now its producer's).
        """
        inputs = [
            _named(self._spec_by_node[n], n.name) for n in self.graph.nodes if n.op == "placeholder"
        ]
        returned = self.graph.output_node().args[0]
        outputs = [
            _named(spec, value.name) if isinstance(value, Node) else spec
            for spec, value in zip(self.output_specs, returned, strict=True)
        ]
        signature = ExportGraphSignature(input_specs=inputs, output_specs=outputs)
        call_graph = _copy(self.ep.module_call_graph)
        for entry in call_graph:
            sig = entry.signature
            if sig is None:
                continue
            for arg_list in (sig.inputs, sig.outputs):
                for i, arg in enumerate(arg_list):
                    if getattr(arg, "name", None) in renamed:
                        arg_list[i] = _argument_named(arg, renamed[arg.name])
        # The new program shares the tensors it did not change with the input, as
        # run_decompositions() does; state the program itself updates (buffers of a kept
        # training-mode BatchNorm) is copied, so running one program never changes the other.
        shared = {id(t) for t in (*self.ep.state_dict.values(), *self.ep.constants.values())}
        written = [(self._spec_of[n], self.tensor(n)) for n in self.written_state()]
        copies = _copy_tensors(t for _, t in written if id(t) in shared)
        for spec, value in written:
            if id(value) in copies:
                self._holder(spec)[spec.target] = copies[id(value)]
        kwargs: dict[str, Any] = dict(
            root=root,
            graph=graph,
            graph_signature=signature,
            state_dict=self.state_dict,
            range_constraints=_copy(self.ep.range_constraints),
            module_call_graph=call_graph,
            example_inputs=self.ep.example_inputs,
            constants=self.constants,
        )
        params = inspect.signature(ExportedProgram.__init__).parameters
        if "verifiers" in params:
            kwargs["verifiers"] = self.ep.verifiers
        elif "verifier" in params:  # torch < 2.5
            kwargs["verifier"] = self.ep.verifier
        program = ExportedProgram(**kwargs)
        meta = program.graph_module.meta
        if meta is not root.meta:  # a cache of the unfolded program must not travel along
            meta.pop("unflattened_module", None)
        return program


_PLAIN_MODULE_ATTRS = frozenset(vars(nn.Module()))


def _is_empty_container(m: nn.Module) -> bool:
    """A plain ``nn.Module`` holding nothing at all (no tensors, modules or attributes)."""
    return (
        type(m) is nn.Module
        and not (m._parameters or m._buffers or m._modules)
        and set(vars(m)) <= _PLAIN_MODULE_ATTRS
    )


class _ModuleStore(_Store):
    """Constants of an ATen GraphModule (``ep.module()``, pt2e): ``get_attr`` nodes."""

    def __init__(self, gm: GraphModule) -> None:
        super().__init__(gm.graph)
        self.gm = gm
        # Tensors are never written into, not even with inplace=True: ep.module() shares its
        # tensors with the ExportedProgram and the eager model it came from, which still apply
        # their BatchNorms. Folded values go into new tensors bound to the module's attributes.

    def _owner(self, target: str) -> tuple[nn.Module, str]:
        prefix, _, attr = target.rpartition(".")
        return (self.gm.get_submodule(prefix) if prefix else self.gm), attr

    def tensor(self, node: Node) -> torch.Tensor | None:
        if node.op != "get_attr":
            return None
        try:
            owner, attr = self._owner(node.target)
            value = getattr(owner, attr)
        except AttributeError:
            return None
        return value if isinstance(value, torch.Tensor) else None

    def key(self, node: Node) -> str:
        return node.target

    def _written(self, node: Node) -> bool:
        return may_be_written(node)

    def constant_nodes(self) -> list[Node]:
        return [n for n in self.graph.nodes if n.op == "get_attr"]

    def _attach(self, target: str, value: torch.Tensor, like: torch.Tensor, like_target: str):
        owner, attr = self._owner(target)
        like_owner, like_attr = self._owner(like_target)
        if isinstance(value, nn.Parameter):
            owner.register_parameter(attr, value)
        elif like_attr in like_owner._buffers:
            persistent = like_attr not in like_owner._non_persistent_buffers_set
            owner.register_buffer(attr, value, persistent=persistent)
        else:
            setattr(owner, attr, value)

    def add(self, like: Node, key_hint: str, value: torch.Tensor, before: Node) -> Node:
        old = self.tensor(like)
        owner, _ = self._owner(like.target)
        prefix = like.target.rpartition(".")[0]
        attr = key_hint.rpartition(".")[2]
        taken = set(dir(owner))
        attr = self.unique_key(attr, taken)
        target = f"{prefix}.{attr}" if prefix else attr
        value = _new_value(value, old)
        self._attach(target, value, old, like.target)
        with self.graph.inserting_before(before):
            # create_node, not get_attr: a plain tensor attribute (a constant, as ep.module()
            # holds them) is a valid target that get_attr would warn about.
            node = self.graph.create_node("get_attr", target)
        self.set_meta(node, value)
        return node

    def replace(self, node: Node, value: torch.Tensor) -> None:
        old = self.tensor(node)
        owner, attr = self._owner(node.target)
        value = _new_value(value, old)
        if isinstance(value, nn.Parameter):
            owner._parameters[attr] = value
        elif attr in owner._buffers:
            owner._buffers[attr] = value
        else:
            setattr(owner, attr, value)

    def drop(self, node: Node) -> None:
        target = node.target
        others = [n for n in self.aliases(node) if n is not node and n.target == target]
        self.graph.erase_node(node)
        if others:
            return
        owner, attr = self._owner(target)
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]
            owner._non_persistent_buffers_set.discard(attr)
        elif hasattr(owner, attr):
            delattr(owner, attr)
        # ep.module() holds tensors in plain nn.Module containers; drop one left empty.
        prefix = target.rpartition(".")[0]
        if prefix and _is_empty_container(owner):
            parent_path, _, child = prefix.rpartition(".")
            parent = self.gm.get_submodule(parent_path) if parent_path else self.gm
            delattr(parent, child)


# --------------------------------------------------------------------------------------------
# Finding and deciding pairs


@dataclass
class _Pair:
    """One BatchNorm node, the producer feeding it (if any), and the decision."""

    bn: BatchNormCall
    name: str
    bn_type: str
    producer: ProducerCall | None
    target: str | None
    target_type: str
    facts: PairFacts
    weight_chain: list[Node] | None = None
    bias_chain: list[Node] | None = None
    weight_axis: int = 0
    new_weight: torch.Tensor | None = None
    new_bias: torch.Tensor | None = None


def _names(nodes: list[Node], fallback_type: str) -> dict[Node, tuple[str, str]]:
    """Report names for nodes: module paths (``@k`` for repeated calls), else node names."""
    out: dict[Node, tuple[str, str]] = {}
    seen: dict[str, int] = {}
    for node in nodes:
        where = module_path(node)
        name, klass = where if where is not None else (node.name, fallback_type)
        if name in seen:  # two ops of one module call: tell them apart by node name
            name = f"{name} ({node.name})"
        seen[name] = 1
        out[node] = (name, klass or fallback_type)
    return out


def _op_label(node: Node) -> str:
    t = node.target
    return f"aten.{t._opname}" if isinstance(t, torch._ops.OpOverload) else str(t)


def _chain_is_constant(store: _Store, chain: list[Node] | None) -> bool:
    return chain is not None and store.tensor(chain[0]) is not None and not store.mutated(chain[0])


def _operand_chain(store: _Store, value: Any, axis: int) -> tuple[list[Node] | None, int, str]:
    """The chain from a constant to a producer operand, the constant's output axis, and what
    the operand is when it is not constant ("" when it is)."""
    found = trace_back(value, axis)
    if found is None:
        return None, axis, "not a tensor"
    chain, source_axis = found
    if store.tensor(chain[0]) is None:
        return None, axis, describe(chain[0])
    if store.mutated(chain[0]):
        return None, axis, f"{describe(chain[0])}, which the program changes while it runs"
    return chain, source_axis, ""


def _other_users(node: Node, but: Node) -> str:
    others = [("the graph output" if u.op == "output" else describe(u)) for u in node.users]
    return ", ".join(o for u, o in zip(node.users, others, strict=True) if u is not but)


def _shared_uses(store: _Store, chain: list[Node] | None, producer: Node) -> str:
    """Who else uses the tensors of a producer's weight or bias chain ("" if nobody)."""
    if chain is None:
        return ""
    others: list[str] = []
    for i, n in enumerate(chain):
        nxt = chain[i + 1] if i + 1 < len(chain) else producer
        others += [describe(u) for u in n.users if u is not nxt]
    for other in store.aliases(chain[0]):
        if other is not chain[0]:
            others += [describe(u) for u in other.users]
    return ", ".join(others)


@dataclass
class _Pass:
    """One look at the graph: the folds to do and an entry for every BatchNorm node."""

    pairs: list[_Pair]
    entries: dict[Node, FoldEntry]
    calls: dict[Node, BatchNormCall]
    names: dict[Node, tuple[str, str]]


def _plan(
    graph: torch.fx.Graph,
    store: _Store,
    selected: set[str],
    boundaries: list[str],
    names: dict[Node, tuple[str, str]] | None = None,
) -> _Pass:
    """Find every BatchNorm node of ``graph``, decide it, and compute the folds.

    Reads the graph and the store only; numbers the algebra refuses become skips. ``names``
    are the report names of BatchNorm nodes from an earlier pass (kept stable across passes).
    """
    bns = [c for c in (batch_norm_call(n) for n in graph.nodes) if c is not None]
    bn_names = dict(names or {})
    missing = [c.node for c in bns if c.node not in bn_names]
    bn_names.update(_names(missing, "BatchNorm"))
    producer_nodes = {c.input for c in bns if isinstance(c.input, Node)}
    prod_calls = {n: producer_call(n) for n in producer_nodes}
    prod_names = _names([n for n in graph.nodes if prod_calls.get(n) is not None], "")
    pairs: list[_Pair] = []
    entries: dict[Node, FoldEntry] = {}
    for c in bns:
        name, bn_type = bn_names[c.node]
        pair = _decide(store, c, name, bn_type, prod_calls, prod_names, boundaries)
        entry = _entry(pair, selected)
        if entry.folded:
            try:
                _compute(store, pair)
            except FoldRefused as refusal:
                entry = dataclasses.replace(
                    entry, action="skipped", reason=refusal.reason, rule=rules.VALID_VALUES
                )
        if entry.folded:
            pairs.append(pair)
        entries[c.node] = entry
    return _Pass(pairs, entries, {c.node: c for c in bns}, bn_names)


def _chained(p: _Pass) -> bool:
    """Whether a BatchNorm left in this pass reads the output of one folded in it (conv ->
    bn1 -> bn2): after the fold it sits on the conv, so another pass can fold it."""
    outputs = {pair.bn.output for pair in p.pairs}
    return any(not p.entries[n].folded and p.calls[n].input in outputs for n in p.entries)


def _fold_graph(
    graph: torch.fx.Graph,
    root: nn.Module,
    store: _Store,
    selected: set[str],
    boundaries: list[str],
) -> tuple[dict[Node, Node], list[FoldEntry]]:
    """Fold every BatchNorm of ``graph`` (owned by ``root``, whose submodules hold subgraphs)
    that can be folded; returns which node took each
    folded BatchNorm output's place, and the report entries."""
    _require_values(store)
    entries: dict[Node, FoldEntry] = {}
    replaced: dict[Node, Node] = {}
    names = None
    while True:
        p = _plan(graph, store, selected, boundaries, names)
        names = p.names
        entries.update(p.entries)  # a later pass decides again; the first order stays
        again = _chained(p)
        replaced.update(_apply(store, p.pairs))
        store.changed()
        if not again:
            break
    return replaced, list(entries.values()) + _nested_entries(root, graph)


def _require_values(store: _Store) -> None:
    for node in store.constant_nodes():
        value = store.tensor(node)
        if value is not None and value.is_meta:
            raise UnsupportedModelError(
                f"{store.key(node)} is on the meta device, so it has no values to fold; load "
                "the weights (e.g. load_state_dict(..., assign=True)) before exporting"
            )


def _preserved_modules(ep: ExportedProgram) -> list[str]:
    """Modules whose call signature the program preserves (``preserve_module_call_signature``)."""
    return [e.fqn for e in ep.module_call_graph if e.fqn and e.signature is not None]


def _inside(node: Node, fqn: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(path == fqn for path, _ in stack.values())


def _decide(
    store: _Store,
    c: BatchNormCall,
    name: str,
    bn_type: str,
    prod_calls: dict[Node, ProducerCall | None],
    prod_names: dict[Node, tuple[str, str]],
    boundaries: list[str],
) -> _Pair:
    bn_constant = all(
        v is None or _chain_is_constant(store, [v] if isinstance(v, Node) else None)
        for v in (c.weight, c.bias)
    ) and all(isinstance(v, Node) and _chain_is_constant(store, [v]) for v in (c.mean, c.var))
    not_inference = ""
    if c.training is not False:
        not_inference = (
            f"{name} ({_op_label(c.node)}) normalises with batch statistics "
            f"(training={c.training}): it was exported in training mode or without running "
            "statistics; call model.eval() before torch.export"
        )
    custom = ""
    if c.other_outputs_used:
        custom = (
            f"its saved-statistics outputs are used ({c.other_outputs_used}); only the "
            "normalised output can be folded"
        )
    elif c.output is None:
        custom = "its normalised output is never read"
    elif not isinstance(c.eps, (int, float)):
        custom = f"its eps is not a constant ({c.eps})"
    bn_facts = dict(
        bn=name,
        bn_uses_running_stats=not not_inference,
        bn_not_inference_reason=not_inference,
        bn_custom_forward=custom,
        bn_params_constant=bn_constant,
        can_unshare=True,
        rank_hint=_RANK_HINT,
    )
    p = prod_calls.get(c.input) if isinstance(c.input, Node) else None
    if p is None:
        detail = describe(c.input) if isinstance(c.input, Node) else "a constant"
        facts = PairFacts(**bn_facts, producer=None, producer_detail=detail)
        return _Pair(c, name, bn_type, None, None, "", facts)
    target, target_type = prod_names[p.node]
    target_type = target_type or _op_label(p.node)
    w_chain, w_axis, w_what = _operand_chain(store, p.weight, p.weight_axis)
    b_chain: list[Node] | None = None
    b_what = ""
    if p.bias is not None:
        b_chain, _, b_what = _operand_chain(store, p.bias, 0)
    facts = PairFacts(
        **bn_facts,
        producer=target,
        producer_kind=p.kind,
        producer_spatial_dims=p.spatial_dims,
        producer_custom_forward=p.problem,
        producer_output_users=len(p.node.users),
        producer_other_users=_other_users(p.node, c.node),
        producer_params_constant=not w_what and not b_what,
        producer_params_shared=_shared_uses(store, w_chain, p.node)
        or _shared_uses(store, b_chain, p.node),
        output_rank=p.output_rank,
        boundary=next(
            (f"module {f}" for f in boundaries if _inside(p.node, f) != _inside(c.node, f)), ""
        ),
    )
    return _Pair(c, name, bn_type, p, target, target_type, facts, w_chain, b_chain, w_axis)


def _entry(pair: _Pair, selected: set[str]) -> FoldEntry:
    base = dict(bn=pair.name, target=pair.target, bn_type=pair.bn_type)
    base["target_type"] = pair.target_type
    decision = rules.decide(pair.facts, selected)
    if not decision.ok:
        return FoldEntry(**base, action="skipped", rule=decision.rule, reason=decision.reason)
    return FoldEntry(**base, action="folded")


def _compute(store: _Store, pair: _Pair) -> None:
    """Compute the folded weight and bias of ``pair`` (raises :class:`FoldRefused`)."""
    c, p = pair.bn, pair.producer
    assert p is not None and pair.weight_chain is not None

    def value(v: Any) -> torch.Tensor | None:
        return None if v is None else store.tensor(v)

    with torch.no_grad():
        s, t = affine_factors(
            value(c.mean), value(c.var), float(c.eps), value(c.weight), value(c.bias)
        )
        weight = store.tensor(pair.weight_chain[0])
        bias = store.tensor(pair.bias_chain[0]) if pair.bias_chain is not None else None
        if bias is not None and bias.dim() != 1:
            raise FoldRefused(
                f"{pair.target}'s bias has shape {tuple(bias.shape)}, not one value per "
                "output channel"
            )
        w, b = fold_affine_into_producer(weight, bias, s, t, layout(p, pair.weight_axis))
    pair.new_weight, pair.new_bias = w, b


def _nested_entries(root: nn.Module, graph: torch.fx.Graph) -> list[FoldEntry]:
    """BatchNorms inside subgraphs (``torch.cond`` branches, ``torch.no_grad()`` regions as
    exported): reported and kept."""
    users: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            for user in node.users:
                users[node.target] = getattr(user.target, "__name__", str(user.target))
    entries = []
    for sub_name, sub in root.named_modules():
        if sub is root or not isinstance(sub, GraphModule):
            continue
        hop = users.get(sub_name, "a higher-order op")
        hint = (
            "; ep.run_decompositions() inlines such regions, after which bnfold can fold them"
            if hop.startswith("wrap_with")
            else ""
        )
        for node in sub.graph.nodes:
            if batch_norm_call(node) is None:
                continue
            where = module_path(node)
            name = f"{sub_name}.{node.name}" if where is None else where[0]
            entries.append(
                FoldEntry(
                    bn=name,
                    target=None,
                    action="skipped",
                    rule=rules.NO_PRODUCER,
                    reason=(
                        f"{name} is inside the subgraph {sub_name} of {hop}; bnfold folds "
                        f"the top-level graph only{hint}"
                    ),
                    bn_type=where[1] if where else "BatchNorm",
                )
            )
    return entries


# --------------------------------------------------------------------------------------------
# Rewriting the graph


def _sole_use(chain: list[Node], producer: Node) -> bool:
    """Whether every node of the chain feeds only the next one (and the last the producer)."""
    for i, n in enumerate(chain):
        nxt = chain[i + 1] if i + 1 < len(chain) else producer
        if len(n.users) != 1 or nxt not in n.users:
            return False
    return True


def _rebuild_chain(store: _Store, chain: list[Node], source: Node, before: Node) -> Node:
    """Copies of ``chain``'s pass-through nodes on top of ``source``; returns the last one."""
    current = source
    for old in chain[1:]:
        with store.graph.inserting_before(before):
            new = store.graph.node_copy(old, lambda n, o=old, c=current: c if n is o.args[0] else n)
        new.meta = dict(old.meta)
        current = new
    return current


def _set_operand(
    store: _Store,
    pair: _Pair,
    chain: list[Node] | None,
    value: torch.Tensor,
    arg: str,
    hint: str,
    touched: list[Node],
) -> str:
    """Make the producer's operand ``arg`` hold ``value``: in place if nothing else uses the
    old tensor, else through a new constant (and copies of the view ops in between).
    Returns the key the value is stored under."""
    prod = pair.producer.node
    if chain is not None and _sole_use(chain, prod) and _is_only_alias(store, chain[0]):
        store.replace(chain[0], value)
        return store.key(chain[0])
    like = chain[0] if chain is not None else pair.weight_chain[0]
    source = store.add(like, hint, value, before=prod)
    node = source
    if chain is not None:
        node = _rebuild_chain(store, chain, source, before=prod)
        touched.append(chain[-1])
    set_argument(prod, arg, node)
    return store.key(source)


def _is_only_alias(store: _Store, node: Node) -> bool:
    """Whether no other constant node holds the same tensor object (tied weights)."""
    return not any(other is not node and other.users for other in store.aliases(node))


def _bias_key(weight_key: str) -> str:
    """Name for a new bias next to the weight stored as ``weight_key``."""
    prefix, _, attr = weight_key.rpartition(".")
    name = attr.replace("weight", "bias") if "weight" in attr else f"{attr}_bias"
    return f"{prefix}.{name}" if prefix else name


def _apply(store: _Store, pairs: list[_Pair]) -> dict[Node, Node]:
    """Rewrite the graph for every computed fold; returns which node took each output's place."""
    replaced: dict[Node, Node] = {}  # folded BatchNorm output -> the producer now in its place
    touched: list[Node] = []  # nodes that may have lost their last user
    for pair in pairs:
        p, c = pair.producer, pair.bn
        w_key = store.key(pair.weight_chain[0])
        w_key = _set_operand(
            store,
            pair,
            pair.weight_chain,
            pair.new_weight,
            p.weight_arg,
            f"{w_key}_folded",
            touched,
        )
        if pair.bias_chain is not None:
            b_key = store.key(pair.bias_chain[0])
            _set_operand(
                store,
                pair,
                pair.bias_chain,
                pair.new_bias,
                p.bias_arg,
                f"{b_key}_folded",
                touched,
            )
        else:
            bias = store.add(pair.weight_chain[0], _bias_key(w_key), pair.new_bias, p.node)
            if p.op in ("mm", "matmul"):  # no bias operand: it becomes addmm(bias, x, w)
                p.node.target = torch.ops.aten.addmm.default
                p.node.args = (bias, p.node.args[0], p.node.args[1])
                p.node.kwargs = {}
            else:
                set_argument(p.node, p.bias_arg, bias)
        out = c.output
        replaced[out] = p.node
        out.replace_all_uses_with(p.node)
        for user in list(c.node.users):
            store.graph.erase_node(user)
        touched += [v for v in (c.weight, c.bias, c.mean, c.var) if isinstance(v, Node)]
        store.graph.erase_node(c.node)
    _drop_unused(store, touched)
    return replaced


def _drop_unused(store: _Store, touched: list[Node]) -> None:
    """Erase view ops and constants the folds left without users (and the statistics
    counters of BatchNorms whose running mean went with them)."""
    dropped_keys: set[str] = set()
    work = list(dict.fromkeys(touched))
    while work:
        node = work.pop()
        if node._erased or node.graph is not store.graph or node.users:
            continue
        if store.tensor(node) is not None:
            # Tied tensors: export routes every use through one placeholder and leaves the
            # other names' placeholders unused; they go with it.
            work += [a for a in store.aliases(node) if a is not node]
            dropped_keys.add(store.key(node))
            store.drop(node)
        elif is_pass_through(node):
            src = node.args[0] if node.args else node.kwargs.get("self")
            store.graph.erase_node(node)
            if isinstance(src, Node):
                work.append(src)
    counters = {
        k.rpartition(".")[0] + ".num_batches_tracked" if "." in k else "num_batches_tracked"
        for k in dropped_keys
        if k.rpartition(".")[2] == "running_mean"
    }
    for node in store.constant_nodes():
        if not node.users and store.key(node) in counters:
            store.drop(node)


# --------------------------------------------------------------------------------------------
# Public entry points


def _copy(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """``copy.deepcopy`` without the FutureWarning that copying torch's pytree specs gives."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(obj, memo)


def _copy_graph_module(gm: GraphModule, memo: dict[int, Any] | None = None) -> GraphModule:
    """A deep copy of ``gm`` whose ``meta`` is a shallow copy without caches.

    ``torch.export.unflatten`` caches its module (fake tensors and all) in ``meta``; copying
    it fails, and a cache of the unfolded program must not travel with the folded one.
    """
    memo = {} if memo is None else memo
    meta = getattr(gm, "meta", None)
    if isinstance(meta, dict):
        memo[id(meta)] = {k: v for k, v in meta.items() if k != "unflattened_module"}
    return _copy(gm, memo)


def _copy_tensors(tensors: Iterable[torch.Tensor]) -> dict[int, torch.Tensor]:
    """New tensors with the values of ``tensors``, keyed by the old ones' ids.

    Tensors that share memory (tied names, a buffer that is a view of a parameter) share the
    new memory the same way: each memory is copied once and every tensor is rebuilt on it with
    its own offset, size and strides. Parameters stay Parameters (``requires_grad`` kept), and
    the copies have no autograd history (``deepcopy`` refuses a non-leaf view of a parameter).
    """
    new_memory: dict[tuple, Any] = {}
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for t in tensors:
            if id(t) in out:
                continue
            key = _storage_key(t)
            if key is None:
                copy_ = t.detach().clone()
            else:
                if key not in new_memory:
                    new_memory[key] = t.untyped_storage().clone()
                copy_ = torch.empty((), dtype=t.dtype, device=t.device)
                copy_.set_(new_memory[key], t.storage_offset(), t.size(), t.stride())
            if isinstance(t, nn.Parameter):
                copy_ = nn.Parameter(copy_, requires_grad=t.requires_grad)
            out[id(t)] = copy_
    return out


def _module_tensors(gm: nn.Module) -> dict[int, torch.Tensor]:
    """Every tensor a module tree holds directly (parameters, buffers, tensor attributes)."""
    found: dict[int, torch.Tensor] = {}
    for mod in gm.modules():
        for value in [*mod._parameters.values(), *mod._buffers.values(), *vars(mod).values()]:
            if isinstance(value, torch.Tensor):
                found[id(value)] = value
    return found


def _unshare(gm: nn.Module, originals: dict[int, torch.Tensor]) -> None:
    """Give ``gm`` its own copy of every tensor it still shares with the input (ties and
    memory shared between tensors kept)."""
    still = [t for i, t in _module_tensors(gm).items() if i in originals]
    copies = _copy_tensors(still)
    for mod in gm.modules():
        for holder in (mod._parameters, mod._buffers):
            for name, value in holder.items():
                if value is not None and id(value) in copies:
                    holder[name] = copies[id(value)]
        for name, value in list(vars(mod).items()):
            if isinstance(value, torch.Tensor) and id(value) in copies:
                mod.__dict__[name] = copies[id(value)]


def _report(entries: list[FoldEntry], model: Any) -> FoldReport:
    return FoldReport(entries, type(model).__name__)


def analyze(
    model: ExportedProgram | GraphModule,
    example_inputs: Any = None,
    *,
    producers: Iterable[str] | str | None = None,
) -> FoldReport:
    """Decide every BatchNorm node of ``model`` without changing anything.

    ``example_inputs`` is not needed: the shapes come from the graph's metadata.
    """
    selected = rules.selected_kinds(producers)
    if isinstance(model, ExportedProgram):
        gm, boundaries = model.graph_module, _preserved_modules(model)
        store: _Store = _ProgramStore(model, gm.graph)
    else:
        gm, boundaries, store = model, [], _ModuleStore(model)
    _require_values(store)
    first = _plan(gm.graph, store, selected, boundaries)
    if not _chained(first):
        return _report(list(first.entries.values()) + _nested_entries(gm, gm.graph), model)
    # Chained BatchNorms: what a fold does takes more than one pass, so fold a scratch copy
    # (sharing the tensors, which are never written) and report that.
    return _fold(model, selected, inplace=False, scratch=True)[1]


def fold(
    model: ExportedProgram | GraphModule,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    producers: Iterable[str] | str | None = None,
    return_report: bool = False,
) -> Any:
    """Fold every BatchNorm node of ``model`` that can be folded exactly.

    An ExportedProgram gives a new ExportedProgram (sharing the unchanged tensors, as
    ``run_decompositions`` does); a GraphModule gives a new GraphModule, or ``model`` itself
    with ``inplace=True``. ``example_inputs`` is not needed: shapes come from the graph.
    """
    if isinstance(model, ExportedProgram) and inplace:
        raise InvalidArgumentError(
            "an ExportedProgram is folded into a new program; inplace=True is only for "
            "nn.Module and GraphModule models"
        )
    result, report = _fold(model, rules.selected_kinds(producers), inplace=inplace)
    return (result, report) if return_report else result


def _fold(
    model: ExportedProgram | GraphModule, selected: set[str], inplace: bool, scratch: bool = False
) -> tuple[Any, FoldReport]:
    if isinstance(model, ExportedProgram):
        # Only the graph is copied: the new program is built on the input's graph module,
        # whose submodules (control-flow bodies) bnfold does not change.
        root = model.graph_module
        graph = _copy(root.graph)
        copied = list(zip(root.graph.nodes, graph.nodes, strict=True))
        for old, new in copied:
            # fx renames a node on copy when its name is a Python builtin ("input"); torch
            # matches placeholders and signatures by name, so the copy keeps the original's.
            if new.name != old.name:
                new.name = old.name
        store: _Store = _ProgramStore(model, graph)
        replaced, entries = _fold_graph(graph, root, store, selected, _preserved_modules(model))
        if scratch:
            return None, _report(entries, model)
        graph.lint()
        renamed = {}
        for old, new in copied:
            final = replaced.get(new, new)
            while final in replaced:  # conv -> bn1 -> bn2: bn2's output went to bn1's place
                final = replaced[final]
            if final.name != old.name:
                renamed[old.name] = final.name
        return store.program(root, graph, renamed), _report(entries, model)
    originals = _module_tensors(model)
    # A copy sharing the input's tensors: the fold replaces what it changes with new tensors,
    # and whatever is still shared afterwards is copied once (_unshare).
    gm = model if inplace else _copy_graph_module(model, dict(originals))
    store = _ModuleStore(gm)
    _, entries = _fold_graph(gm.graph, gm, store, selected, [])
    if scratch:
        return None, _report(entries, model)
    gm.graph.lint()
    gm.recompile()
    if not inplace:
        _unshare(gm, originals)
    return gm, _report(entries, model)


def verify(original: Any, folded: Any, example_inputs: Any) -> tuple[float, float]:
    """Run both programs (or graph modules) on ``example_inputs``; return the errors."""

    def runnable(m: Any) -> Any:
        return _runnable(m) if isinstance(m, ExportedProgram) else m

    return verify_modules(runnable(original), runnable(folded), example_inputs)


# --------------------------------------------------------------------------------------------
# Files and random inputs (the command line)


@contextlib.contextmanager
def _quiet_torch_export_logs() -> Iterator[None]:
    """torch.export.load logs a traceback before raising; the caller reports one line."""
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch.export.pt2_archive")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@dataclass
class ProgramFile:
    """A torch.export archive as read: the program and the extra files stored beside it."""

    program: ExportedProgram
    extra_files: dict[str, str]


# A .pt2 stores weights uncompressed; an archive that declares far more data than it holds is
# a zip bomb, refused before anything is inflated.
_MAX_INFLATION = 8
_SMALL_ARCHIVE = 256 * 2**20


def _archive_contents(path: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """The program names and extra-file names a .pt2 archive holds (checked for sanity)."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ModelFileError(f"{path} is not a torch.export archive (.pt2): {first_line(e)}") from e
    declared = sum(i.file_size for i in infos)
    size = os.path.getsize(path)
    if declared > max(_MAX_INFLATION * size, _SMALL_ARCHIVE):
        raise ModelFileError(
            f"{path} declares {declared / 2**20:.0f} MiB of contents in a "
            f"{size / 2**20:.1f} MiB file; refusing to inflate it (a damaged or malicious archive)"
        )
    programs, extra = [], []
    for info in infos:
        parts = info.filename.split("/")
        if len(parts) == 3 and parts[1] == "models" and parts[2].endswith(".json"):
            programs.append(parts[2][: -len(".json")])
        elif len(parts) >= 3 and parts[1] == "extra" and not info.is_dir():
            extra.append("/".join(parts[2:]))
    return programs, extra


def load(path: str | os.PathLike[str]) -> ProgramFile:
    """Read a torch.export archive (.pt2) holding one program, with its extra files.

    Raises :class:`ModelFileError` for anything else: not an archive, damaged, several
    programs (bnfold would silently drop all but one), or a program torch cannot read.
    """
    programs, extra_names = _archive_contents(path)
    if len(programs) > 1 or (programs and programs != ["model"]):
        raise ModelFileError(
            f"{path} holds the programs {', '.join(sorted(programs))}; bnfold folds archives "
            "of one program, as torch.export.save writes them (fold each program in Python "
            "with bnfold.fold and package them again)"
        )
    extra = dict.fromkeys(extra_names, "")
    try:
        with open(path, "rb") as f, _quiet_torch_export_logs(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.load(f, extra_files=extra)
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror or e}") from e
    except Exception as e:  # noqa: BLE001 - whatever a damaged archive makes torch raise
        raise ModelFileError(
            f"{path} is not a readable torch.export archive (.pt2): {type(e).__name__}: "
            f"{first_line(e)}"
        ) from e
    if not isinstance(ep, ExportedProgram):
        raise ModelFileError(f"{path} holds a {type(ep).__name__}, not an ExportedProgram")
    return ProgramFile(ep, extra)


def save(ep: ExportedProgram, f: BinaryIO, extra_files: dict[str, str] | None = None) -> None:
    """Write ``ep`` (and ``extra_files``) as a torch.export archive to the binary file ``f``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(ep, f, extra_files=extra_files or None)


def _random_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random values of ``t``'s shape and dtype; integer and bool tensors are kept (they are
    often indices or masks that random values would break)."""
    if t.is_floating_point():
        return torch.randn(t.shape, generator=gen).to(t.dtype)
    if t.is_complex():
        return torch.randn(t.shape, generator=gen, dtype=torch.complex64).to(t.dtype)
    return t.clone()


def _size(d: Any, ep: ExportedProgram) -> int:
    """A concrete size for a possibly symbolic dimension: its example value, else the
    smallest size of at least 2 that its range allows."""
    if isinstance(d, int):
        return d
    node = d.node
    hint = getattr(node, "hint", None)
    if isinstance(hint, int):
        return hint
    expr = node.expr
    values = {}
    for sym in expr.free_symbols:
        vr = ep.range_constraints.get(sym)
        lower = int(vr.lower) if vr is not None and vr.lower.is_finite else 0
        upper = vr.upper if vr is not None else None
        value = max(lower, 2)
        if upper is not None and upper.is_finite and value > int(upper):
            value = int(upper)
        values[sym] = value
    return int(expr.subs(values))


def sample_inputs(ep: ExportedProgram, seed: int = 0) -> tuple[tuple, dict]:
    """Random ``(args, kwargs)`` for ``ep.module()``: shaped like the program's example inputs
    when it kept them, else built from its input specs (symbolic sizes at small values)."""
    import torch.utils._pytree as pytree
    from torch.export.graph_signature import ConstantArgument

    gen = torch.Generator().manual_seed(seed)
    if ep.example_inputs is not None:
        args, kwargs = ep.example_inputs
        return pytree.tree_map_only(torch.Tensor, lambda t: _random_like(t, gen), (args, kwargs))
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    flat: list[Any] = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        arg = spec.arg
        if isinstance(arg, ConstantArgument):
            flat.append(arg.value)
            continue
        val = vals.get(arg.name)
        if isinstance(val, torch.Tensor):
            shape = [_size(d, ep) for d in val.shape]
            like = torch.zeros(shape, dtype=val.dtype)
            flat.append(_random_like(like, gen))
        elif isinstance(val, torch.SymInt):
            flat.append(_size(val, ep))
        else:
            raise UnsupportedModelError(
                f"cannot make a random value for the program input {arg.name} "
                f"({type(val).__name__}); verify it in Python with bnfold.verify"
            )
    args, kwargs = pytree.tree_unflatten(flat, ep.call_spec.in_spec)
    return tuple(args), dict(kwargs)


# Integer and boolean outputs (class ids, masks) are decisions: an exact fold still flips the
# few that sit on a boundary. --verify allows this share of their elements to differ.
DISCRETE_MISMATCH_TOLERANCE = 1e-2


@dataclass(frozen=True)
class CheckResult:
    """How the folded program's outputs compare with the original's on random inputs."""

    max_abs: float
    max_rel: float  # over floating-point outputs
    tolerance: float
    discrete_mismatch: float  # share of integer/bool output elements that differ
    discrete_outputs: bool

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.tolerance and (
            self.discrete_mismatch <= DISCRETE_MISMATCH_TOLERANCE
        )

    def summary(self) -> str:
        text = (
            f"max abs err {self.max_abs:.3g}, max rel err {self.max_rel:.3g} "
            f"(tolerance {self.tolerance:.3g})"
        )
        if self.discrete_outputs:
            text += (
                f"; integer/bool outputs differ in {self.discrete_mismatch:.3%} of elements "
                f"(tolerance {DISCRETE_MISMATCH_TOLERANCE:.0%})"
            )
        return text


def _runnable(program: ExportedProgram) -> nn.Module:
    """``program.module()``, with its own copy of any state the program writes while it runs
    (so verifying never changes the program, nor the eager model it shares tensors with)."""
    module = program.module()
    store = _ProgramStore(program, program.graph_module.graph)
    written = [store.tensor(n) for n in store.written_state()]
    if not written:
        return module
    memo: dict[int, Any] = {id(t): t for t in _module_tensors(module).values()}
    memo.update(_copy_tensors(written))
    return _copy(module, memo)


def check(original: ExportedProgram, folded: ExportedProgram, seed: int = 0) -> CheckResult:
    """Run both programs on the same random inputs (each on its own copy) and compare."""
    args, kwargs = sample_inputs(original, seed)
    with torch.no_grad():
        a = output_tensors(_runnable(original)(*_fresh(args), **_fresh(kwargs)))
        b = output_tensors(_runnable(folded)(*_fresh(args), **_fresh(kwargs)))
    floats = [i for i, (_, t) in enumerate(a) if t.is_floating_point() or t.is_complex()]
    discrete = [i for i in range(len(a)) if i not in floats]
    max_abs = max_rel = 0.0
    if floats:
        max_abs, max_rel = compare([a[i] for i in floats], [b[i] for i in floats])
    else:
        compare(a, b)  # structure and shapes still have to match
    differing = total = 0
    for i in discrete:
        x, y = a[i][1], b[i][1]
        differing += int((x != y).sum())
        total += x.numel()
    return CheckResult(
        max_abs,
        max_rel,
        tolerance([a[i][1] for i in floats]),
        differing / total if total else 0.0,
        bool(discrete),
    )


def is_aten_graph(model: Any) -> bool:
    """Whether a GraphModule holds ATen ops (torch.export / pt2e) rather than module calls."""
    if not isinstance(model, GraphModule):
        return False
    saw_aten = False
    for node in model.graph.nodes:
        if node.op == "call_module":
            sub = model.get_submodule(node.target)
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                return False
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            saw_aten = True
    return saw_aten


__all__ = [
    "analyze",
    "fold",
    "verify",
    "is_aten_graph",
    "load",
    "save",
    "sample_inputs",
    "check",
    "CheckResult",
    "ProgramFile",
]
