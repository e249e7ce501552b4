"""torch.export archives (``.pt2``) for the command line: read, write, random inputs, check; and
the ``.pt2`` file frontend (:func:`open_file`, see :mod:`bnfold.core.frontend`).

Reading checks the archive before torch does, and refuses what would be silently mangled
(several programs in one archive) or dangerous: anything torch would unpickle or run as code,
and declared sizes far beyond what the file holds. Extra files travel with the program. A
program of pt2e quantization gets the ``quantized_decomposed`` ops it calls registered from
torch's own definitions (torchao is not needed).
:func:`check` runs the original and the folded program on the same random inputs, each on its
own copy of the inputs and of any state it writes, and only once every op of both programs is
on the allowlist of :mod:`bnfold.torch.aten.safe_ops` (a program read from a file is
untrusted input).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import json
import math
import operator
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from ..core.compare import CheckResult, random_array
from ..core.files import write_atomically
from ..core.frontend import model_frontend
from ..core.logs import quiet, quiet_warnings
from ..core.report import FoldReport
from ..errors import (
    BnfoldError,
    ModelFileError,
    UnsupportedModelError,
    VerificationError,
    first_line,
)
from ..torch.aten.ops import UNCHECKED_SHAPE
from ..torch.aten.safe_ops import runs_on_fake_tensors
from ..torch.verify import (
    check_outputs,
    fresh_copy,
    from_file,
    mark_from_file,
    output_tensors,
    runnable,
)

# torch.export.load logs a traceback before raising; the caller reports one line. (The last is
# named because torch makes it only when it first reads an archive.)
_TORCH_EXPORT_LOGGERS = (
    "torch.export",
    "torch.export.pt2_archive",
    "torch.export.pt2_archive._package",
)

# --verify's random inputs may take this much in all (as for ONNX models).
_MAX_INPUT_BYTES = 128 * 2**20


@dataclass
class ProgramFile:
    """A torch.export archive as read: the program and the extra files stored beside it."""

    program: ExportedProgram
    extra_files: dict[str, str]


# A .pt2 stores its members uncompressed, so an archive declaring far more data than it holds is
# a zip bomb, refused before anything is inflated. The slack lets a small archive repacked with
# compression (JSON shrinks well) through; it is not a budget for one deflated member.
_MAX_INFLATION = 8
_INFLATION_SLACK = 4 * 2**20

_TRUST_HINT = (
    "bnfold does not unpickle untrusted data (a pickle can run any code); if you trust the "
    "file, fold it in Python: bnfold.fold(torch.export.load(path))"
)

# Member names inside the archive's directory, as torch >= 2.8 writes and reads them
# (torch.export.pt2_archive.constants, not imported: older torch has no such module).
_MODELS = "models/"
_EXTRA = "extra/"
_PROGRAM = "models/model.json"
_WEIGHTS = "data/weights/"
_CONSTANTS = "data/constants/"
_WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
_CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
_SAMPLE_INPUTS = "data/sample_inputs/model.pt"
_PICKLED_WEIGHTS = "data/weights/model.pt"  # torch 2.8 and 2.9
_PICKLED_CONSTANTS = "data/constants/model.pt"
_COMPILED = "data/aotinductor/"
# torch < 2.8 wrote these at the root of the zip; torch.export.load still reads them.
_LEGACY_VERSION = "version"
_LEGACY_PROGRAM = "serialized_exported_program.json"
_LEGACY_PICKLES = {
    "serialized_state_dict.pt": "weights",
    "serialized_state_dict.json": "weights",
    "serialized_constants.pt": "constants",
    "serialized_constants.json": "constants",
}
_LEGACY_SAMPLE_INPUTS = "serialized_example_inputs.pt"
_LEGACY_EXTRA = "extra_files/"


def _inflation_limit(size: int) -> int:
    """The most a zip of ``size`` bytes may declare before it counts as a zip bomb."""
    return _MAX_INFLATION * size + _INFLATION_SLACK


def _damaged(path: str | os.PathLike[str], why: str) -> ModelFileError:
    return ModelFileError(f"{path} is a damaged torch.export archive (.pt2): {why}")


def _read(path: str | os.PathLike[str], z: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        return z.read(info)
    except Exception as e:  # noqa: BLE001 - a bad CRC, an unknown compression, encryption
        raise _damaged(path, f"cannot read {info.filename}: {first_line(e)}") from e


def _read_json(path: str | os.PathLike[str], z: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    try:
        return json.loads(_read(path, z, info))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise _damaged(path, f"{info.filename} is not JSON: {first_line(e)}") from e


def _loads_as_weights(data: bytes) -> bool:
    """Whether torch.load reads ``data`` with ``weights_only=True`` (tensors and plain
    containers, no code), without inflating more than the bytes justify.

    torch falls back to a full unpickling when this fails, so only data that passes here may
    reach it. The pre-zip format of torch.save is refused: it allocates whatever storage size
    its pickle declares before reading any of it.
    """
    if not data.startswith(b"PK\x03\x04"):
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            if sum(i.file_size for i in z.infolist()) > _inflation_limit(len(data)):
                return False
        with quiet_warnings():
            torch.load(io.BytesIO(data), weights_only=True)
    except Exception:  # noqa: BLE001 - whatever stops the weights-only reader
        return False
    return True


# Strings of the program that torch turns into code: symbolic sizes go through sympy's parser
# (an eval), guards are exec'd by ExportedProgram.module(), and names are pasted into the
# Python that torch.fx generates for the graph. Each must be plain data.
_NAME = re.compile(r"[\w.\-]*")
_PATH_NAME = re.compile(r"[\w.\-]+")
_LITERAL = re.compile(r"[\w.+\-]*")
_SYMBOL = re.compile(r"[a-z][a-z0-9_]*[0-9]")
_SYMPY_NAMES = frozenset(
    """Add Mul Pow Mod Symbol Dummy Integer Rational Float Half One Zero NegativeOne Infinity
    NegativeInfinity ComplexInfinity NaN oo zoo nan int_oo IntInfinity NegativeIntInfinity Max
    Min Abs floor ceiling sign sqrt Eq Ne Lt Le Gt Ge Equality Unequality StrictLessThan
    LessThan StrictGreaterThan GreaterThan And Or Not Xor true false True False None
    BooleanTrue BooleanFalse Piecewise ExprCondPair ITE Tuple FloorDiv ModularIndexing Where
    PythonMod CleanDiv CeilToInt FloorToInt CeilDiv IntTrueDiv FloatTrueDiv LShift RShift
    IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat
    FloatPow PowByNatural Identity""".split()
)
_SYMPY_FUNCTION = re.compile(r"(OpaqueUnaryFn|BitwiseFn)_[a-z_]+")
_GUARD_NAMES = frozenset(
    "L math torch int float bool abs min max round inf IsNonOverlappingAndDenseIndicator "
    "cast_symbool_to_symint_guardless".split()
)
_TENSOR_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_EXPRESSION_NODES = (
    ast.Expression,
    ast.Call,
    ast.keyword,
    ast.BinOp,
    ast.UnaryOp,
    ast.BoolOp,
    ast.Compare,
    ast.Tuple,
    ast.Name,
    ast.Constant,
    ast.Load,
    ast.operator,
    ast.unaryop,
    ast.boolop,
    ast.cmpop,
)


def _parse(text: str) -> ast.Expression | None:
    if len(text) > 100_000:
        return None
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _plain_constant(value: Any) -> bool:
    if isinstance(value, str):
        return _LITERAL.fullmatch(value) is not None
    return value is None or isinstance(value, (bool, int, float, complex))


# What evaluating an expression may cost. sympy and Python compute with integers of any size,
# so a short string can ask for unbounded work (``Pow(Integer(10), Integer(30000000))``,
# ``9**9**9**9``, ``1 << 10**18``, ``round(5, -10**18)``): literals are bounded, exponents and
# shifts must be small literals, powers do not nest, and an expression is at most 10,000
# characters (torch writes a few hundred).
_MAX_EXPRESSION_CHARS = 10_000
_MAX_LITERAL = 2**64
_MAX_EXPONENT = 64
_MAX_PRECISION = 1024  # bits of a sympy Float (torch writes 53)
# Calls and operators whose second operand is an exponent, a shift or a number of digits.
_POWER_CALLS = frozenset("Pow PowByNatural FloatPow LShift RShift RoundDecimal round pow".split())
_POWER_OPERATORS = (ast.Pow, ast.BitXor, ast.LShift, ast.RShift)  # sympy reads ^ as **
_MATH_FUNCTIONS = frozenset(
    """floor ceil trunc sqrt inf nan exp log log2 log10 sin cos tan asin acos atan sinh cosh
    tanh asinh acosh atanh fabs""".split()
)


def _literal_value(node: ast.AST) -> Any:
    """The number a literal node stands for (``-3``, ``Integer(3)``, ``3``), else ``None``."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal_value(node.operand)
        return -value if isinstance(node.op, ast.USub) and value is not None else value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) == 1:
        if node.func.id in ("Integer", "int") and not node.keywords:
            return _literal_value(node.args[0])
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    return None


