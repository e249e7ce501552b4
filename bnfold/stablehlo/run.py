"""Running StableHLO programs on the CPU, for ``bnfold.verify`` and ``--verify``.

An ``Exported`` runs through its own ``call``; text is compiled by the XLA CPU client that
jaxlib brings and run on the inputs. Inputs are the caller's, or random ones drawn by
:func:`bnfold.core.compare.random_array` for the function's argument types (every dimension
must then be known). Before a file's module runs, :func:`refuse_unsafe` refuses the ops that
reach outside the computation (custom calls into the runtime, host transfers): a model file is
data, and running it must not run code or touch the machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..core import compare
from ..errors import UnsupportedModelError
from . import mlir
from .constants import np_dtype, symbol_name

# The most elements of random input made for one run.
MAX_INPUT_ELEMENTS = 1 << 28

# Ops that leave the computation: a custom call runs whatever the runtime registered under its
# name (Python callbacks included); the others talk to the host or other devices.
UNSAFE_OPS = frozenset(
    {
        "stablehlo.custom_call",
        "stablehlo.infeed",
        "stablehlo.outfeed",
        "stablehlo.send",
        "stablehlo.recv",
        "mhlo.custom_call",
        "mhlo.infeed",
        "mhlo.outfeed",
        "mhlo.send",
        "mhlo.recv",
    }
)
_SAFE_DIALECTS = ("stablehlo.", "chlo.", "func.", "sdy.", "shape.", "arith.", "tensor.")


def refuse_unsafe(module: Any) -> None:
    """Raise :class:`UnsupportedModelError` naming the first op that would reach outside the
    computation, or that belongs to a dialect bnfold does not run."""
    for op in mlir.walk_ops(module.operation):
        if op.name in UNSAFE_OPS or not op.name.startswith(_SAFE_DIALECTS):
            raise UnsupportedModelError(
                f"--verify does not run modules with {op.name} (it can call into the runtime "
                "or the host); fold without --verify and check the model where you trust it"
            )


# --------------------------------------------------------------------------------------------
# Inputs


def main_function(module: Any) -> Any:
    """The function a module runs: ``@main``, or its only public function."""
    funcs = [op.operation for op in module.body.operations if op.operation.name == "func.func"]
    for f in funcs:
        if symbol_name(f) == "main":
            return f
    public = [
        f
        for f in funcs
        if "sym_visibility" not in f.attributes
        or mlir.ir.StringAttr(f.attributes["sym_visibility"]).value == "public"
    ]
    if len(public) == 1:
        return public[0]
    raise UnsupportedModelError("the module has no @main function to run")


def input_types(module: Any) -> list[tuple[np.dtype, tuple[int, ...]]]:
    """``(dtype, shape)`` of each argument of the module's main function."""
    f = main_function(module)
    ftype = mlir.ir.FunctionType(mlir.ir.TypeAttr(f.attributes["function_type"]).value)
    out = []
    for i, t in enumerate(ftype.inputs):
        try:
            rt = mlir.ir.RankedTensorType(t)
        except (ValueError, TypeError) as e:
            raise UnsupportedModelError(f"argument {i} of @main is a {t}, not a tensor") from e
        dt = np_dtype(rt.element_type)
        if dt is None:
            raise UnsupportedModelError(f"argument {i} of @main has element type {rt.element_type}")
        if not rt.has_static_shape:
            raise UnsupportedModelError(
                f"argument {i} of @main has dynamic dimensions ({t}): pass example inputs"
            )
        out.append((dt, tuple(int(d) for d in rt.shape)))
    return out


def random_inputs(specs: Sequence[tuple[np.dtype, tuple[int, ...]]], seed: int) -> list[np.ndarray]:
    """Random inputs of these dtypes and shapes (within :data:`MAX_INPUT_ELEMENTS`)."""
    total = sum(math.prod(s) for _, s in specs)  # Python integers: no overflow
    if total > MAX_INPUT_ELEMENTS:
        raise UnsupportedModelError(
            f"the inputs have {total:,} elements, more than --verify makes ({MAX_INPUT_ELEMENTS:,})"
        )
    rng = np.random.default_rng(seed)
    return [compare.random_array(dt, shape, rng) for dt, shape in specs]


def _exported_inputs(exported: Any, seed: int) -> list[np.ndarray]:
    specs = []
    for i, aval in enumerate(exported.in_avals):
        if not all(isinstance(d, int) for d in aval.shape):
            raise UnsupportedModelError(
                f"input {i} of the program has symbolic dimensions {aval.shape}: pass "
                "example_inputs"
            )
        specs.append((np.dtype(aval.dtype), tuple(aval.shape)))
    return random_inputs(specs, seed)


# --------------------------------------------------------------------------------------------
# Running


def run_exported(exported: Any, flat_inputs: Sequence[Any]) -> list[np.ndarray]:
    """``exported`` called on its flattened inputs; its outputs, flattened, as numpy arrays."""
    import jax

    args, kwargs = jax.tree_util.tree_unflatten(exported.in_tree, list(flat_inputs))
    out = exported.call(*args, **kwargs)
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(out)]


def run_text(module_or_text: Any, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """A module (or its text) compiled for the CPU and run on ``inputs``."""
    import jax
    from jax.extend import backend

    text = module_or_text if isinstance(module_or_text, str) else str(module_or_text)
    client = backend.get_backend("cpu")
    devices = client.local_devices()[:1]
    executable = client.compile_and_load(text, devices)
    buffers = [jax.device_put(x, devices[0]) for x in inputs]
    return [np.asarray(x) for x in executable.execute(buffers)]


def _flat_example_inputs(example_inputs: Any) -> list[Any]:
    import jax

    if isinstance(example_inputs, dict):
        raise UnsupportedModelError("example_inputs are the positional arguments, not a dict")
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return list(jax.tree_util.tree_leaves(list(args)))


def outputs(model: Any, inputs: Sequence[Any]) -> list[np.ndarray]:
    """``model`` (an ``Exported`` or text) run on flat inputs."""
    if mlir.is_exported(model):
        return run_exported(model, inputs)
    return run_text(model, inputs)


def default_inputs(model: Any, seed: int = 0) -> list[np.ndarray]:
    """Random flat inputs for ``model``."""
    if mlir.is_exported(model):
        return _exported_inputs(model, seed)
    ctx = mlir.context()
    module = mlir.parse_text(model, ctx)
    with ctx:
        return random_inputs(input_types(module), seed)


def verify(original: Any, folded: Any, example_inputs: Any) -> tuple[float, float]:
    """``(max_abs_err, max_rel_err)`` of the two models' floating-point outputs."""
    if type(original) is not type(folded):
        raise UnsupportedModelError(
            f"the original is a {type(original).__name__} and the folded model a "
            f"{type(folded).__name__}: compare models of one kind"
        )
    if example_inputs is None:
        inputs = default_inputs(original)
    elif mlir.is_exported(original):
        inputs = _flat_example_inputs(example_inputs)
    else:
        inputs = [np.asarray(x) for x in _flat_example_inputs(example_inputs)]
    a = outputs(original, inputs)
    b = outputs(folded, inputs)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        raise UnsupportedModelError("the two models' outputs differ in number or shape")
    return compare.float_error(a, b)


__all__ = [
    "MAX_INPUT_ELEMENTS",
    "UNSAFE_OPS",
    "default_inputs",
    "input_types",
    "outputs",
    "random_inputs",
    "refuse_unsafe",
    "run_exported",
    "run_text",
    "verify",
]
