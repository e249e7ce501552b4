"""Running ONNX models in onnxruntime: random inputs by the shapes a model declares, bounded
sessions (a time limit, a capped memory arena), and ``bnfold.verify`` for ONNX models.

Used by the ONNX model frontend (:mod:`bnfold.onnx.fold`) and by ``--verify`` on files
(:mod:`bnfold.onnx.files`); it reads no file itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ..core.compare import float_error, is_floating, random_array
from ..errors import (
    BnfoldError,
    InvalidArgumentError,
    UnsupportedModelError,
    VerificationError,
    first_line,
)
from ..onnx.constants import FLOAT_TYPES, INTEGER_TYPES, quiet_logs
from ..onnx.model import (
    MAX_INLINE_BYTES,
    all_nodes,
    all_tensors,
    as_ir_model,
    has_external,
    tensor_bytes,
)

_DEFAULT_DOMAINS = ("", "ai.onnx")
_DIM_SIZES = (16, 32, 64)
_LEADING_DIM_SIZE = 2


def _fed_inputs(model: ir.Model) -> list[ir.Value]:
    """The graph inputs a caller feeds: an initializer listed as an input has a default value
    (IR >= 4), and IR 3 lists every initializer as an input; neither is fed."""
    graph = model.graph
    return [v for v in graph.inputs if v.name not in graph.initializers]


def _has_free_dims(model: ir.Model) -> bool:
    return any(
        v.shape is not None and any(not isinstance(d, int) for d in v.shape.dims)
        for v in _fed_inputs(model)
    )


# Random inputs --verify makes at most. A check on random values needs no more than this, and
# the model's own activations grow with the inputs: a file declaring a huge static shape must
# not cost gigabytes (verify on real inputs of your own through bnfold.verify instead).
_MAX_INPUT_BYTES = 128 * 2**20


def sample_inputs(model: ir.Model, seed: int = 0, dim_size: int = 16) -> dict[str, np.ndarray]:
    """Random values for the model's inputs (initializers are never fed).

    Values follow :func:`bnfold.core.compare.random_array` (floats standard normal, one-byte
    integers over their range, wider ones 0 or 1, bools random). Static dimensions are kept;
    a symbolic dimension gets one size everywhere it appears: 2 if it leads some input
    (batch-like), else ``dim_size``; an unnamed dimension gets a size by the same rule.
    Raises :class:`UnsupportedModelError` for inputs that are not such tensors.
    """
    rng = np.random.default_rng(seed)
    inputs = _fed_inputs(model)
    for v in inputs:
        _check_input_kind(v)
    leading = {
        v.shape.dims[0].value
        for v in inputs
        if len(v.shape.dims) and isinstance(v.shape.dims[0], ir.SymbolicDim)
    }
    shapes = {}
    total = 0
    for v in inputs:
        shape = []
        for axis, d in enumerate(v.shape.dims):
            if isinstance(d, int):
                shape.append(d)
            elif axis == 0 or (d.value is not None and d.value in leading):
                shape.append(_LEADING_DIM_SIZE)
            else:
                shape.append(dim_size)
        shapes[v.name] = shape
        # Declared shapes are checked before anything is allocated: a model may promise more
        # than any machine holds.
        if any(d < 0 for d in shape):
            raise VerificationError(f"input {v.name!r} declares a negative dimension {shape}")
        total += math.prod(shape) * max(v.dtype.itemsize, 1)
        if total > _MAX_INPUT_BYTES:
            raise VerificationError(
                f"the model input {v.name!r} is declared with the shape {shape}, too large to "
                f"verify: that is {total / 2**30:.2f} GiB of random inputs, and --verify makes "
                f"at most {_MAX_INPUT_BYTES // 2**20} MiB; fold without --verify, and compare "
                "the models on inputs of your own with bnfold.verify(original, folded, inputs)"
            )
    return {v.name: _random_array(v.dtype, shapes[v.name], rng) for v in inputs}


def _check_input_kind(v: ir.Value) -> None:
    """Refuse an input --verify cannot make random values for."""
    kind = None
    if type(v.type) is not ir.TensorType:
        kind = "a non-tensor type" if v.type is None else f"type {v.type}"
    elif (
        v.dtype not in FLOAT_TYPES and v.dtype not in INTEGER_TYPES and v.dtype != ir.DataType.BOOL
    ):
        kind = f"element type {v.dtype.name}"
    elif v.shape is None:
        kind = "no shape (unknown rank)"
    if kind is not None:
        raise UnsupportedModelError(
            f"the model input {v.name!r} has {kind}: --verify can only make random float, "
            "integer and bool tensors of known rank; fold without --verify and check the "
            "result with your own inputs (bnfold.verify)"
        )


def _random_array(dtype: ir.DataType, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    """Random values of an input, by :func:`bnfold.core.compare.random_array`'s rule."""
    return random_array(dtype.numpy(), shape, rng)


