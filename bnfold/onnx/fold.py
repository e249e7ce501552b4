"""ONNX models: fold BatchNormalization into Conv, ConvTranspose, Gemm and MatMul.

Works on the ``onnx_ir`` in-memory graph (an ``onnx.ModelProto`` is read into one and written
back). The graph work is :mod:`bnfold.onnx.adapter` on the shared driver
(:mod:`bnfold.core.pipeline`); this module picks the working copy, runs it and converts the
result back to the kind of model it was given.
"""

from __future__ import annotations

from typing import Any

import onnx
import onnx_ir as ir

from ..core import pipeline, rules
from ..core.report import FoldReport
from ..errors import UnsupportedModelError, first_line
from .adapter import folding, report
from .constants import quiet_logs
from .model import as_ir_model


def _as_ir(model: Any, *, copy: bool) -> ir.Model:
    """``model`` as an ``onnx_ir.Model`` of its own when ``copy`` (a ModelProto is always read
    into a new one)."""
    working = as_ir_model(model)
    return _copy(working) if copy and isinstance(model, ir.Model) else working


def _copy(model: ir.Model) -> ir.Model:
    try:
        return model.clone()
    except Exception as e:  # noqa: BLE001 - onnx-ir refuses graphs it cannot copy
        raise UnsupportedModelError(
            f"this onnx_ir.Model cannot be copied ({type(e).__name__}: {first_line(e)[:200]}): "
            "a node reads a value that no node, input or initializer of the model defines"
        ) from e


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a chain (onnx_ir wraps the one that says what is wrong)."""
    seen = {id(e)}
    while e.__cause__ is not None and id(e.__cause__) not in seen:
        e = e.__cause__
        seen.add(id(e))
    return e


def _fold_model(model: ir.Model, selected: set[str], affine: bool = True) -> FoldReport:
    """Fold every foldable BatchNorm (and, with ``affine``, affine chain) of ``model`` in
    place; return the report."""
    with folding(model, affine) as adapter:
        return report(model, pipeline.run(adapter, selected).entries)


def analyze(
    model: Any, example_inputs: Any = None, *, producers: Any = None, affine: bool = True
) -> FoldReport:
    """What :func:`fold` would do to ``model``; nothing is changed."""
    selected = rules.selected_kinds(producers)
    with quiet_logs():
        # A copy (for an onnx_ir.Model: copying also refuses one whose nodes read values that
        # nothing defines), rewritten only when a chain of BatchNorms needs it to be decided.
        working = _as_ir(model, copy=True)
        with folding(working, affine) as adapter:
            outcome = pipeline.run(adapter, selected, rewrite=False)
        if outcome.complete:
            return report(working, outcome.entries)
        return _fold_model(working, selected, affine)


def fold(
    model: Any,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    producers: Any = None,
    return_report: bool = False,
    affine: bool = True,
) -> Any:
    """Fold ``model`` (an ``onnx.ModelProto`` or ``onnx_ir.Model``); return one of the same kind.

    ``example_inputs`` is not needed: ONNX models carry their own shapes. ``affine``: fold
    per-channel arithmetic by constants after a layer too (see :mod:`bnfold.onnx.adapter`).
    """
    selected = rules.selected_kinds(producers)
    with quiet_logs():
        working = _as_ir(model, copy=not inplace)
        folded_report = _fold_model(working, selected, affine)
        result: Any = working
        if isinstance(model, onnx.ModelProto):
            try:
                result = ir.serde.serialize_model(working)
            except Exception as e:  # noqa: BLE001 - whatever onnx_ir cannot write back
                raise UnsupportedModelError(
                    "the folded model cannot be written back as a ModelProto "
                    f"({type(e).__name__}: {first_line(_root_cause(e))[:200]})"
                ) from e
            if inplace:
                model.CopyFrom(result)
                result = model
    return (result, folded_report) if return_report else result


def verify(original: Any, folded: Any, example_inputs: Any) -> tuple[float, float]:
    """Run both models in onnxruntime on ``example_inputs`` (a dict of input name to array, or
    ``None`` for random inputs); return ``(max_abs_err, max_rel_err)``."""
    from .run import verify as run_and_compare

    return run_and_compare(original, folded, example_inputs)
