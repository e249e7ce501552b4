"""Frontends: which code folds a model object or a model file, and what that code must provide.

``bnfold.fold``, ``bnfold.analyze`` and ``bnfold.verify`` hand a model object to the *model
frontend* that claims it; the command line hands a model file to the *file frontend* of its
format. Both kinds are registered here, each under the name of a module that is imported only
when a model or file of its kind arrives, so ``import bnfold`` and ``import bnfold.cli`` import
no framework. Adding a frontend is one call to :func:`register_model_frontend` or
:func:`register_file_frontend`.

Model frontends
---------------
A registration names the module and a function that claims model objects by their type without
importing a framework: a model of a framework exists only if that framework was imported, so
the function looks in ``sys.modules`` first. It may raise :class:`UnsupportedModelError` for a
model of its framework that no frontend folds, saying what to do instead. The registration
also says, in words, which kinds of model it folds (``"a torch.nn.Module"``); the error for an
object nobody claims lists them all. The first registration claiming a model takes it. The
module provides:

* ``fold(model, example_inputs, *, inplace, producers, return_report)``: the folded model, of
  the same kind as ``model`` (``(folded, FoldReport)`` with ``return_report``); ``model`` is not
  modified unless ``inplace``. ``producers`` is passed as the user gave it
  (:func:`bnfold.core.rules.selected_kinds` reads it). A frontend whose graphs can hold pt2e
  QAT chains also takes ``qat`` (:data:`bnfold.core.rules.QAT_MODES`), in ``analyze`` too;
  ``bnfold.fold`` passes it only when it is not the default, and refuses it for the others. A
  frontend that folds plain per-channel arithmetic (affine chains) takes ``affine`` (a bool, in
  ``analyze`` too); the others never touch arithmetic and are not passed it.
* ``analyze(model, example_inputs, *, producers)``: the :class:`~bnfold.core.report.FoldReport`
  ``fold`` would return, changing nothing.
* ``verify(original, folded, example_inputs)``: ``(max_abs_err, max_rel_err)`` of the two models
  run on the inputs, measured by :mod:`bnfold.core.compare`.

File frontends
--------------
A registration names the module, the format (``"onnx"``), its file suffix and the leading bytes
that mark a file of the format under another name (:func:`bnfold.core.files.model_format`
tries the suffix first, then the leading bytes, in registration order), its names in messages,
the command-line options only it takes (argparse names, such as
``"remove_initializer_inputs"``), and what its module needs installed. The module provides
``open_file(path) -> FileFold``: the file read and checked (raising a one-line
:class:`~bnfold.errors.BnfoldError` for a file it refuses), ready for the steps the command line
runs, in this order, on the :class:`FileFold`:

1. ``check_output(output)`` when an output is named: refuse it before any work, beyond what
   :func:`bnfold.core.files.check_output` already refused (an output that would replace the
   input's data files, say);
2. ``prepare(**options)`` with the format's own options (each as the command line has it:
   ``None`` or ``False`` when not given): apply what they change in the model before the fold,
   and keep what they say about the fold itself (``qat`` of ``.pt2`` files); returns the lines
   to print;
3. ``fold(producers, affine=True)``: fold the model (with the options ``prepare`` kept),
   keeping the original for ``check``; ``affine=False`` (``--no-affine``) leaves plain
   arithmetic alone; returns the report;
4. ``check(seed)`` with ``--verify``: run the original and the folded model on the same random
   inputs (:func:`bnfold.core.compare.random_array`) and compare them
   (:func:`bnfold.core.compare.compare_arrays`); returns the
   :class:`~bnfold.core.compare.CheckResult`; ``verified_where`` says where they ran, for the
   line that reports success;
5. ``save(output)``: write the folded model in the input's format, atomically
   (:mod:`bnfold.core.files`).

Graph adapters
--------------
Graph frontends are adapters on :mod:`bnfold.core.pipeline`: the pipeline drives the fold the
same way for every graph form (rules, algebra, report, chains), and an adapter only knows its IR
(the ``GraphAdapter`` contract is written there): :mod:`bnfold.torch.aten.adapter` for
torch.export programs and ATen GraphModules, :mod:`bnfold.onnx.adapter` for ONNX models. The
model frontend registered for a graph form is the adapter's entry module
(:mod:`bnfold.torch.export`, :mod:`bnfold.onnx.fold`): it copies the model, runs the pipeline
with the adapter and converts back. A file frontend reads a file into such a model and folds it
with the model frontend registered for it. A graph frontend never imports a file frontend: what
both need (running a program, reading a model object) lives beside the adapter
(:mod:`bnfold.torch.verify`, :mod:`bnfold.onnx.model`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import UnsupportedModelError, first_line

if TYPE_CHECKING:  # numpy is imported when a comparison is made, not with bnfold
    from .compare import CheckResult
    from .report import FoldReport


@dataclass(frozen=True)
class ModelFrontend:
    """A model frontend: its module, what it claims, and what it folds, in words."""

    module: str
    claims: Callable[[Any], bool]
    kinds: tuple[str, ...]


@dataclass(frozen=True)
class FileFrontend:
    """A file frontend: its module and how files of its format are recognised and named."""

    format: str
    module: str
    suffix: str
    magic: bytes
    description: str  # one file, in messages: "an ONNX model (.onnx)"
    plural: str  # files of the format, in messages: "ONNX models"
    options: tuple[str, ...] = ()
    needs: str | None = None  # what the module imports, for the error when it is missing
    extra: str | None = None  # the pip extra that installs it


class FileFold(Protocol):
    """One model file on its way through the command line (see the module docstring)."""

    verified_where: str

    def check_output(self, output: str) -> None: ...

    def prepare(self, **options: Any) -> list[str]: ...

    def fold(self, producers: list[str] | None, affine: bool = True) -> FoldReport: ...

    def check(self, seed: int) -> CheckResult: ...

    def save(self, output: str) -> None: ...


MODEL_FRONTENDS: list[ModelFrontend] = []
FILE_FRONTENDS: list[FileFrontend] = []


def register_model_frontend(module: str, claims: Callable[[Any], bool], *kinds: str) -> None:
    """Register the model frontend ``module``, which folds the models ``claims`` returns True
    for; ``kinds`` name them in the error for an unsupported object."""
    MODEL_FRONTENDS.append(ModelFrontend(module, claims, kinds))


def register_file_frontend(frontend: FileFrontend) -> None:
    """Register a file frontend (its format must be new)."""
    if any(f.format == frontend.format for f in FILE_FRONTENDS):
        raise ValueError(f"a file frontend for {frontend.format!r} is registered already")
    FILE_FRONTENDS.append(frontend)


def model_frontend(model: Any) -> ModuleType:
    """The module of the model frontend that claims ``model``, imported on first use;
    :class:`UnsupportedModelError` when none does."""
    for frontend in MODEL_FRONTENDS:
        if frontend.claims(model):
            return importlib.import_module(frontend.module)
    kinds = [k for f in MODEL_FRONTENDS for k in f.kinds]
    listed = ", ".join(kinds[:-1]) + " or " + kinds[-1] if len(kinds) > 1 else "".join(kinds)
    raise UnsupportedModelError(
        f"bnfold cannot fold a {type(model).__module__}.{type(model).__name__}: pass {listed}"
    )


def file_frontend(fmt: str) -> FileFrontend:
    """The file frontend of the format ``fmt`` (as :func:`bnfold.core.files.model_format`
    names it)."""
    for frontend in FILE_FRONTENDS:
        if frontend.format == fmt:
            return frontend
    raise KeyError(fmt)


def file_module(frontend: FileFrontend) -> ModuleType:
    """``frontend``'s module, imported; :class:`UnsupportedModelError` saying what to install
    when what it needs is missing (and the registration says what that is)."""
    try:
        return importlib.import_module(frontend.module)
    except ImportError as e:
        if frontend.needs is None:
            raise
        install = f": pip install 'bnfold[{frontend.extra}]'" if frontend.extra else ""
        raise UnsupportedModelError(
            f"reading {frontend.plural} needs {frontend.needs} ({first_line(e)}){install}"
        ) from e


# ---------------------------------------------------------------------------------------------
# The frontends bnfold has


def _torch_kind(model: Any) -> str | None:
    """``"graph"`` for a torch.export program or an ATen GraphModule, ``"module"`` for another
    ``torch.nn.Module``, ``None`` for anything else (and whenever torch is not imported)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    from torch.export import ExportedProgram

    if isinstance(model, ExportedProgram):
        return "graph"
    if not isinstance(model, torch.nn.Module):
        return None
    _refuse_unflattened(model)
    if isinstance(model, torch.fx.GraphModule):
        if importlib.import_module("bnfold.torch.export").is_aten_graph(model):
            return "graph"
    return "module"


