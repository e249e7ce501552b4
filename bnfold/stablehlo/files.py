"""StableHLO model files for the command line: MLIR text (``.mlir``) and serialized
``jax.export`` programs (``.jaxexport``, the bytes of ``Exported.serialize()``); the file
frontend of both (:func:`open_file`, see :mod:`bnfold.core.frontend`).

A model file is untrusted input, and jaxlib's readers are not hardened against it: MLIR's
bytecode reader (a program's portable artifact) crashes, aborts, corrupts the heap or never
returns on some damaged bytes; its text parser overflows the stack on a few kilobytes of deeply
nested text; the Python bindings abort the process reading a string of the module that is not
UTF-8 (a location's name); ``jax.export.deserialize`` aborts in XLA on a damaged legacy
``HloSharding`` proto and spends exponential time on a pytree whose nodes share children. So
nothing of a file reaches jaxlib in this process before it has been read elsewhere:

* the module (the text, or the program's portable artifact) is read first by a *reader
  process*: a fresh interpreter importing only jaxlib's MLIR bindings, with a time limit and a
  memory cap, which parses and verifies it, refuses ops outside the StableHLO dialects and
  strings that are not UTF-8, and writes it back as MLIR itself prints it (text) or as
  ``jax.export`` writes it (bytecode). Only what the reader wrote is read here; its crash, hang
  or exhausted memory is a one-line :class:`ModelFileError`;
* a program's flatbuffer is walked here first with bounds checks (pure Python, as
  ``jax.export.deserialize`` is, which raises only Python exceptions on damaged bytes): the
  pytrees' sizes and the chain of VJPs are bounded before jax builds them, and legacy
  ``HloSharding`` protos are refused.

``--verify`` runs the original and the folded module with XLA on the CPU, after
:func:`bnfold.stablehlo.run.refuse_unsafe` on both (no custom calls, no host transfers), and
only programs without effects, lowered for the CPU and one device, whose intermediate results
fit :data:`MAX_RUN_BYTES`. Writing is atomic (:mod:`bnfold.core.files`): text as MLIR prints
it, a program as ``Exported.serialize()`` writes it (with the VJPs the input held).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax  # noqa: F401 - what this frontend needs (bnfold.core.frontend names it if missing)
import numpy as np

from ..core.compare import CheckResult, compare_arrays
from ..core.files import write_atomically
from ..core.report import FoldReport
from ..errors import (
    BnfoldError,
    ModelFileError,
    UnsupportedModelError,
    VerificationError,
    first_line,
)
from . import fold as hlo_fold
from . import mlir, run
from .constants import np_dtype, ranked

MLIR_SUFFIX = ".mlir"
EXPORTED_SUFFIX = ".jaxexport"

# The reader process gets this long, plus a second per 10 MB of input, and this much memory
# beyond what it has after importing jaxlib, plus 8 bytes per byte of input.
READ_SECONDS = 10.0
READ_SECONDS_PER_BYTE = 1e-7
READ_MEMORY = 2 * 2**30
READ_MEMORY_PER_BYTE = 8

# Bounds of a program's flatbuffer, checked before jax builds it: nodes of each pytree (a node
# may be shared by many parents, each a node of the tree jax builds) and VJPs held.
MAX_PYTREE_NODES = 100_000
MAX_VJP_ORDER = 8

# --verify makes at most this much of random inputs (as for the other formats), and refuses a
# module whose results, all ops together, take more than MAX_RUN_BYTES (an upper bound of the
# values running it makes: a file may not make it allocate what it does not hold).
MAX_INPUT_BYTES = 128 * 2**20
MAX_RUN_BYTES = 2 * 2**30

# The dialects of a module bnfold reads (the ops JAX and other StableHLO producers emit).
DIALECTS = ("builtin", "func", "stablehlo", "chlo", "mhlo", "sdy", "shape", "arith", "tensor")

# ---------------------------------------------------------------------------------------------
# The reader process

# Run as ``python -c``: reads the module from stdin, writes "ok\n" and the module as MLIR writes
# it, or "error <one line>", to stdout. Imports nothing but jaxlib's MLIR bindings (a fraction
# of jax's start-up time); the context has every dialect jaxlib links, JAX's included.
_READER = r"""
import sys
sys.path[:] = [p for p in sys.path if p not in ("", ".")]  # nothing from the working directory