# ---------------------------------------------------------------------------------------------
# Running in onnxruntime


# How long one run of a model in onnxruntime may take, and how much memory its intermediate
# values may take (the model's own tensors do not count), when --verify or verify() run a model:
# a file of a few hundred bytes can ask for a Loop of 2**62 iterations or an Expand to gigabytes.
VERIFY_TIME_LIMIT = 60.0
VERIFY_MEMORY_LIMIT = 2**30
_ARENA_LOCK = threading.Lock()
_arena_limit: int | None = None  # the limit of the arena registered in onnxruntime's environment


def _bounded_arena() -> bool:
    """Register (once per limit) a CPU arena of at most :data:`VERIFY_MEMORY_LIMIT` bytes in
    onnxruntime's environment, for sessions that ask for it; whether there is one. Sessions
    that do not ask (the caller's own) are not affected."""
    global _arena_limit
    import onnxruntime as ort

    with _ARENA_LOCK:
        if _arena_limit == VERIFY_MEMORY_LIMIT:
            return True
        try:
            info = ort.OrtMemoryInfo(
                "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
            )
            ort.create_and_register_allocator(
                info, ort.OrtArenaCfg({"max_mem": int(VERIFY_MEMORY_LIMIT)})
            )
        except Exception:  # noqa: BLE001 - an onnxruntime without it: time is still bounded
            return False
        _arena_limit = VERIFY_MEMORY_LIMIT
        return True


