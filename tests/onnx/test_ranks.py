"""Ranks and channel axes: ranks come from the declared inputs, and shapes the model annotates
(value_info, outputs, inside branches) are claims checked against them, not premises; a torch
Linear on a flattened 3-D activation transposed into BatchNorm1d folds into its MatMul; a Gemm C
per row, a MatMul by a vector, and a constant on the left of a MatMul are not per-channel
producers.

Tiny models built with ``onnx_models.Graph`` (non-trivial BatchNorm statistics), folded by
``check_fold`` where the full checker accepts them (onnxruntime's outputs of the original and the
folded model compared, optimizations off), or folded and compared in onnxruntime by hand.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import bnfold
from bnfold.core import rules
from tests.helpers.onnx_models import (
    BOOL,
    Graph,
    bn_nodes,
    check_fold,
    check_skip,
    export_torch,
    gemm_model,
    initializer,
    node_input,
    random_feeds,
    rel_err,
    run,
)
from tests.helpers.support import randomize_all


class Lin3(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.b = nn.Linear(8, 6), nn.BatchNorm1d(6)

    def forward(self, x):  # (N, 8, H, W) -> (N, HW, 8) -> Linear -> (N, 6, HW) -> BN
        return self.b(self.l(x.flatten(2).transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("opset", [11, 13])
def test_torch_linear_3d_transpose_bn1d_folds(opset):
    """The Reshape's computed shape leaves the MatMul's rank unknown to shape inference; the
    Transpose's perm fixes it, so the BatchNorm folds into the MatMul."""
    torch.manual_seed(0)
    module = randomize_all(Lin3())
    x = torch.randn(2, 8, 5, 5)
    model = export_torch(module, x, False, opset_version=opset)
    (bn,) = bn_nodes(model)
    (mm,) = [n for n in model.graph.node if n.op_type == "MatMul"]
    adds = {n.name for n in model.graph.node if n.op_type == "Add"}
    feeds = [{"x": x.numpy()}, {"x": torch.randn(2, 8, 5, 5).numpy()}]
    r = check_fold(model, {bn.name: ("folded", mm.name)}, feeds=feeds, may_remove=adds)
    with torch.no_grad():
        want = module(x).numpy()
    assert rel_err([want], r.after[0]) < 1e-5


@pytest.mark.parametrize("c_shape", [(3, 4), (3, 1)], ids=["MxN", "Mx1"])
def test_gemm_per_row_c_channel_axis(c_shape):
    """C of shape (M, N) or (M, 1) varies along the rows, not the channels: kept, exactly,
    with rule channel-axis."""
    r = check_skip(gemm_model(c_shape=c_shape, seed=19), rules.CHANNEL_AXIS)
    assert node_input(r.folded, "gemm", 2) == "c"
    np.testing.assert_array_equal(initializer(r.folded, "c"), initializer(r.model, "c"))


def test_constant_on_the_left_of_a_matmul_is_named_as_such():
    """``W @ x`` is not a layer bnfold folds into; the reason says so rather than calling the
    activation a non-constant weight."""
    from onnx import TensorProto
    from onnx import helper as h

    rng = np.random.default_rng(5)
    c = 4
    inits = [onnx.numpy_helper.from_array(rng.normal(size=(c, 6)).astype("f4"), "W")]
    inits += [
        onnx.numpy_helper.from_array(v.astype("f4"), k)
        for k, v in (
            ("s", rng.uniform(0.5, 2, c)),
            ("b", rng.normal(size=c)),
            ("m", rng.normal(size=c)),
            ("v", rng.uniform(0.5, 2, c)),
        )
    ]
    graph = h.make_graph(
        [
            h.make_node("MatMul", ["W", "x"], ["y"], name="wx"),
            h.make_node("BatchNormalization", ["y", "s", "b", "m", "v"], ["z"], name="bn"),
        ],
        "g",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 5])],
        [h.make_tensor_value_info("z", TensorProto.FLOAT, [2, c, 5])],
        inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=10)
    entry = bnfold.analyze(model).entry("bn")
    assert entry.rule == rules.NO_PRODUCER and "W @ x" in entry.reason


def _annotate(graph: onnx.GraphProto, name: str, shape) -> None:
    """Add a value_info entry to ``graph`` claiming ``name`` has ``shape``."""
    info = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)
    graph.value_info.append(info)


