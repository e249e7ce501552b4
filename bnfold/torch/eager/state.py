"""Undo and detect what running or tracing ``forward`` does to a model.

Finding the data flow runs the user's Python ``forward`` (under torch.fx, torch.export, or for
real to see shapes). That code may count calls, store intermediate values on the module (in
dicts, lists, deques, namespaces), create submodules, or change tensors in place.
:class:`ModelState` records enough to put the modules back as they were, and to tell the
frontend what ``forward`` did that the graph does not show.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
import types
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

# torch.fx patches nn.Module.__call__ while it traces: one trace at a time in this process.
TRACE_LOCK = threading.RLock()

_MAX_DEPTH = 6
_SEQUENCES = (list, collections.deque)
_SCALARS = frozenset({int, float, bool, str, bytes, complex, type(None)})


@functools.cache
def _module_internals() -> frozenset[str]:
    """nn.Module's own bookkeeping attributes (slots and hook tables): restored as slots or
    left alone, never searched as user containers."""
    return frozenset(vars(nn.Module()))


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter (nor change outside it)
        return None


@functools.cache
def _slot_names(cls: type) -> list[str]:
    names = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else list(slots)
    return [n for n in names if n not in ("__dict__", "__weakref__")]


_NOT_HOLDERS = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    functools.partial,
    nn.Module,
    torch.Tensor,
    torch.fx.Proxy,
)


def _is_plain_object(value: Any) -> bool:
    """An object of a user's class whose attributes live in its ``__dict__`` (a config, a box
    that forward stores values in): a holder like a namespace."""
    return (
        isinstance(getattr(value, "__dict__", None), dict)
        and not isinstance(value, _NOT_HOLDERS)
        and not type(value).__module__.startswith(("torch", "builtins", "numpy"))
    )


def _children(value: Any) -> list[Any] | None:
    """The values a mutable holder holds, or None for anything else."""
    if isinstance(value, dict):
        return list(dict.values(value))
    if isinstance(value, (*_SEQUENCES, set)):
        return list(value)
    if isinstance(value, types.SimpleNamespace) or _is_plain_object(value):
        return list(vars(value).values())
    return None


def _contents(value: Any) -> list[Any] | None:
    """What a value holds: a holder's contents, or a tuple's items (a tuple is no holder, since
    it cannot change, but the lists or objects in it can)."""
    children = _children(value)
    if children is None and isinstance(value, tuple):
        children = list(value)
    return children


class _Holders:
    """Mutable containers reachable from module attributes, each recorded once, and plain
    tensors among their contents."""

    def __init__(self) -> None:
        self.saved: dict[int, tuple[Any, Any, tuple]] = {}  # id -> (holder, contents, signature)
        self.tensors: dict[int, tuple[torch.Tensor, int | None, torch.Tensor | None]] = {}

    def record(self, value: Any, depth: int = 0) -> None:
        if isinstance(value, torch.Tensor):
            if id(value) not in self.tensors and not isinstance(value, nn.Parameter):
                small = value.numel() <= 1 << 20 and not value.is_meta
                keep = value.detach().clone() if small else None
                self.tensors[id(value)] = (value, _version(value), keep)
            return
        if depth >= _MAX_DEPTH or id(value) in self.saved:
            return
        if type(value) is tuple:  # not a holder itself, but it may hold some
            for child in value:
                if type(child) not in _SCALARS:
                    self.record(child, depth + 1)
            return
        children = _children(value)
        if children is None:
            return
        if isinstance(value, dict):
            contents: Any = list(dict.items(value))
        elif not isinstance(value, (*_SEQUENCES, set)):  # a namespace or plain object
            contents = dict(vars(value))
        else:
            contents = list(value)
        self.saved[id(value)] = (value, contents, _signature(value))
        for child in children:
            if type(child) not in _SCALARS:  # most elements of big holders are numbers
                self.record(child, depth + 1)

    def changed(self) -> list[Any]:
        """The recorded holders whose contents changed."""
        return [h for h, _, sig in self.saved.values() if not _unchanged(h, sig)]

    def restore(self) -> None:
        for holder, contents, signature in self.saved.values():
            if _unchanged(holder, signature):
                continue
            if isinstance(holder, dict):
                dict.clear(holder)
                dict.update(holder, contents)
            elif not isinstance(holder, (*_SEQUENCES, set)):  # a namespace or plain object
                vars(holder).clear()
                vars(holder).update(contents)
            elif isinstance(holder, list):
                list.__setitem__(holder, slice(None), contents)
            elif isinstance(holder, collections.deque):
                collections.deque.clear(holder)
                collections.deque.extend(holder, contents)
            else:
                set.clear(holder)
                set.update(holder, contents)
        with torch.no_grad():
            for t, version, keep in self.tensors.values():
                if keep is not None and version is not None and _version(t) != version:
                    t.copy_(keep)


def _signature(holder: Any) -> tuple:
    """What a holder holds, by identity (compared in C, without calling elements' ``__eq__``)."""
    if isinstance(holder, dict):
        return tuple(dict.keys(holder)), tuple(map(id, dict.values(holder)))
    if not isinstance(holder, (*_SEQUENCES, set)):  # a namespace or plain object
        return tuple(vars(holder)), tuple(map(id, vars(holder).values()))
    return tuple(map(id, holder))


def identity(value: Any) -> Any:
    """What identifies an attribute's value for change detection: the object, and for a holder
    the objects it holds."""
    return (id(value), _signature(value)) if _children(value) is not None else id(value)


def _unchanged(holder: Any, signature: tuple) -> bool:
    return _signature(holder) == signature


def find_proxies(value: Any, depth: int = 0) -> list[torch.fx.Proxy]:
    """torch.fx proxies held in ``value`` (holders searched to a small depth)."""
    if isinstance(value, torch.fx.Proxy):
        return [value]
    if depth >= _MAX_DEPTH:
        return []
    children = _contents(value)
    if not children:
        return []
    return [p for child in children for p in find_proxies(child, depth + 1)]


def reachable_tensors(model: nn.Module) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    """Every tensor the model's modules hold: ``(module, key, qualified name, tensor)``.

    Registered parameters and buffers, plain tensor attributes and slots (``self.w =
    conv.weight.detach()``, a ``bias`` that is a plain tensor), and tensors in the holders
    (dicts, lists, tuples, sets, namespaces) those attributes hold, to the depth the state walk
    searches. ``key`` is the attribute's name on the module, ``""`` for a holder's content.
    Each module once, under its first name.
    """
    internals = _module_internals()
    found: list[tuple[nn.Module, str, str, torch.Tensor]] = []

    def walk(m: nn.Module, name: str, value: Any, depth: int, seen: set[int]) -> None:
        if isinstance(value, torch.Tensor):
            found.append((m, "", name, value))
            return
        if depth >= _MAX_DEPTH or id(value) in seen or isinstance(value, nn.Module):
            return
        children = _contents(value)
        if not children:
            return
        seen.add(id(value))
        for i, child in enumerate(children):
            if type(child) not in _SCALARS:
                walk(m, f"{name}[{i}]", child, depth + 1, seen)

    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        for table in (m._parameters, m._buffers):
            for key, t in table.items():
                if t is not None:
                    found.append((m, key, prefix + key, t))
        slots = {n: getattr(m, n) for n in _slot_names(type(m)) if hasattr(m, n)}
        seen: set[int] = set()
        for key, value in [*vars(m).items(), *slots.items()]:
            if key in internals:
                continue
            if isinstance(value, torch.Tensor):
                found.append((m, key, prefix + key, value))
            else:
                walk(m, prefix + key, value, 0, seen)
    return found


class ModelState:
    """A record of every module's attributes, slots, holders and tensor versions."""

    def __init__(self, model: nn.Module, values: bool) -> None:
        self.model = model
        self.modules: list[tuple[str, nn.Module]] = []
        # Each module once, under its first name (named_modules skips a module seen before and
        # everything below it, so a tree of aliases costs no more than the modules it holds).
        for path, m in model.named_modules():
            self.modules.append((path, m))
        internals = _module_internals()
        self.holders = _Holders()
        self.saved = []
        for _, m in self.modules:
            attrs = dict(m.__dict__)
            slots = {n: getattr(m, n) for n in _slot_names(type(m)) if hasattr(m, n)}
            tables = (dict(m._parameters), dict(m._buffers), dict(m._modules))
            self.saved.append((m, attrs, slots, tables))
            for key, value in [*attrs.items(), *slots.items()]:
                if key not in internals:
                    self.holders.record(value)
        self.tensors = [(name, t, _version(t)) for name, t in self._named_tensors()]
        self.values = [(b, _version(b), b.clone()) for b in model.buffers()] if values else []

    def _named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Every parameter, then every buffer, once, under its first name (as
        ``named_parameters`` and ``named_buffers`` give them, without walking the tree again)."""
        named, seen = [], set()
        for table in ("_parameters", "_buffers"):
            for path, m in self.modules:
                for name, t in getattr(m, table).items():
                    if t is not None and id(t) not in seen:
                        seen.add(id(t))
                        named.append((f"{path}.{name}" if path else name, t))
        return named

    def restore(self) -> None:
        """Put every module back as it was when the record was made."""
        failures = []
        for m, attrs, slots, (params, buffers, children) in self.saved:
            try:
                m.__dict__.clear()
                m.__dict__.update(attrs)
                for name, value in slots.items():
                    object.__setattr__(m, name, value)
                for table, content in (
                    (m._parameters, params),
                    (m._buffers, buffers),
                    (m._modules, children),
                ):
                    dict.clear(table)
                    dict.update(table, content)
            except Exception as e:  # noqa: BLE001 - restore every other module first
                failures.append(e)
        try:
            self.holders.restore()
            with torch.no_grad():
                for b, _, value in self.values:
                    _write_back(b, value)
        except Exception as e:  # noqa: BLE001
            failures.append(e)
        # Writing values back counts as a change: measure from here on.
        self.tensors = [(name, t, _version(t)) for name, t, _ in self.tensors]
        self.values = [(b, _version(b), value) for b, _, value in self.values]
        if failures:
            raise failures[0]

    def changed_in_place(self) -> list[str]:
        """Parameters and buffers that ``forward`` changed in place since the record."""
        return [name for name, t, version in self.tensors if _version(t) != version]

    def leaked_proxies(self) -> list[tuple[str, torch.fx.Proxy]]:
        """torch.fx proxies that tracing left in the modules' attributes: values ``forward``
        stores on the side, where the graph does not see them used."""
        # A proxy can only be in an attribute that was (re)assigned, or in a holder whose
        # contents changed: search those, not every number of every unchanged list.
        found = []
        internals = _module_internals()
        changed = {id(h) for h in self.holders.changed()}
        for (path, m), (_, attrs, slots, _) in zip(self.modules, self.saved, strict=True):
            now_slots = {n: getattr(m, n) for n in slots if hasattr(m, n)}
            for key, value in [*m.__dict__.items(), *now_slots.items()]:
                if key in internals:
                    continue
                before = attrs.get(key, slots.get(key, _MISSING))
                if before is value and not _changed_within(value, changed):
                    continue
                where = f"{path + '.' if path else ''}{key}"
                found += [(where, p) for p in find_proxies(value)]
        return found

    def changed_attributes(self) -> list[tuple[str, str, bool]]:
        """Plain attributes of the modules (counters, flags, holders) that now hold other
        values than when the record was made: ``(module path, attribute, scalar)``, where
        ``scalar`` says the old or new value is a number, string, flag or None."""
        internals = _module_internals()
        changed = {id(h) for h in self.holders.changed()}
        found = []
        for (path, m), (_, attrs, _, _) in zip(self.modules, self.saved, strict=True):
            for key, value in m.__dict__.items():
                if key in internals:
                    continue
                before = attrs.get(key, _MISSING)
                if before is not value or _changed_within(value, changed):
                    scalar = type(value) in _SCALARS or type(before) in _SCALARS
                    found.append((path, key, scalar))
        return found

    def stored_tensors(self) -> list[str]:
        """Attributes that now hold tensors they did not hold when the record was made."""
        internals = _module_internals()
        stored = []
        for (path, m), (_, attrs, _, _) in zip(self.modules, self.saved, strict=True):
            for key, value in m.__dict__.items():
                if key in internals or attrs.get(key, _MISSING) is value and not _children(value):
                    continue
                if _holds_new_tensor(value, self.holders):
                    stored.append(f"{path + '.' if path else ''}{key}")
        return stored


_MISSING = object()


def _write_back(buffer: torch.Tensor, value: torch.Tensor) -> None:
    """Put a buffer's recorded contents back if they changed. Kernels such as training-mode
    batch_norm update statistics without bumping the version counter, so compare contents;
    a buffer whose elements share memory (an expanded tensor) cannot have been written."""
    if (
        torch.equal(buffer, value)
        or bool(buffer.isnan().any())
        and torch.equal(buffer.nan_to_num(), value.nan_to_num())
    ):
        return
    try:
        buffer.copy_(value)
    except RuntimeError:
        if buffer.stride() and 0 not in buffer.stride():
            raise


def _changed_within(value: Any, changed: set[int], depth: int = 0) -> bool:
    """Whether ``value`` is, or holds, one of the ``changed`` holders."""
    if not changed or depth >= _MAX_DEPTH:
        return False
    if id(value) in changed:
        return True
    children = _contents(value)
    return bool(children) and any(
        _changed_within(c, changed, depth + 1) for c in children if type(c) not in _SCALARS
    )


def _holds_new_tensor(value: Any, holders: _Holders, depth: int = 0) -> bool:
    if isinstance(value, torch.Tensor):
        return id(value) not in holders.tensors and not isinstance(value, nn.Parameter)
    if depth >= _MAX_DEPTH:
        return False
    children = _contents(value)
    return any(_holds_new_tensor(c, holders, depth + 1) for c in children or ())


class _WriteGuard(TorchFunctionMode):
    """Copies a model's tensor the first time an operation is about to write into it (through
    any view of its memory), so that it can be put back: parameters a forward renormalises
    in place, a counter kept as a Parameter.

    Writes are told by name, as torch names them: in-place methods (``add_``, ``copy_``,
    ``set_``), in-place operators (``+=``, ``x[i] = v``), ``out=`` and ``inplace=True``
    arguments, and ``.data`` assignment. (A dispatch mode would see every kernel's writes, but
    its first use imports torch._dynamo, about two seconds.) Buffers a kernel updates without
    saying so (a training-mode batch_norm's statistics) are put back by value instead.

    Only for real runs: traces see proxies or fake tensors, and torch.export runs modes of its
    own.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.by_storage: dict[int, list[torch.Tensor]] = collections.defaultdict(list)
        for _, m in model.named_modules():
            for t in [*m._parameters.values(), *m._buffers.values()]:
                ptr = _storage_ptr(t) if t is not None else None
                if ptr is not None:
                    self.by_storage[ptr].append(t)
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.by_storage:
            for t in _written(func, args, kwargs):
                self._keep(t)
        return func(*args, **kwargs)

    def _keep(self, written: torch.Tensor) -> None:
        ptr = _storage_ptr(written)
        for t in self.by_storage.get(ptr, ()) if ptr is not None else ():
            if id(t) not in self.saved:
                self.saved[id(t)] = (t, t.detach().clone(), ptr)

    def restore(self) -> None:
        with torch.no_grad():
            for t, kept, ptr in self.saved.values():
                if _storage_ptr(t) == ptr and t.shape == kept.shape:
                    t.copy_(kept)
                else:  # its memory was replaced (``p.data = ...``, ``set_``, ``resize_``)
                    t.data = kept
        self.saved.clear()


_INPLACE_OPERATORS = frozenset(
    f"__i{op}__"
    for op in (
        "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
        "and", "or", "xor", "lshift", "rshift",
    )
) | {"__setitem__", "__set__"}  # fmt: skip


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _written(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors a torch call writes into: for an ATen operator called directly, the
    arguments its schema marks as written; otherwise by how torch names its writes (the first
    argument, or the list of tensors a ``_foreach_..._`` function takes)."""
    if isinstance(func, torch._ops.OpOverload):
        written = []
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                written += _tensors(args[i] if i < len(args) else kwargs.get(arg.name))
        return written
    written = _tensors(kwargs.get("out"))
    name = getattr(func, "__name__", "")
    in_place = (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_OPERATORS
    if (in_place or kwargs.get("inplace") is True) and args:
        written += _tensors(args[0])
    return written


def _storage_ptr(t: torch.Tensor) -> int | None:
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - fake, meta or sparse tensors have no memory to guard
        return None
    return ptr or None


@contextlib.contextmanager
def preserved_state(
    model: nn.Module, values: bool = False, run: bool = False
) -> Iterator[ModelState]:
    """Run a block that executes ``forward``, then put ``model``'s modules back as they were.

    Restores attributes (counters, stored values, holders changed in place, tensors held in
    attributes), parameter, buffer and submodule tables and ``__slots__``, and with ``values``
    the buffers' contents (a BatchNorm left in training mode updates its statistics when run).
    With ``run`` (the block runs the model for real), every parameter or buffer an operation
    writes into is copied first and put back. Yields the record, which can also say what
    ``forward`` did in between.
    """
    state = ModelState(model, values)
    guard = _WriteGuard(model) if run else None
    unguarded: list[str] = []
    try:
        if guard is None:
            yield state
        else:
            with guard:
                yield state
    finally:
        if guard is not None:  # written in a way torch does not name (an ATen call in C++)
            unguarded = [
                name
                for name, t, version in state.tensors
                if isinstance(t, nn.Parameter)
                and id(t) not in guard.saved
                and _version(t) != version
            ]
        try:
            state.restore()
        finally:
            if guard is not None:
                guard.restore()
    if unguarded:
        warnings.warn(
            f"running {type(model).__name__} changed {', '.join(unguarded[:3])} in place in a "
            "way bnfold could not see coming, so it could not put the old values back",
            RuntimeWarning,
            stacklevel=3,
        )