def _small(node: ast.AST, bound: int) -> bool:
    value = _literal_value(node)
    return value is not None and abs(value) <= bound


def _is_power(node: ast.AST) -> bool:
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, _POWER_OPERATORS)
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _POWER_CALLS
    )


def _numeric_string_ok(text: str) -> bool:
    """A number written as a string (``Integer('12')``, ``Float('1e-5')``) within bounds."""
    try:
        value = float(text)
    except ValueError:
        return True  # not a number: a symbol's name
    if math.isnan(value) or (math.isinf(value) and text.strip("+-").lower() in ("inf", "infinity")):
        return True
    if not math.isfinite(value):
        return False
    try:
        return abs(int(text)) <= _MAX_LITERAL
    except ValueError:  # a float literal: its size is bounded by float's range
        return True


def _cost_is_bounded(text: str) -> bool:
    """Whether evaluating ``text`` (in sympy or Python) takes bounded time and memory."""
    tree = _parse(text) if len(text) <= _MAX_EXPRESSION_CHARS else None
    if tree is None:
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            value = node.value
            if type(value) is int and abs(value) > _MAX_LITERAL:
                return False
            if isinstance(value, str) and not _numeric_string_ok(value):
                return False
        elif _is_power(node):
            if isinstance(node, ast.BinOp):
                base, exponent = node.left, node.right
            else:
                if len(node.args) < 2 and not node.keywords:
                    continue  # round(x): no digits
                if len(node.args) != 2 or node.keywords:
                    return False
                base, exponent = node.args
            if not _small(exponent, _MAX_EXPONENT):
                return False
            if any(_is_power(inner) for inner in ast.walk(base)):
                return False  # nested powers multiply their exponents
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            # sequence repetition ("a" * n, (1,) * n) allocates n copies
            for side in (node.left, node.right):
                if isinstance(side, (ast.Tuple, ast.List)) or (
                    isinstance(side, ast.Constant) and isinstance(side.value, (str, bytes))
                ):
                    return False
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "Float":
                digits = node.args[1:] + [k.value for k in node.keywords]
                if not all(_small(d, _MAX_PRECISION) for d in digits):
                    return False
    return True


def _is_sym_expr(text: str) -> bool:
    """Whether ``text`` is a symbolic size as torch writes it (``srepr`` of sympy: calls of
    sympy's and torch's classes on numbers and symbols), which sympy can parse harmlessly."""
    tree = _parse(text)
    if tree is None:
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _EXPRESSION_NODES):
            return False
        if isinstance(node, ast.Name):
            name = node.id
            if not (name in _SYMPY_NAMES or _SYMBOL.fullmatch(name)):
                if not _SYMPY_FUNCTION.fullmatch(name):
                    return False
        elif isinstance(node, ast.Call) and not isinstance(node.func, ast.Name):
            return False
        elif isinstance(node, ast.keyword) and node.arg is None:
            return False
        elif isinstance(node, ast.Constant) and not _plain_constant(node.value):
            return False
    return True


def _is_guard(text: str) -> bool:
    """Whether ``text`` is a shape guard as torch writes it (``L['x'].size()[0] <= 64``).

    torch pastes it into a string literal of generated code, so quotes, backslashes, comments
    and line breaks are refused outright."""
    if any(c in text for c in '"\\#') or not text.isprintable():
        return False
    tree = _parse(text)
    if tree is None:
        return False
    for node in ast.walk(tree):
        if not isinstance(node, (*_EXPRESSION_NODES, ast.Attribute, ast.Subscript, ast.IfExp)):
            return False
        if isinstance(node, ast.Name) and node.id not in _GUARD_NAMES:
            return False
        if isinstance(node, ast.Attribute):
            base = node.value.id if isinstance(node.value, ast.Name) else None
            if node.attr.startswith("_") or not (
                (base == "math" and node.attr in _MATH_FUNCTIONS)
                or (base == "torch" and node.attr.startswith("sym_"))
                or (base is None and node.attr in _TENSOR_METHODS)
            ):
                return False
        elif isinstance(node, ast.Call) and (node.keywords or isinstance(node.func, ast.Call)):
            return False
        elif isinstance(node, ast.Constant) and not _plain_constant(node.value):
            return False
    return True


def _code_in_data(path: str | os.PathLike[str], what: str, text: str) -> ModelFileError:
    shown = text if len(text) <= 60 else text[:57] + "..."
    return ModelFileError(
        f"{path} holds {what} that is not plain data ({shown!r}); torch would run it as Python "
        "code, so bnfold refuses the archive (a damaged or malicious file)"
    )


def _costly(path: str | os.PathLike[str], what: str, text: str) -> ModelFileError:
    shown = text if len(text) <= 60 else text[:57] + "..."
    return ModelFileError(
        f"{path} holds {what} that could take unbounded time or memory to evaluate "
        f"({shown!r}, {len(text)} characters); torch computes it while reading or running the "
        f"program, and bnfold accepts only literals up to 2**64, exponents, shifts and digit "
        f"counts up to {_MAX_EXPONENT}, no nested powers and at most "
        f"{_MAX_EXPRESSION_CHARS} characters (a damaged or malicious file)"
    )


def _check_treespec(path: str | os.PathLike[str], key: str, text: str) -> None:
    """Refuse an input/output structure (a pytree spec) whose keys or type names are not plain
    names: torch.fx pastes the keys of keyword inputs into the generated ``forward``."""
    stack: list[Any] = [text]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            if item[:1] in ("[", "{"):  # the spec nests JSON text (each node's context)
                try:
                    stack.append(json.loads(item))
                    continue
                except (ValueError, RecursionError):
                    pass
            if not _NAME.fullmatch(item):
                raise _code_in_data(path, f"a name in the program's {key}", item)