def _refuse_unflattened(model: Any) -> None:
    """An ``torch.export.unflatten`` result spreads one ATen graph over many modules, which
    neither the module nor the graph frontend reads; say what to do instead."""
    from torch.export.unflatten import InterpreterModule, UnflattenedModule

    kinds = (UnflattenedModule, InterpreterModule)
    if any(isinstance(m, kinds) for m in model.modules()):
        raise UnsupportedModelError(
            "this is (or holds) a module made by torch.export.unflatten: fold the "
            "ExportedProgram first (bnfold.fold(ep)), then unflatten the result"
        )


def _is_onnx_model(model: Any) -> bool:
    onnx, onnx_ir = sys.modules.get("onnx"), sys.modules.get("onnx_ir")
    return (onnx is not None and isinstance(model, onnx.ModelProto)) or (
        onnx_ir is not None and isinstance(model, onnx_ir.Model)
    )


register_model_frontend(
    "bnfold.torch.eager.module", lambda m: _torch_kind(m) == "module", "a torch.nn.Module"
)
register_model_frontend(
    "bnfold.torch.export",
    lambda m: _torch_kind(m) == "graph",
    "a torch.export.ExportedProgram",
    "an ATen GraphModule",
)
register_model_frontend(
    "bnfold.onnx.fold", _is_onnx_model, "an onnx.ModelProto", "an onnx_ir.Model"
)


