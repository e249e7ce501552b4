"""Opening and writing StableHLO modules with the MLIR bindings jaxlib ships.

A ``jax.export.Exported`` holds its module as a StableHLO portable artifact (versioned
bytecode); text holds it as MLIR assembly. Both are read into an ``ir.Module`` of a context
that knows the dialects JAX emits (func, stablehlo, chlo, sdy, mhlo), rewritten there, and
written back the same way they came.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from ..errors import UnsupportedModelError, first_line

try:  # jaxlib is an extra: without it this module imports, and says what to install on use
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import stablehlo as hlo
except ImportError as _e:  # pragma: no cover - exercised without the extra
    ir = hlo = None  # type: ignore[assignment]
    _MISSING: ImportError | None = _e
else:
    _MISSING = None

INSTALL = "pip install 'bnfold[jax]'"


def require() -> None:
    """Raise :class:`UnsupportedModelError` saying what to install when jaxlib is missing."""
    if _MISSING is not None:
        raise UnsupportedModelError(
            f"StableHLO models need jax and jaxlib ({first_line(_MISSING)}): {INSTALL}"
        )


def context() -> Any:
    """A new MLIR context with every dialect JAX programs use registered."""
    require()
    from jax.interpreters import mlir as jax_mlir

    return jax_mlir.make_ir_context()


def parse_text(text: str, ctx: Any) -> Any:
    """The module of MLIR assembly ``text``; a one-line :class:`UnsupportedModelError` for
    text that does not parse or verify."""
    with ctx:
        try:
            module = ir.Module.parse(text)
        except Exception as e:  # noqa: BLE001 - MLIRError carries the diagnostics
            raise UnsupportedModelError(f"not a valid StableHLO module: {_diagnostic(e)}") from e
        verify(module)
        return module


def from_artifact(data: bytes, ctx: Any) -> Any:
    """The module of a StableHLO portable artifact (what ``Exported`` holds)."""
    with ctx:
        try:
            module = hlo.deserialize_portable_artifact(ctx, bytes(data))
        except Exception as e:  # noqa: BLE001
            raise UnsupportedModelError(
                f"the program's StableHLO module cannot be read: {_diagnostic(e)}"
            ) from e
        if module is None:
            raise UnsupportedModelError("the program's StableHLO module cannot be read")
        verify(module)
        return module


def to_artifact(module: Any) -> bytes:
    """``module`` as a portable artifact, the way ``jax.export`` writes one: for consumers at most
    about four weeks older than this jaxlib, with Shardy shardings exported as JAX does (the
    stablehlo dialect's own serializer refuses modules with ``sdy`` attributes)."""
    try:
        from jax._src.export._export import _module_to_bytecode
    except ImportError:  # pragma: no cover - a jax without it: the dialect's serializer
        _module_to_bytecode = None
    if _module_to_bytecode is not None:
        return bytes(_module_to_bytecode(module))
    version = hlo.get_version_from_compatibility_requirement(
        hlo.StablehloCompatibilityRequirement.WEEK_4
    )
    return bytes(hlo.serialize_portable_artifact(module, version))


def to_text(module: Any, *, debug_info: bool) -> str:
    """``module`` as MLIR assembly, with its locations when ``debug_info``."""
    return module.operation.get_asm(enable_debug_info=debug_info)


def walk_ops(root: Any) -> Iterator[Any]:
    """Every op nested in ``root`` (not ``root`` itself), in program order, as
    ``ir.Operation``s; iterative, so deep nesting does not reach the recursion limit."""
    stack = [root]
    while stack:
        op = stack.pop()
        if op is not root:
            yield op
        inner = [
            o.operation
            for region in op.regions
            for block in region.blocks
            for o in block.operations
        ]
        stack.extend(reversed(inner))


def verify(module: Any) -> None:
    """Raise a one-line :class:`UnsupportedModelError` when ``module`` does not verify."""
    try:
        module.operation.verify()
    except Exception as e:  # noqa: BLE001
        raise UnsupportedModelError(
            f"the StableHLO module does not verify: {_diagnostic(e)}"
        ) from e


def _diagnostic(e: BaseException) -> str:
    """The first diagnostic of an MLIR error, on one line."""
    text = " ".join(str(e).split())
    return text[:300] or type(e).__name__


# --------------------------------------------------------------------------------------------
# jax.export.Exported


def is_exported(model: Any) -> bool:
    """Whether ``model`` is a ``jax.export.Exported`` (without importing jax)."""
    import sys

    export = sys.modules.get("jax.export") or sys.modules.get("jax._src.export._export")
    cls = getattr(export, "Exported", None)
    return cls is not None and isinstance(model, cls)


def replace_module(exported: Any, module: Any) -> Any:
    """A new ``Exported`` like ``exported`` whose module is ``module``; every other field (the
    calling convention, shardings, effects, the VJP) is kept."""
    return dataclasses.replace(exported, mlir_module_serialized=to_artifact(module))