def _check_program(path: str | os.PathLike[str], program: Any) -> None:
    """Refuse the serialized program if any string torch turns into code is not plain data."""
    stack = [program]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if isinstance(value, (dict, list)):
                stack.append(value)
            if key == "guards_code":
                guards = value if isinstance(value, list) else [value]
                for guard in guards:
                    if not isinstance(guard, str) or not _is_guard(guard):
                        raise _code_in_data(path, "a shape guard", str(guard))
                    if not _cost_is_bounded(guard):
                        raise _costly(path, "a shape guard", guard)
            elif key in ("in_spec", "out_spec") and isinstance(value, str):
                _check_treespec(path, key, value)
            elif key.endswith("names") and isinstance(value, list):  # forward_arg_names
                for name in value:
                    if not isinstance(name, str) or not _NAME.fullmatch(name):
                        raise _code_in_data(path, f"a name ({key})", str(name))
            elif not isinstance(value, str):
                continue
            elif key == "expr_str" and not _is_sym_expr(value):
                raise _code_in_data(path, "a symbolic size", value)
            elif key == "expr_str" and not _cost_is_bounded(value):
                raise _costly(path, "a symbolic size", value)
            elif key.endswith(("name", "fqn")) and not _NAME.fullmatch(value):
                raise _code_in_data(path, f"a name ({key})", value)


# The op namespace of pt2e quantization (torch.ao's and torchao's convert_pt2e): torch defines
# its ops in torch.ao.quantization.fx._decomposed, which ``import torch`` does not import, and
# torch.export.load cannot read a program calling an op nobody registered.
_QUANTIZED_TARGET = "torch.ops.quantized_decomposed."
_QUANTIZED_OPS_MODULE = "torch.ao.quantization.fx._decomposed"


def _calls_quantized_ops(program: Any) -> bool:
    """Whether a node of the serialized program (nested graphs too) calls a
    ``quantized_decomposed`` op (a node's ``target``, as torch.export writes it)."""
    stack = [program]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            target = node.get("target")
            if isinstance(target, str) and target.startswith(_QUANTIZED_TARGET):
                return True
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
    return False


def _register_quantized_ops(path: str | os.PathLike[str]) -> None:
    """Register the ``quantized_decomposed`` ops by importing torch's own module defining them
    (torch's code, nothing of the archive's; torchao imports the same module)."""
    try:
        with quiet_warnings():
            importlib.import_module(_QUANTIZED_OPS_MODULE)
    except ImportError as e:
        raise ModelFileError(
            f"{path} calls torch.ops.quantized_decomposed ops (pt2e quantization), which this "
            f"torch does not define ({_QUANTIZED_OPS_MODULE}: {first_line(e)})"
        ) from e


def _as_int(value: Any) -> int:
    n = value["as_int"] if isinstance(value, dict) else value
    if type(n) is not int or n < 0:
        raise ValueError(f"{value!r} is not a size")
    return n


def _stored_bytes(tensor_meta: Any) -> int:
    """The bytes a raw tensor's member must hold for its declared dtype, sizes, strides and
    offset."""
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    dtype = _SERIALIZE_TO_TORCH_DTYPE[tensor_meta["dtype"]]
    sizes = [_as_int(d) for d in tensor_meta["sizes"]]
    strides = [_as_int(d) for d in tensor_meta["strides"]]
    offset = _as_int(tensor_meta["storage_offset"])
    if len(sizes) != len(strides):
        raise ValueError("sizes and strides differ in length")
    if 0 in sizes:
        return 0
    return (offset + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True)) + 1) * (
        dtype.itemsize
    )


class _Members:
    """The members of a torch.export archive by their names inside its directory, looked up as
    torch's reader looks them up: ignoring case (so two names differing only in case are
    refused, as is a name Python's zipfile and torch's reader would read differently)."""

    def __init__(self, path: str | os.PathLike[str], infos: list[zipfile.ZipInfo], top: str):
        self.exact: dict[str, zipfile.ZipInfo] = {}
        self._folded: dict[str, zipfile.ZipInfo] = {}
        prefix = f"{top}/" if top else ""
        for info in infos:
            name = info.filename
            if info.orig_filename != name:  # zipfile cut it at a NUL byte, torch does not
                raise _damaged(path, f"the member name {info.orig_filename!r} is malformed")
            if not name.startswith(prefix):
                raise _damaged(path, f"{name} is outside the archive's directory {top}")
            # torch's reader hands out uninitialized memory for the data of a directory entry
            # (a name ending in "/" or the DOS directory attribute).
            if (name.endswith("/") or info.external_attr & 0x10) and info.file_size:
                raise _damaged(path, f"the directory entry {name} holds data")
            relative = name[len(prefix) :]
            if relative.lower() in self._folded:
                raise _damaged(path, f"it holds two members named {relative}")
            self.exact[relative] = info
            self._folded[relative.lower()] = info

    def find(self, name: str) -> zipfile.ZipInfo | None:
        """The member torch's reader opens for ``name``."""
        return self._folded.get(name.lower())


@dataclass
class _Plan:
    """What reading an archive takes: its extra files, the members torch must not read
    (sample inputs that only unpickling could read), emptied in a copy, and whether its program
    calls ``quantized_decomposed`` ops (which torch registers only on request)."""

    extra: list[str]
    blank: list[zipfile.ZipInfo]
    quantized: bool = False


def _payloads(
    path: str | os.PathLike[str], z: zipfile.ZipFile, members: _Members, name: str
) -> dict[str, dict[str, Any]]:
    """The entries of a weights or constants config: {fully qualified name: payload meta}."""
    info = members.find(name)
    if info is None:
        raise _damaged(path, f"{name} is missing")
    config = _read_json(path, z, info)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(m, dict) for m in entries.values()):
        raise _damaged(path, f"{name} is not a payload config")
    for fqn in entries:
        if not _NAME.fullmatch(fqn):
            raise _code_in_data(path, "a name (a state key)", fqn)
    return entries


