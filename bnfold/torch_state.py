"""Undo and detect what running or tracing ``forward`` does to a model.

Finding the data flow runs the user's Python ``forward`` (under torch.fx, torch.export, or for
real to see shapes). That code may count calls, store intermediate values on the module, create
submodules, or change tensors in place. :class:`ModelState` records enough to put the modules
back as they were, and to tell the frontend what ``forward`` did that the graph does not show.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# torch.fx patches nn.Module.__call__ while it traces: one trace at a time in this process.
TRACE_LOCK = threading.RLock()

_CONTAINERS = (dict, list, set)
_MAX_DEPTH = 4


def _snapshot_container(value: Any, depth: int = 0) -> Any:
    """The contents of a mutable container (recursively), to be written back in place."""
    if depth >= _MAX_DEPTH or not isinstance(value, _CONTAINERS):
        return None
    if isinstance(value, dict):
        items = list(value.items())
        inner = [_snapshot_container(v, depth + 1) for _, v in items]
    else:
        items = list(value)
        inner = [_snapshot_container(v, depth + 1) for v in items]
    return items, inner


def _restore_container(value: Any, snap: Any) -> None:
    if snap is None:
        return
    items, inner = snap
    if isinstance(value, dict):
        value.clear()
        value.update(items)
        children = [v for _, v in items]
    elif isinstance(value, list):
        value[:] = items
        children = items
    else:
        value.clear()
        value.update(items)
        children = items
    for child, child_snap in zip(children, inner, strict=True):
        _restore_container(child, child_snap)


def find_proxies(value: Any, where: str, depth: int = 0) -> list[tuple[str, torch.fx.Proxy]]:
    """torch.fx proxies held in ``value`` (containers searched to a small depth)."""
    if isinstance(value, torch.fx.Proxy):
        return [(where, value)]
    if depth >= _MAX_DEPTH:
        return []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in find_proxies(v, f"{where}[{k!r}]", depth + 1)]
    if isinstance(value, (list, tuple, set)):
        return [p for i, v in enumerate(value) for p in find_proxies(v, f"{where}[{i}]", depth + 1)]
    return []


@functools.cache
def _module_internals() -> frozenset[str]:
    """nn.Module's own bookkeeping attributes (slots and hook tables): restored as slots or
    left alone, never searched as user containers."""
    return frozenset(vars(nn.Module()))


class ModelState:
    """A record of every module's attributes, slots, containers and tensor versions."""

    def __init__(self, model: nn.Module, values: bool) -> None:
        self.model = model
        self.modules = [(path, m) for path, m in model.named_modules(remove_duplicate=False)]
        self.saved = []
        internals = _module_internals()
        for _, m in self.modules:
            attrs = dict(m.__dict__)
            containers = {
                k: _snapshot_container(v)
                for k, v in attrs.items()
                if k not in internals and isinstance(v, _CONTAINERS)
            }
            slots = (dict(m._parameters), dict(m._buffers), dict(m._modules))
            self.saved.append((m, attrs, containers, slots))
        self.tensors = [
            (name, t, t._version)
            for name, t in list(model.named_parameters(remove_duplicate=True))
            + list(model.named_buffers(remove_duplicate=True))
        ]
        self.values = [(b, b.clone()) for b in model.buffers()] if values else []

    def restore(self) -> None:
        """Put every module back as it was when the record was made."""
        for m, attrs, containers, (params, buffers, children) in self.saved:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for key, snap in containers.items():
                _restore_container(attrs[key], snap)
            for slot, content in (
                (m._parameters, params),
                (m._buffers, buffers),
                (m._modules, children),
            ):
                slot.clear()
                slot.update(content)
        with torch.no_grad():
            for b, value in self.values:
                b.copy_(value)
        # Writing the values back counts as a change: measure from here on.
        self.tensors = [(name, t, t._version) for name, t, _ in self.tensors]

    def changed_in_place(self) -> list[str]:
        """Parameters and buffers that ``forward`` changed in place since the record."""
        return [name for name, t, version in self.tensors if t._version != version]

    def leaked_proxies(self) -> list[tuple[str, torch.fx.Proxy]]:
        """torch.fx proxies that tracing left in the modules' attributes: values ``forward``
        stores on the side, where the graph does not see them used."""
        found = []
        internals = _module_internals()
        for path, m in self.modules:
            for key, value in list(m.__dict__.items()):
                if key in internals:
                    continue
                found += find_proxies(value, f"{path + '.' if path else ''}{key}")
        return found


@contextlib.contextmanager
def preserved_state(model: nn.Module, values: bool = False) -> Iterator[ModelState]:
    """Run a block that executes ``forward``, then put ``model``'s modules back as they were.

    Restores attributes (counters, stored values, containers mutated in place), parameter,
    buffer and submodule slots, and with ``values`` the buffers' contents (a BatchNorm left in
    training mode updates its statistics when run). Yields the record, which can also say what
    ``forward`` did in between.
    """
    state = ModelState(model, values)
    try:
        yield state
    finally:
        state.restore()
