"""ONNX model files for the command line: read, write, random inputs, check; and the ONNX file
frontend (:func:`open_file`, see :mod:`bnfold.core.frontend`).

Reading refuses, with one line, what onnx and onnx_ir would only trip over later (names that
nothing defines, tensors whose data does not fit their shape, external data outside the model's
directory or shorter than declared), judged from the file's structure and sizes alone: weights
in external data files stay memory-mapped and unread until a fold needs them. Writing is
atomic (:mod:`bnfold.core.files`): the files are written into a temporary directory beside the
target, flushed, and renamed into place. :func:`check` runs the original and the folded model in
onnxruntime on the same random inputs and compares every output (:mod:`bnfold.core.compare`).
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from ..core.compare import CheckResult, compare_arrays
from ..core.files import (
    check_replaceable,
    output_target,
    write_atomically,
    write_pair_atomically,
)
from ..core.frontend import model_frontend
from ..core.report import FoldReport
from ..errors import (
    ModelFileError,
    first_line,
)
from ..onnx.constants import quiet_logs
from ..onnx.model import (
    MAX_INLINE_BYTES,
    all_nodes,
    all_tensors,
    attribute_tensors,
    node_label,
    quiet_libraries,
    refuse_attribute_references,
    refuse_sparse,
    tensor_bytes,
)
from ..onnx.run import _memory_is_an_error, _run_both, _weight_dtypes

# With external data, initializers larger than this go to the data file (small ones stay in
# the .onnx, where they cost nothing and keep it readable).
_EXTERNAL_THRESHOLD = 1024
_DATA_SUFFIX = ".data"
# Where load() notes the file a model came from, so that save() can tell an in-place write.
_SOURCE_KEY = "bnfold.source_path"
_DEFAULT_DOMAINS = ("", "ai.onnx")
# Sizes --verify tries for dimensions the model leaves free (other than the leading, batch-like
# one, which gets 2): a spatial dimension smaller than a kernel makes onnxruntime refuse.
_DIM_SIZES = (16, 32, 64)
_LEADING_DIM_SIZE = 2


@dataclass
class ModelFile:
    """An ONNX model as read, with the external data files its tensors are stored in
    (resolved absolute paths; empty when all data is inline)."""

    model: ir.Model
    path: Path
    external_files: frozenset[Path]


# ---------------------------------------------------------------------------------------------
# Reading


def load(path: str | os.PathLike[str]) -> ModelFile:
    """Read an ONNX model file; external tensors stay memory-mapped, unread.

    Raises :class:`ModelFileError` (one line) for a missing, empty, truncated or damaged file,
    one that is not an ONNX model, or external data that is missing, too short or outside the
    model's directory; :class:`UnsupportedModelError` for sparse initializers.
    """
    p = Path(path)
    _check_is_file(p)
    try:
        proto = onnx.load_model(os.fspath(p), format="protobuf", load_external_data=False)
    except OSError as e:
        raise ModelFileError(f"cannot read {p}: {e.strerror or e}") from e
    except Exception as e:  # protobuf's DecodeError, or whatever a damaged file makes onnx raise
        raise ModelFileError(
            f"{p} is not an ONNX model, or it is truncated or damaged: protobuf cannot parse "
            f"it ({first_line(e)})"
        ) from e
    # Absolute, so that onnx_ir's own containment checks apply and a later chdir is harmless.
    base_dir = os.path.dirname(os.path.abspath(p))
    checker = _ProtoChecker(p, base_dir)
    checker.model(proto)
    refuse_sparse(proto, str(p))
    refuse_attribute_references(proto, str(p))
    try:
        with quiet_libraries():
            model = ir.serde.deserialize_model(proto)
    except Exception as e:
        raise ModelFileError(f"{p}: onnx_ir cannot read this model ({first_line(e)})") from e
    for tensor in all_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = base_dir
    source = os.path.abspath(p)
    model.meta[_SOURCE_KEY] = source
    model.graph.meta[_SOURCE_KEY] = source
    return ModelFile(model, p, frozenset(checker.external_files))


def _check_is_file(p: Path) -> None:
    """Refuse a path that cannot be a model file before protobuf sees it."""
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ModelFileError(f"{p}: no such file") from None
    except OSError as e:
        raise ModelFileError(f"cannot read {p}: {e.strerror or e}") from e
    if stat.S_ISDIR(st.st_mode):
        raise ModelFileError(f"{p} is a directory, not a model file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"{p} is not a regular file")
    if st.st_size == 0:
        raise ModelFileError(f"{p} is empty (0 bytes), not an ONNX model")


def _expected_nbytes(n: int, dtype: ir.DataType) -> int:
    """Bytes that ``n`` elements of ``dtype`` take in raw_data or external data (sub-byte
    types packed), computed in Python integers: an absurd shape never allocates."""
    return (n * dtype.bitwidth + 7) // 8


def _digits(text: Any) -> bool:
    """Whether ``text`` is a number as onnxruntime reads an external-data offset or length:
    ASCII decimal digits only (Python's ``int`` also takes spaces, signs, underscores and
    other scripts' digits)."""
    return isinstance(text, str) and text != "" and text.isascii() and text.isdigit()


class _ProtoChecker:
    """Checks a ModelProto's structure and tensor sizes without reading tensor data."""

    def __init__(self, path: Path, base_dir: str) -> None:
        self.path = path
        self.base_dir = base_dir
        self.external_files: set[Path] = set()
        self._sizes: dict[str, int] = {}  # data file (real path) -> size in bytes

    def fail(self, message: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: {message}")

    def model(self, proto: onnx.ModelProto) -> None:
        if not proto.HasField("graph"):
            raise ModelFileError(f"{self.path} is not an ONNX model: it holds no graph")
        if proto.ir_version < 3:
            raise ModelFileError(
                f"{self.path} is not an ONNX model bnfold reads: its IR version is "
                f"{proto.ir_version} (3 or newer is needed; the file may be damaged)"
            )
        opsets = {o.domain for o in proto.opset_import}
        uses_default = self.graph(proto.graph, [])
        if uses_default and not opsets & set(_DEFAULT_DOMAINS):
            raise self.fail(
                "the graph uses ONNX operators but the model imports no ONNX opset; the file "
                "may be truncated or damaged"
            )
        for function in proto.functions:
            self.function(function)

    def graph(self, g: onnx.GraphProto, outer: list[set[str]]) -> bool:
        """Check a graph and its subgraphs; whether they use default-domain operators."""
        defined = {v.name for v in g.input}
        for t in g.initializer:
            self.tensor(t, f"initializer {t.name!r}")
            defined.add(t.name)
        defined.update(o for n in g.node for o in n.output if o)
        scopes = [*outer, defined]
        uses_default = False
        for n in g.node:
            uses_default |= n.domain in _DEFAULT_DOMAINS
            uses_default |= self.node(n, scopes)
        for v in g.output:
            if not any(v.name in s for s in scopes):
                raise self.fail(
                    f"graph output {v.name!r} is computed by nothing in the model; the file "
                    "may be truncated or damaged"
                )
        return uses_default

    def node(self, n: onnx.NodeProto, scopes: list[set[str]]) -> bool:
        """Check a node's inputs, attribute tensors and subgraphs."""
        for name in n.input:
            if name and not any(name in s for s in scopes):
                raise self.fail(
                    f"{node_label(n)} reads {name!r}, which nothing in the model defines; "
                    "the file may be truncated or damaged"
                )
        uses_default = False
        for a in n.attribute:
            label = f"the tensor in attribute {a.name!r} of {node_label(n)}"
            if a.type == onnx.AttributeProto.TENSOR:
                self.tensor(a.t, label)
            elif a.type == onnx.AttributeProto.TENSORS:
                for t in a.tensors:
                    self.tensor(t, label)
            elif a.type == onnx.AttributeProto.GRAPH:
                uses_default |= self.graph(a.g, scopes)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    uses_default |= self.graph(g, scopes)
        return uses_default

    def function(self, f: onnx.FunctionProto) -> None:
        defined = set(f.input)
        defined.update(o for n in f.node for o in n.output if o)
        for n in f.node:
            self.node(n, [defined])
        for name in f.output:
            if name not in defined:
                raise self.fail(
                    f"function {f.name!r} returns {name!r}, which it does not compute; the file "
                    "may be truncated or damaged"
                )

    def tensor(self, t: onnx.TensorProto, label: str) -> None:
        """Check that a tensor's data fits its shape and element type, from sizes alone."""
        dims = list(t.dims)
        if any(d < 0 for d in dims):
            raise self.fail(f"{label} has a negative dimension in its shape {dims}")
        try:
            dtype = ir.DataType(t.data_type)
        except ValueError:
            dtype = ir.DataType.UNDEFINED
        if dtype == ir.DataType.UNDEFINED:
            raise self.fail(
                f"{label} has the unknown element type {t.data_type}; the file may be "
                "damaged, or written by a newer ONNX"
            )
        if t.HasField("segment"):
            raise self.fail(f"{label} is a segment of a tensor, which bnfold does not read")
        n = math.prod(dims)
        if t.data_location == onnx.TensorProto.EXTERNAL:
            self.external(t, label, n, dtype, dims)
            return
        if dtype == ir.DataType.STRING:
            if t.HasField("raw_data") or len(t.string_data) != n:
                raise self.fail(
                    f"{label} holds {len(t.string_data)} strings but its shape {dims} needs "
                    f"{n}; the file may be truncated or damaged"
                )
            return
        if t.HasField("raw_data"):
            expected = _expected_nbytes(n, dtype)
            if len(t.raw_data) != expected:
                raise self.fail(
                    f"{label} holds {len(t.raw_data)} bytes of data but its shape {dims} of "
                    f"{dtype.name} needs {expected}; the file may be truncated or damaged"
                )
            return
        count = sum(
            len(field)
            for field in (t.float_data, t.int32_data, t.int64_data, t.double_data, t.uint64_data)
        )
        if dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128):
            allowed = {2 * n}  # real and imaginary parts
        elif dtype.bitwidth < 8:
            allowed = {n, _expected_nbytes(n, dtype)}  # writers disagree on packing
        else:
            allowed = {n}
        if count not in allowed:
            raise self.fail(
                f"{label} holds {count} values but its shape {dims} needs {n}; the file may "
                "be truncated or damaged"
            )

    def external(
        self, t: onnx.TensorProto, label: str, n: int, dtype: ir.DataType, dims: list[int]
    ) -> None:
        """Check an external tensor's location and that its file holds its bytes."""
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        if not location:
            raise self.fail(f"{label} is stored externally but names no data file")
        # protobuf hands over a string field that is not UTF-8 as bytes; no file has such a name
        # in ONNX, and a NUL cannot be in a path at all.
        if not isinstance(location, str):
            raise self.fail(
                f"{label} names its data file {location!r}, which is not UTF-8 text; the file "
                "may be damaged"
            )
        if "\0" in location:
            raise self.fail(
                f"{label} names its data file {location!r}, which holds a NUL character; the "
                "file may be damaged"
            )
        if dtype == ir.DataType.STRING:
            raise self.fail(f"{label} is a string tensor stored externally, which ONNX forbids")
        if os.path.isabs(location) or location.startswith(("/", "\\")):
            raise self.fail(
                f"{label} is stored in {location!r}, an absolute path; ONNX external data must "
                "be relative to the model's directory (refusing to read it)"
            )
        normal = os.path.normpath(location)
        if normal == os.pardir or normal.startswith(os.pardir + os.sep):
            raise self.fail(
                f"{label} is stored in {location!r}, outside the model's directory; refusing "
                "to read it (put the data file beside the model)"
            )
        file = os.path.join(self.base_dir, normal)
        # Where the OS opens the location as written: it follows a symbolic link before the
        # ".." after it, so "d/up/../x.bin" with d/up -> .. leaves the directory though its
        # normalized form "d/x.bin" does not.
        real = os.path.realpath(os.path.join(self.base_dir, location))
        real_base = os.path.realpath(self.base_dir)
        if real == real_base or normal == os.curdir:
            raise self.fail(
                f"{label} is stored in {location!r}, which names the model's directory itself, "
                "not a data file in it; the file may be damaged"
            )
        if not real.startswith(real_base.rstrip(os.sep) + os.sep):
            # onnx_ir refuses to read through such a link; say so now, not in the middle of a fold
            raise self.fail(
                f"{label} is stored in {location!r}, which a symbolic link leads to {real}, "
                "outside the model's directory; onnx_ir refuses to read it (copy the data file "
                "beside the model)"
            )
        offset_text = info.get("offset", "0")
        if isinstance(offset_text, str) and offset_text[:1] == "-" and _digits(offset_text[1:]):
            raise self.fail(f"{label} has the negative external data offset {offset_text}")
        if not _digits(offset_text) or ("length" in info and not _digits(info["length"])):
            raise self.fail(
                f"{label} has an external data offset or length that is not a number of plain "
                f"decimal digits ({info.get('offset')!r}, {info.get('length')!r}); the file may "
                "be damaged"
            )
        offset = int(offset_text)
        length = int(info["length"]) if "length" in info else None
        expected = _expected_nbytes(n, dtype)
        if length is not None and length != expected:
            raise self.fail(
                f"{label} declares {length} bytes at offset {offset} of {location!r}, but its "
                f"shape {dims} of {dtype.name} needs {expected}; the file may be damaged"
            )
        size = self._file_size(real, label, file)
        if offset + expected > size:
            raise self.fail(
                f"{label} needs bytes {offset} to {offset + expected} of {file}, which holds "
                f"only {size}; the data file may be truncated"
            )
        self.external_files.add(Path(real))

    def _file_size(self, real: str, label: str, file: str) -> int:
        if real in self._sizes:
            return self._sizes[real]
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise self.fail(
                f"{label} is stored in {file}, which does not exist; put the model's data file "
                "beside it"
            ) from None
        except OSError as e:
            raise self.fail(f"cannot read the data file {file}: {e.strerror or e}") from e
        if not stat.S_ISREG(st.st_mode):
            raise self.fail(f"{label} is stored in {file}, which is not a regular file")
        if st.st_nlink > 1:
            # onnx_ir refuses hard-linked data files (a guard against linking in other files)
            raise self.fail(
                f"the data file {file} has {st.st_nlink} hard links, which onnx_ir refuses to "
                "read; copy it (cp) so that it has one"
            )
        self._sizes[real] = st.st_size
        return st.st_size


# ---------------------------------------------------------------------------------------------
# Tensors of an ir.Model


def remove_initializer_inputs(model: ir.Model) -> list[str]:
    """Stop listing the main graph's initializers as graph inputs, so they are constants rather
    than defaults a caller may override; return the names removed. IR version 3 requires the
    listing (and there it means nothing), so nothing is removed."""
    if (model.ir_version or 0) < 4:
        return []
    graph = model.graph
    removed = [v.name or "" for v in graph.inputs if v.is_initializer()]
    kept = [v for v in graph.inputs if not v.is_initializer()]
    graph.inputs.clear()
    graph.inputs.extend(kept)
    return removed


def needs_external_data(loaded: ModelFile) -> bool:
    """Whether the folded model should be written with external data: the input had it (keep
    the user's layout), or its tensors are too large for one protobuf message."""
    return bool(loaded.external_files) or tensor_bytes(loaded.model) > MAX_INLINE_BYTES


def _in_memory(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    """An in-memory tensor for an external one (its data is read only when serialized)."""
    if not isinstance(tensor, ir.ExternalTensor):
        return tensor
    return ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)


class _InlineStrings(ir.StringTensor):
    """A string tensor that ``ir.save`` keeps inline: ONNX stores strings only inline, but
    onnx_ir would move a large one to the data file and fail."""

    def __init__(self, tensor: ir.TensorProtocol) -> None:
        super().__init__(tensor.string_data(), shape=tensor.shape, name=tensor.name)

    @property
    def nbytes(self) -> int:
        return 0


@contextlib.contextmanager
def _external_tensors_inlined(model: ir.Model, initializers: bool) -> Iterator[None]:
    """Temporarily replace external tensors whose location would be wrong in the output:
    attribute tensors always (ir.save moves only initializers), initializers too when
    ``initializers`` (an output without external data); and keep string tensors inline."""
    undo: list[Any] = []
    try:
        for graph in model.graphs():
            for value in graph.initializers.values():
                old = value.const_value
                if initializers and isinstance(old, ir.ExternalTensor):
                    value.const_value = _in_memory(old)
                elif old is not None and old.dtype == ir.DataType.STRING:
                    value.const_value = _InlineStrings(old)
                else:
                    continue
                undo.append(lambda v=value, t=old: setattr(v, "const_value", t))
        for node in all_nodes(model):
            for name, attr in list(node.attributes.items()):
                tensors = list(attribute_tensors(attr))
                if not any(isinstance(t, ir.ExternalTensor) for t in tensors):
                    continue
                value = (
                    _in_memory(attr.value)
                    if attr.type == ir.AttributeType.TENSOR
                    else [_in_memory(t) for t in attr.value]
                )
                node.attributes[name] = ir.Attr(name, attr.type, value, doc_string=attr.doc_string)
                undo.append(lambda n=node, k=name, a=attr: n.attributes.__setitem__(k, a))
        yield
    finally:
        for restore in reversed(undo):
            restore()


# ---------------------------------------------------------------------------------------------
# Writing


def output_files(path: str | os.PathLike[str], external_data: bool) -> list[Path]:
    """The files :func:`save` writes for ``path``: the model, and its data file when
    ``external_data`` (save also switches to external data for a model too large for one
    protobuf message; :func:`needs_external_data` tells that case beforehand)."""
    target = output_target(path)
    return [target, _data_path(target)] if external_data else [target]


def _data_path(target: Path) -> Path:
    return target.with_name(target.name + _DATA_SUFFIX)


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _input_models(model: ir.Model, source: str | os.PathLike[str] | None) -> list[str]:
    """The file the model was read from: ``source``, or the one :func:`load` noted."""
    if source is not None:
        return [os.fspath(source)]
    noted = (model.meta.get(_SOURCE_KEY), model.graph.meta.get(_SOURCE_KEY))
    return [s for s in dict.fromkeys(noted) if s is not None]


def _read_files(model: ir.Model, reads_from: frozenset[Path]) -> list[Path]:
    """The input's data files: those it was read from, and any a tensor still reads."""
    still = {Path(t.path) for t in all_tensors(model) if isinstance(t, ir.ExternalTensor)}
    return sorted({*reads_from, *still})


def _check_outputs(
    target: Path, data: Path | None, inputs: list[str], reads_from: list[Path]
) -> None:
    """Refuse to write files that are the input: the output's files (``target``, and ``data``
    when written) may be neither the input model (``inputs``) nor one of its data files
    (``reads_from``), compared as files (a symbolic or hard link to one is one), except that
    writing over the input model itself, with its data file, is a wanted in-place write (the
    weights still read are mapped first). Temporary files get new names, so never collide."""
    if any(_same_file(target, f) for f in reads_from):
        raise ModelFileError(
            f"cannot write {target}: the input model's weights are stored in that file; "
            "choose another output file name"
        )
    if data is None:
        return
    check_replaceable(data, "the model's data file")
    if any(_same_file(target, s) for s in inputs):
        return  # in place: the user named the input
    if any(_same_file(data, f) for f in reads_from):
        raise ModelFileError(
            f"cannot write {data}: the input model reads its weights from that file, and "
            "writing this output would replace it; choose another output file name (or "
            "write over the input model itself)"
        )
    if any(_same_file(data, s) for s in inputs):
        raise ModelFileError(
            f"cannot write {data} (the data file of {target.name}): it is the input model, "
            "which writing this output would replace; choose another output file name"
        )


def check_output(loaded: ModelFile, path: str | os.PathLike[str], external_data: bool) -> None:
    """Refuse, before any work, an output :func:`save` would refuse for ``loaded``: a target
    that is not a regular file, or output files that would replace the input model or its
    data files (writing over the input model itself is allowed)."""
    target = output_target(path)
    data = _data_path(target) if external_data else None
    _check_outputs(target, data, [os.fspath(loaded.path)], sorted(loaded.external_files))


def save(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool,
    reads_from: frozenset[Path] = frozenset(),
    source: str | os.PathLike[str] | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically, with its initializers larger than 1 KiB in
    ``<name>.data`` beside it when ``external_data`` (or when it is too large for one protobuf
    message).

    ``reads_from`` are the input model's external data files, still memory-mapped and read
    from: replacing one would destroy the input, so that is refused unless ``path`` is the
    input model itself (``source``, by default the file :func:`load` read the model from);
    so is a data file that would replace the input model (:func:`check_output`).
    A failure at any point leaves no partial or temporary file and the targets as they were.
    """
    with quiet_logs():
        _save(model, output_target(path), external_data, reads_from, source)


def _save(
    model: ir.Model,
    target: Path,
    external_data: bool,
    reads_from: frozenset[Path],
    source: str | os.PathLike[str] | None,
) -> None:
    if not external_data and tensor_bytes(model) > MAX_INLINE_BYTES:
        external_data = True  # one protobuf message cannot hold it
    data = _data_path(target) if external_data else None
    _check_outputs(target, data, _input_models(model, source), _read_files(model, reads_from))
    if data is None:
        _save_inline(model, target)
    else:
        _save_with_data(model, target, data)


def _save_inline(model: ir.Model, target: Path) -> None:
    """One self-contained .onnx file, written by write_atomically.

    The main graph's initializers are written one by one after the rest of the model, each as
    a ``graph { initializer }`` message of its own, which protobuf merges into the one graph
    when the file is read. So no second copy of all the weights (a full ModelProto and its
    serialized bytes) is ever held in memory, only one tensor at a time.
    """
    graph = model.graph
    try:
        with _external_tensors_inlined(model, initializers=True):
            values = list(graph.initializers.values())
            for name in list(graph.initializers):  # one by one: clear() is quadratic in onnx-ir
                graph.initializers.pop(name)
            try:
                skeleton = ir.serde.serialize_model(model).SerializeToString()
            finally:
                for value in values:
                    graph.initializers.add(value)
            tensors = [(v.name, v.const_value) for v in values]
    except Exception as e:
        raise ModelFileError(
            f"cannot write {target}: the model cannot be serialized ({type(e).__name__}: "
            f"{first_line(e)})"
        ) from e

    def write(f: Any) -> None:
        f.write(skeleton)
        for name, tensor in tensors:
            chunk = onnx.ModelProto()
            if tensor is not None:
                proto = chunk.graph.initializer.add()
                try:
                    ir.serde.serialize_tensor_into(proto, tensor)
                except Exception as e:  # a tensor that cannot be read, or memory running out
                    raise ModelFileError(
                        f"cannot write {target}: initializer {name!r} cannot be serialized "
                        f"({type(e).__name__}: {first_line(e)})"
                    ) from e
                proto.name = name
            f.write(chunk.SerializeToString())

    write_atomically(target, write)


def _save_with_data(model: ir.Model, target: Path, data: Path) -> None:
    """The .onnx and its data file, written by :func:`bnfold.core.files.write_pair_atomically`
    (through a temporary directory beside the target, renamed into place data file first)."""

    def write(tmp: Path) -> tuple[Path, Path]:
        tmp_model, tmp_data = tmp / target.name, _data_in(tmp, data.name)
        with _external_tensors_inlined(model, initializers=False):
            ir.save(
                model,
                tmp_model,
                format="protobuf",
                external_data=data.name,
                size_threshold_bytes=_EXTERNAL_THRESHOLD,
            )
        return tmp_model, tmp_data

    write_pair_atomically(target, data, write, lambda: _pin_mappings(model, data))


# onnx_ir writes a data file through a temporary directory named after it (a dot, the name, a
# dot and 8 random characters) beside it; a name too long for that is written through a link.
_TEMP_NAME_EXTRA = 10
_NAME_MAX = 255


def _data_in(tmp: Path, name: str) -> Path:
    """Where the data file ``name`` is written in the temporary directory ``tmp``: there under
    its own name, or, when onnx_ir's temporary name for it would pass the file system's limit,
    under a short name that a link ``name`` leads to (onnx_ir writes a link's target, and the
    model still refers to ``name``)."""
    if len(os.fsencode(name)) + _TEMP_NAME_EXTRA <= _NAME_MAX:
        return tmp / name
    short = tmp / "data"
    os.symlink(short.name, tmp / name)
    return short


def _pin_mappings(model: ir.Model, data: Path) -> None:
    """Map the file about to be replaced for every tensor of ``model`` stored in it.

    A mapping keeps reading the old file after the rename, whereas a tensor not yet mapped
    would open the new file at its old offset. Mapping reads nothing.
    """
    if not data.exists():
        return
    for tensor in all_tensors(model):
        if isinstance(tensor, ir.ExternalTensor) and _same_file(tensor.path, data):
            tensor.numpy()


# ---------------------------------------------------------------------------------------------
# Random inputs


def check(
    original: ir.Model | str | os.PathLike[str], folded: ir.Model, seed: int = 0
) -> CheckResult:
    """Run both models in onnxruntime on the same random inputs and compare every output.

    ``original`` may be the input file's path (onnxruntime then reads the file itself). Run
    this before :func:`save` writes over the input. Raises :class:`VerificationError` when
    onnxruntime cannot run the original (or runs it but not the folded model).
    """
    if isinstance(original, ir.Model):
        model, file = original, None
    else:
        file = Path(original)
        model = load(file).model
    with _memory_is_an_error(), quiet_logs():
        a, b = _run_both(model, file, folded, None, seed)
        # A model may compute in a lower precision than it returns (float16 inside, float32 at
        # the edges): its folded weights' precision bounds the tolerance too.
        return compare_arrays(
            [x for _, x in a], [y for _, y in b], compute_dtypes=_weight_dtypes(folded)
        )


# ---------------------------------------------------------------------------------------------
# The ONNX file frontend of the command line (bnfold.core.frontend)


class OnnxFileFold:
    """An ONNX model file through the command line's steps (:class:`bnfold.core.frontend.FileFold`).

    The model is folded in place as read: external tensors stay memory-mapped, so weights that
    are not folded are never read until the result is written, and ``check`` runs the original
    from the input file itself.
    """

    verified_where = "in onnxruntime on random inputs"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.loaded = load(path)
        self.external = needs_external_data(self.loaded)
        self.folded: ir.Model | None = None

    def check_output(self, output: str | os.PathLike[str]) -> None:
        """Refuse an output that would replace the input or its data files (the output's data
        file may be the input: known once it is loaded)."""
        check_output(self.loaded, output, self.external)

    def prepare(self, **options: Any) -> list[str]:
        """``remove_initializer_inputs``: make the initializers listed as graph inputs
        constants (:func:`remove_initializer_inputs`); the line saying what was removed."""
        unknown = set(options) - {"remove_initializer_inputs"}
        if unknown:
            raise TypeError(f"unknown options {sorted(unknown)}")
        if not options.get("remove_initializer_inputs"):
            return []
        model = self.loaded.model
        removed = remove_initializer_inputs(model)
        shown = ", ".join(removed[:5]) + (
            f" and {len(removed) - 5} more" if len(removed) > 5 else ""
        )
        return [
            f"removed {len(removed)} initializer{'s' if len(removed) != 1 else ''} "
            f"from the graph inputs{': ' + shown if removed else ''}"
            + ("" if model.graph.inputs else "; the model now has no inputs")
        ]

    def fold(self, producers: list[str] | None, affine: bool = True) -> FoldReport:
        """Fold the model with the model frontend that takes it (:mod:`bnfold.core.frontend`),
        in place: ``check`` reads the original again from the file."""
        self.folded, report = model_frontend(self.loaded.model).fold(
            self.loaded.model,
            inplace=True,
            producers=producers,
            return_report=True,
            affine=affine,
        )
        return report

    def check(self, seed: int) -> CheckResult:
        """:func:`check` of the input file against the folded model."""
        return check(self.loaded.path, self._folded(), seed)

    def save(self, output: str | os.PathLike[str]) -> None:
        """:func:`save` the folded model, with external data when the input had it."""
        save(
            self._folded(),
            output,
            external_data=self.external,
            reads_from=self.loaded.external_files,
        )

    def _folded(self) -> ir.Model:
        if self.folded is None:
            raise RuntimeError("fold() comes before check() and save()")
        return self.folded


def open_file(path: str | os.PathLike[str]) -> OnnxFileFold:
    """Read the ONNX model file ``path`` for the command line (the file frontend's entry)."""
    return OnnxFileFold(path)


__all__ = [
    "ModelFile",
    "CheckResult",
    "load",
    "save",
    "output_files",
    "check_output",
    "needs_external_data",
    "check",
    "remove_initializer_inputs",
    "OnnxFileFold",
    "open_file",
]