def _kept_unchanged(model: onnx.ModelProto, feeds: list[dict]) -> bnfold.FoldReport:
    """Fold a model that the full checker refuses (so no check_fold): its BatchNorm must be kept
    with a reason about the annotation, and onnxruntime's outputs stay bit-exact."""
    onnx.checker.check_model(model)
    folded, report = bnfold.fold(model, return_report=True)
    entry = report.entry("bn")
    assert entry.rule == rules.CHANNEL_AXIS and "annotates" in entry.reason, entry
    assert len(bn_nodes(folded)) == 1
    for f in feeds:
        for a, b in zip(run(model, f), run(folded, f), strict=True):
            np.testing.assert_array_equal(a, b)
    return report


def _matmul_bn(x_shape: list[int], out_shape=None, seed: int = 30) -> onnx.ModelProto:
    g = Graph(seed=seed)
    x = g.input("x", x_shape)
    c = g.node("MatMul", [x, g.weight("w", [4, 4])], name="mm", outputs=["c"])
    g.output(g.bn(c, 4), shape=out_shape)
    return g.model(infer=out_shape is None)


def test_value_info_of_a_lower_rank_does_not_make_a_fold():
    """x [2, 4, 4] -> MatMul 'c', annotated [4, 4] in value_info, -> BatchNorm: the annotation
    made 'c' 2-D, the channels axis 1, and the fold wrong (relative error 1.09); from the
    declared input 'c' is 3-D, its channels last, and the BatchNorm's on axis 1."""
    model = _matmul_bn([2, 4, 4], out_shape=[2, 4, 4])
    _annotate(model.graph, "c", [4, 4])
    feeds = [random_feeds(model, s) for s in (0, 1)]
    _kept_unchanged(model, feeds)


@pytest.mark.parametrize("where", ["value_info", "output"])
def test_annotation_contradicting_a_foldable_rank_refused(where):
    """x [3, 4] -> MatMul -> BatchNorm folds (2-D, channels last); an annotation saying 'c' or
    the BatchNorm's output is 3-D contradicts the declared input: kept, with the reason."""
    if where == "output":
        model = _matmul_bn([3, 4], out_shape=[3, 4, 1])
    else:
        model = _matmul_bn([3, 4], out_shape=[3, 4])
        _annotate(model.graph, "c", [3, 4, 1])
    feeds = [random_feeds(model, s) for s in (0, 1)]
    report = _kept_unchanged(model, feeds)
    assert "'c'" in report.entry("bn").reason or where == "output"
    # the same model without the wrong annotation folds
    check_fold(_matmul_bn([3, 4], out_shape=[3, 4]), {"bn": ("folded", "mm")})


def test_annotation_inside_an_if_branch_not_trusted():
    """The same trap inside an If branch: the branch's value_info says the MatMul output is 2-D
    while the outer input makes it 3-D; the branch's BatchNorm is kept."""
    outer = Graph(seed=31)
    x = outer.input("x", [2, 4, 4])
    cond = outer.input("cond", [], BOOL)
    then = Graph(seed=32, name="then")
    c = then.node("MatMul", [x, then.weight("w", [4, 4])], name="mm", outputs=["c"])
    then.output(then.bn(c, 4), shape=[2, 4, 4])
    other = Graph(seed=33, name="else")
    other.output(other.node("Identity", [x], name="identity"), shape=[2, 4, 4])
    then_graph = then.graph()
    _annotate(then_graph, "c", [4, 4])
    out = outer.node("If", [cond], name="if", then_branch=then_graph, else_branch=other.graph())
    outer.output(out, shape=[2, 4, 4])
    model = outer.model(opset=17, infer=False)
    rng = np.random.default_rng(0)
    feeds = [
        {"x": rng.standard_normal((2, 4, 4)).astype(np.float32), "cond": np.array(v)}
        for v in (True, False)
    ]
    _kept_unchanged(model, feeds)


def test_annotations_that_agree_still_fold():
    """value_info that agrees with the declared inputs (what exporters write) changes nothing."""
    g = Graph(seed=34)
    x = g.input("x", [2, 3, 4])
    c = g.node("MatMul", [x, g.weight("w", [4, 4])], name="mm", outputs=["c"])
    t = g.node("Transpose", [c], name="t", outputs=["t"], perm=[0, 2, 1])
    g.output(g.bn(t, 4), shape=[2, 4, 3])
    model = g.model(infer=False)
    _annotate(model.graph, "c", [2, 3, 4])
    _annotate(model.graph, "t", [2, "C", 3])
    check_fold(model, {"bn": ("folded", "mm")})


def test_matmul_by_a_vector_is_valid_and_kept():
    """A MatMul by a 1-D constant is valid ONNX (x @ v drops an axis): kept, not an error."""
    g = Graph(seed=36)
    x = g.input("x", [2, 3, 4, 4])
    y = g.node("MatMul", [x, g.weight("w", [4])], name="p")
    g.output(g.bn(y, 3))
    check_skip(g.model(), rules.NO_PRODUCER)
