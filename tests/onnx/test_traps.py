"""Traps of the ONNX frontend a reviewer found, one focused test each.

Same style as ``test_onnx_fold``: tiny models built with ``onnx_models.Graph`` (non-trivial
BatchNorm statistics), folded by ``check_fold``, which compares onnxruntime's outputs of the
original and the folded model (ORT_DISABLE_ALL), runs the full checker and checks the report.
"""

from __future__ import annotations

import gc
import warnings

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from torch import nn

import bnfold
from bnfold.cli import main
from bnfold.core import rules
from tests.helpers.onnx_models import (
    BFLOAT16,
    BOOL,
    DOUBLE,
    INT64,
    Graph,
    bn_nodes,
    check_fold,
    check_skip,
    conv_model,
    export_torch,
    gemm_model,
    initializer,
    node_input,
    peak_growth,
    random_feeds,
    rel_err,
    run,
    shared_scale_model,
)

# --------------------------------------------------------------------------------------------
# 1. One initializer as both operands of the producer


@pytest.mark.parametrize("op", ["MatMul", "Gemm", "Gemm-transB"])
def test_same_weight_as_both_operands(op):
    """MatMul(W, W) / Gemm(A=W, B=W) -> BN: the folded weight is a new tensor; W, which is
    also the activation, keeps its values (scaling it in place gave a relative error of 0.37)."""
    c = 4
    g = Graph(seed=11)
    x = g.input("x", [c, c])
    w = g.weight("w", [c, c])
    attrs = {"transB": 1} if op == "Gemm-transB" else {}
    y = g.node(op.split("-")[0], [w, w], name="mm", **attrs)
    g.output(g.node("Add", [g.bn(y, c), x], name="add"))
    model = g.model()
    r = check_fold(model, {"bn": ("folded", "mm")})
    np.testing.assert_array_equal(initializer(r.folded, "w"), initializer(model, "w"))
    assert node_input(r.folded, "mm", 0) == "w"
    assert node_input(r.folded, "mm", 1) != "w"


# --------------------------------------------------------------------------------------------
# 2. An Add in a subgraph over a producer of the outer graph


def test_add_in_branch_over_outer_conv_refused():
    """Conv in the main graph; in an If branch Add(conv_out, const) -> BN -> branch output: the
    Conv is not in the BatchNorm's graph, so nothing is folded and the model runs both ways."""
    c = 3
    outer = Graph(seed=12)
    x = outer.input("x", [1, c, 5, 5])
    cond = outer.input("cond", [], BOOL)
    conv = outer.node("Conv", [x, outer.weight("w", [c, c, 3, 3])], name="conv", pads=[1] * 4)
    k = outer.init("k", outer.randn(c, 1, 1))
    bn_params = outer.bn_params(c)

    then = Graph(seed=13, name="then")
    added = then.node("Add", [conv, k], name="add")
    then.output(then.bn(added, c, params=bn_params), shape=[1, c, 5, 5])
    other = Graph(seed=14, name="else")
    other.output(other.node("Identity", [x], name="identity"), shape=[1, c, 5, 5])

    out = outer.node("If", [cond], name="if", then_branch=then.graph(), else_branch=other.graph())
    outer.output(out)
    model = outer.model(opset=17)
    feeds = [
        {
            "x": np.random.default_rng(s).standard_normal((1, c, 5, 5)).astype(np.float32),
            "cond": np.array(bool(v)),
        }
        for s, v in enumerate((True, False))
    ]
    r = check_skip(model, rules.NO_PRODUCER, feeds=feeds)
    assert "Add" in r.report.entry("bn").reason
    assert len(bn_nodes(r.folded)) == 1


# --------------------------------------------------------------------------------------------
# 3. An onnx_ir model with memory-mapped external data, folded out of place


def test_external_ir_model_usable_after_fold(tmp_path):
    """After ``fold(ir_model)`` the input can still be saved with external data and verified
    against the result, without a garbage collection (a cache held numpy views of the mmapped
    data: BufferError)."""
    model = conv_model(cin=16, cout=32, size=6, batch=1, seed=15)
    path = tmp_path / "m.onnx"
    external = onnx.ModelProto()
    external.CopyFrom(model)  # save_model moves the tensors of what it saves out
    onnx.save_model(
        external, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0
    )
    enabled = gc.isenabled()
    gc.disable()  # a collection would hide the bug
    try:
        im = ir.load(path)
        folded, report = bnfold.fold(im, return_report=True)
        assert [e.action for e in report] == ["folded"]
        ir.save(im, tmp_path / "copy.onnx", external_data="copy.onnx.data")
        max_abs, max_rel = bnfold.verify(im, folded, None)
        assert max_rel < 1e-5, (max_abs, max_rel)
        ir.save(folded, tmp_path / "folded.onnx", external_data="folded.onnx.data")
    finally:
        if enabled:
            gc.enable()
    copy = onnx.load(tmp_path / "copy.onnx")
    for name in ("w", "b", "bn.mean"):
        np.testing.assert_array_equal(initializer(copy, name), initializer(model, name))
    onnx.checker.check_model(onnx.load(tmp_path / "folded.onnx"), full_check=True)


# --------------------------------------------------------------------------------------------
# 4. --verify on a model whose input declares a huge static shape