def reply(head, body=b""):
    sys.stdout.buffer.write(head.encode("utf-8", "replace") + b"\n" + body)
    sys.stdout.flush()
    raise SystemExit(0)


def one_line(text):
    return " ".join(str(text).split())[:300]


kind, memory, debug_info, allowed = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
data = sys.stdin.buffer.read()
try:
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import stablehlo as hlo
except ImportError as e:
    reply("error jaxlib's MLIR bindings cannot be imported: " + one_line(e))
try:  # the memory cap: the address space after the imports, plus the budget (Linux)
    import resource

    with open("/proc/self/status") as f:
        size = next((int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:")), 0)
    if size and memory:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = size + memory if hard == resource.RLIM_INFINITY else min(size + memory, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
except (ImportError, OSError, ValueError):
    pass
try:  # the dialects of jax's make_ir_context, registered without importing jax (seconds)
    from jaxlib.mlir._mlir_libs import _jax_mlir_ext

    ctx = ir.Context()
    registry = ir.DialectRegistry()
    _jax_mlir_ext.register_dialects(registry)  # func, arith, ... (upstream MLIR)
    ctx.append_dialect_registry(registry)
    ctx.load_all_available_dialects()
    for module_name, function in (
        ("sdy", "register_dialect"),
        ("mpmd", "register_dialect"),
        ("mhlo", "register_mhlo_dialect"),
        ("chlo", "register_dialect"),
    ):
        try:
            mod = __import__("jaxlib.mlir.dialects." + module_name, fromlist=[function])
        except ImportError:
            continue
        getattr(mod, function)(ctx)
    hlo.register_dialect(ctx)
except ImportError:  # a jaxlib without it: jax's own context
    from jax.interpreters import mlir as jax_mlir

    ctx = jax_mlir.make_ir_context()
ctx.enable_multithreading(False)
diagnostics = []


def keep(d):
    diagnostics.append(one_line(d.message))
    return True


ctx.attach_diagnostic_handler(keep)


def why(e):
    said = one_line(e)
    if diagnostics and (not said or "failed to deserialize" in said or said.endswith(":")):
        return diagnostics[0]
    return said or (diagnostics[0] if diagnostics else type(e).__name__)


with ctx, ir.Location.unknown():
    try:
        if kind == "text":
            module = ir.Module.parse(data.decode("utf-8"))
        else:
            module = hlo.deserialize_portable_artifact(ctx, data)
            if module is None:
                raise ValueError("")
        module.operation.verify()
    except Exception as e:
        reply("error " + why(e))
    dialects = tuple(allowed.split(","))
    stack = [module.operation]
    while stack:
        op = stack.pop()
        name = op.name
        if name.split(".")[0] not in dialects:
            reply("dialect " + name)
        for region in op.regions:
            for block in region.blocks:
                stack.extend(inner.operation for inner in block.operations)
    # MLIR strings are bytes, and the Python bindings abort the process (nanobind's conversion
    # error, thrown where it cannot be caught) reading one that is not UTF-8: a location's name,
    # an attribute. The printer escapes every byte outside printable ASCII, so the strings are
    # checked in the printed module (large constants elided).
    import re

    printed = module.operation.get_asm(
        enable_debug_info=True, print_generic_op_form=True, large_elements_limit=16
    )
    escape = re.compile(rb"\\([0-9A-Fa-f]{2}|.)", re.S)
    for literal in re.finditer(r'"((?:[^"\\]|\\.)*)"', printed):
        raw = escape.sub(
            lambda m: bytes([int(m.group(1), 16)]) if len(m.group(1)) == 2 else m.group(1),
            literal.group(1).encode("utf-8"),
        )
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            reply("error it holds a string that is not UTF-8 text: " + literal.group(0)[:80])
    try:
        if kind == "text":
            out = module.operation.get_asm(enable_debug_info=debug_info).encode("utf-8")
        else:
            version = hlo.get_current_version()
            try:  # as jax.export writes artifacts (Shardy shardings kept)
                from jaxlib import _jax
                write = lambda m: _jax.mlir.serialize_portable_artifact(m, version, True)
            except (ImportError, AttributeError):
                write = lambda m: hlo.serialize_portable_artifact(m, version)
            out = bytes(write(module))
    except Exception as e:
        reply("error MLIR cannot write the module back: " + why(e))
reply("ok", out)
"""


def _read_in_reader(path: Path, kind: str, data: bytes, debug_info: bool = False) -> bytes:
    """``data`` read by the reader process (``kind``: ``"text"`` or ``"artifact"``); what it
    wrote back. A one-line :class:`ModelFileError` when it refuses the module, crashes, runs out
    of time or memory."""
    what = {
        "text": f"{path} is not a StableHLO module in MLIR text",
        "artifact": f"{path}: the program's StableHLO module cannot be read",
    }[kind]
    seconds = READ_SECONDS + READ_SECONDS_PER_BYTE * len(data)
    memory = READ_MEMORY + READ_MEMORY_PER_BYTE * len(data)
    argv = [sys.executable, "-c", _READER, kind, str(memory), "1" if debug_info else "0"]
    argv.append(",".join(DIALECTS))
    try:
        done = subprocess.run(argv, input=data, capture_output=True, timeout=seconds, check=False)
    except subprocess.TimeoutExpired:
        raise ModelFileError(
            f"{what}: jaxlib's reader did not finish in {seconds:.0f} s (stopped); the file is "
            "damaged, or not what its name says"
        ) from None
    except OSError as e:
        raise ModelFileError(
            f"cannot read {path}: the reader process cannot start ({e.strerror or e})"
        ) from e
    head, _, body = done.stdout.partition(b"\n")
    line = head.decode("utf-8", "replace")
    if done.returncode == 0 and line == "ok":
        return body
    if done.returncode == 0 and line.startswith("dialect "):
        op = line.removeprefix("dialect ")
        raise ModelFileError(
            f"{path} holds the op {op!r} of the {op.split('.')[0]} dialect: bnfold reads "
            f"StableHLO modules (ops of {', '.join(DIALECTS[1:])})"
        )
    if done.returncode == 0 and line.startswith("error "):
        raise ModelFileError(f"{what}: {line.removeprefix('error ')}")
    said = done.stderr.decode("utf-8", "replace").strip().splitlines()
    if any("MemoryError" in s or "std::bad_alloc" in s for s in said):
        raise ModelFileError(
            f"{what}: reading it takes more than {memory / 2**30:.1f} GiB of memory; the file "
            "is damaged, or not what its name says"
        )
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        raise ModelFileError(
            f"{what}: jaxlib's reader crashed on it ({name}); the file is damaged, or not what "
            "its name says"
        )
    raise ModelFileError(
        f"{what}: jaxlib's reader failed (exit status {done.returncode}"
        + (f": {' '.join(said[-1].split())[:200]})" if said else ")")
    )


# ---------------------------------------------------------------------------------------------
# Reading


def _read_bytes(path: str | os.PathLike[str], what: str) -> bytes:
    p = Path(path)
    try:
        st = p.stat()
        if stat.S_ISDIR(st.st_mode):
            raise ModelFileError(f"{p} is a directory, not a model file")
        if not stat.S_ISREG(st.st_mode):
            raise ModelFileError(f"{p} is not a regular file")
        data = p.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(f"{p}: no such file") from None
    except OSError as e:
        raise ModelFileError(f"cannot read {p}: {e.strerror or e}") from e
    if not data:
        raise ModelFileError(f"{p} is empty (0 bytes), not {what}")
    return data


def read_text(path: str | os.PathLike[str]) -> str:
    """A StableHLO module in MLIR text, read from ``path`` (through the reader process) and
    written back as MLIR prints it (with locations when the file has them)."""
    p = Path(path)
    data = _read_bytes(p, "a StableHLO module in MLIR text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(
            f"{p} is not MLIR text: byte {e.start} is not UTF-8 ({data[e.start : e.end]!r}); the "
            "file is binary or damaged"
        ) from None
    if "\0" in text:
        raise ModelFileError(
            f"{p} is not MLIR text: it holds a NUL character (at {text.index(chr(0))}); the file "
            "is binary or damaged"
        )
    if not any(word in text for word in ("module", "func.func", "stablehlo.")):
        raise ModelFileError(
            f"{p} is not a StableHLO module in MLIR text: it holds no module, function or "
            "stablehlo op"
        )
    debug_info = "loc(" in text  # as bnfold.stablehlo.fold keeps locations
    return _read_in_reader(p, "text", data, debug_info).decode("utf-8")


def read_exported(path: str | os.PathLike[str]) -> tuple[Any, int]:
    """A ``jax.export.Exported`` read from ``path`` (the bytes of ``Exported.serialize()``),
    whose module is the one the reader process wrote back; and the number of VJPs it holds."""
    p = Path(path)
    data = _read_bytes(p, "a serialized jax.export program")
    vjp_order = _check_flatbuffer(p, data)
    try:
        exported = jax.export.deserialize(bytearray(data))
    except Exception as e:  # noqa: BLE001 - whatever damaged bytes make jax raise
        raise ModelFileError(
            f"{p} is not a readable jax.export program ({type(e).__name__}: {first_line(e)}); "
            "the file is truncated, damaged or of another kind"
        ) from e
    if not isinstance(exported.mlir_module_serialized, (bytes, bytearray)):
        raise ModelFileError(f"{p} is not a readable jax.export program: it holds no module")
    module = _read_in_reader(p, "artifact", bytes(exported.mlir_module_serialized))
    return dataclasses.replace(exported, mlir_module_serialized=module), vjp_order


def _check_flatbuffer(path: Path, data: bytes) -> int:
    """Walk a program's flatbuffer before ``jax.export.deserialize`` does; the number of VJPs
    it holds. Refuses pytrees beyond :data:`MAX_PYTREE_NODES` nodes (jax builds a shared node
    once per parent) or with a cycle, more than :data:`MAX_VJP_ORDER` VJPs, and shardings stored
    as ``HloSharding`` protos (as jax wrote them before January 2026), which jax reads in XLA's
    C++ without checks (XLA aborts on a damaged one) and cannot write back."""
    from jax._src.export import serialization_generated as fb

    def damaged(why: str) -> ModelFileError:
        return ModelFileError(
            f"{path} is not a readable jax.export program: {why}; the file is truncated, "
            "damaged or of another kind"
        )

    if len(data) < 8:
        raise damaged(f"it has only {len(data)} bytes")
    buf = bytearray(data)
    try:
        exported = fb.Exported.GetRootAs(buf, 0)
        seen: set[int] = set()
        vjp_order = -1
        while exported is not None:
            position = exported._tab.Pos
            if position in seen:
                raise damaged("its VJPs form a cycle")
            seen.add(position)
            vjp_order += 1
            if vjp_order > MAX_VJP_ORDER:
                raise damaged(f"it holds more than {MAX_VJP_ORDER} VJPs")
            for tree in (exported.InTree(), exported.OutTree()):
                if tree is not None:
                    _pytree_nodes(tree, damaged)
            if _legacy_shardings(exported):
                raise ModelFileError(
                    f"{path} stores its shardings as HloSharding protos, as jax wrote programs "
                    "before January 2026: jax reads those in C++ without checks and cannot write "
                    "them back; export the model again with the installed jax"
                )
            exported = exported.Vjp()
    except BnfoldError:
        raise
    except Exception as e:  # noqa: BLE001 - struct.error, IndexError: offsets out of the file
        raise damaged(f"{type(e).__name__}: {first_line(e)}") from e
    return vjp_order


def _pytree_nodes(tree: Any, damaged: Any) -> int:
    """The nodes of the pytree jax would build from the flatbuffer table ``tree`` (each table
    once per parent), counted without building it; a cycle or too many nodes is refused."""
    counts: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(tree, False)]
    while stack:
        node, done = stack.pop()
        position = node._tab.Pos
        if done:
            on_path.discard(position)
            total = 1 + sum(counts[node.Children(i)._tab.Pos] for i in range(node.ChildrenLength()))
            if total > MAX_PYTREE_NODES:
                raise damaged(f"a pytree has more than {MAX_PYTREE_NODES:,} nodes")
            counts[position] = total
            continue
        if position in counts:
            continue
        if position in on_path:
            raise damaged("a pytree is a cycle")
        on_path.add(position)
        stack.append((node, True))
        for i in range(node.ChildrenLength()):
            child = node.Children(i)
            if child._tab.Pos not in counts:
                stack.append((child, False))
    return counts[tree._tab.Pos]


def _legacy_shardings(exported: Any) -> bool:
    """Whether jax reads HloSharding protos from this table (as it does for programs
    serialized before named shardings, January 2026)."""
    for idxs, length, item in (
        (exported.InShardingsIdxsLength, exported.InShardingsLength, exported.InShardings),
        (exported.OutShardingsIdxsLength, exported.OutShardingsLength, exported.OutShardings),
    ):
        if idxs() > 0:
            continue
        for i in range(length()):
            sharding = item(i)
            if sharding.NamedSharding() is None and not sharding.HloShardingProtoIsNone():
                return True
    return False


# ---------------------------------------------------------------------------------------------
# Running, for --verify


def _module_of(model: Any) -> Any:
    """The module of a model this frontend read or folded (never a file's own bytes)."""
    ctx = mlir.context()
    if isinstance(model, str):
        return mlir.parse_text(model, ctx), ctx
    return mlir.from_artifact(model.mlir_module_serialized, ctx), ctx


def _result_bytes(module: Any) -> int:
    """The bytes of every op result in ``module``, in Python integers; a result whose shape is
    not static is refused (its size cannot be bounded)."""
    total = 0
    for op in mlir.walk_ops(module.operation):
        for result in op.results:
            t = ranked(result.type)
            if t is None:
                continue
            if not t.has_static_shape:
                raise UnsupportedModelError(
                    f"--verify cannot bound the memory of {op.name}, whose result {t} has "
                    "dynamic dimensions; fold without --verify"
                )
            dt = np_dtype(t.element_type)
            itemsize = dt.itemsize if dt is not None else 16
            total += math.prod(int(d) for d in t.shape) * itemsize
    return total


def _compute_dtypes(module: Any) -> list[str]:
    """The float dtypes the module's convolutions and dot_generals compute in (a module may
    compute in a lower precision than it returns: that bounds --verify's tolerance too)."""
    names = set()
    for op in mlir.walk_ops(module.operation):
        if op.name in ("stablehlo.convolution", "stablehlo.dot_general", "stablehlo.dot"):
            t = ranked(op.results[0].type)
            dt = np_dtype(t.element_type) if t is not None else None
            if dt is not None and dt.kind not in "biu":
                names.add(dt.name)
    return sorted(names)


def _refuse_exported_run(exported: Any) -> None:
    """Refuse, with one line, a program --verify cannot run here."""
    effects = [*exported.ordered_effects, *exported.unordered_effects]
    if effects:
        raise UnsupportedModelError(
            f"--verify does not run programs with effects ({effects[0]}); fold without --verify"
        )
    if "cpu" not in exported.platforms:
        raise UnsupportedModelError(
            f"--verify runs programs on the CPU, and this one was lowered for "
            f"{', '.join(exported.platforms) or 'no platform'}; fold without --verify"
        )
    if exported.nr_devices != 1:
        raise UnsupportedModelError(
            f"--verify runs programs on one device, and this one was lowered for "
            f"{exported.nr_devices}; fold without --verify"
        )
    for i, aval in enumerate(exported.in_avals):
        if not all(isinstance(d, int) for d in aval.shape):
            raise UnsupportedModelError(
                f"input {i} of the program has symbolic dimensions {aval.shape}: --verify needs "
                "static shapes; fold without --verify, and compare the programs on inputs of "
                "your own with bnfold.verify(original, folded, inputs)"
            )


def _input_bytes(specs: list[tuple[np.dtype, tuple[int, ...]]]) -> None:
    """Refuse inputs beyond :data:`MAX_INPUT_BYTES`, counted in Python integers."""
    total = sum(math.prod(shape) * np.dtype(dt).itemsize for dt, shape in specs)
    if total > MAX_INPUT_BYTES:
        dt, shape = max(specs, key=lambda s: math.prod(s[1]) * np.dtype(s[0]).itemsize)
        raise VerificationError(
            f"cannot verify: the inputs take {total / 2**30:,.2f} GiB (one is {np.dtype(dt)} "
            f"{list(shape)}), and --verify makes at most {MAX_INPUT_BYTES // 2**20} MiB of random "
            "inputs; fold without --verify, and compare the models on inputs of your own with "
            "bnfold.verify(original, folded, inputs)"
        )


def check(original: Any, folded: Any, seed: int = 0) -> CheckResult:
    """Run ``original`` and ``folded`` (both programs, or both texts, read by this module or
    folded from one) on the same random inputs with XLA on the CPU and compare their outputs.

    Both modules pass :func:`bnfold.stablehlo.run.refuse_unsafe` and the memory bound before
    either runs; a program must be free of effects and lowered for the CPU and one device."""
    modules = [_module_of(model)[0] for model in (original, folded)]
    for module in modules:
        run.refuse_unsafe(module)
    for module in modules:
        size = _result_bytes(module)
        if size > MAX_RUN_BYTES:
            raise UnsupportedModelError(
                f"--verify would run a module whose results take {size / 2**30:,.1f} GiB, more "
                f"than the {MAX_RUN_BYTES / 2**30:.0f} GiB it allows; fold without --verify"
            )
    if isinstance(original, str):
        with modules[0].context:
            specs = run.input_types(modules[0])
        _input_bytes(specs)
        inputs = run.random_inputs(specs, seed)
    else:
        _refuse_exported_run(original)
        _input_bytes([(np.dtype(a.dtype), tuple(a.shape)) for a in original.in_avals])
        inputs = run.default_inputs(original, seed)
    a = _outputs(original, inputs, folded=False)
    b = _outputs(folded, inputs, folded=True)
    if len(a) != len(b) or any(
        x.shape != y.shape or x.dtype != y.dtype for x, y in zip(a, b, strict=True)
    ):
        raise VerificationError(
            "the folded module's outputs differ from the original's in number, shape or dtype; "
            "please report this bnfold bug with the model"
        )
    return compare_arrays(a, b, compute_dtypes=_compute_dtypes(modules[1]))


def _outputs(model: Any, inputs: list[np.ndarray], folded: bool) -> list[np.ndarray]:
    try:
        return run.outputs(model, inputs)
    except (BnfoldError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - whatever XLA or jax raise for this module
        if not folded:
            raise VerificationError(
                f"cannot verify: the original fails on random inputs of the shapes it declares "
                f"({type(e).__name__}: {first_line(e)}); fold without --verify"
            ) from e
        raise VerificationError(
            f"the folded module fails on inputs the original runs ({type(e).__name__}: "
            f"{first_line(e)}); please report this bnfold bug with the model"
        ) from e


# ---------------------------------------------------------------------------------------------
# The file frontends of the command line (bnfold.core.frontend)


class StableHloFileFold:
    """A StableHLO model file through the command line's steps
    (:class:`bnfold.core.frontend.FileFold`): ``model`` is the text or the ``Exported`` as
    read (its module the one the reader process wrote back)."""

    verified_where = "with XLA on the CPU"

    def __init__(self, path: Path, model: Any, vjp_order: int = 0) -> None:
        self.path = path
        self.model = model
        self.vjp_order = vjp_order
        self.folded: Any = None

    def check_output(self, output: str | os.PathLike[str]) -> None:
        """Refuse, before the fold, a program jax cannot write back (some fields jax reads it
        cannot serialize). Writing over the input is allowed: it is read whole, and the result
        is one file, renamed into place."""
        if not isinstance(self.model, str):
            self._serialize(self.model, output)

    def _serialize(self, exported: Any, output: str | os.PathLike[str]) -> bytes:
        try:
            return bytes(exported.serialize(vjp_order=self.vjp_order))
        except Exception as e:  # noqa: BLE001 - a program jax read but cannot write back
            raise ModelFileError(
                f"cannot write {os.fspath(output)}: jax cannot serialize this program "
                f"({type(e).__name__}: {first_line(e)})"
            ) from e

    def prepare(self, **options: Any) -> list[str]:
        """No options of its own."""
        if options:
            raise TypeError(f"unknown options {sorted(options)}")
        return []

    def fold(self, producers: list[str] | None, affine: bool = True) -> FoldReport:
        """Fold the model with :func:`bnfold.stablehlo.fold.fold` into a new one."""
        self.folded, report = hlo_fold.fold(
            self.model, producers=producers, return_report=True, affine=affine
        )
        return report

    def check(self, seed: int) -> CheckResult:
        """:func:`check` of the model as read against the folded one."""
        return check(self.model, self._folded(), seed)

    def save(self, output: str | os.PathLike[str]) -> None:
        """Write the folded model atomically: text as MLIR prints it, a program as
        ``Exported.serialize()`` writes it, with as many VJPs as the input held."""
        folded = self._folded()
        if isinstance(folded, str):
            data = folded.encode("utf-8")
        else:
            data = self._serialize(folded, output)
        write_atomically(output, lambda f: f.write(data))

    def _folded(self) -> Any:
        if self.folded is None:
            raise RuntimeError("fold() comes before check() and save()")
        return self.folded


def open_mlir(path: str | os.PathLike[str]) -> StableHloFileFold:
    """Read the StableHLO MLIR text file ``path`` for the command line."""
    mlir.require()
    return StableHloFileFold(Path(path), read_text(path))


def open_exported(path: str | os.PathLike[str]) -> StableHloFileFold:
    """Read the serialized ``jax.export`` program ``path`` for the command line."""
    mlir.require()
    exported, vjp_order = read_exported(path)
    return StableHloFileFold(Path(path), exported, vjp_order)


def open_file(path: str | os.PathLike[str]) -> StableHloFileFold:
    """Read the StableHLO model file ``path`` for the command line: a program when its name
    ends in ``.jaxexport``, MLIR text otherwise (the file frontends' entry)."""
    if Path(path).suffix.lower() == EXPORTED_SUFFIX:
        return open_exported(path)
    return open_mlir(path)


__all__ = [
    "DIALECTS",
    "EXPORTED_SUFFIX",
    "MLIR_SUFFIX",
    "StableHloFileFold",
    "check",
    "open_exported",
    "open_file",
    "open_mlir",
    "read_exported",
    "read_text",
]