def _is_stablehlo(model: Any) -> bool:
    """A ``jax.export.Exported``, or a string holding StableHLO assembly."""
    if isinstance(model, str):
        return "func.func" in model or "stablehlo." in model
    export = sys.modules.get("jax.export")
    return export is not None and isinstance(model, export.Exported)


register_model_frontend(
    "bnfold.stablehlo.fold", _is_stablehlo, "a jax.export.Exported", "StableHLO text"
)

register_file_frontend(
    FileFrontend(
        format="onnx",
        module="bnfold.onnx.files",
        suffix=".onnx",
        # A ModelProto's first field is ir_version (field 1, a varint): the byte 0x08.
        magic=b"\x08",
        description="an ONNX model (.onnx)",
        plural="ONNX models",
        options=("remove_initializer_inputs",),
        needs="onnx, onnx-ir and onnxruntime",
        extra="onnx",
    )
)
register_file_frontend(
    FileFrontend(
        format="pt2",
        module="bnfold.torch.pt2",
        suffix=".pt2",
        magic=b"PK\x03\x04",  # a zip archive
        description="a torch.export archive (.pt2)",
        plural="torch.export archives",
        options=("qat",),
    )
)
# StableHLO files have no magic of their own: MLIR text starts with whatever comes first
# (#loc aliases, a comment, the module), and Exported.serialize() writes a flatbuffer without a
# file identifier (its leading bytes are offsets that change with jax's schema). So they are
# known by their suffix alone; these leading bytes, which no model file has, only fill the
# registration.
register_file_frontend(
    FileFrontend(
        format="stablehlo",
        module="bnfold.stablehlo.files",
        suffix=".mlir",
        magic=b"\0bnfold: StableHLO text is known by its suffix (.mlir)\0",
        description="a StableHLO module in MLIR text (.mlir)",
        plural="StableHLO MLIR files",
        needs="jax and jaxlib",
        extra="jax",
    )
)
register_file_frontend(
    FileFrontend(
        format="jaxexport",
        module="bnfold.stablehlo.files",  # its open_file reads a .jaxexport as a program
        suffix=".jaxexport",
        magic=b"\0bnfold: jax.export programs are known by their suffix (.jaxexport)\0",
        description="a serialized jax.export program (.jaxexport)",
        plural="serialized jax.export programs",
        needs="jax and jaxlib",
        extra="jax",
    )
)


__all__ = [
    "FILE_FRONTENDS",
    "MODEL_FRONTENDS",
    "FileFold",
    "FileFrontend",
    "ModelFrontend",
    "file_frontend",
    "file_module",
    "model_frontend",
    "register_file_frontend",
    "register_model_frontend",
]