def _check_payloads(
    path: str | os.PathLike[str],
    members: _Members,
    entries: dict[str, dict[str, Any]],
    directory: str,
    kind: str,
) -> None:
    """Refuse pickled payloads, and raw tensors declaring more bytes than their member holds
    (torch allocates what the config declares when a member is empty)."""
    widest: dict[str, tuple[int, str]] = {}  # member -> (most bytes a tensor in it uses, name)
    for fqn, meta in entries.items():
        file = meta.get("path_name")
        if not isinstance(file, str) or not _PATH_NAME.fullmatch(file):
            raise _damaged(path, f"the {kind} {fqn} has no valid path_name")
        if meta.get("use_pickle") is not False:
            raise ModelFileError(
                f"{path} stores the {kind} {fqn} as a Python pickle ({directory}{file}), as "
                f"torch does for tensor subclasses; {_TRUST_HINT}"
            )
        info = members.find(directory + file)
        if info is None:
            raise _damaged(path, f"{directory}{file} (the {kind} {fqn}) is missing")
        try:
            needed = _stored_bytes(meta["tensor_meta"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise _damaged(path, f"the {kind} {fqn} has no valid tensor_meta ({e})") from e
        if needed > info.file_size:
            raise _damaged(
                path,
                f"the {kind} {fqn} declares {needed} bytes but {directory}{file} stores "
                f"{info.file_size}; refusing it rather than allocate the difference",
            )
        if needed >= widest.get(file, (0, ""))[0]:
            widest[file] = (needed, fqn)
    for file, (needed, fqn) in widest.items():
        # torch.export.save stores a tensor without elements as an empty member; bytes under
        # tensors that all have none are damage, and torch.export.save fails on them.
        stored = members.find(directory + file)
        if needed == 0 and stored is not None and stored.file_size:
            raise _damaged(
                path,
                f"the {kind} {fqn} has no elements but {directory}{file} stores "
                f"{stored.file_size} bytes",
            )


def _check_pickled_state(
    path: str | os.PathLike[str], z: zipfile.ZipFile, info: zipfile.ZipInfo, what: str
) -> None:
    """Refuse weights or constants saved with torch.save unless they read as tensors with
    ``weights_only=True`` (torch would otherwise retry with a full unpickling)."""
    if not _loads_as_weights(_read(path, z, info)):
        raise ModelFileError(
            f"{path} stores its {what} ({info.filename}) as a pickle that only a full "
            f"unpickling reads, not as plain tensors; {_TRUST_HINT}"
        )


def _inspect_package(
    path: str | os.PathLike[str], z: zipfile.ZipFile, infos: list[zipfile.ZipInfo]
) -> _Plan:
    """Check an archive in the layout of torch >= 2.8 (all members in one directory)."""
    top = infos[0].filename.split("/", 1)[0] if infos and "/" in infos[0].filename else ""
    if not top:
        raise ModelFileError(f"{path} is not a torch.export archive (.pt2): no archive directory")
    members = _Members(path, infos, top)
    names = members.exact
    programs = sorted({n[len(_MODELS) : -len(".json")] for n in names if n.startswith(_MODELS)})
    if len(programs) > 1 or (programs and programs != ["model"]):
        raise ModelFileError(
            f"{path} holds the programs {', '.join(programs)}; bnfold folds archives "
            "of one program, as torch.export.save writes them (fold each program in Python "
            "with bnfold.fold and package them again)"
        )
    if _PROGRAM not in names:
        raise ModelFileError(f"{path} is not a torch.export archive (.pt2): it holds no program")
    if any(n.lower().startswith(_COMPILED) for n in names):
        raise ModelFileError(
            f"{path} holds AOTInductor-compiled code, which torch.export.load would load and "
            "run; bnfold reads archives of exported programs only (torch.export.save)"
        )
    # torch 2.8 and 2.9 stored the state as one torch.save pickle each; torch still reads
    # them when the exact name is listed, and the per-tensor configs otherwise.
    constants = names.get(_PICKLED_CONSTANTS)
    if constants is not None:
        _check_pickled_state(path, z, constants, "constants")
    else:
        entries = _payloads(path, z, members, _CONSTANTS_CONFIG)
        for fqn, meta in entries.items():  # torch tells a constant's kind by its file name
            file = meta.get("path_name")
            if isinstance(file, str) and not file.startswith("tensor_"):
                raise ModelFileError(
                    f"{path} holds the constant {fqn}, an object that is not a tensor "
                    f"({_CONSTANTS}{file}), which torch reads by unpickling; bnfold folds "
                    f"programs whose constants are tensors, and {_TRUST_HINT}"
                )
        _check_payloads(path, members, entries, _CONSTANTS, "constant")
    weights = names.get(_PICKLED_WEIGHTS)
    if weights is not None:
        _check_pickled_state(path, z, weights, "weights")
    else:
        entries = _payloads(path, z, members, _WEIGHTS_CONFIG)
        _check_payloads(path, members, entries, _WEIGHTS, "weight")
    program = _read_json(path, z, names[_PROGRAM])
    _check_program(path, program)
    blank = []
    sample = members.find(_SAMPLE_INPUTS)
    if sample is not None and sample.file_size and not _loads_as_weights(_read(path, z, sample)):
        blank.append(sample)
    extra = [n[len(_EXTRA) :] for n in names if n.startswith(_EXTRA) and not n.endswith("/")]
    return _Plan(extra, blank, _calls_quantized_ops(program))


def _inspect_legacy(
    path: str | os.PathLike[str], z: zipfile.ZipFile, infos: list[zipfile.ZipInfo]
) -> _Plan:
    """Check an archive in the layout of torch < 2.8 (members at the root of the zip), which
    torch reads with torch.load, falling back to a full unpickling."""
    members = _Members(path, infos, "")
    blank = []
    quantized = False
    for name, info in members.exact.items():
        if name == _LEGACY_PROGRAM:
            program = _read_json(path, z, info)
            _check_program(path, program)
            quantized = _calls_quantized_ops(program)
        elif name in _LEGACY_PICKLES:
            _check_pickled_state(path, z, info, _LEGACY_PICKLES[name])
        elif name == _LEGACY_SAMPLE_INPUTS and not _loads_as_weights(_read(path, z, info)):
            blank.append(info)
    extra = [
        n[len(_LEGACY_EXTRA) :]
        for n in members.exact
        if n.startswith(_LEGACY_EXTRA) and not n.endswith("/")
    ]
    return _Plan(extra, blank, quantized)


def _inspect(path: str | os.PathLike[str]) -> _Plan:
    """Check a .pt2 archive before torch reads it: nothing in it may make torch unpickle, run
    code, or allocate far more memory than the file's size."""
    try:
        z = zipfile.ZipFile(path)
    # NotImplementedError: a member needing a newer zip version than Python reads.
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise ModelFileError(f"{path} is not a torch.export archive (.pt2): {first_line(e)}") from e
    with z:
        infos = z.infolist()
        declared = sum(i.file_size for i in infos)
        size = os.path.getsize(path)
        if declared > _inflation_limit(size):
            raise ModelFileError(
                f"{path} declares {declared / 2**20:.0f} MiB of contents in a "
                f"{size / 2**20:.1f} MiB file; refusing to inflate it (a damaged or malicious "
                "archive)"
            )
        if any(i.filename == _LEGACY_VERSION for i in infos):
            return _inspect_legacy(path, z, infos)
        return _inspect_package(path, z, infos)


def _blanked_copy(path: str | os.PathLike[str], blank: list[zipfile.ZipInfo]) -> BinaryIO:
    """A temporary copy of the archive with the ``blank`` members empty (torch reads an empty
    sample-inputs member as none)."""
    offsets = {i.header_offset for i in blank}
    out = tempfile.TemporaryFile()
    try:
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                copy = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                if info.header_offset in offsets:
                    dst.writestr(copy, b"")
                    continue
                copy.file_size = info.file_size  # tells zipfile whether it needs zip64
                with src.open(info) as r, dst.open(copy, "w") as w:
                    shutil.copyfileobj(r, w, 2**20)
        out.seek(0)
    except Exception as e:
        out.close()
        if isinstance(e, OSError):
            raise ModelFileError(f"cannot copy {path}: {e.strerror or e}") from e
        raise _damaged(path, first_line(e)) from e
    return out


@contextlib.contextmanager
def _torch_loads_weights_only() -> Iterator[None]:
    """Make every torch.load read weights only, even one asking for ``weights_only=False``: a
    second guard behind :func:`_inspect`, should torch grow a path it does not know."""
    force, no_force = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
    saved = {k: os.environ.get(k) for k in (force, no_force)}
    os.environ[force] = "1"
    os.environ.pop(no_force, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _check_state_matches_program(path: str | os.PathLike[str], ep: ExportedProgram) -> None:
    """Refuse a weight stored with another dtype or shape than the program declares for it
    (the stored config and the program are separate members; torch compares neither)."""
    declared = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    lifted = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    for spec in ep.graph_signature.input_specs:
        if spec.kind not in lifted or spec.target is None:
            continue
        value = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
        meta = declared.get(getattr(spec.arg, "name", ""))
        if not isinstance(value, torch.Tensor) or not isinstance(meta, torch.Tensor):
            continue
        static = all(isinstance(d, int) for d in meta.shape)
        if value.dtype != meta.dtype or (static and value.shape != meta.shape):
            raise _damaged(
                path,
                f"{spec.target} is stored as {value.dtype} {list(value.shape)} but the program "
                f"declares {meta.dtype} {list(meta.shape)}",
            )


# --------------------------------------------------------------------------------------------
# Running a program on fake tensors: shapes and sizes without computing or allocating anything.
# The shape metadata of a file (node.meta["val"]) is data like any other: bnfold checks it
# against what the program computes from its inputs and weights, and --verify bounds the memory
# the program would take from what it computes, never from what the file says.

# --verify refuses a program any of whose values would take more than this (a tensor, or the
# tensors of a node returning several), or whose intermediate values alive at one time would.
_MAX_VALUE_BYTES = 2**30
_MAX_LIVE_BYTES = 2 * 2**30


# The value of a node the fake run did not compute: its op is off the allowlist (an op off
# it might act even on fake tensors), or it depends on such a node.
_UNKNOWN = object()


class _FakeRun(torch.fx.Interpreter):
    """Runs a graph on fake tensors and keeps every node's value (:data:`_UNKNOWN` for nodes
    that depend on ops off the allowlist, which are not run)."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.values: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op != "output" and (
            not runs_on_fake_tensors(n, self.module)
            or any(self.values.get(a) is _UNKNOWN for a in n.all_input_nodes)
        ):
            result = _UNKNOWN
        else:
            result = super().run_node(n)
        self.values[n] = result
        return result


def _fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=False)


def _fake_state(ep: ExportedProgram, mode: Any) -> list[Any] | None:
    """Fake copies of the program's state tensors, one per placeholder before the user inputs
    (in input-spec order); ``None`` for a program with inputs of another kind."""
    lifted = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    state = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            continue
        if spec.kind not in lifted:
            return None
        value = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
        if not isinstance(value, torch.Tensor):
            return None
        state.append(mode.from_tensor(value, static_shapes=True))
    return state


def _placeholder_args(ep: ExportedProgram, state: list[Any], user: list[Any]) -> list[Any]:
    """The values of the graph's placeholders, in input-spec order."""
    state_it, user_it = iter(state), iter(user)
    return [
        next(user_it) if spec.kind == InputKind.USER_INPUT else next(state_it)
        for spec in ep.graph_signature.input_specs
    ]


def _fake_run(ep: ExportedProgram, mode: Any, args: list[Any]) -> dict[torch.fx.Node, Any]:
    return _fake_run_graph(ep.graph_module, mode, args)


def _concrete(d: Any, bindings: dict[Any, int]) -> int | None:
    """A size as a number: an int, or a symbolic size whose symbols are all bound."""
    if isinstance(d, int):
        return d
    if isinstance(d, torch.SymInt):
        expr = d.node.expr
        if isinstance(expr, int):
            return expr
        expr = expr.xreplace(bindings)
        return int(expr) if getattr(expr, "is_Integer", False) else None
    return None


def _shown(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {list(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"({', '.join(_shown(v) for v in value)})"
    return type(value).__name__


def _agrees(stored: Any, computed: Any, bindings: dict[Any, int]) -> bool:
    """Whether the stored metadata of a node says what the program computes there: ranks,
    dtypes, and every size known on both sides (symbolic ones at the inputs' sizes)."""
    if computed is _UNKNOWN:
        return True  # not computed: the node's shape counts as unknown
    if isinstance(stored, torch.Tensor):
        if not isinstance(computed, torch.Tensor):
            return False
        if stored.dim() != computed.dim() or stored.dtype != computed.dtype:
            return False
        pairs = zip(stored.shape, computed.shape, strict=True)
        return all(
            a is None or b is None or a == b
            for a, b in ((_concrete(x, bindings), _concrete(y, {})) for x, y in pairs)
        )
    if isinstance(stored, (list, tuple)):
        if not isinstance(computed, (list, tuple)) or len(stored) != len(computed):
            return False
        return all(_agrees(a, b, bindings) for a, b in zip(stored, computed, strict=True))
    if isinstance(stored, (int, torch.SymInt)) and not isinstance(stored, bool):
        a, b = _concrete(stored, bindings), _concrete(computed, {})
        return a is None or b is None or a == b
    return True


def _spec_inputs(ep: ExportedProgram, mode: Any) -> tuple[list[Any], dict[Any, int]]:
    """Fake user inputs shaped as the input specs declare (symbolic sizes as --verify picks
    them), and the values given to the symbols of the declared sizes."""
    from torch.export.graph_signature import ConstantArgument

    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    user: list[Any] = []
    bindings: dict[Any, int] = {}

    def size(d: Any) -> int:
        n = _size(d, ep)
        if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol:
            bindings[d.node.expr] = n
        return n

    for spec in ep.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        if isinstance(spec.arg, ConstantArgument):
            user.append(spec.arg.value)
            continue
        val = vals.get(spec.arg.name)
        if isinstance(val, torch.Tensor):
            shape = [size(d) for d in val.shape]
            with mode:
                user.append(torch.empty(shape, dtype=val.dtype, device=val.device))
        elif isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
            user.append(size(val))
        else:
            user.append(val)
    return user, bindings


def _check_shapes(path: str | os.PathLike[str], ep: ExportedProgram) -> None:
    """Refuse a program whose shape metadata says otherwise than the program computes.

    bnfold decides folds from ``node.meta["val"]`` (a Linear's output rank decides where its
    channels are), and a file's metadata is not checked by torch: the graph is run on fake
    tensors (no values, nothing allocated) from the input specs and the stored weights, and
    every node's stored value must agree with the computed one.
    """
    mode = _fake_mode()
    try:
        state = _fake_state(ep, mode)
        if state is None:
            return  # inputs of other kinds (tokens, script objects): nothing is folded from them
        user, bindings = _spec_inputs(ep, mode)
        computed = _fake_run(ep, mode, _placeholder_args(ep, state, user))
    except (BnfoldError, MemoryError, RecursionError):
        raise
    except Exception as e:  # noqa: BLE001 - whatever the program makes torch raise
        raise ModelFileError(
            f"{path} holds a program bnfold cannot check: it fails on fake inputs shaped as it "
            f"declares ({type(e).__name__}: {first_line(e)}), so its shape metadata cannot be "
            "trusted"
        ) from e
    for node, value in computed.items():
        stored = node.meta.get("val")
        if value is _UNKNOWN:
            node.meta[UNCHECKED_SHAPE] = True  # its shape counts as unknown (no fold relies on it)
        elif stored is not None and not _agrees(stored, value, bindings):
            raise _damaged(
                path,
                f"its metadata declares node {node.name} as {_shown(stored)}, but the program "
                f"computes {_shown(value)} there; bnfold decides folds from shapes and refuses "
                "metadata that disagrees with the program",
            )


def _upper(d: Any, shape_env: Any) -> int | None:
    """The most a size can be: its value, or for a size that depends on the data (``nonzero``,
    ``item``) the upper end of its range; ``None`` when nothing bounds it."""
    n = _concrete(d, {})
    if n is not None or not isinstance(d, torch.SymInt):
        return n
    from torch.utils._sympy.value_ranges import bound_sympy

    try:
        upper = bound_sympy(d.node.expr, shape_env.var_to_range).upper
        return int(upper) if upper.is_finite else None
    except Exception:  # noqa: BLE001 - a range sympy cannot bound
        return None


def _value_bytes(value: Any, shape_env: Any) -> int | None:
    """Bytes of the tensors in a node's value (``None``: unbounded)."""
    if value is _UNKNOWN:
        return None
    if isinstance(value, torch.Tensor):
        numel = 1
        for d in value.shape:
            n = _upper(d, shape_env)
            if n is None:
                return None
            numel *= n
        return numel * value.dtype.itemsize
    if isinstance(value, (list, tuple)):
        total = 0
        for v in value:
            n = _value_bytes(v, shape_env)
            if n is None:
                return None
            total += n
        return total
    return 0


def _is_view(node: torch.fx.Node) -> bool:
    """Whether ``node`` returns views of its arguments (its value takes no new memory)."""
    t = node.target
    if t is operator.getitem:
        return True
    return isinstance(t, torch._ops.OpOverload) and any(
        r.alias_info is not None for r in t._schema.returns
    )


def _subgraph_calls(
    node: torch.fx.Node, gm: torch.fx.GraphModule, values: dict[torch.fx.Node, Any]
) -> list[tuple[torch.fx.GraphModule, list[Any]]] | None:
    """The graphs a higher-order op runs at ``node`` with the fake values it runs them on
    (one iteration of a loop over slices); ``None`` for an op bnfold cannot follow."""

    def graph(arg: Any) -> torch.fx.GraphModule:
        return getattr(gm, arg.target)

    def val(arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            return values[arg]
        if isinstance(arg, (list, tuple)):
            return [val(a) for a in arg]
        return arg

    def first_slices(xs: Any) -> list[Any]:
        return [x.select(0, 0) if isinstance(x, torch.Tensor) else x for x in val(xs)]

    name = node.target.name()
    a = node.args
    if name == "cond":
        operands = val(a[3])
        return [(graph(a[1]), operands), (graph(a[2]), operands)]
    if name == "invoke_subgraph":
        return [(graph(a[0]), val(list(a[2:])))]
    if name == "wrap_with_set_grad_enabled":
        return [(graph(a[1]), val(list(a[2:])))]
    if name == "wrap_with_autocast":
        return [(graph(a[4]), val(list(a[5:])))]
    if name == "map_impl":
        return [(graph(a[0]), first_slices(a[1]) + val(a[2]))]
    if name == "scan":
        return [(graph(a[0]), val(a[1]) + first_slices(a[2]) + val(a[3]))]
    return None


class _TooLarge(Exception):
    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def _peak_bytes(
    gm: torch.fx.GraphModule, values: dict[torch.fx.Node, Any], mode: Any, where: str
) -> int:
    """The most memory the intermediate values of ``gm``'s graph take at one time (placeholders
    excluded: inputs and state exist already); raises :class:`_TooLarge`."""
    nodes = list(gm.graph.nodes)
    last_use: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            last_use[arg] = node
    sizes: dict[torch.fx.Node, int] = {}
    live = peak = 0
    for node in nodes:
        if node.op == "call_function":
            value = values.get(node)
            n = 0 if _is_view(node) else _value_bytes(value, mode.shape_env)
            if n is None:
                raise _TooLarge(
                    f"the size of node {where}{node.name} ({_shown(value)}) depends on the data "
                    "and nothing bounds it"
                )
            if n > _MAX_VALUE_BYTES:
                raise _TooLarge(
                    f"node {where}{node.name} makes {_shown(value)}, {n / 2**30:.2f} GiB, and "
                    f"--verify runs programs whose values take at most "
                    f"{_MAX_VALUE_BYTES // 2**30} GiB each"
                )
            inner = 0
            if isinstance(node.target, torch._ops.HigherOrderOperator):
                calls = _subgraph_calls(node, gm, values)
                if calls is None:
                    raise _TooLarge(f"bnfold cannot bound what node {where}{node.name} allocates")
                for sub, args in calls:
                    sub_values = _fake_run_graph(sub, mode, args)
                    inner = max(inner, _peak_bytes(sub, sub_values, mode, f"{where}{node.name}."))
            sizes[node] = n
            live += n
            peak = max(peak, live + inner)
            if peak > _MAX_LIVE_BYTES:
                raise _TooLarge(
                    f"its intermediate values would take {peak / 2**30:.2f} GiB at once (at node "
                    f"{where}{node.name}), and --verify runs programs whose values take at most "
                    f"{_MAX_LIVE_BYTES // 2**30} GiB at a time"
                )
        for arg in node.all_input_nodes:
            if last_use.get(arg) is node:
                live -= sizes.pop(arg, 0)
    return peak


def _fake_run_graph(gm: torch.fx.GraphModule, mode: Any, args: list[Any]) -> dict:
    with quiet_warnings(), mode:
        run = _FakeRun(gm)
        run.run(*args, enable_io_processing=False)
    return run.values


def check_memory(program: ExportedProgram, args: tuple, kwargs: dict) -> None:
    """Raise :class:`VerificationError` if running ``program`` on ``(args, kwargs)`` would make
    a value over 1 GiB, or intermediate values over 2 GiB at one time, found by running it on
    fake tensors of the inputs' shapes (nothing computed, nothing allocated)."""
    import torch.utils._pytree as pytree

    mode = _fake_mode()
    try:
        state = _fake_state(program, mode)
        if state is None:
            raise VerificationError(
                "cannot verify: the program takes inputs other than tensors and its state"
            )
        leaves = pytree.tree_flatten((args, kwargs))[0]
        user = [
            mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x
            for x in leaves
        ]
        values = _fake_run(program, mode, _placeholder_args(program, state, user))
        _peak_bytes(program.graph_module, values, mode, "")
    except _TooLarge as e:
        raise VerificationError(
            f"cannot verify: {e.why}; fold without --verify, and compare the programs on inputs "
            "of your own with bnfold.verify(original, folded, inputs)"
        ) from e
    except (BnfoldError, MemoryError, RecursionError):
        raise
    except Exception as e:  # noqa: BLE001 - whatever the program makes torch raise
        raise VerificationError(
            f"cannot verify: the program fails on fake inputs of the shapes --verify would use "
            f"({type(e).__name__}: {first_line(e)}), so bnfold cannot bound the memory it takes; "
            "fold without --verify"
        ) from e


def load(path: str | os.PathLike[str]) -> ProgramFile:
    """Read a torch.export archive (.pt2) holding one program, with its extra files.

    The archive is checked before torch reads it. Raises :class:`ModelFileError` for anything
    else: not an archive, damaged, several programs (bnfold would silently drop all but one),
    anything torch would unpickle or run as code, or a program torch cannot read. Sample inputs
    that only unpickling could read, or unlike the program's input specs, are dropped (random
    inputs then come from the input specs). A program calling ``quantized_decomposed`` ops (pt2e
    quantization) has them registered first, from torch's own definitions
    (``torch.ao.quantization.fx._decomposed``; torchao is not needed). The program is marked as
    read from a file: it is run only after :func:`bnfold.torch.aten.safe_ops.check_program`.
    """
    plan = _inspect(path)
    if plan.quantized:
        _register_quantized_ops(path)
    extra = dict.fromkeys(plan.extra, "")
    try:
        with contextlib.ExitStack() as stack:
            f = stack.enter_context(
                _blanked_copy(path, plan.blank) if plan.blank else open(path, "rb")
            )
            stack.enter_context(quiet(*_TORCH_EXPORT_LOGGERS))
            stack.enter_context(_torch_loads_weights_only())
            ep = torch.export.load(f, extra_files=extra)
    except ModelFileError:
        raise
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror or e}") from e
    except Exception as e:  # noqa: BLE001 - whatever a damaged archive makes torch raise
        raise ModelFileError(
            f"{path} is not a readable torch.export archive (.pt2): {type(e).__name__}: "
            f"{first_line(e)}"
        ) from e
    if not isinstance(ep, ExportedProgram):
        raise ModelFileError(f"{path} holds a {type(ep).__name__}, not an ExportedProgram")
    _check_state_matches_program(path, ep)
    _check_shapes(path, ep)
    # torch lists a directory entry under extra/ as a file named "" or "x/", which
    # torch.export.save cannot write back; it is not a file.
    extra = {k: v for k, v in extra.items() if k and not k.endswith("/")}
    for name, value in ep.constants.items():
        if not isinstance(value, torch.Tensor):
            raise ModelFileError(
                f"{path} holds the constant {name}, a {type(value).__name__} (not a tensor); "
                "bnfold folds programs whose constants are tensors"
            )
    if ep.example_inputs is not None and not _examples_fit(ep):
        # torch.export pairs them with the program's inputs (ep.module() binds them to its
        # signature): sample inputs unlike the declared ones would break it. They are only data.
        ep.example_inputs = None
    mark_from_file(ep)
    return ProgramFile(ep, extra)


def save(ep: ExportedProgram, f: BinaryIO, extra_files: dict[str, str] | None = None) -> None:
    """Write ``ep`` (and ``extra_files``) as a torch.export archive to the binary file ``f``."""
    with quiet_warnings():
        try:
            torch.export.save(ep, f, extra_files=extra_files or None)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - a program torch read but cannot write back
            raise ModelFileError(
                f"torch.export.save cannot write this program ({type(e).__name__}: "
                f"{first_line(e)}); the archive holds values torch does not round-trip"
            ) from e


def _random_values(
    shape: list[int], dtype: torch.dtype, device: torch.device, rng: np.random.Generator
) -> torch.Tensor:
    """Random values for an input the program kept no example of, by the rule of
    :func:`bnfold.core.compare.random_array`; a type numpy lacks (bfloat16, float8) is drawn as
    float32 (complex32 as complex64) and rounded, as that rule does for narrow floats."""
    if dtype.is_floating_point and dtype not in (torch.float16, torch.float32, torch.float64):
        drawn: Any = np.float32
    elif dtype == torch.complex32:
        drawn = np.complex64
    else:
        drawn = torch.empty(0, dtype=dtype).numpy().dtype
    return torch.from_numpy(random_array(drawn, shape, rng)).to(device, dtype)


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


def _in_range(d: torch.SymInt, n: int, ep: ExportedProgram) -> bool:
    """Whether ``n`` may stand for the symbolic size ``d`` (a bare symbol within its range;
    sizes derived from others are left to the program's own checks)."""
    expr = d.node.expr
    vr = ep.range_constraints.get(expr) if expr.is_Symbol else None
    if vr is None:
        return n >= 0
    return bool(vr.lower <= n) and bool(n <= vr.upper)


@dataclass(frozen=True)
class _Input:
    """How to make one user input: a tensor (shape, dtype, device, and an integer example to
    keep), or a plain value."""

    shape: tuple[int, ...] = ()
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    example: torch.Tensor | None = None
    value: Any = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize if self.dtype is not None else 0

    def make(self, rng: np.random.Generator) -> Any:
        if self.dtype is None:
            return self.value
        if self.example is not None:
            return self.example.clone()
        return _random_values(list(self.shape), self.dtype, self.device, rng)


def _declared_inputs(ep: ExportedProgram) -> list[tuple[str, Any]]:
    """(name, declared value) of each user input in call order: a tensor's fake value, a
    symbolic or static int, or a constant argument's value."""
    from torch.export.graph_signature import ConstantArgument

    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    declared: list[tuple[str, Any]] = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        arg = spec.arg
        if isinstance(arg, ConstantArgument):
            declared.append((arg.name, arg.value))
            continue
        val = vals.get(arg.name)
        if isinstance(val, torch.Tensor) and val.device.type == "meta":
            raise VerificationError(
                f"cannot verify: the program input {arg.name} is on the meta device, which "
                "holds no values to compare; fold without --verify"
            )
        if not isinstance(val, (torch.Tensor, torch.SymInt, int)):
            raise UnsupportedModelError(
                f"cannot make a random value for the program input {arg.name} "
                f"({type(val).__name__}); verify it in Python with bnfold.verify"
            )
        declared.append((arg.name, val))
    return declared


def _example_fits(want: Any, got: Any, ep: ExportedProgram) -> bool:
    """Whether the stored example ``got`` is a value the program declares as ``want``."""
    if isinstance(want, torch.Tensor):
        if type(got) not in (torch.Tensor, nn.Parameter) or got.layout != torch.strided:
            return False
        if (got.dtype, got.device, got.dim()) != (want.dtype, want.device, want.dim()):
            return False
        return all(
            n == d if isinstance(d, int) else _in_range(d, n, ep)
            for d, n in zip(want.shape, got.shape, strict=True)
        )
    if isinstance(want, torch.SymInt):
        return type(got) is int and _in_range(want, got, ep)
    return type(got) is type(want) and got == want


def _from_examples(ep: ExportedProgram, declared: list[tuple[str, Any]]) -> list[_Input] | None:
    """Inputs shaped like the program's stored examples, or ``None`` when it kept none or they
    are not what its input specs declare (an archive's sample inputs are only data)."""
    import torch.utils._pytree as pytree

    if ep.example_inputs is None:
        return None
    try:
        leaves, spec = pytree.tree_flatten(ep.example_inputs)
        if spec != ep.call_spec.in_spec or len(leaves) != len(declared):
            return None
    except Exception:  # noqa: BLE001 - whatever the weights-only reader produced
        return None
    inputs = []
    for (_, want), got in zip(declared, leaves, strict=True):
        if not _example_fits(want, got, ep):
            return None
        if not isinstance(got, torch.Tensor):
            inputs.append(_Input(value=got))
            continue
        keep = not (got.is_floating_point() or got.is_complex())  # indices and masks
        inputs.append(_Input(tuple(got.shape), got.dtype, got.device, got if keep else None))
    return inputs


def _examples_fit(ep: ExportedProgram) -> bool:
    """Whether the program's stored example inputs are what its input specs declare."""
    try:
        return _from_examples(ep, _declared_inputs(ep)) is not None
    except BnfoldError:  # inputs bnfold cannot describe: no example can be checked
        return False


def _from_specs(ep: ExportedProgram, declared: list[tuple[str, Any]]) -> list[_Input]:
    """Inputs built from the input specs, symbolic sizes at small values inside their ranges."""
    inputs = []
    for name, val in declared:
        try:
            if isinstance(val, torch.Tensor):
                shape = tuple(_size(d, ep) for d in val.shape)
                if any(n < 0 for n in shape):
                    raise ValueError(f"negative size {list(shape)}")
                inputs.append(_Input(shape, val.dtype, val.device))
            elif isinstance(val, (torch.SymInt, int)):
                inputs.append(_Input(value=_size(val, ep)))
            else:
                inputs.append(_Input(value=val))
        except (TypeError, ValueError, AttributeError, OverflowError) as e:
            raise VerificationError(
                f"cannot verify: no size for the program input {name} follows from its "
                f"declared shape ({first_line(e)}); fold without --verify"
            ) from e
    return inputs


def _within_budget(inputs: list[_Input]) -> bool:
    return sum(i.nbytes for i in inputs) <= _MAX_INPUT_BYTES


def sample_inputs(ep: ExportedProgram, seed: int = 0) -> tuple[tuple, dict]:
    """Random ``(args, kwargs)`` for ``ep.module()``: shaped like the program's example inputs
    when it kept ones matching its input specs (and within --verify's budget), else built from
    its input specs (symbolic sizes at small values).

    Nothing is allocated before the inputs' sizes are known to total at most 128 MiB; beyond
    that :class:`VerificationError` is raised.
    """
    import torch.utils._pytree as pytree

    declared = _declared_inputs(ep)
    inputs = _from_examples(ep, declared)
    if inputs is None or not _within_budget(inputs):
        inputs = _from_specs(ep, declared)
    if not _within_budget(inputs):
        total = sum(i.nbytes for i in inputs)
        biggest = max((i for i in inputs if i.dtype is not None), key=lambda i: i.nbytes)
        raise VerificationError(
            f"cannot verify: the program's inputs take {total / 2**30:.2f} GiB (one is "
            f"{biggest.dtype} {list(biggest.shape)}), and --verify makes at most "
            f"{_MAX_INPUT_BYTES // 2**20} MiB of random inputs; fold without --verify, and "
            "compare the programs on inputs of your own with bnfold.verify(original, folded, "
            "inputs)"
        )
    rng = np.random.default_rng(seed)
    flat = [i.make(rng) for i in inputs]
    args, kwargs = pytree.tree_unflatten(flat, ep.call_spec.in_spec)
    return tuple(args), dict(kwargs)


def _cannot_run_original(e: BaseException) -> VerificationError:
    return VerificationError(
        f"cannot verify: the original program fails on random inputs shaped as it declares "
        f"({type(e).__name__}: {first_line(e)}); fold without --verify, and compare the "
        "programs on inputs of your own with bnfold.verify(original, folded, inputs)"
    )


def _outputs(
    module: nn.Module, args: tuple, kwargs: dict, folded: bool
) -> list[tuple[str, torch.Tensor]]:
    """The output tensors of ``module`` on its own copy of the inputs; a failure is a one-line
    :class:`VerificationError` (the inputs are made here, so a failure is no bnfold bug unless
    the folded program fails where the original ran)."""
    try:
        with torch.no_grad():
            return output_tensors(module(*fresh_copy(args), **fresh_copy(kwargs)))
    except (BnfoldError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - whatever the program raises on these inputs
        if not folded:
            raise _cannot_run_original(e) from e
        raise VerificationError(
            f"the folded program fails on inputs the original runs ({type(e).__name__}: "
            f"{first_line(e)}); please report this bnfold bug with the program"
        ) from e


def check(original: ExportedProgram, folded: ExportedProgram, seed: int = 0) -> CheckResult:
    """Run both programs on the same random inputs (each on its own copy) and compare.

    When either was read from a file, both must pass the allowlist before either runs. A
    program that cannot be run or compared on the inputs bnfold can make raises a one-line
    :class:`VerificationError`.
    """
    untrusted = from_file(original) or from_file(folded)
    modules = []
    for program in (original, folded):
        try:
            modules.append(runnable(program, untrusted))
        except (BnfoldError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - a program torch read but cannot make runnable
            raise _cannot_run_original(e) from e
    args, kwargs = sample_inputs(original, seed)
    if untrusted:
        for program in (original, folded):
            check_memory(program, args, kwargs)
    a = _outputs(modules[0], args, kwargs, folded=False)
    b = _outputs(modules[1], args, kwargs, folded=True)
    try:
        return check_outputs(a, b)
    except (BnfoldError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - outputs that cannot be compared (meta tensors)
        raise VerificationError(
            f"cannot verify: the programs' outputs cannot be compared ({type(e).__name__}: "
            f"{first_line(e)}); fold without --verify"
        ) from e


# ---------------------------------------------------------------------------------------------
# The .pt2 file frontend of the command line (bnfold.core.frontend)


class Pt2FileFold:
    """A torch.export archive through the command line's steps
    (:class:`bnfold.core.frontend.FileFold`); the extra files travel with the program."""

    verified_where = "on random inputs"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.loaded = load(path)
        self.folded: ExportedProgram | None = None
        self.qat = "exact"

    def check_output(self, output: str | os.PathLike[str]) -> None:
        """Nothing beyond :func:`bnfold.core.files.check_output`: an archive is one file."""

    def prepare(self, *, qat: str | None = None, **options: Any) -> list[str]:
        """Keep ``qat`` (``--qat``: where the BatchNorm of a pt2e QAT chain goes; ``None``, not
        given, is ``"exact"``) for the fold; nothing changes before it."""
        if options:
            raise TypeError(f"unknown options {sorted(options)}")
        if qat is not None:
            self.qat = qat
        return []

    def fold(self, producers: list[str] | None, affine: bool = True) -> FoldReport:
        """Fold the program into a new one, with the model frontend that takes it
        (:mod:`bnfold.core.frontend`: :func:`bnfold.torch.export.fold`), in the ``qat`` mode
        :meth:`prepare` kept; ``affine`` as for :func:`bnfold.fold`."""
        self.folded, report = model_frontend(self.loaded.program).fold(
            self.loaded.program,
            producers=producers,
            return_report=True,
            qat=self.qat,
            affine=affine,
        )
        return report

    def check(self, seed: int) -> CheckResult:
        """:func:`check` of the original program against the folded one."""
        return check(self.loaded.program, self._folded(), seed)

    def save(self, output: str | os.PathLike[str]) -> None:
        """Write the folded program and the extra files atomically (torch's zip writer cannot
        survive a failed write, so failures are held back until it returns)."""
        folded, extra = self._folded(), self.loaded.extra_files
        write_atomically(output, lambda f: save(folded, f, extra), hold_back_errors=True)

    def _folded(self) -> ExportedProgram:
        if self.folded is None:
            raise RuntimeError("fold() comes before check() and save()")
        return self.folded


def open_file(path: str | os.PathLike[str]) -> Pt2FileFold:
    """Read the torch.export archive ``path`` for the command line (the file frontend's
    entry)."""
    return Pt2FileFold(path)


__all__ = [
    "ProgramFile",
    "load",
    "save",
    "sample_inputs",
    "check",
    "CheckResult",
    "runnable",
    "from_file",
    "check_memory",
    "Pt2FileFold",
    "open_file",
]