def _open_session(model: ir.Model | Path, stack: contextlib.ExitStack) -> Any:
    """An onnxruntime CPU session without graph optimizations (so that onnxruntime's own
    fusions cannot hide a wrong fold), allocating its intermediate values from the bounded
    arena of :func:`_bounded_arena`: from bytes when the model fits in one message, else from
    a copy with external data in a temporary directory, which ``stack`` removes."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # errors only: its warnings are noise here
    options = ort.SessionOptions()
    if _bounded_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if isinstance(model, Path):
        source: str | bytes = os.fspath(model)
    elif has_external(model) or tensor_bytes(model) > MAX_INLINE_BYTES:
        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="bnfold-verify-"))
        path = Path(directory) / "model.onnx"
        # too large for one message: onnxruntime reads it from a scratch file with external data
        from .files import save

        save(model, path, external_data=True)
        source = os.fspath(path)
    else:
        try:
            source = ir.serde.serialize_model(model).SerializeToString()
        except Exception as e:  # noqa: BLE001 - a model onnx_ir cannot write cannot be run
            raise VerificationError(
                f"cannot verify: the model cannot be serialized for onnxruntime "
                f"({type(e).__name__}: {first_line(e)[:200]})"
            ) from e
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def _over_limit(which: str, e: BaseException, timed_out: bool) -> VerificationError | None:
    """The error to raise when a run failed on a limit of :func:`_run`, else ``None``."""
    if timed_out:
        return VerificationError(
            f"cannot verify: onnxruntime ran the {which} model for more than "
            f"{VERIFY_TIME_LIMIT:g} s (the time limit of one run), so it was stopped; fold "
            "without --verify, and compare the models on inputs of your own with "
            "bnfold.verify(original, folded, inputs)"
        )
    text = str(e)
    if "Available memory of" in text or "Failed to allocate memory" in text:
        return VerificationError(
            f"cannot verify: the {which} model needs more than "
            f"{VERIFY_MEMORY_LIMIT / 2**30:g} GiB for its intermediate values on random inputs "
            "(the memory limit of one run), so onnxruntime stopped; fold without --verify, and "
            "compare the models on inputs of your own with bnfold.verify(original, folded, "
            "inputs)"
        )
    return None


def _run(
    session: Any, inputs: dict[str, np.ndarray], which: str = "original"
) -> list[tuple[str, np.ndarray]]:
    """Run a session within :data:`VERIFY_TIME_LIMIT` (a timer sets onnxruntime's terminate
    flag, which it checks between nodes and loop iterations) and, with the arena of
    :func:`_bounded_arena`, :data:`VERIFY_MEMORY_LIMIT` (memory given back to the arena after
    the run); its outputs as (name, array). bfloat16 goes through OrtValues, which
    onnxruntime's numpy conversion does not handle."""
    import onnxruntime as ort

    feeds = {}
    for name, array in inputs.items():
        array = np.ascontiguousarray(array)
        if array.dtype == ir.DataType.BFLOAT16.numpy():
            feeds[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                array.view(np.uint16), onnx_element_type=int(ir.DataType.BFLOAT16)
            )
        else:
            feeds[name] = ort.OrtValue.ortvalue_from_numpy(array)
    names = [o.name for o in session.get_outputs()]
    run_options = ort.RunOptions()
    # A failed run is raised with the same message; its log line on stderr is only noise
    # (and the size retries of check() expect failures).
    run_options.log_severity_level = 4
    run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    fired = threading.Event()

    def stop() -> None:
        fired.set()
        run_options.terminate = True

    timer = threading.Timer(VERIFY_TIME_LIMIT, stop)
    timer.daemon = True
    timer.start()
    try:
        values = session.run_with_ort_values(names, feeds, run_options)
    except Exception as e:
        limit = _over_limit(which, e, fired.is_set())
        if limit is not None:
            raise limit from None
        raise
    finally:
        timer.cancel()
    return [(name, _to_numpy(name, v)) for name, v in zip(names, values, strict=True)]


def _to_numpy(name: str, value: Any) -> np.ndarray:
    if not value.is_tensor():
        raise UnsupportedModelError(
            f"the model output {name!r} is not a tensor (a sequence, map or optional): "
            "--verify compares tensor outputs only"
        )
    dtype = ir.DataType(value.element_type())
    if dtype.numpy().kind != "V":
        return value.numpy()
    if dtype.bitwidth % 8:
        raise UnsupportedModelError(
            f"the model output {name!r} is of type {dtype.name}, which --verify cannot compare"
        )
    # An ml_dtypes type (bfloat16, float8) onnxruntime cannot hand to numpy: copy its bytes.
    array = np.empty(value.shape(), dtype=dtype.numpy())
    ctypes.memmove(array.ctypes.data, value.data_ptr(), array.nbytes)
    return array


def _run_both(
    original: ir.Model,
    original_file: Path | None,
    folded: ir.Model,
    inputs: dict[str, np.ndarray] | None,
    seed: int,
) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]]]:
    """Both models' outputs on the same inputs (random ones, retried with larger free
    dimensions while onnxruntime rejects the original's)."""
    with contextlib.ExitStack() as stack:
        try:
            session = _open_session(original_file or original, stack)
        except (BnfoldError, MemoryError):
            raise
        except Exception as e:
            raise _cannot_run_original(e) from e
        sizes = _DIM_SIZES if inputs is None and _has_free_dims(original) else _DIM_SIZES[:1]
        a, error = None, None
        for size in sizes:
            try:
                feeds = inputs if inputs is not None else sample_inputs(original, seed, size)
            except VerificationError:
                if error is None:
                    raise
                break  # a larger retry is too large: report why the smaller inputs failed
            try:
                a = _run(session, feeds)
                break
            except (BnfoldError, MemoryError):
                raise
            except Exception as e:  # onnxruntime's errors: a kernel refusing a size, say
                error = e
        if a is None:
            raise _cannot_run_original(error) from error
        del session
        try:
            b = _run(_open_session(folded, stack), feeds, "folded")
        except (BnfoldError, MemoryError):
            raise
        except Exception as e:
            raise _folded_failed(original, folded, e) from e
    if len(a) != len(b):
        raise VerificationError(
            f"the folded model has {len(b)} outputs, the original {len(a)}; the fold is wrong"
        )
    for (name, x), (_, y) in zip(a, b, strict=True):
        if x.shape != y.shape or x.dtype != y.dtype:
            raise VerificationError(
                f"the folded model's output {name!r} is {y.dtype}{list(y.shape)}, the "
                f"original's {x.dtype}{list(x.shape)}; the fold is wrong"
            )
    return a, b


