"""``stablehlo.batch_norm_inference`` after convolutions and dot_generals, built op by op with
jaxlib's MLIR bindings (no text), folded, and run before and after by XLA."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")

import bnfold  # noqa: E402
from bnfold.stablehlo import mlir  # noqa: E402
from bnfold.stablehlo.run import run_text  # noqa: E402

ir, hlo = mlir.ir, mlir.hlo


def _dense(arr: np.ndarray) -> object:
    return ir.DenseElementsAttr.get(np.ascontiguousarray(arr, dtype=np.float32))


def _bn_stats(rng: np.random.Generator, c: int) -> list[np.ndarray]:
    return [
        rng.uniform(0.5, 2.0, c),  # scale
        rng.normal(0, 1, c),  # offset
        rng.normal(0, 1, c),  # mean
        rng.uniform(0.2, 2.0, c),  # variance
    ]


def conv_bn_module(
    layout: str, feature_index: int | None = None, groups: int = 1, seed: int = 0
) -> tuple[str, np.ndarray]:
    """``conv(x, W) -> batch_norm_inference`` as text printed from a module built with the
    bindings; NCHW/OIHW or NHWC/HWIO. ``feature_index`` defaults to the conv's feature axis."""
    rng = np.random.default_rng(seed)
    n, cin, cout, hw = 2, 4, 6, 5
    if layout == "nchw":
        x_shape, w_shape, y_shape = (n, cin, hw, hw), (cout, cin // groups, 3, 3), (n, cout, hw, hw)
        dn = "[b, f, 0, 1]x[o, i, 0, 1]->[b, f, 0, 1]"
        feature = 1
    else:
        x_shape, w_shape, y_shape = (n, hw, hw, cin), (3, 3, cin // groups, cout), (n, hw, hw, cout)
        dn = "[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]"
        feature = 3
    fi = feature if feature_index is None else feature_index
    channels = y_shape[fi]
    ctx = mlir.context()
    with ctx, ir.Location.unknown():
        module = ir.Module.create()
        f32 = ir.F32Type.get()
        x_type = ir.RankedTensorType.get(list(x_shape), f32)
        y_type = ir.RankedTensorType.get(list(y_shape), f32)
        with ir.InsertionPoint(module.body):
            from jaxlib.mlir.dialects import func

            fn = func.FuncOp("main", ir.FunctionType.get([x_type], [y_type]))
            with ir.InsertionPoint(fn.add_entry_block()):
                w = hlo.ConstantOp(_dense(rng.normal(0, 0.5, w_shape))).result
                conv = hlo.ConvolutionOp(
                    y_type,
                    fn.arguments[0],
                    w,
                    dimension_numbers=ir.Attribute.parse(f"#stablehlo.conv<{dn}>"),
                    feature_group_count=groups,
                    batch_group_count=1,
                    padding=ir.DenseIntElementsAttr.get(np.ones((2, 2), dtype=np.int64)),
                ).result
                stats = [hlo.ConstantOp(_dense(v)).result for v in _bn_stats(rng, channels)]
                bn = hlo.BatchNormInferenceOp(conv, *stats, epsilon=1e-3, feature_index=fi)
                func.ReturnOp([bn.result])
        module.operation.verify()
        text = str(module)
    return text, rng.standard_normal(x_shape).astype(np.float32)


def dot_bn_module(seed: int = 0) -> tuple[str, np.ndarray]:
    """``dot_general(x, W) -> batch_norm_inference(feature_index=1)``."""
    rng = np.random.default_rng(seed)
    ctx = mlir.context()
    with ctx, ir.Location.unknown():
        module = ir.Module.create()
        f32 = ir.F32Type.get()
        x_type = ir.RankedTensorType.get([3, 5], f32)
        y_type = ir.RankedTensorType.get([3, 7], f32)
        with ir.InsertionPoint(module.body):
            from jaxlib.mlir.dialects import func

            fn = func.FuncOp("main", ir.FunctionType.get([x_type], [y_type]))
            with ir.InsertionPoint(fn.add_entry_block()):
                w = hlo.ConstantOp(_dense(rng.normal(0, 0.5, (5, 7)))).result
                dims = hlo.DotDimensionNumbers.get(
                    lhs_batching_dimensions=[],
                    rhs_batching_dimensions=[],
                    lhs_contracting_dimensions=[1],
                    rhs_contracting_dimensions=[0],
                )
                y = hlo.DotGeneralOp(y_type, fn.arguments[0], w, dims).result
                stats = [hlo.ConstantOp(_dense(v)).result for v in _bn_stats(rng, 7)]
                bn = hlo.BatchNormInferenceOp(y, *stats, epsilon=1e-5, feature_index=1)
                func.ReturnOp([bn.result])
        module.operation.verify()
        text = str(module)
    return text, rng.standard_normal((3, 5)).astype(np.float32)


def _check_fold(text: str, x: np.ndarray, folds: int) -> str:
    folded, report = bnfold.fold(text, return_report=True)
    assert len(report.folded) == folds, str(report)
    before = run_text(text, [x])[0].astype(np.float64)
    after = run_text(folded, [x])[0].astype(np.float64)
    assert np.abs(after - before).max() <= 1e-5 * max(1.0, np.abs(before).max())
    # the BatchNorm changes the outputs a lot: the comparison above could fail
    assert np.abs(before).max() > 0.5
    return folded


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("groups", [1, 2])
def test_batch_norm_inference_after_conv_folds(layout: str, groups: int) -> None:
    text, x = conv_bn_module(layout, groups=groups)
    folded = _check_fold(text, x, 1)
    assert "batch_norm_inference" not in folded
    assert folded.count("stablehlo.add") == 1


def test_batch_norm_inference_after_dot_general_folds() -> None:
    text, x = dot_bn_module()
    folded = _check_fold(text, x, 1)
    assert "batch_norm_inference" not in folded


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_batch_norm_on_another_axis_is_kept(layout: str) -> None:
    # a BatchNorm over a spatial axis of the size of the channels: never the conv's features
    text, x = conv_bn_module(layout, feature_index=2 if layout == "nchw" else 1)
    folded, report = bnfold.fold(text, return_report=True)
    (entry,) = report.entries
    assert entry.rule == "channel-axis", str(report)
    assert folded.count("batch_norm_inference") == 1
    np.testing.assert_array_equal(run_text(text, [x])[0], run_text(folded, [x])[0])


def test_text_is_returned_without_locations_when_it_had_none() -> None:
    text, _ = conv_bn_module("nchw")
    folded = bnfold.fold(text)
    assert "loc(" not in folded
    assert bnfold.fold(folded) == folded  # nothing left to fold: the same text
