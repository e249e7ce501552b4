"""Where the constant tensors of an ATen graph live, for the graph frontend.

An ``ExportedProgram`` keeps parameters, buffers and constants as placeholders described by its
graph signature, with values in ``state_dict`` / ``constants``; the GraphModule of
``ep.module()`` keeps them as ``get_attr`` attributes. :class:`Store` is what the fold sees of
either: read a constant node's tensor, ask whether the program writes it, add a new constant,
give one a new value, drop an unused one. Also the copying helpers both frontends' results need
(copies that keep tied and memory-sharing tensors tied).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Container, Iterable
from typing import Any

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

from ...core.logs import quiet_warnings
from ...core.pipeline import unique_name
from ...errors import BnfoldError, UnsupportedModelError, first_line
from ...torch.aten.ops import may_be_written

_CONSTANT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


class Store:
    """The constant tensors of a graph: read them, add new ones, replace and drop them."""

    def __init__(self, graph: torch.fx.Graph) -> None:
        self.graph = graph
        self._fake_mode: Any = None
        self._fake_mode_known = False
        self._by_tensor: dict[int, list[Node]] | None = None
        self._by_storage: dict[tuple, list[Node]] | None = None
        self._mutated: dict[Node, bool] = {}
        self._stored_bytes: int | None = None
        self.materialised = 0  # bytes folds of expanded weights have made dense so far

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

    def readers(self, node: Node) -> list[str]:
        """What reads ``node``'s tensor other than through constant nodes (a submodule that
        the graph runs or hands on); empty when nothing does."""
        return []

    def stored_bytes(self) -> int:
        """Bytes the graph's constants really occupy: each memory once, however many tensors
        view it (an expanded weight is as small as the values it repeats). Measured once,
        before any fold adds tensors."""
        if self._stored_bytes is None:
            sizes: dict[tuple, int] = {}
            for node in self.constant_nodes():
                value = self.tensor(node)
                key = _storage_key(value)
                if key is not None:
                    sizes[key] = value.untyped_storage().nbytes()
            self._stored_bytes = sum(sizes.values())
        return self._stored_bytes

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

    def unique_key(self, hint: str, taken: Container[str]) -> str:
        """``hint``, or the first of ``hint_2``, ``hint_3``, ... not in ``taken``."""
        return unique_name(hint, taken)


class _Attributes:
    """The attribute names of a module, as a container (what ``dir`` lists, without listing)."""

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and hasattr(self.owner, name)


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


class ProgramStore(Store):
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
        holder = self._holder(spec)
        # A state key may be named by several placeholders (a crafted file does it; torch
        # loads and runs it): the tensor stays while another input spec still names it.
        if not any(
            s.target == spec.target and self._holder(s) is holder
            for s in self._spec_by_node.values()
        ):
            holder.pop(spec.target, None)
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
        call_graph = copy_quietly(self.ep.module_call_graph)
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
        copies = copy_tensors(t for _, t in written if id(t) in shared)
        for spec, value in written:
            if id(value) in copies:
                self._holder(spec)[spec.target] = copies[id(value)]
        kwargs: dict[str, Any] = dict(
            root=root,
            graph=graph,
            graph_signature=signature,
            state_dict=self.state_dict,
            range_constraints=copy_quietly(self.ep.range_constraints),
            module_call_graph=call_graph,
            example_inputs=self.ep.example_inputs,
            constants=self.constants,
        )
        params = inspect.signature(ExportedProgram.__init__).parameters
        if "verifiers" in params:
            kwargs["verifiers"] = self.ep.verifiers
        elif "verifier" in params:  # torch < 2.5
            kwargs["verifier"] = self.ep.verifier
        try:
            program = ExportedProgram(**kwargs)
        except Exception as e:  # noqa: BLE001 - torch's verifier rejects the folded program
            raise _rejected(self.ep, e) from e
        meta = program.graph_module.meta
        if meta is not root.meta:  # a cache of the unfolded program must not travel along
            meta.pop("unflattened_module", None)
        return program


def _rejected(ep: ExportedProgram, e: Exception) -> BnfoldError:
    """The error for a folded program torch's verifier rejects: the input's fault when torch
    rejects the input as well (a crafted or damaged program), else a bnfold bug."""
    what = f"{type(e).__name__}: {first_line(e)}"
    try:
        ep.validate()
    except Exception as original:  # noqa: BLE001 - whatever torch's verifier raises
        return UnsupportedModelError(
            f"torch's verifier rejects the program itself ({type(original).__name__}: "
            f"{first_line(original)}), so bnfold cannot build a folded one ({what})"
        )
    return UnsupportedModelError(
        f"torch's verifier rejects the folded program ({what}) although it accepts the "
        "original; please report this bnfold bug with the program"
    )


_PLAIN_MODULE_ATTRS = frozenset(vars(nn.Module()))


def _is_empty_container(m: nn.Module) -> bool:
    """A plain ``nn.Module`` holding nothing at all (no tensors, modules or attributes)."""
    return (
        type(m) is nn.Module
        and not (m._parameters or m._buffers or m._modules)
        and set(vars(m)) <= _PLAIN_MODULE_ATTRS
    )


class ModuleStore(Store):
    """Constants of an ATen GraphModule (``ep.module()``, pt2e): ``get_attr`` nodes."""

    def __init__(self, gm: GraphModule) -> None:
        super().__init__(gm.graph)
        self.gm = gm
        # Tensors are never written into, not even with inplace=True: ep.module() shares its
        # tensors with the ExportedProgram and the eager model it came from, which still apply
        # their BatchNorms. Folded values go into new tensors bound to the module's attributes.
        self._owners: dict[str, nn.Module] = {}
        self._readers: dict[int | tuple, list[str]] | None = None

    def changed(self) -> None:
        super().changed()
        self._readers = None

    def readers(self, node: Node) -> list[str]:
        """Nodes that run or hand on a module holding ``node``'s tensor (``call_module`` of
        its owner, ``get_attr`` of the owner or a parent): a mixed graph may still call the
        module whose parameter an ATen op reads, and rebinding it would change that call."""
        if self._readers is None:
            self._readers = self._module_readers()
        value = self.tensor(node)
        if value is None:
            return []
        found = self._readers.get(id(value), []) + self._readers.get(_storage_key(value), [])
        return list(dict.fromkeys(found))

    def _module_readers(self) -> dict[int | tuple, list[str]]:
        """Tensor ids and memories -> the nodes that read a module holding them."""
        readers: dict[int | tuple, list[str]] = {}
        for n in self.graph.nodes:
            if n.op not in ("call_module", "get_attr") or not isinstance(n.target, str):
                continue
            try:
                module = self.gm.get_submodule(n.target)
            except AttributeError:
                continue  # a get_attr of a tensor, not of a module
            what = f"{'module call' if n.op == 'call_module' else 'module'} {n.target or 'root'}"
            for value in module_tensors(module).values():
                for k in (id(value), _storage_key(value)):
                    if k is not None:
                        readers.setdefault(k, []).append(what)
        return readers

    def _owner(self, target: str) -> tuple[nn.Module, str]:
        prefix, _, attr = target.rpartition(".")
        if prefix not in self._owners:
            self._owners[prefix] = self.gm.get_submodule(prefix) if prefix else self.gm
        return self._owners[prefix], attr

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
        attr = self.unique_key(attr, _Attributes(owner))
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
        read = self.readers(node)  # a module call still needs its own attribute
        self.graph.erase_node(node)
        if others or read:
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
            self._owners.pop(prefix, None)


def copy_quietly(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """``copy.deepcopy`` without the FutureWarning that copying torch's pytree specs gives."""
    with quiet_warnings(FutureWarning):
        return copy.deepcopy(obj, memo)


