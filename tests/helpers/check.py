"""The fold check every frontend test uses: one for torch models, one for ONNX models, with the
same steps and the same result (:class:`FoldCheck`).

1. ``analyze`` before the fold, and ``fold`` itself, leave the input as it was (every tensor
   bit for bit, the structure, the graph; an ``inplace=True`` fold returns the input instead);
2. ``analyze`` reports what ``fold`` did, entry by entry;
3. every report entry is a fold into a named layer or kept under a rule id with a reason, and,
   when ``expected`` is given, exactly the BatchNorms named there, each folded into the layer
   or kept under the rule it names (:func:`check_report`);
4. the folded model computes what the original computes on fresh inputs (inputs the fold did not
   see): within ``tol`` (``max|a - b| / max|a|`` per output, :data:`REL_TOL` for float32 torch
   models, ``onnx_models.TOLERANCE`` by output type for ONNX), or bit for bit when ``exact``
   (by default: when nothing was folded, since then nothing may have changed).

Frontend tests add their own structural checks on top (which module replaces a folded
BatchNorm, a well-formed ExportedProgram, ``onnx.checker``), in ``test_eager``, ``test_export``
and ``onnx_models.check_fold``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.export import ExportedProgram

import bnfold
from tests.helpers.forms import check_entries

REL_TOL = 1e-5  # float32 folds: max|a - b| / max|a|

Expected = dict[str, tuple[str, object]]  # bn -> ("folded", target) | ("skipped", rule(s))


@dataclass
class FoldCheck:
    """What a fold check saw: the input and folded models, the report, the fresh inputs with
    both models' outputs on each, and the largest relative error of those outputs."""

    model: Any
    folded: Any
    report: bnfold.FoldReport
    inputs: list = field(default_factory=list)  # torch: argument tuples; ONNX: feed dicts
    before: list[list] = field(default_factory=list)  # the original's outputs, per input
    after: list[list] = field(default_factory=list)  # the folded model's outputs, per input
    max_rel: float = 0.0
    tol: float = 0.0

    @property
    def feeds(self) -> list:
        return self.inputs


# --------------------------------------------------------------------------------------------
# Reports


def check_report(report: bnfold.FoldReport, expected: Expected) -> None:
    """Exactly the BatchNorms of ``expected`` (each named once), each as it says:
    ``("folded", target)``, ``("skipped", rule or set of rules)``, or ``("any", target)`` when
    folding into ``target`` and keeping are both right."""
    assert isinstance(report, bnfold.FoldReport)
    names = [e.bn for e in report]
    assert len(names) == len(set(names)), str(report)  # names are unique
    assert set(names) == set(expected), f"{sorted(names)} != {sorted(expected)}\n{report}"
    try:
        check_report_entries(report, expected)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{report}") from None


def check_report_entries(report: bnfold.FoldReport, expected: Expected) -> None:
    """The entries named in ``expected`` (as for :func:`check_report`); others may exist."""
    for bn, (action, what) in expected.items():
        try:
            e = report.entry(bn)
        except KeyError as err:
            raise AssertionError(str(err)) from None
        assert isinstance(e.bn_type, str) and e.bn_type, e
        if action == "any":  # either is right; a fold must be into ``what``
            action, what = ("folded", what) if e.folded else ("skipped", {e.rule})
        assert e.action == action, e
        if action == "folded":
            assert e.folded and e.target == what and e.rule is None and e.reason == "", e
            assert e.target_type, e
        else:
            allowed = what if isinstance(what, (set, frozenset)) else {what}
            assert not e.folded and e.rule in allowed, e
            assert isinstance(e.reason, str) and e.reason.strip(), e


def skipped(report: bnfold.FoldReport) -> dict[str, str | None]:
    """bn -> rule of every kept BatchNorm."""
    return {e.bn: e.rule for e in report.skipped}


def folded(report: bnfold.FoldReport) -> dict[str, str | None]:
    """bn -> target of every folded BatchNorm."""
    return {e.bn: e.target for e in report.folded}


# --------------------------------------------------------------------------------------------
# Torch: outputs, snapshots, closeness


def tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor of a model's output: in tuples, lists, dicts and dataclasses, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in tensors(v)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out) for t in tensors(getattr(out, f.name))]
    return []


