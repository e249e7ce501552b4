"""Constant subgraphs that compute a weight, a bias or BatchNorm parameters: evaluated as
onnxruntime computes them or not at all (strings, int4/float8 casts, 16-bit arithmetic, integer
to 16-bit casts beyond float32's exact integers, Cast-1's string ``to``), within a memory budget
per model (a few bytes that expand to gigabytes are refused before allocating), evaluated once
when many BatchNorms share them, forgotten when a fold rewrites what they read; shape inference
does not expand them either. The dynamo exporter's affine-less BatchNorm (``Expand`` of a
constant over the conv output's shape) folds.

Tiny models built with ``onnx_models.Graph`` (non-trivial BatchNorm statistics), folded by
``check_fold`` where the full checker accepts them (onnxruntime's outputs of the original and the
folded model compared, optimizations off), or folded and compared in onnxruntime by hand.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from torch import nn

import bnfold
from bnfold.core import rules
from tests.helpers.onnx_models import (
    BFLOAT16,
    DOUBLE,
    INT64,
    Graph,
    bn_nodes,
    check_fold,
    check_skip,
    export_torch,
    peak_growth,
    rel_err,
    run,
    shared_scale_model,
)
from tests.helpers.support import randomize_all


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


def test_dynamo_batch_norm_without_affine_folds():
    """The exporter's scale and bias are ``Expand(CastLike(1 or 0, y), Shape(y))`` of the conv
    output ``y``: one value for every channel, and ``Shape``/``CastLike`` only read ``y``'s
    shape and type, so the BatchNorm folds and that subgraph goes."""
    torch.manual_seed(0)
    module = randomize_all(nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, affine=False)))
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