def copy_graph_module(gm: GraphModule, memo: dict[int, Any] | None = None) -> GraphModule:
    """A deep copy of ``gm`` whose ``meta`` is a shallow copy without caches.

    ``torch.export.unflatten`` caches its module (fake tensors and all) in ``meta``; copying
    it fails, and a cache of the unfolded program must not travel with the folded one.
    """
    memo = {} if memo is None else memo
    meta = getattr(gm, "meta", None)
    if isinstance(meta, dict):
        memo[id(meta)] = {k: v for k, v in meta.items() if k != "unflattened_module"}
    copied = copy_quietly(gm, memo)
    # GraphModule.__deepcopy__ re-creates its submodules and forgets which buffers were not
    # persistent: they would enter the copy's state_dict.
    for name, module in gm.named_modules():
        try:
            target = copied.get_submodule(name)
        except AttributeError:
            continue
        target._non_persistent_buffers_set = set(module._non_persistent_buffers_set) & set(
            target._buffers
        )
    return copied


def copy_tensors(tensors: Iterable[torch.Tensor]) -> dict[int, torch.Tensor]:
    """New tensors with the values of ``tensors``, keyed by the old ones' ids.

    Plain dense tensors that share memory (tied names, a buffer that is a view of a parameter)
    share the new memory the same way: each memory is copied once and every tensor is rebuilt
    on it with its own offset, size and strides, without autograd history (``deepcopy``
    refuses a non-leaf view of a parameter). Parameters stay Parameters. Anything else
    (subclasses, quantized, sparse, conjugate or negative views) is deep-copied, which keeps
    what it is.
    """
    new_memory: dict[tuple, Any] = {}
    memo: dict[int, Any] = {}
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for t in tensors:
            if id(t) in out:
                continue
            key = _storage_key(t) if _is_plain_dense(t) else None
            if key is None:
                out[id(t)] = _deepcopy_tensor(t, memo)
                continue
            if key not in new_memory:
                new_memory[key] = t.untyped_storage().clone()
            copy_ = torch.empty((), dtype=t.dtype, device=t.device)
            copy_.set_(new_memory[key], t.storage_offset(), t.size(), t.stride())
            if isinstance(t, nn.Parameter):
                copy_ = nn.Parameter(copy_, requires_grad=t.requires_grad)
            elif t.requires_grad and t.is_leaf:
                copy_.requires_grad_(True)
            out[id(t)] = copy_
    return out