def _copy_inputs(inputs: tuple) -> tuple:
    """A copy forward may write into (some models write into their inputs)."""
    try:
        with torch.inference_mode(False):
            return copy.deepcopy(inputs)
    except Exception:  # noqa: BLE001 - an object refusing to be copied: clone the tensors
        return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, inputs)


def torch_outputs(model: Any, inputs: tuple) -> list[torch.Tensor]:
    """Every output tensor of a module or an ExportedProgram (run through ``ep.module()``) on a
    copy of ``inputs``."""
    module = model.module() if isinstance(model, ExportedProgram) else model
    with torch.no_grad():
        return [t.clone() for t in tensors(module(*_copy_inputs(inputs)))]


def rel_err(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    """max|a - b| / max|a| over every output, each of the same shape and dtype (the original's
    outputs finite and not all zero: a check on zeros proves nothing)."""
    assert len(expected) == len(actual) > 0
    worst = 0.0
    for a, b in zip(expected, actual, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        if not (a.is_floating_point() or a.is_complex()):
            assert torch.equal(a, b)
            continue
        a64, b64 = (
            a.to(torch.complex128 if a.is_complex() else torch.float64),
            b.to(torch.complex128 if b.is_complex() else torch.float64),
        )
        scale = float(a64.abs().max())
        assert scale > 0 and torch.isfinite(a64).all()
        worst = max(worst, float((a64 - b64).abs().max()) / scale)
    return worst


def assert_same_outputs(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> None:
    """Bit for bit (NaN where NaN was)."""
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)


def assert_close(reference: Any, folded: Any, *inputs: Any, tol: float = REL_TOL) -> float:
    """``folded`` computes what ``reference`` computes on ``inputs``, within ``tol``; returns
    the relative error."""
    err = rel_err(torch_outputs(reference, inputs), torch_outputs(folded, inputs))
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"
    return err


def _tensors_of(items) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in items if isinstance(v, torch.Tensor)}


def snapshot(model: Any) -> dict:
    """Everything about a module or an ExportedProgram that a fold must leave alone when it
    works on a copy (compare two with :func:`assert_snapshot_equal`)."""
    if isinstance(model, ExportedProgram):
        items = [*model.state_dict.items(), *model.constants.items()]
        return {
            "graph": str(model.graph),
            "code": model.graph_module.code,
            "signature": str(model.graph_signature),
            "range_constraints": str(model.range_constraints),
            "meta": [
                (n.name, str(n.meta.get("val")), str(n.meta.get("nn_module_stack")))
                for n in model.graph.nodes
            ],
            "tensors": _tensors_of(items),
            "ids": {k: id(v) for k, v in items},
        }
    state = model.state_dict(keep_vars=True)
    return {
        "structure": [(name, type(m)) for name, m in model.named_modules()],
        "code": getattr(model, "code", None) if isinstance(model, torch.fx.GraphModule) else None,
        "graph": str(model.graph) if isinstance(model, torch.fx.GraphModule) else None,
        "tensors": _tensors_of(state.items()),
        "ids": {k: id(v) for k, v in state.items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
    }


def assert_snapshot_equal(before: dict, after: dict) -> None:
    """Two snapshots agree: every value equal, every tensor of the same dtype, shape and values
    (NaN where NaN was)."""
    assert before.keys() == after.keys()
    for key in before:
        if key != "tensors":
            assert before[key] == after[key], key
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, v in before["tensors"].items():
        w = after["tensors"][k]
        assert v.dtype == w.dtype and v.shape == w.shape, k
        if v.is_quantized:
            v, w = v.dequantize(), w.dequantize()
        assert torch.equal(v.nan_to_num(), w.nan_to_num()) and torch.equal(v.isnan(), w.isnan()), k


# --------------------------------------------------------------------------------------------
# The torch check


def check_torch_fold(
    model: nn.Module | ExportedProgram,
    example: Any = None,
    fresh: tuple | list[tuple] | None = None,
    expected: Expected | None = None,
    *,
    tol: float = REL_TOL,
    exact: bool | None = None,
    inplace: bool = False,
    producers: Any = None,
    analyze: bool = True,
    reference: Any = None,
) -> FoldCheck:
    """Fold a torch model (eager module, ExportedProgram or ATen GraphModule) with ``example``
    inputs and check 1-4 of the module docstring. ``fresh``: one argument tuple or a list of
    them; ``reference``: what the folded model is compared with (default: the input, or a copy
    of it taken before an in-place fold)."""
    inputs = [] if fresh is None else (list(fresh) if isinstance(fresh, list) else [fresh])
    if reference is None:
        reference = copy.deepcopy(model) if inplace else model
    before = snapshot(model)
    analyzed = bnfold.analyze(model, example, producers=producers) if analyze else None
    if analyze:
        assert_snapshot_equal(before, snapshot(model))
    folded, report = bnfold.fold(
        model, example, inplace=inplace, producers=producers, return_report=True
    )
    assert type(folded) is type(model)
    if inplace:
        assert folded is model
    else:
        assert folded is not model
        assert_snapshot_equal(before, snapshot(model))
    if analyzed is not None:
        assert analyzed.to_list() == report.to_list(), f"analyze:\n{analyzed}\nfold:\n{report}"
    check_entries(report)
    if expected is not None:
        check_report(report, expected)
    if exact is None:
        exact = not report.folded
    result = FoldCheck(model, folded, report, inputs, tol=0.0 if exact else tol)
    for args in inputs:
        want, got = torch_outputs(reference, args), torch_outputs(folded, args)
        result.before.append(want)
        result.after.append(got)
        if exact:
            assert_same_outputs(want, got)
        else:
            err = rel_err(want, got)
            assert err <= tol, f"relative error {err:.3g} > {tol:g}\n{report}"
            result.max_rel = max(result.max_rel, err)
    return result


# --------------------------------------------------------------------------------------------
# The ONNX check


def serialized(model: Any) -> bytes:
    """An onnx.ModelProto's or onnx_ir.Model's bytes."""
    import onnx_ir as ir

    return (ir.to_proto(model) if isinstance(model, ir.Model) else model).SerializeToString()


def check_onnx_fold(
    model: Any,
    expected: Expected | None = None,
    *,
    feeds: list[dict[str, np.ndarray]] | None = None,
    seeds: tuple[int, ...] = (0, 1),
    tol: float | None = None,
    exact: bool | None = None,
    producers: Any = None,
    run: bool = True,
    compare: bool = True,
    affine: bool = True,
) -> FoldCheck:
    """Fold an ONNX model (ModelProto or onnx_ir.Model) and check 1-4 of the module docstring,
    running both models in onnxruntime (optimizations off) on ``feeds`` (default: random inputs
    from ``seeds``). ``run=False``: onnxruntime cannot run the model; ``compare=False``: the
    outputs are collected for the caller to compare (float16 models)."""
    import onnx_ir as ir

    from tests.helpers import onnx_models as om

    before = serialized(model)
    folded, report = bnfold.fold(model, return_report=True, producers=producers, affine=affine)
    assert serialized(model) == before, "fold modified its input"
    analyzed = bnfold.analyze(model, producers=producers, affine=affine)
    assert serialized(model) == before, "analyze modified its input"
    assert analyzed.to_list() == report.to_list(), f"analyze:\n{analyzed}\nfold:\n{report}"
    assert type(folded) is type(model)
    check_entries(report)
    if expected is not None:
        check_report(report, expected)
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    folded_proto = ir.to_proto(folded) if isinstance(folded, ir.Model) else folded
    inputs = list(feeds) if feeds is not None else [om.random_feeds(proto, s) for s in seeds]
    result = FoldCheck(model, folded, report, inputs)
    if not run:
        return result
    for f in inputs:
        result.before.append(om.run(proto, f))
        result.after.append(om.run(folded_proto, f))
    if not compare:
        return result
    if exact is None:
        exact = not report.folded
    if tol is None:
        out_types = [o.type.tensor_type.elem_type for o in proto.graph.output]
        tol = max(om.TOLERANCE.get(t, 0.0) for t in out_types)
    result.tol = 0.0 if exact else tol
    for want, got in zip(result.before, result.after, strict=True):
        if exact:
            om.assert_bit_exact(want, got)
        else:
            err = om.rel_err(want, got)
            assert err <= tol, f"relative error {err:.3g} > {tol:g}\n{report}"
            result.max_rel = max(result.max_rel, err)
    return result
