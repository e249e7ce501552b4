"""torch.export archives (``.pt2``) for the command line: read, write, random inputs, check.

Reading refuses what would be silently mangled (several programs in one archive) or dangerous
(an archive declaring far more data than it holds); extra files travel with the program.
:func:`check` runs the original and the folded program on the same random inputs, each on its
own copy of the inputs and of any state it writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from .checks import CheckResult
from .errors import ModelFileError, UnsupportedModelError, first_line
from .torch_graph_store import ProgramStore, copy_quietly, copy_tensors, module_tensors
from .torch_verify import compare, fresh_copy, output_tensors, tolerance


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
        return torch.randn(t.shape, generator=gen).to(t.device, t.dtype)
    if t.is_complex():
        return torch.randn(t.shape, generator=gen, dtype=torch.complex64).to(t.device, t.dtype)
    return t.clone()


def _random_values(shape: list[int], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random values for an input the program kept no example of.

    Floats are normal; 8-bit integers (images) span their range; bools are random; wider
    integers, often indices, are 0 or 1, which every index range holds.
    """
    if dtype.is_floating_point or dtype.is_complex:
        return _random_like(torch.zeros(shape, dtype=dtype), gen)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    info = torch.iinfo(dtype)
    low, high = (info.min, info.max + 1) if info.bits == 8 else (0, 2)
    return torch.randint(low, high, shape, generator=gen).to(dtype)


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
            flat.append(_random_values(shape, val.dtype, gen).to(val.device))
        elif isinstance(val, torch.SymInt):
            flat.append(_size(val, ep))
        else:
            raise UnsupportedModelError(
                f"cannot make a random value for the program input {arg.name} "
                f"({type(val).__name__}); verify it in Python with bnfold.verify"
            )
    args, kwargs = pytree.tree_unflatten(flat, ep.call_spec.in_spec)
    return tuple(args), dict(kwargs)


def runnable(program: ExportedProgram) -> nn.Module:
    """``program.module()``, with its own copy of any state the program writes while it runs
    (so verifying never changes the program, nor the eager model it shares tensors with)."""
    module = program.module()
    store = ProgramStore(program, program.graph_module.graph)
    written = [store.tensor(n) for n in store.written_state()]
    if not written:
        return module
    memo: dict[int, Any] = {id(t): t for t in module_tensors(module).values()}
    memo.update(copy_tensors(written))
    return copy_quietly(module, memo)


def check(original: ExportedProgram, folded: ExportedProgram, seed: int = 0) -> CheckResult:
    """Run both programs on the same random inputs (each on its own copy) and compare."""
    args, kwargs = sample_inputs(original, seed)
    with torch.no_grad():
        a = output_tensors(runnable(original)(*fresh_copy(args), **fresh_copy(kwargs)))
        b = output_tensors(runnable(folded)(*fresh_copy(args), **fresh_copy(kwargs)))
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


__all__ = ["ProgramFile", "load", "save", "sample_inputs", "check", "CheckResult", "runnable"]
