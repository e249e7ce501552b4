"""JAX and StableHLO: a flax ResNet-18 exported with jax.export, before and after bnfold.

The network is a flax linen ResNet-18 (NHWC, basic blocks with identity and projection
shortcuts, 20 BatchNorms), its BatchNorm statistics and affine parameters random but
trained-looking, its parameters closed over (``jax.jit(functools.partial(model.apply,
variables))``), exported with ``jax.export``. Rows:

- ``original``: the exported program as JAX wrote it (each BatchNorm a subtract, a multiply
  and an add of broadcast constants, their factors computed in the graph);
- ``bnfold``: ``bnfold.fold(exported)`` — fold time is the median of ``--rounds`` folds of the
  ``Exported`` (deserialize, fold, serialize); *text* the same for its MLIR text.

Columns: the ops of ``@main`` (all, and the elementwise arithmetic on activations: add,
subtract, multiply, divide of full-size tensors), the serialized size, XLA's compile time
(``jax.jit(exported.call)`` to the first output), the median latency of ``--rounds`` calls on
the CPU, and the max relative error of the outputs against the original's. XLA fuses the
BatchNorm arithmetic into the convolution's consumers itself; the table shows what a fold saves
beyond that (ops and bytes a downstream compiler sees; latency on XLA's CPU backend).

Run ``python -m benchmarks.stablehlo`` (``--rounds``, ``--batch``, ``--size``).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Any

import numpy as np


def resnet18() -> Any:
    import flax.linen as nn
    import jax.numpy as jnp

    class Block(nn.Module):
        features: int
        stride: int = 1

        @nn.compact
        def __call__(self, x: Any) -> Any:
            norm = functools.partial(nn.BatchNorm, use_running_average=True)
            y = nn.Conv(self.features, (3, 3), (self.stride,) * 2, use_bias=False)(x)
            y = nn.relu(norm()(y))
            y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
            y = norm()(y)
            if x.shape[-1] != self.features or self.stride != 1:
                x = nn.Conv(self.features, (1, 1), (self.stride,) * 2, use_bias=False)(x)
                x = norm()(x)
            return nn.relu(x + y)

    class ResNet18(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            x = nn.Conv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
            x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
            for i, features in enumerate((64, 128, 256, 512)):
                for j in range(2):
                    x = Block(features, 2 if i > 0 and j == 0 else 1)(x)
            x = jnp.mean(x, axis=(1, 2))
            return nn.Dense(1000)(x)

    return ResNet18()


def _trained_looking(variables: Any, seed: int) -> Any:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)

    def draw(path: Any, leaf: Any) -> Any:
        name = str(path[-1].key)
        shape, dtype = leaf.shape, leaf.dtype
        if name == "mean":
            return jnp.asarray(rng.normal(0, 0.5, shape), dtype)
        if name == "var":
            return jnp.asarray(rng.uniform(0.2, 2.0, shape), dtype)
        if name == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, shape), dtype)
        if name == "bias" and len(shape) == 1:
            return jnp.asarray(rng.normal(0, 0.2, shape), dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(draw, variables)


_ARITHMETIC = ("stablehlo.add", "stablehlo.subtract", "stablehlo.multiply", "stablehlo.divide")


def op_counts(exported: Any) -> tuple[int, int]:
    """(ops in @main, elementwise arithmetic ops on tensors of rank 2 or more)."""
    from bnfold.stablehlo import mlir

    ctx = mlir.context()
    module = mlir.from_artifact(exported.mlir_module_serialized, ctx)
    with ctx:
        main = next(
            op.operation
            for op in module.body.operations
            if op.operation.name == "func.func"
            and mlir.ir.StringAttr(op.operation.attributes["sym_name"]).value == "main"
        )
        total = arithmetic = 0
        for op in main.regions[0].blocks[0].operations:
            total += 1
            op = op.operation
            if op.name in _ARITHMETIC and mlir.ir.RankedTensorType(op.results[0].type).rank > 1:
                arithmetic += 1
    return total, arithmetic


def _timed(fn: Any, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    import jax
    from jax import export

    import bnfold

    model = resnet18()
    x = np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3))
    x = x.astype(np.float32)
    variables = _trained_looking(model.init(jax.random.key(0), x), seed=1)
    exported = export.export(jax.jit(functools.partial(model.apply, variables)))(x)

    fold_s = _timed(lambda: bnfold.fold(exported), args.rounds)
    folded, report = bnfold.fold(exported, return_report=True)
    text = exported.mlir_module()
    text_s = _timed(lambda: bnfold.fold(text), max(3, args.rounds // 3))

    reference = None
    rows = []
    for name, program, seconds in (("original", exported, None), ("bnfold", folded, fold_s)):
        total, arithmetic = op_counts(program)
        call = jax.jit(program.call)
        t0 = time.perf_counter()
        out = np.asarray(call(x))
        compile_s = time.perf_counter() - t0
        latency = _timed(lambda c=call: c(x).block_until_ready(), args.rounds)
        if reference is None:
            reference = out
        err = float(np.abs(out - reference).max() / np.abs(reference).max())
        rows.append(
            (name, total, arithmetic, len(program.serialize()), seconds, compile_s, latency, err)
        )

    print(f"flax ResNet-18, batch {args.batch}, {args.size}x{args.size}, jax {jax.__version__}")
    print(report.summary())
    head = ("program", "ops", "arith ops", "bytes", "fold s", "compile s", "latency ms", "rel err")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, total, arith, size, seconds, compile_s, latency, err in rows:
        fold_cell = "-" if seconds is None else f"{seconds:.3f}"
        print(
            f"| {name} | {total} | {arith} | {size:,} | {fold_cell} | {compile_s:.2f} | "
            f"{latency * 1e3:.1f} | {err:.1e} |"
        )
    print(f"fold of the module's text: {text_s:.3f} s")


if __name__ == "__main__":
    main()