def _batch_norms(model: ir.Model) -> int:
    return sum(
        1
        for node in all_nodes(model)
        if node.op_type == "BatchNormalization" and node.domain in _DEFAULT_DOMAINS
    )


def _folded_failed(original: ir.Model, folded: ir.Model, e: BaseException) -> VerificationError:
    """What to say when onnxruntime ran the original but not the folded model: a bnfold bug
    when BatchNorms were folded (each fold removes one), else not something the fold did."""
    if _batch_norms(folded) < _batch_norms(original):
        return VerificationError(
            "onnxruntime runs the original model but not the folded one "
            f"({first_line(e)}); please report this bnfold bug with the model"
        )
    return VerificationError(
        "cannot verify: onnxruntime ran the original model, then failed on the same inputs "
        f"running the result, in which bnfold folded no BatchNorm ({first_line(e)}); fold "
        "without --verify"
    )


def _cannot_run_original(e: BaseException) -> VerificationError:
    return VerificationError(
        f"onnxruntime could not run the original model ({first_line(e)}); --verify needs a "
        "model onnxruntime runs: fold without --verify"
    )


def _weight_dtypes(model: ir.Model) -> set[str]:
    """The numpy names of the floating-point types the model's stored tensors have."""
    names = set()
    for tensor in all_tensors(model):
        try:
            dtype = np.dtype(tensor.dtype.numpy())
        except Exception:  # noqa: BLE001 - types numpy has no name for are not floats here
            continue
        if is_floating(dtype):
            names.add(dtype.name)
    return names


def _feeds(model: ir.Model, inputs: Any) -> dict[str, np.ndarray] | None:
    """``inputs`` as onnxruntime feeds: a dict by input name, or arrays in input order."""
    if inputs is None or isinstance(inputs, dict):
        return inputs
    arrays = [inputs] if isinstance(inputs, np.ndarray) else inputs
    names = [v.name for v in _fed_inputs(model)]
    if not isinstance(arrays, (list, tuple)) or len(arrays) != len(names):
        raise InvalidArgumentError(
            f"inputs must be a dict of input name to array, or {len(names)} arrays in the "
            f"order of the model's inputs ({', '.join(map(repr, names))})"
        )
    return {name: np.asarray(a) for name, a in zip(names, arrays, strict=True)}


def verify(
    original: onnx.ModelProto | ir.Model,
    folded: onnx.ModelProto | ir.Model,
    inputs: Any = None,
) -> tuple[float, float]:
    """Run both models in onnxruntime on ``inputs`` (a dict of input name to array, arrays in
    input order, or ``None`` for random ones); return ``(max_abs_err, max_rel_err)`` over the
    floating-point outputs (over all outputs when there is none), each output's relative error
    being ``max|a - b| / max|a|``."""
    original_ir = as_ir_model(original, "original")
    feeds = _feeds(original_ir, inputs)
    with _memory_is_an_error(), quiet_logs():
        a, b = _run_both(original_ir, None, as_ir_model(folded, "folded"), feeds, 0)
        return float_error([x for _, x in a], [y for _, y in b])


@contextlib.contextmanager
def _memory_is_an_error() -> Iterator[None]:
    """Running out of memory while running or comparing the models is a verification that
    cannot be done here, not a bnfold bug."""
    try:
        yield
    except MemoryError:
        raise VerificationError(
            "ran out of memory running the models in onnxruntime on random inputs of the shapes "
            "they declare: fold without --verify, and compare the models on smaller inputs of "
            "your own with bnfold.verify(original, folded, inputs)"
        ) from None