@pytest.mark.parametrize("shape", [[1, 3, 2**20, 2**20], [2**62, 3, 5, 5]], ids=["hw", "batch"])
def test_verify_huge_declared_input_refused(shape, tmp_path, capsys):
    """No random inputs of terabytes: the CLI says so in one line and returns 1; the API
    raises VerificationError."""
    g = Graph(seed=16)
    x = g.input("x", shape)
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3, 3])], name="conv")
    g.output(g.bn(y, 4))
    model = g.model()
    path = tmp_path / "huge.onnx"
    onnx.save(model, path)
    capsys.readouterr()
    assert main([str(path), "--verify"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("bnfold: error:") and "Memory" not in err, err
    folded = bnfold.fold(model)
    with pytest.raises(bnfold.VerificationError):
        bnfold.verify(model, folded, None)


# --------------------------------------------------------------------------------------------
# 5. Cast-1's string ``to`` attribute


def test_cast1_string_to_feeding_conv_bias():
    """Opset 5, IR 3: Cast-1 has a STRING ``to``; it makes the Conv's bias. Analyzing and
    folding do not raise, the BatchNorm is reported and the result is valid."""
    c = 3
    g = Graph(seed=17)
    x = g.input("x", [1, 3, 5, 5])
    b = g.node("Cast", [g.init("b64", g.uniform(c, signed=True), DOUBLE)], name="cast", to="FLOAT")
    y = g.node("Conv", [x, g.weight("w", [c, 3, 3, 3]), b], name="conv")
    g.output(g.bn(y, c, is_test=1, consumed_inputs=[0, 0, 0, 1, 1]), shape=[1, c, 3, 3])
    model = g.model(opset=5, ir_version=3, legacy_inputs=True)
    cast = model.graph.node[0]
    assert cast.attribute[0].type == onnx.AttributeProto.STRING
    onnx.checker.check_model(model, full_check=True)
    entry = bnfold.analyze(model).entry("bn")
    expected = {"bn": ("folded", "conv") if entry.folded else ("skipped", entry.rule)}
    check_fold(model, expected, numbers="none")  # onnxruntime does not run opset 5


# --------------------------------------------------------------------------------------------
# 6. A weight whose raw_data does not fit its dims


def test_truncated_weight_raw_data_skipped():
    model = conv_model(seed=18)
    w = next(t for t in model.graph.initializer if t.name == "w")
    w.raw_data = w.raw_data[:-8]
    before = model.SerializeToString()
    report = bnfold.analyze(model)
    folded, folded_report = bnfold.fold(model, return_report=True)
    assert model.SerializeToString() == before
    assert report.to_list() == folded_report.to_list()
    e = report.entry("bn")
    assert e.action == "skipped" and e.rule == rules.VALID_VALUES, e
    assert e.reason.strip()
    assert [n.op_type for n in folded.graph.node] == ["Conv", "BatchNormalization"]
    new_w = next(t for t in folded.graph.initializer if t.name == "w")
    assert new_w.raw_data == w.raw_data


# --------------------------------------------------------------------------------------------
# 7. torch Linear on a flattened 3-D activation, transposed into BatchNorm1d


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
    module = Lin3().eval()
    with torch.no_grad():
        module.b.weight.uniform_(0.5, 2)
        module.b.bias.normal_()
        module.b.running_mean.normal_()
        module.b.running_var.uniform_(0.5, 2)
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


# --------------------------------------------------------------------------------------------
# 8. Gemm with a per-row C


@pytest.mark.parametrize("c_shape", [(3, 4), (3, 1)], ids=["MxN", "Mx1"])
def test_gemm_per_row_c_channel_axis(c_shape):
    """C of shape (M, N) or (M, 1) varies along the rows, not the channels: kept, exactly,
    with rule channel-axis."""
    r = check_skip(gemm_model(c_shape=c_shape, seed=19), rules.CHANNEL_AXIS)
    assert node_input(r.folded, "gemm", 2) == "c"
    np.testing.assert_array_equal(initializer(r.folded, "c"), initializer(r.model, "c"))


# --------------------------------------------------------------------------------------------
# 9. A BatchNorm without affine parameters, as the dynamo exporter writes it


def test_dynamo_batch_norm_without_affine_folds():
    """The exporter's scale and bias are ``Expand(CastLike(1 or 0, y), Shape(y))`` of the conv
    output ``y``: one value for every channel, and ``Shape``/``CastLike`` only read ``y``'s
    shape and type, so the BatchNorm folds and that subgraph goes."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, affine=False)).eval()
    with torch.no_grad():
        module[1].running_mean.normal_()
        module[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 8, 8)
    model = export_torch(module, x, True, opset_version=18, input_names=["x"])
    (bn,) = bn_nodes(model)
    assert any(n.op_type == "Expand" for n in model.graph.node)
    (conv,) = [n for n in model.graph.node if n.op_type == "Conv"]
    feeds = [{"x": x.numpy()}, {"x": torch.randn(2, 4, 8, 8).numpy()}]
    extra = {n.name for n in model.graph.node if n.op_type in ("Expand", "CastLike", "Shape")}
    r = check_fold(model, {bn.name: ("folded", conv.name)}, feeds=feeds, may_remove=extra)
    with torch.no_grad():
        want = module(x).numpy()
    assert rel_err([want], r.after[0]) < 1e-5
    assert {n.op_type for n in r.folded.graph.node} == {"Conv"}


# --------------------------------------------------------------------------------------------
# 10. Sibling branches reusing a value name


def _branch(tag: str, x: str, w: str, reshape: bool) -> onnx.GraphProto:
    from onnx import TensorProto
    from onnx import helper as h

    nodes = [
        h.make_node("Identity", [x], ["xx"]),
        h.make_node("MatMul", ["xx", w], ["mm"], name=f"mm{tag}"),
        h.make_node(
            "BatchNormalization",
            ["mm", f"s{tag}", f"b{tag}", f"m{tag}", f"v{tag}"],
            [f"y{tag}"],
            name=f"bn{tag}",
        ),
    ]
    out = f"y{tag}"
    if reshape:
        nodes.append(h.make_node("Reshape", [out, "shape"], [f"r{tag}"]))
        out = f"r{tag}"
    return h.make_graph(
        nodes, f"g{tag}", [], [h.make_tensor_value_info(out, TensorProto.FLOAT, None)]
    )


@pytest.mark.parametrize("then_first", [True, False])
def test_sibling_branches_do_not_lend_each_other_ranks(then_first):
    """Both If branches name their MatMul output ``mm``: 2-D in one (foldable), 3-D in the other
    (its BatchNorm normalises rows). Shape inference results are per scope, so the 3-D one is
    never folded along the wrong axis (it was, with rel error 0.56)."""
    from onnx import TensorProto
    from onnx import helper as h

    rng = np.random.default_rng(3)
    c = 4
    two_d, three_d = _branch("T", "x2", "Wa", False), _branch("E", "x3", "Wb", True)
    branches = (two_d, three_d) if then_first else (three_d, two_d)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((6, c)).astype(np.float32), "Wa"),
        onnx.numpy_helper.from_array(rng.standard_normal((6, c)).astype(np.float32), "Wb"),
        onnx.numpy_helper.from_array(np.array([8, 4], np.int64), "shape"),
    ]
    for tag in "TE":
        for name, values in (
            ("s", rng.uniform(0.5, 2, c)),
            ("b", rng.normal(size=c)),
            ("m", rng.normal(size=c)),
            ("v", rng.uniform(0.5, 2, c)),
        ):
            inits.append(onnx.numpy_helper.from_array(values.astype(np.float32), name + tag))
    graph = h.make_graph(
        [h.make_node("If", ["cond"], ["o"], then_branch=branches[0], else_branch=branches[1])],
        "siblings",
        [
            h.make_tensor_value_info("x2", TensorProto.FLOAT, [3, 6]),
            h.make_tensor_value_info("x3", TensorProto.FLOAT, [2, 4, 6]),
            h.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [h.make_tensor_value_info("o", TensorProto.FLOAT, None)],
        inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    folded, report = bnfold.fold(model, return_report=True)
    assert not report.entry("bnE").folded
    x2 = rng.standard_normal((3, 6)).astype(np.float32)
    x3 = rng.standard_normal((2, 4, 6)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x2": x2, "x3": x3, "cond": np.array(cond)}
        before, after = run(model, feeds), run(folded, feeds)
        assert rel_err(before, after) < 1e-5


# --------------------------------------------------------------------------------------------
# 11. Constant subgraphs the evaluator must read as onnxruntime does, or not at all


def _const(name: str, array) -> onnx.NodeProto:
    from onnx import helper as h

    return h.make_node(
        "Constant", [], [name], value=onnx.numpy_helper.from_array(np.asarray(array), name)
    )


def _conv_bn_with(mid: list, bn_in: str, params: dict, x_shape: tuple) -> onnx.ModelProto:
    """Conv(x) -> y, then ``mid`` nodes, then BatchNormalization(bn_in) with parameters named
    ``s``, ``b``, ``m``, ``v`` unless ``params`` maps them to values ``mid`` computes."""
    from onnx import TensorProto
    from onnx import helper as h

    rng = np.random.default_rng(11)
    c = 4
    stored = {
        "s": rng.uniform(0.5, 2, c),
        "b": rng.normal(size=c),
        "m": rng.normal(size=c),
        "v": rng.uniform(0.5, 2, c),
    }
    names = [params.get(k, k) for k in "sbmv"]
    inits = [onnx.numpy_helper.from_array(rng.normal(size=(c, x_shape[1], 1, 1)).astype("f4"), "w")]
    inits += [
        onnx.numpy_helper.from_array(stored[k].astype("f4"), k) for k in "sbmv" if k not in params
    ]
    nodes = [h.make_node("Conv", ["x", "w"], ["y"], name="conv"), *mid]
    nodes.append(h.make_node("BatchNormalization", [bn_in, *names], ["z"], name="bn"))
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [h.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        inits,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 21)], ir_version=10)


def _cases():
    from onnx import TensorProto
    from onnx import helper as h

    empty = _const("ax", np.array([], np.int64))
    yield (
        "squeeze-empty-axes-constant",
        _conv_bn_with(
            [
                _const("c", np.ones((4, 1, 1), np.float32) * 0.7),
                empty,
                h.make_node("Squeeze", ["c", "ax"], ["cq"]),
                h.make_node("Add", ["y", "cq"], ["ya"]),
            ],
            "ya",
            {},
            (2, 3, 5, 4),
        ),
    )
    yield (
        "squeeze-empty-axes-layout",
        _conv_bn_with([empty, h.make_node("Squeeze", ["y", "ax"], ["yq"])], "yq", {}, (1, 3, 1, 4)),
    )
    strings = np.array([b"1_000", b"2e1x", b"0.5", b"-3"], dtype=object)
    yield (
        "cast-from-string",
        _conv_bn_with(
            [_const("bs", strings), h.make_node("Cast", ["bs"], ["bb"], to=TensorProto.FLOAT)],
            "y",
            {"b": "bb"},
            (2, 3, 5, 4),
        ),
    )
    doubles = np.array([2049.0001, 1 + 2**-11 + 2**-40, 0.5, -3.0])
    yield (
        "double-to-float16",
        _conv_bn_with(
            [
                _const("md", doubles),
                h.make_node("Cast", ["md"], ["mh"], to=TensorProto.FLOAT16),
                h.make_node("Cast", ["mh"], ["mf"], to=TensorProto.FLOAT),
            ],
            "y",
            {"m": "mf"},
            (2, 3, 5, 4),
        ),
    )
    half = np.array([300.0, 0.1, 2.0, 7.0], np.float16)
    yield (
        "float16-arithmetic",
        _conv_bn_with(
            [
                _const("a", half),
                h.make_node("Mul", ["a", "a"], ["aa"]),
                h.make_node("Cast", ["aa"], ["vf"], to=TensorProto.FLOAT),
            ],
            "y",
            {"v": "vf"},
            (2, 3, 5, 4),
        ),
    )
    yield (
        "cast-to-int4",
        _conv_bn_with(
            [
                _const("f", np.array([0.5, 2.5, -1.5, 3.7], np.float32)),
                h.make_node("Cast", ["f"], ["i4"], to=TensorProto.INT4),
                h.make_node("Cast", ["i4"], ["bi"], to=TensorProto.FLOAT),
            ],
            "y",
            {"b": "bi"},
            (2, 3, 5, 4),
        ),
    )
    yield (
        "uniform-mean",
        _conv_bn_with(
            [
                _const("one", np.array(0.3, np.float32)),
                h.make_node("Shape", ["y"], ["sh"], start=1, end=2),
                h.make_node("Expand", ["one", "sh"], ["mu"]),
            ],
            "y",
            {"m": "mu"},
            (2, 3, 5, 4),
        ),
    )


@pytest.mark.parametrize("name, model", list(_cases()), ids=[n for n, _ in _cases()])
def test_constant_subgraphs_mean_what_onnxruntime_computes(name, model):
    """Each folded or kept, never wrong: an empty Squeeze axes list squeezes every 1-sized
    axis; string, int4 and float8 casts, double-to-float16 roundings and 16-bit arithmetic are
    not evaluated (runtimes differ from numpy there); a mean spread over a run-time shape is
    one value per channel (these were wrong by up to 131x, or refused)."""
    folded, report = bnfold.fold(model, return_report=True)
    x = np.random.default_rng(0).standard_normal(
        [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    )
    feeds = {"x": x.astype(np.float32)}
    before, after = run(model, feeds), run(folded, feeds)
    assert rel_err(before, after) < 1e-5
    assert report.entry("bn").folded == (name == "uniform-mean")


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


# --------------------------------------------------------------------------------------------
# 12. Found by the file fuzzer (tests/fuzz/files.py): malformed nodes, constants that would take
#     gigabytes, shape inference that would, and warnings of handled overflows


def _two_conv_bns(seed: int = 21) -> onnx.ModelProto:
    g = Graph(seed=seed)
    x = g.input("x", [2, 3, 6, 6])
    y = g.bn(g.node("Conv", [x, g.weight("w1", [4, 3, 3, 3])], name="conv1"), 4, name="bn1")
    z = g.node("Conv", [y, g.weight("w2", [4, 4, 1, 1])], name="conv2")
    g.output(g.bn(z, 4, name="bn2"))
    return g.model()


def test_invalid_attribute_refused_before_anything_changes():
    """A wrong-typed attribute on a node bnfold reads (here the second BatchNorm's epsilon) is an
    invalid model: UnsupportedModelError naming it, raised before the first BatchNorm is folded
    (it was a TypeError from onnx_ir, after an ``inplace=True`` fold had changed the model)."""
    model = _two_conv_bns()
    (bn2,) = [n for n in model.graph.node if n.name == "bn2"]
    del bn2.attribute[:]
    bn2.attribute.append(onnx.helper.make_attribute("epsilon", "1e-5"))
    with pytest.raises(bnfold.UnsupportedModelError, match="'epsilon' is of type STRING"):
        bnfold.analyze(model)
    im = ir.serde.deserialize_model(model)
    with pytest.raises(bnfold.UnsupportedModelError, match="bn2"):
        bnfold.fold(im, inplace=True)
    assert [n.op_type for n in im.graph].count("BatchNormalization") == 2


@pytest.mark.parametrize("c_shape", [(7,), (1, 7)])
def test_gemm_c_of_another_length_is_kept(c_shape):
    """A Gemm C that fits neither one value nor one per output channel is kept with a reason
    (np.broadcast_to raised ValueError)."""
    model = gemm_model(n=4)
    c = next(t for t in model.graph.initializer if t.name == "c")
    c.CopyFrom(onnx.numpy_helper.from_array(np.ones(c_shape, np.float32), "c"))
    folded, report = bnfold.fold(model, return_report=True)
    entry = report.entry("bn")
    assert entry.rule == rules.VALID_VALUES and "C has shape" in entry.reason, entry
    assert len(bn_nodes(folded)) == 1


def _big_constant_cases():
    from onnx import TensorProto
    from onnx import helper as h

    def expand(name: str, n: int, dtype=np.float32) -> list[onnx.NodeProto]:
        return [
            _const(f"{name}_fill", np.array(1.5, dtype)),
            _const(f"{name}_shape", np.array([n], np.int64)),
            h.make_node("Expand", [f"{name}_fill", f"{name}_shape"], [name]),
        ]

    parts = [f"e{i}" for i in range(16)]
    concat = [n for p in parts for n in expand(p, 2**22)]
    yield "concat", [*concat, h.make_node("Concat", parts, ["vv"], axis=0)]
    fill = onnx.numpy_helper.from_array(np.array([1.5]), "fill")
    yield (
        "constant-of-shape",
        [
            _const("sh", np.array([2**24], np.int64)),
            h.make_node("ConstantOfShape", ["sh"], ["vd"], value=fill),
            h.make_node("Cast", ["vd"], ["vv"], to=TensorProto.FLOAT),
        ],
    )
    yield (
        "cast",
        [
            *expand("e", 2**23),
            h.make_node("Cast", ["e"], ["ed"], to=TensorProto.DOUBLE),
            h.make_node("Cast", ["ed"], ["vv"], to=TensorProto.FLOAT),
        ],
    )
    yield (
        "add-chain",
        [
            *expand("e", 2**23),
            h.make_node("Add", ["e", "e"], ["a1"]),
            h.make_node("Add", ["a1", "a1"], ["a2"]),
            h.make_node("Add", ["a2", "a2"], ["vv"]),
        ],
    )


@pytest.mark.parametrize(
    "name, mid", list(_big_constant_cases()), ids=[n for n, _ in _big_constant_cases()]
)
def test_constant_subgraphs_cannot_take_gigabytes(name, mid):
    """A few hundred bytes of Expand, Concat, ConstantOfShape, Cast or Add make a "constant" of
    hundreds of MiB: bnfold evaluates at most 64 MiB of computed values per BatchNorm, refusing
    before it allocates (every intermediate was cached up to 2**24 elements: +1 GiB from a
    1.4 KB file, and Concat allocated before its size was checked)."""
    import tracemalloc

    model = _conv_bn_with(mid, "y", {"v": "vv"}, (2, 3, 5, 4))
    tracemalloc.start()
    try:
        report = bnfold.analyze(model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    entry = report.entry("bn")
    assert entry.rule == rules.CONSTANT_PARAMS and "MiB" in entry.reason, entry
    assert peak < 80 * 2**20, f"{peak / 2**20:.0f} MiB"


def _count_shape_inference(monkeypatch) -> list[int]:
    calls: list[int] = []
    infer = onnx.shape_inference.infer_shapes

    def counted(*args, **kwargs):
        calls.append(1)
        return infer(*args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", counted)
    return calls


def test_shape_inference_does_not_expand_large_constants(monkeypatch):
    """A 1 KB model whose conv weight is ``Cast(Mul(Expand(c, [2**22])))``: the rank of the second
    conv's input comes from ONNX shape inference, which with data propagation walked every
    element of the 1-D tensor (at 2**24: 3.4 GiB and 17 s)."""
    from onnx import TensorProto

    g = Graph(seed=22)
    x = g.input("x", [1, 2, 5, 5])
    fill = g.node("Constant", [], name="fill", value=onnx.numpy_helper.from_array(np.array(0.5)))
    n = onnx.numpy_helper.from_array(np.array([2**22]))
    d = g.node("Expand", [fill, g.node("Constant", [], name="n", value=n)], name="expand")
    w = g.node("Cast", [g.node("Mul", [d, d], name="mul")], name="cast", to=TensorProto.FLOAT)
    y = g.bn(g.node("Conv", [x, w], name="conv1"), 2, name="bn1")
    g.output(g.bn(g.node("Conv", [y, w], name="conv2"), 2, name="bn2"), shape=[1, 2, 5, 5])
    model = g.model(infer=False)
    calls = _count_shape_inference(monkeypatch)
    report, growth = peak_growth(lambda: bnfold.analyze(model))
    assert calls, "the test needs a rank only shape inference gives"
    assert [e.rule for e in report] == [rules.CONSTANT_PARAMS] * 2
    assert growth < 150 * 2**20, f"{growth / 2**20:.0f} MiB"


def test_rank_through_reshape_of_shape_arithmetic_still_inferred(monkeypatch):
    """Without data propagation, shape inference still gives the rank of a Reshape whose shape
    is computed from Shape (how exporters flatten), which a MatMul fold needs."""
    g = Graph(seed=23)
    x = g.input("x", [2, 3, 4])
    sh = g.node("Shape", [x], name="shape")
    st, en = g.constant("st", np.array([2]), INT64), g.constant("en", np.array([3]), INT64)
    tail = g.node("Slice", [sh, st, en], name="slice")
    head = g.constant("head", np.array([-1]), INT64)
    r = g.node("Reshape", [x, g.node("Concat", [head, tail], name="concat", axis=0)], name="r")
    y = g.node("MatMul", [r, g.weight("w", [4, 5])], name="mm")
    g.output(g.bn(y, 5))
    model = g.model(opset=17)
    calls = _count_shape_inference(monkeypatch)
    assert bnfold.analyze(model).entry("bn").folded
    assert calls, "the test needs a rank only shape inference gives"
    monkeypatch.undo()
    check_fold(model, {"bn": ("folded", "mm")})


def _stats(g: Graph, *values) -> list[str]:
    return [g.init(n, np.array(a)) for n, a in zip("sbmv", values, strict=True)]


def _overflow_cases():
    g = Graph(seed=24)  # float32 weights of 1e30 scaled by 1e10: the float32 product overflows
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.init("w", np.full((4, 3, 1, 1), 1e30))], name="conv")
    params = _stats(g, [1e10] * 4, [0] * 4, [0] * 4, [1] * 4)
    g.output(g.bn(y, 4, params=params))
    yield "weight-product", g.model()

    g = Graph(seed=25)  # a float64 BatchNorm scale of 1e300 does not fit the float32 weight
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 1, 1])], name="conv")
    params = [g.init("s", np.full(4, 1e300), DOUBLE), g.init("b", np.zeros(4), DOUBLE)]
    params += [g.init(n, np.full(4, v)) for n, v in (("m", 0.0), ("v", 1.0))]
    g.output(g.bn(y, 4, params=params))
    yield "float64-scale", g.model(infer=False)

    g = Graph(BFLOAT16, seed=26)  # a signalling NaN of bfloat16 warned as it became float64
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 1, 1])], name="conv")
    nan = np.full(4, 0x7F81, np.uint16).view(ml_dtypes.bfloat16)
    g.output(g.bn(y, 4, params=_stats(g, [1] * 4, [0] * 4, nan, [1] * 4)))
    yield "bfloat16-nan", g.model(infer=False)

    model = gemm_model(dtype=DOUBLE)  # float64: s * C overflows, the weights do not
    for t in model.graph.initializer:
        if t.name in ("c", "bn.scale"):
            value = 1e10 if t.name == "c" else 1e300
            t.CopyFrom(onnx.numpy_helper.from_array(np.full(4, value), t.name))
    yield "gemm-bias", model

    model = conv_model()  # complex statistics: numpy dropped the imaginary part, with a warning
    for t in model.graph.initializer:
        if t.name == "bn.mean":
            t.CopyFrom(onnx.numpy_helper.from_array(np.full(6, 1 + 2j, np.complex64), t.name))
    yield "complex-mean", model


@pytest.mark.parametrize(
    "name, model", list(_overflow_cases()), ids=[n for n, _ in _overflow_cases()]
)
def test_overflowing_folds_are_refused_without_warnings(name, model):
    """Overflows and odd numbers bnfold refuses (valid-values) print no RuntimeWarning: the
    command line's stderr carried numpy's 'overflow encountered in multiply / cast' and
    'invalid value encountered in cast' on success."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded, report = bnfold.fold(model, return_report=True)
    assert report.entry("bn").rule == rules.VALID_VALUES, report.entry("bn")
    assert len(bn_nodes(folded)) == 1


# --------------------------------------------------------------------------------------------
# Shapes the model annotates are claims, not premises: ranks come from the declared inputs


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


# --------------------------------------------------------------------------------------------
# Operands of a rank the operator does not take: the model is invalid, said before indexing


def _with_operand(op: str, w_shape: list[int], param: str = "", p_shape=()) -> onnx.ModelProto:
    """``op`` -> BatchNorm with a weight of ``w_shape``, or BatchNorm parameter ``param``
    (scale, bias, mean, var) of ``p_shape``."""
    x_shape = {"Gemm": [2, 4], "MatMul": [2, 3, 4]}.get(op, [2, 4, 5, 5])
    g = Graph(seed=35)
    x = g.input("x", x_shape)
    y = g.node(op, [x, g.weight("w", w_shape)], name="p")
    params = g.bn_params(4)
    if param:
        i = ["scale", "bias", "mean", "var"].index(param)
        params[i] = g.init(f"bad.{param}", np.ones(p_shape))
    g.output(g.bn(y, 4, params=params))
    return g.model(infer=False)


_INVALID_OPERANDS = {
    "gemm-b-1d": ("Gemm", [4], "", ()),
    "gemm-b-0d": ("Gemm", [], "", ()),
    "gemm-b-3d": ("Gemm", [4, 4, 4], "", ()),
    "conv-w-2d": ("Conv", [4, 4], "", ()),
    "conv-transpose-w-1d": ("ConvTranspose", [4], "", ()),
    "matmul-w-0d": ("MatMul", [], "", ()),
    "bn-scale-0d": ("Conv", [4, 4, 1, 1], "scale", ()),
    "bn-mean-2d": ("Conv", [4, 4, 1, 1], "mean", (4, 1)),
    "bn-var-0d": ("Conv", [4, 4, 1, 1], "var", ()),
}


@pytest.mark.parametrize("case", list(_INVALID_OPERANDS))
def test_operand_of_a_rank_the_operator_refuses(case, tmp_path, capsys):
    """A Gemm with a 1-D or 0-D B raised IndexError (the command line: internal error, exit 3),
    and a 1-D B folded into a model onnxruntime refuses anyway; a 0-D BatchNorm scale folded.
    Every such operand is now UnsupportedModelError, from fold, analyze and the command line."""
    op, w_shape, param, p_shape = _INVALID_OPERANDS[case]
    model = _with_operand(op, w_shape, param, p_shape)
    with pytest.raises(Exception, match="ONNXRuntimeError"):
        run(model, random_feeds(model))  # the model is invalid indeed
    for call in (bnfold.fold, bnfold.analyze):
        with pytest.raises(bnfold.UnsupportedModelError, match=r"-D, but .* takes") as e:
            call(model)
        assert "\n" not in str(e.value)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert main([str(path), "-o", str(tmp_path / "out.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bnfold: error:") and err.count("\n") == 1 and "-D, but" in err, err
    assert not (tmp_path / "out.onnx").exists()


def test_matmul_by_a_vector_is_valid_and_kept():
    """A MatMul by a 1-D constant is valid ONNX (x @ v drops an axis): kept, not an error."""
    g = Graph(seed=36)
    x = g.input("x", [2, 3, 4, 4])
    y = g.node("MatMul", [x, g.weight("w", [4])], name="p")
    g.output(g.bn(y, 3))
    check_skip(g.model(), rules.NO_PRODUCER)


def test_computed_zero_d_batch_norm_parameter_refused():
    """A BatchNorm scale computed as a 0-d constant (not stored, so not checked up front) is
    not taken as one value for every channel: only an Expand over a run-time shape is."""
    model = _with_operand("Conv", [4, 4, 1, 1])
    scale = next(n for n in model.graph.node if n.op_type == "BatchNormalization").input[1]
    value = onnx.numpy_helper.from_array(np.array(1.5, np.float32))
    k = onnx.helper.make_node("Constant", [], ["k"], name="k", value=value)
    square = onnx.helper.make_node("Mul", ["k", "k"], [scale + "_0d"], name="square")
    model.graph.node.insert(0, square)
    model.graph.node.insert(0, k)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.input[1] = scale + "_0d"
    folded, report = bnfold.fold(model, return_report=True)
    entry = report.entry("bn")
    assert entry.rule == rules.VALID_VALUES and "scale has shape []" in entry.reason, entry
    assert len(bn_nodes(folded)) == 1


# --------------------------------------------------------------------------------------------
# A constant subgraph many BatchNorms share is evaluated once, within one budget per model


def _count_evaluations(monkeypatch, op: str) -> list[int]:
    from bnfold.onnx import constants as onnx_const

    calls: list[int] = []
    evaluate = onnx_const._OPS[op]

    def counted(c):
        calls.append(1)
        return evaluate(c)

    monkeypatch.setitem(onnx_const._OPS, op, counted)
    return calls


def test_shared_constant_subgraph_evaluated_once(monkeypatch):
    """200 Conv + BatchNorm pairs whose scales read one Expand of 2**22 floats: the evaluator's
    cache was cleared after every BatchNorm, so the Expand was computed 200 times (1,000 pairs
    of 2**24 took 44 s); it is computed once per fold."""
    pairs = 200
    model = shared_scale_model(pairs, 2**22)
    calls = _count_evaluations(monkeypatch, "Expand")
    report = bnfold.analyze(model)
    assert len(calls) == 1, len(calls)
    assert len(report.folded) == pairs, report
    monkeypatch.undo()
    expected = {f"bn{i}": ("folded", f"conv{i}") for i in range(pairs)}
    check_fold(model, expected, seeds=(0,))


def test_shared_constant_over_the_budget_refused_once(monkeypatch):
    """The same with 2**24 floats: the Expand takes the whole 64 MiB; every BatchNorm is kept
    with the budget as its reason, and the Expand is still computed only once."""
    model = shared_scale_model(20, 2**24)
    calls = _count_evaluations(monkeypatch, "Expand")
    report = bnfold.analyze(model)
    assert len(calls) == 1, len(calls)
    for entry in report:
        assert entry.rule == rules.CONSTANT_PARAMS and "64 MiB" in entry.reason, entry


def test_constant_budget_is_per_model():
    """Two BatchNorms, each scale from its own Expand of 40 MiB: within a budget per BatchNorm
    both folded; per model the second is kept, with the budget as its reason."""
    g = Graph(seed=37)
    x = g.input("x", [1, 2, 3, 3])
    fill = g.constant("fill", np.array(1.0))
    total = []
    for i in range(2):
        size = g.constant(f"size{i}", np.array([10 * 2**20]), INT64)
        big = g.node("Expand", [fill, size], name=f"expand{i}")
        n = g.node("Cast", [g.node("Shape", [big], name=f"shape{i}")], name=f"cast{i}", to=1)
        one = g.node("Div", [n, n], name=f"one{i}")
        params = g.bn_params(2, f"bn{i}")
        params[0] = g.node("Mul", [one, params[0]], name=f"scale{i}")
        y = g.node("Conv", [x, g.weight(f"w{i}", [2, 2, 1, 1])], name=f"conv{i}")
        total.append(g.bn(y, 2, name=f"bn{i}", params=params))
    g.output(g.node("Add", total, name="sum"), shape=[1, 2, 3, 3])
    r = check_fold(
        g.model(infer=False),
        {"bn0": ("folded", "conv0"), "bn1": ("skipped", rules.CONSTANT_PARAMS)},
        seeds=(0,),
    )
    assert "past the 64 MiB" in r.report.entry("bn1").reason, r.report.entry("bn1")


def test_constants_forget_what_was_computed_from_a_rewritten_tensor():
    """After a fold rewrites a stored weight in place, what the cache computed from it is
    computed again from the new data (the cache now lives for the whole fold)."""
    from bnfold.onnx.constants import Constants

    g = Graph(seed=38)
    x = g.input("x", [2])
    w = g.init("w", np.array([1.0, 2.0]))
    doubled = g.node("Add", [w, w], name="double")
    g.output(g.node("Mul", [x, doubled], name="use"), shape=[2])
    model = ir.serde.deserialize_model(g.model(infer=False))
    constants = Constants(model)
    stored = model.graph.initializers["w"]
    value = next(n for n in model.graph if n.name == "double").outputs[0]
    np.testing.assert_array_equal(constants.value(value), [2.0, 4.0])
    stored.const_value = ir.Tensor(np.array([3.0, 5.0], np.float32), name="w")
    constants.changed(stored)
    np.testing.assert_array_equal(constants.value(value), [6.0, 10.0])


# --------------------------------------------------------------------------------------------
# Ranks per scope: a name an If's branches both define is looked up in its own branch


def _branch_model(else_activation: str) -> onnx.ModelProto:
    """If(cond): then ``mm = MatMul(x2 (3, 5), w1) -> Relu``; else ``mm = MatMul(act(x3), w2)
    -> BatchNormalization``, ``act`` being ``Relu`` (x3 is (3, 5)) or ``com.microsoft.Gelu``,
    which ONNX shape inference cannot type (x3 is (2, 4, 5), so the else ``mm`` is 3-D)."""
    c = 4
    outer = Graph(seed=40)
    x2 = outer.input("x2", [3, 5])
    x3 = outer.input("x3", [3, 5] if else_activation == "Relu" else [2, 4, 5])
    cond = outer.input("cond", [], BOOL)
    w1, w2 = outer.weight("w1", [5, c]), outer.weight("w2", [5, c])
    params = outer.bn_params(c)
    then = Graph(seed=41, name="then")
    then.node("MatMul", [x2, w1], name="mm_t", outputs=["mm"])
    typed = else_activation == "Relu"
    then.output(then.node("Relu", ["mm"], name="relu_t"), shape=[3, c])
    els = Graph(seed=42, name="else")
    domain = "" if else_activation == "Relu" else "com.microsoft"
    act = els.node(else_activation.split(".")[-1], [x3], name="act", domain=domain)
    els.node("MatMul", [act, w2], name="mm_e", outputs=["mm"])
    els.output(els.bn("mm", c, name="bn_e", params=params), shape=[3, c] if typed else None)
    outer.output(
        outer.node("If", [cond], name="if", then_branch=then.graph(), else_branch=els.graph()),
        shape=[3, c] if typed else None,
    )
    extra = [] if domain == "" else [("com.microsoft", 1)]
    return outer.model(extra_opsets=extra, infer=False)


def _both_branches(model: onnx.ModelProto, seed: int = 0) -> list[dict[str, np.ndarray]]:
    feeds = []
    for cond in (True, False):
        rng = np.random.default_rng(seed)
        f = {}
        for info in model.graph.input:
            if info.name == "cond":
                f["cond"] = np.array(cond)
                continue
            dims = [d.dim_value for d in info.type.tensor_type.shape.dim]
            f[info.name] = rng.standard_normal(dims).astype(np.float32)
        feeds.append(f)
    return feeds


def test_rank_not_taken_from_a_same_named_value_of_a_sibling_branch():
    """The else branch's ``mm`` is 3-D after a com.microsoft.Gelu inference cannot type; the
    then branch's ``mm`` is 2-D. Ranks were looked up by name across all graphs, so the else
    BatchNorm was folded as if its channels were the last axis (max abs error 6.4 with
    cond=False, which --verify's random cond never took). Now unknown: kept."""
    model = _branch_model("com.microsoft.Gelu")
    before = model.SerializeToString()
    folded, report = bnfold.fold(model, return_report=True)
    assert model.SerializeToString() == before
    entry = report.entry("bn_e")
    assert entry.action == "skipped" and entry.rule == rules.CHANNEL_AXIS, report
    for feeds in _both_branches(model):
        for a, b in zip(run(model, feeds), run(folded, feeds), strict=True):
            np.testing.assert_array_equal(a, b)


def test_rank_of_a_branch_value_is_its_own_branch_s():
    """The same names with a typeable else branch (2-D): the else BatchNorm folds, and both
    branches compute what they did."""
    model = _branch_model("Relu")
    r = check_fold(model, {"bn_e": ("folded", "mm_e")}, feeds=_both_branches(model))
    assert len(r.before) == 2


# --------------------------------------------------------------------------------------------
# A subgraph value named like a value of an enclosing scope


def _shadow_model(outer_bn: bool) -> onnx.ModelProto:
    """Main graph initializer ``w``; an If whose then branch has its own initializer ``w`` and
    runs Conv(x, w) -> BN; with ``outer_bn`` the main graph also runs Conv(x, w) -> BN."""
    c = 3
    outer = Graph(seed=43)
    x = outer.input("x", [1, c, 4, 4])
    cond = outer.input("cond", [], BOOL)
    w_outer = outer.weight("w", [c, c, 1, 1])
    then = Graph(seed=44, name="then")
    w_inner = then.weight("w", [c, c, 1, 1])
    assert w_inner == w_outer
    conv_t = then.node("Conv", [x, w_inner], name="conv_t")
    params = outer.bn_params(c, "bn_t")
    then.output(then.bn(conv_t, c, name="bn_t", params=params), shape=[1, c, 4, 4])
    els = Graph(seed=45, name="else")
    els.output(els.node("Conv", [x, w_outer], name="conv_e"), shape=[1, c, 4, 4])
    y = outer.node("If", [cond], name="if", then_branch=then.graph(), else_branch=els.graph())
    outer.output(y, shape=[1, c, 4, 4])
    if outer_bn:
        conv = outer.node("Conv", [x, w_outer], name="conv")
        outer.output(outer.bn(conv, c, name="bn"), shape=[1, c, 4, 4])
    return outer.model(infer=False)


@pytest.mark.parametrize("outer_bn", [False, True])
def test_initializer_shadowing_an_outer_name_is_not_folded_into(outer_bn):
    """onnxruntime binds the branch's ``w`` to the outer initializer, onnx_ir to the branch's
    own: bnfold scaled the inner tensor, a wrong fold in onnxruntime (max abs 1.89). Neither
    ``w`` has one meaning, so neither BatchNorm folds into it, and nothing changes."""
    model = _shadow_model(outer_bn)
    onnx.checker.check_model(model, full_check=True)
    expected = {"bn_t": ("skipped", rules.CONSTANT_PARAMS)}
    if outer_bn:
        expected["bn"] = ("skipped", rules.CONSTANT_PARAMS)
    before = model.SerializeToString()
    folded, report = bnfold.fold(model, return_report=True)  # not check_fold: names repeat
    assert model.SerializeToString() == before
    for bn, (action, rule) in expected.items():
        entry = report.entry(bn)
        assert (entry.action, entry.rule) == (action, rule), report
        assert "enclosing" in entry.reason, entry.reason
    onnx.checker.check_model(folded, full_check=True)
    for g_before, g_after in zip(
        [model.graph, model.graph.node[0].attribute[0].g],
        [folded.graph, folded.graph.node[0].attribute[0].g],
        strict=True,
    ):
        assert [n.name for n in g_after.node] == [n.name for n in g_before.node]
        after = {t.name: t.SerializeToString() for t in g_after.initializer}
        assert after == {t.name: t.SerializeToString() for t in g_before.initializer}
    for feeds in _both_branches(model):
        for a, b in zip(run(model, feeds), run(folded, feeds), strict=True):
            np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# Integer -> 16-bit float casts in constant subgraphs


def _cast_mean_model(values, to: int) -> onnx.ModelProto:
    """Conv -> BN whose mean is Cast(Cast(int64 values, to), FLOAT)."""
    c = len(values)
    g = Graph(seed=46)
    x = g.input("x", [1, 3, 5, 5])
    conv = g.node("Conv", [x, g.weight("w", [c, 3, 3, 3])], name="conv")
    scale, bias, _, var = g.bn_params(c)
    ints = g.init("mean_i", np.array(values, np.int64), INT64)
    narrow = g.node("Cast", [ints], name="narrow", to=to)
    mean = g.node("Cast", [narrow], name="widen", to=onnx.TensorProto.FLOAT)
    g.output(g.bn(conv, c, params=[scale, bias, mean, var]))
    return g.model()


@pytest.mark.parametrize("to", [BFLOAT16, onnx.TensorProto.FLOAT16])
def test_integer_to_16_bit_cast_beyond_float32_exactness_is_not_evaluated(to):
    """int64 33685505 -> bfloat16: onnxruntime rounds through float32 (33554432), numpy in one
    step (33816576); the fold was off by 3.9e5. Integers beyond 2**24 are not evaluated."""
    big = [33685505, 16777217 + 3 * 2**16, -33685505, 1]
    r = check_skip(_cast_mean_model(big, to), rules.CONSTANT_PARAMS)
    assert "2**24" in r.report.entry("bn").reason


@pytest.mark.parametrize("to", [BFLOAT16, onnx.TensorProto.FLOAT16])
def test_integer_to_16_bit_cast_of_exact_integers_still_folds(to):
    """Integers float32 holds exactly round once either way: evaluated, folded, and equal to
    onnxruntime's."""
    check_fold(
        _cast_mean_model([3, -1000, 2**24 if to == BFLOAT16 else 2049, 7], to),
        {"bn": ("folded", "conv")},
    )


# --------------------------------------------------------------------------------------------
# Nodes without the inputs their operator requires


@pytest.mark.parametrize("op", ["Identity", "Transpose"])
def test_layout_node_without_inputs_before_a_weight_is_refused(op):
    """Transpose/Identity with no input in front of a MatMul weight: IndexError (the CLI's exit
    status 3). Every node bnfold reads is checked against its operator's required inputs."""
    g = Graph(seed=47)
    x = g.input("x", [2, 3])
    wt = g.node(op, [], name="wt")
    g.output(g.node("MatMul", [x, wt], name="mm"), shape=[2, 4])
    model = g.model(infer=False)
    before = model.SerializeToString()
    for call in (bnfold.fold, bnfold.analyze):
        with pytest.raises(bnfold.UnsupportedModelError, match="lacks its required input 0"):
            call(model)
    assert model.SerializeToString() == before


def test_batch_norm_without_output_is_refused():
    g = Graph(seed=48)
    x = g.input("x", [1, 3, 5, 5])
    conv = g.node("Conv", [x, g.weight("w", [3, 3, 3, 3])], name="conv")
    g.bn(conv, 3, outputs=[])
    g.output(conv, shape=[1, 3, 3, 3])
    with pytest.raises(bnfold.UnsupportedModelError, match="has no output"):
        bnfold.fold(g.model(infer=False))


# --------------------------------------------------------------------------------------------
# A ModelProto onnx_ir reads but cannot write back


def test_unknown_tensor_type_in_a_model_proto_is_a_bnfold_error():
    """An unused initializer of data_type 99 that is also a graph input: onnx_ir read it lazily
    and fold() raised onnx_ir's SerdeError when writing the result back."""
    g = Graph(seed=49)
    x = g.input("x", [4])
    g.output(g.node("Relu", [x], name="relu"), shape=[4])
    model = g.model(infer=False)
    junk = onnx.numpy_helper.from_array(np.zeros(4, np.float32), "junk")
    junk.data_type = 99
    model.graph.initializer.append(junk)
    model.graph.input.append(onnx.helper.make_tensor_value_info("junk", 1, [4]))
    for call in (bnfold.fold, bnfold.analyze):
        with pytest.raises(bnfold.UnsupportedModelError, match="unknown element type 99") as e:
            call(model)
        assert "\n" not in str(e.value)


def _if_branch_given_by_reference() -> onnx.ModelProto:
    """An If whose then-branch is an attribute reference (``ref_attr_name``), which only a
    node inside a function may have: the model is invalid."""
    c = 3
    outer = Graph(seed=31)
    x = outer.input("x", [1, c, 5, 5])
    cond = outer.input("cond", [], BOOL)
    then = Graph(seed=32, name="then")
    then.output(then.node("Identity", [x], name="identity"), shape=[1, c, 5, 5])
    other = Graph(seed=33, name="else")
    other.output(other.node("Identity", [x], name="identity2"), shape=[1, c, 5, 5])
    out = outer.node("If", [cond], name="if", then_branch=then.graph(), else_branch=other.graph())
    outer.output(out)
    model = outer.model(opset=17)
    attr = next(a for a in model.graph.node[-1].attribute if a.name == "then_branch")
    attr.ref_attr_name = "BatchNormalization"
    return model


def test_a_subgraph_given_by_attribute_reference_outside_a_function_is_refused(tmp_path, capsys):
    model = _if_branch_given_by_reference()
    with pytest.raises(bnfold.UnsupportedModelError, match="not in a function"):
        bnfold.fold(model)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert main([str(path), "-o", str(tmp_path / "out.onnx")]) == 1
    assert "not in a function" in capsys.readouterr().err