def _is_plain_dense(t: torch.Tensor) -> bool:
    return (
        type(t) in (torch.Tensor, nn.Parameter)
        and t.layout == torch.strided
        and not t.is_quantized
        and not t.is_conj()
        and not t.is_neg()
    )


def _deepcopy_tensor(t: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
    try:
        return copy.deepcopy(t, memo)
    except RuntimeError:  # a non-leaf view: copy its values, keep its class
        return t.detach().clone()


def module_tensors(gm: nn.Module) -> dict[int, torch.Tensor]:
    """Every tensor a module tree holds directly (parameters, buffers, tensor attributes)."""
    found: dict[int, torch.Tensor] = {}
    for mod in gm.modules():
        for value in [*mod._parameters.values(), *mod._buffers.values(), *vars(mod).values()]:
            if isinstance(value, torch.Tensor):
                found[id(value)] = value
    return found


def unshare(gm: nn.Module, originals: dict[int, torch.Tensor]) -> None:
    """Give ``gm`` its own copy of every tensor it still shares with the input (ties and
    memory shared between tensors kept)."""
    still = [t for i, t in module_tensors(gm).items() if i in originals]
    copies = copy_tensors(still)
    for mod in gm.modules():
        for holder in (mod._parameters, mod._buffers):
            for name, value in holder.items():
                if value is not None and id(value) in copies:
                    holder[name] = copies[id(value)]
        for name, value in list(vars(mod).items()):
            if isinstance(value, torch.Tensor) and id(value) in copies:
                mod.__dict__[name] = copies[id(value)]


__all__ = [
    "Store",
    "ProgramStore",
    "ModuleStore",
    "copy_quietly",
    "copy_graph_module",
    "copy_tensors",
    "module_tensors",
    "unshare",
]
