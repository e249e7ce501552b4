"""Tiny ONNX models for the ONNX frontend tests, and the checks every fold test runs.

``Graph`` builds a model node by node with ``onnx.helper`` and numpy (every node gets a name,
every BatchNorm non-trivial statistics); ``session``/``run``/``random_feeds`` run models in
onnxruntime with its optimizations off. ``check_fold`` is the shared ``check.check_onnx_fold``
(the input untouched, ``analyze`` agreeing with ``fold``, the report, the outputs of
onnxruntime, bit-exact when nothing was folded) plus what only ONNX has: a model that passes
the full checker with the same opsets and IR version, no BatchNorm left where one was folded and
every skipped one in place, no unused initializer, the surviving nodes' names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import bnfold
from tests.helpers.check import Expected, FoldCheck, check_onnx_fold

FLOAT = TensorProto.FLOAT
DOUBLE = TensorProto.DOUBLE
FLOAT16 = TensorProto.FLOAT16
BFLOAT16 = TensorProto.BFLOAT16
BOOL = TensorProto.BOOL
INT64 = TensorProto.INT64

NP_TYPES = {
    FLOAT: np.float32,
    DOUBLE: np.float64,
    FLOAT16: np.float16,
    BFLOAT16: ml_dtypes.bfloat16,
    BOOL: np.bool_,
    INT64: np.int64,
}
# max|folded - original| / max|original|
TOLERANCE = {FLOAT: 1e-5, DOUBLE: 1e-9}
# float16: the folded model's RMS error against a higher-precision reference may be at most
# this many times the unfolded model's.
FP16_ERROR_RATIO = 2.0


# --------------------------------------------------------------------------------------------
# Building


def tensor(name: str, array: np.ndarray, dtype: int = FLOAT) -> TensorProto:
    """An ONNX tensor of ``dtype`` holding ``array`` (cast)."""
    return numpy_helper.from_array(np.asarray(array).astype(NP_TYPES[dtype]), name)


class Graph:
    """Accumulates nodes, initializers, inputs and outputs of one (sub)graph."""

    def __init__(self, dtype: int = FLOAT, seed: int = 0, name: str = "g") -> None:
        self.dtype = dtype
        self.rng = np.random.default_rng(seed)
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()

    # values ---------------------------------------------------------------------------------

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def input(self, name: str, shape: Sequence[int | str] | None, dtype: int | None = None) -> str:
        self._names.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, dtype or self.dtype, shape))
        return name

    def init(self, name: str, array, dtype: int | None = None) -> str:
        name = self.fresh(name)
        self.inits.append(tensor(name, array, self.dtype if dtype is None else dtype))
        return name

    def randn(self, *shape: int, scale: float = 1.0) -> np.ndarray:
        return self.rng.standard_normal(shape) * scale

    def uniform(self, n: int, signed: bool = False) -> np.ndarray:
        """Values in [0.5, 2] (with a random sign when ``signed``)."""
        v = self.rng.uniform(0.5, 2.0, n)
        return v * self.rng.choice([-1.0, 1.0], n) if signed else v

    def weight(self, name: str, shape: Sequence[int], dtype: int | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return self.init(name, self.randn(*shape, scale=1.5 / np.sqrt(fan_in)), dtype)

    # nodes ----------------------------------------------------------------------------------

    def node(
        self,
        op: str,
        inputs: Sequence[str],
        n_out: int = 1,
        name: str | None = None,
        outputs: Sequence[str] | None = None,
        domain: str = "",
        **attrs,
    ) -> str | list[str]:
        """Add a node named ``name`` (default: the op type, made unique); return its output
        name (a list when ``n_out != 1`` or ``outputs`` has several)."""
        name = self.fresh(name or op.lower())
        if outputs is None:
            outputs = [self.fresh(f"{name}_out")] + [
                self.fresh(f"{name}_out{i}") for i in range(1, n_out)
            ]
        else:
            self._names.update(o for o in outputs if o)
        self.nodes.append(
            helper.make_node(op, list(inputs), list(outputs), name=name, domain=domain, **attrs)
        )
        return outputs[0] if len(outputs) == 1 else list(outputs)

    def constant(self, name: str, array, dtype: int | None = None) -> str:
        value = tensor(self.fresh(f"{name}_value"), array, self.dtype if dtype is None else dtype)
        return self.node("Constant", [], name=name, value=value)

    def bn_params(
        self, c: int, name: str = "bn", dtype: int | None = None, stats_dtype: int | None = None
    ) -> list[str]:
        """Initializers scale, bias, mean, var with non-trivial values."""
        sd = stats_dtype if stats_dtype is not None else dtype
        return [
            self.init(f"{name}.scale", self.uniform(c, signed=True), dtype),
            self.init(f"{name}.bias", self.uniform(c, signed=True), dtype),
            self.init(f"{name}.mean", self.uniform(c, signed=True), sd),
            self.init(f"{name}.var", self.uniform(c), sd),
        ]

    def bn(
        self,
        x: str,
        c: int,
        name: str = "bn",
        params: Sequence[str] | None = None,
        outputs: Sequence[str] | None = None,
        **attrs,
    ) -> str | list[str]:
        """A BatchNormalization of ``x`` (``c`` channels); attributes passed on (epsilon,
        training_mode, spatial); default epsilon 1e-5 is written unless ``epsilon=None``."""
        if params is None:
            params = self.bn_params(c, name)
        if "epsilon" not in attrs:
            attrs["epsilon"] = 1e-5
        elif attrs["epsilon"] is None:
            del attrs["epsilon"]
        return self.node("BatchNormalization", [x, *params], name=name, outputs=outputs, **attrs)

    def output(self, name: str, dtype: int | None = None, shape=None) -> str:
        """A graph output (its shape filled in by shape inference unless given)."""
        self.outputs.append(helper.make_tensor_value_info(name, dtype or self.dtype, shape))
        return name

    # models ---------------------------------------------------------------------------------

    def graph(self) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)

    def model(
        self,
        opset: int = 15,
        ir_version: int = 8,
        functions: Iterable[onnx.FunctionProto] = (),
        extra_opsets: Sequence[tuple[str, int]] = (),
        legacy_inputs: bool = False,
        infer: bool = True,
    ) -> onnx.ModelProto:
        """The model; ``legacy_inputs`` lists the initializers as graph inputs (IR 3)."""
        g = self.graph()
        # Drop the initializers a test made and did not use (say, a replaced BN parameter).
        used = {i for sub in all_graphs(g) for n in sub.node for i in n.input}
        used |= {o.name for o in g.output}
        kept = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(kept)
        if legacy_inputs:
            for t in g.initializer:
                g.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
        opsets = [helper.make_opsetid("", opset)]
        opsets += [helper.make_opsetid(d, v) for d, v in extra_opsets]
        model = helper.make_model(
            g,
            opset_imports=opsets,
            ir_version=ir_version,
            functions=list(functions),
            producer_name="bnfold-tests",
        )
        return with_output_shapes(model) if infer else model


def with_output_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its graph outputs' shapes filled in by shape inference (the full checker
    wants them)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    for out, inf in zip(model.graph.output, inferred.graph.output, strict=True):
        if not out.type.tensor_type.HasField("shape"):
            out.type.CopyFrom(inf.type)
        assert out.type.tensor_type.HasField("shape"), out.name
    return model


# --------------------------------------------------------------------------------------------
# Running


def session(model) -> ort.InferenceSession:
    """An onnxruntime session (CPU, optimizations off, quiet) of a ModelProto, or of the model
    file at a path (its external data read from beside it)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def random_feeds(model: onnx.ModelProto, seed: int = 0, dim: int = 2) -> dict[str, np.ndarray]:
    """Random inputs for every graph input that is not an initializer (symbolic sizes: ``dim``)."""
    rng = np.random.default_rng(seed + 12345)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for info in model.graph.input:
        if info.name in inits:
            continue
        t = info.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dim for d in t.shape.dim]
        np_type = NP_TYPES[t.elem_type]
        if t.elem_type == BOOL:
            feeds[info.name] = np.asarray(rng.random(shape) < 0.5)
        else:
            feeds[info.name] = rng.standard_normal(shape).astype(np_type)
    return feeds


def run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of a ModelProto or a model file on ``feeds``."""
    return session(model).run(None, feeds)


def rel_err(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> float:
    """max|a - b| / max|a| over every output."""
    assert len(expected) == len(actual)
    worst = 0.0
    for a, b in zip(expected, actual, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        if a.dtype.kind != "f":
            np.testing.assert_array_equal(b, a)
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        assert np.isfinite(a64).all()
        scale = float(np.abs(a64).max())
        assert scale > 0
        worst = max(worst, float(np.abs(a64 - b64).max()) / scale)
    return worst


def assert_bit_exact(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> None:
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(b, a)  # NaN where NaN was


def convert(model: onnx.ModelProto, src: int = FLOAT16, dst: int = FLOAT) -> onnx.ModelProto:
    """A copy of ``model`` with every ``src`` tensor, type and Cast turned into ``dst``: the
    higher-precision reference of a float16 model, or a float64 model onnxruntime can run."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    np_dst = NP_TYPES[dst]

    def fix_tensor(t: TensorProto) -> None:
        if t.data_type == src:
            t.CopyFrom(tensor(t.name, numpy_helper.to_array(t).astype(np_dst), dst))

    def fix_type(tp: onnx.TypeProto) -> None:
        if tp.HasField("tensor_type") and tp.tensor_type.elem_type == src:
            tp.tensor_type.elem_type = dst

    def fix_graph(g: onnx.GraphProto) -> None:
        for t in g.initializer:
            fix_tensor(t)
        for info in list(g.input) + list(g.output) + list(g.value_info):
            fix_type(info.type)
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    fix_tensor(a.t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    fix_graph(a.g)
                elif a.name == "to" and a.i == src:
                    a.i = dst

    fix_graph(m.graph)
    return m


def peak_growth(call):
    """``call()`` and how far it raised the process's peak resident memory (VmHWM), in bytes
    (Linux: the peak is reset to the current size first)."""

    def hwm() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = hwm()
    result = call()
    return result, hwm() - base


# --------------------------------------------------------------------------------------------
# Inspecting


def all_graphs(g: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``g`` and every subgraph in it."""
    out = [g]
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out.extend(all_graphs(a.g))
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    out.extend(all_graphs(sub))
    return out


def all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for g in all_graphs(model.graph) for n in g.node]


def nodes_by_name(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in all_nodes(model)}


def bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in all_nodes(model) if n.op_type == "BatchNormalization"]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for g in all_graphs(model.graph):
        for t in g.initializer:
            if t.name == name:
                return numpy_helper.to_array(t)
    raise KeyError(name)


def initializer_names(model: onnx.ModelProto) -> list[str]:
    return [t.name for g in all_graphs(model.graph) for t in g.initializer]


def node_input(model: onnx.ModelProto, node_name: str, i: int) -> str:
    n = nodes_by_name(model)[node_name]
    return n.input[i] if i < len(n.input) else ""


def dead_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of nodes none of whose outputs is used or a graph output."""
    used = {i for n in all_nodes(model) for i in n.input}
    used |= {o.name for g in all_graphs(model.graph) for o in g.output}
    return {n.name for n in all_nodes(model) if not any(o in used for o in n.output if o)}


def _constant_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of nodes computed from initializers and Constant nodes only (per graph)."""
    const: set[str] = set()
    for g in all_graphs(model.graph):
        known = {t.name for t in g.initializer} - {i.name for i in g.input}
        changed = True
        while changed:
            changed = False
            for n in g.node:
                if n.name in const or any(
                    a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                    for a in n.attribute
                ):
                    continue
                # Shape and Size read only (static) shapes, CastLike only its input 1's type.
                data = [] if n.op_type in ("Shape", "Size") else list(n.input)
                data = data[:1] if n.op_type == "CastLike" else data
                if all(i == "" or i in known for i in data):
                    const.add(n.name)
                    known.update(n.output)
                    changed = True
    return const


def removable_nodes(model: onnx.ModelProto, report: bnfold.FoldReport, may_remove) -> set[str]:
    """Original nodes a fold may remove: the folded BatchNorms, ``may_remove``, and constant
    nodes whose outputs feed only those or the folded layers."""
    removable = {e.bn for e in report.folded if e.kind == "batchnorm"} | set(may_remove)
    # an affine entry names its nodes: "mul -> add"
    removable |= {n for e in report.folded if e.kind == "affine" for n in e.bn.split(" -> ")}
    targets = {e.target for e in report.folded}
    const = _constant_nodes(model)
    graph_outputs = {o.name for g in all_graphs(model.graph) for o in g.output}
    nodes = all_nodes(model)
    consumers: dict[str, list[str]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n.name)
    changed = True
    while changed:
        changed = False
        for n in nodes:
            if n.name in removable or n.name not in const:
                continue
            users = [u for o in n.output for u in consumers.get(o, [])]
            if any(o in graph_outputs for o in n.output) or not users:
                continue
            if all(u in removable or u in targets for u in users):
                removable.add(n.name)
                changed = True
    return removable


# --------------------------------------------------------------------------------------------
# The checks of every fold


def check_structure(
    model: onnx.ModelProto,
    folded: onnx.ModelProto,
    report: bnfold.FoldReport,
    may_remove: Iterable[str] = (),
) -> None:
    """Everything but the numbers."""
    onnx.checker.check_model(folded, full_check=True)
    assert folded.ir_version == model.ir_version
    assert {(o.domain, o.version) for o in folded.opset_import} == {
        (o.domain, o.version) for o in model.opset_import
    }
    # BatchNorms: the folded ones gone, the skipped ones in place.
    n_folded = sum(e.kind == "batchnorm" for e in report.folded)
    assert len(bn_nodes(folded)) == len(bn_nodes(model)) - n_folded
    left = {n.name for n in bn_nodes(folded)}
    in_graphs = {n.name for n in bn_nodes(model)}
    for e in report.skipped:
        if e.bn in in_graphs:
            assert e.bn in left, e
    for e in report.folded:
        assert e.bn not in left, e
    # Graph inputs and outputs keep their names, order and types.
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    for a, b in zip(model.graph.output, folded.graph.output, strict=True):
        assert a.type.tensor_type.elem_type == b.type.tensor_type.elem_type
    inits = set(initializer_names(folded))
    real_inputs = [i.name for i in model.graph.input if i.name not in set(initializer_names(model))]
    assert [i.name for i in folded.graph.input if i.name not in inits] == real_inputs
    # No unused initializer (outer-scope uses from subgraphs count).
    used = {i for n in all_nodes(folded) for i in n.input}
    used |= {o.name for g in all_graphs(folded.graph) for o in g.output}
    unused = [t for t in initializer_names(folded) if t not in used]
    assert not unused, f"unused initializers {unused}"
    assert len(initializer_names(folded)) == len(set(initializer_names(folded)))
    # IR 3 lists every initializer as a graph input.
    if model.ir_version < 4:
        inputs = {i.name for i in folded.graph.input}
        assert {t.name for t in folded.graph.initializer} <= inputs
    # Node names: those of the original survive, except what the fold may remove.
    orig_names = {n.name for n in all_nodes(model)} - {""}
    new_nodes = nodes_by_name(folded)
    new_nodes.pop("", None)
    assert len(new_nodes) == len([n for n in all_nodes(folded) if n.name]), "names not unique"
    gone = orig_names - set(new_nodes)
    allowed = removable_nodes(model, report, may_remove)
    assert gone <= allowed, f"nodes removed that should stay: {sorted(gone - allowed)}"
    orig = nodes_by_name(model)
    for name in orig_names & set(new_nodes):
        assert new_nodes[name].op_type == orig[name].op_type, name
    # No node left computing something nobody uses (unless the original had it already).
    assert dead_nodes(folded) <= dead_nodes(model), sorted(dead_nodes(folded) - dead_nodes(model))
    # Model-local functions are not touched.
    assert [f.SerializeToString() for f in folded.functions] == [
        f.SerializeToString() for f in model.functions
    ]


def check_fold(
    model: onnx.ModelProto,
    expected: Expected,
    *,
    producers=None,
    may_remove: Iterable[str] = (),
    seeds: Sequence[int] = (0, 1),
    feeds: Sequence[dict[str, np.ndarray]] | None = None,
    numbers: str = "auto",
    affine: bool = True,
) -> FoldCheck:
    """``check.check_onnx_fold`` (input untouched, analyze agreeing, the report, outputs in
    onnxruntime), then ``check_structure``. ``numbers`` is "auto" (by the output dtype;
    bit-exact when nothing folded), "exact", "fp16" (error against a float32 reference no worse
    than FP16_ERROR_RATIO times the original's) or "none" (onnxruntime cannot run it)."""
    fp16 = numbers == "fp16" or (
        numbers == "auto" and model.graph.output[0].type.tensor_type.elem_type == FLOAT16
    )
    result = check_onnx_fold(
        model,
        expected,
        producers=producers,
        feeds=None if feeds is None else list(feeds),
        seeds=tuple(seeds),
        exact=True if numbers == "exact" else None,
        run=numbers != "none",
        compare=not fp16,
        affine=affine,
    )
    assert isinstance(result.folded, onnx.ModelProto)
    check_structure(model, result.folded, result.report, may_remove)
    if fp16 and result.report.folded and numbers != "none":
        check_fp16(model, result)
    elif fp16 and numbers != "none":  # nothing folded: nothing may have changed
        for before, after in zip(result.before, result.after, strict=True):
            assert_bit_exact(before, after)
    return result


def check_fp16(model: onnx.ModelProto, result: FoldCheck) -> None:
    """The folded float16 model's RMS error against the float32 model (over every input and
    output) is at most FP16_ERROR_RATIO times the original float16 model's."""
    ref_model = convert(model)
    sq_before = sq_after = 0.0
    for feeds, before, after in zip(result.feeds, result.before, result.after, strict=True):
        ref_feeds = {
            k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in feeds.items()
        }
        for r, b, a in zip(run(ref_model, ref_feeds), before, after, strict=True):
            r64, a64 = r.astype(np.float64), a.astype(np.float64)
            assert np.isfinite(a64).all()
            assert float(np.abs(a64 - r64).max()) <= 2e-2 * float(np.abs(r64).max())
            sq_before += float(np.mean((b.astype(np.float64) - r64) ** 2))
            sq_after += float(np.mean((a64 - r64) ** 2))
    ratio = np.sqrt(sq_after / sq_before)
    assert ratio <= FP16_ERROR_RATIO, f"folded float16 error {ratio:.2f}x the original's"


def check_skip(model: onnx.ModelProto, rule, bn: str = "bn", **kw) -> FoldCheck:
    """A model whose only BatchNorm ``bn`` must be kept with ``rule``: bit-exact."""
    return check_fold(model, {bn: ("skipped", rule)}, numbers=kw.pop("numbers", "exact"), **kw)


# --------------------------------------------------------------------------------------------
# The single-producer models of the matrices


def conv_model(
    dims: int = 2,
    cin: int = 4,
    cout: int = 6,
    kernel: int = 3,
    size: int = 7,
    batch: int = 2,
    bias: bool = True,
    opset: int = 15,
    dtype: int = FLOAT,
    transpose: bool = False,
    group: int = 1,
    seed: int = 0,
    bn_kw: dict | None = None,
    **attrs,
) -> onnx.ModelProto:
    """x -> Conv/ConvTranspose (node "conv") -> BatchNormalization ("bn") -> output."""
    g = Graph(dtype, seed)
    x = g.input("x", [batch, cin] + [size] * dims)
    if transpose:
        wshape = [cin, cout // group] + [kernel] * dims
    else:
        wshape = [cout, cin // group] + [kernel] * dims
    inputs = [x, g.weight("w", wshape)]
    if bias:
        inputs.append(g.init("b", g.uniform(cout, signed=True)))
    if group != 1:
        attrs["group"] = group
    y = g.node("ConvTranspose" if transpose else "Conv", inputs, name="conv", **attrs)
    g.output(g.bn(y, cout, **(bn_kw or {})))
    return g.model(opset=opset)


def gemm_model(
    m: int = 3,
    k: int = 5,
    n: int = 4,
    trans_a: int = 0,
    trans_b: int = 0,
    alpha: float | None = None,
    beta: float | None = None,
    c_shape: tuple[int, ...] | None = (4,),
    opset: int = 15,
    dtype: int = FLOAT,
    seed: int = 0,
) -> onnx.ModelProto:
    """x -> Gemm ("gemm") -> BatchNormalization ("bn") -> output."""
    g = Graph(dtype, seed)
    x = g.input("x", [k, m] if trans_a else [m, k])
    w = g.weight("w", [n, k] if trans_b else [k, n])
    inputs = [x, w]
    if c_shape is not None:
        inputs.append(g.init("c", g.uniform(int(np.prod(c_shape)), True).reshape(c_shape)))
    attrs = {}
    for key, v in (("transA", trans_a), ("transB", trans_b), ("alpha", alpha), ("beta", beta)):
        if v:
            attrs[key] = v
    if beta == 0.0:
        attrs["beta"] = 0.0
    y = g.node("Gemm", inputs, name="gemm", **attrs)
    g.output(g.bn(y, n))
    return g.model(opset=opset)


def matmul_model(
    x_shape: Sequence[int] = (3, 5),
    n: int = 4,
    add: str | None = None,
    bias_shape: tuple[int, ...] | None = None,
    perm: Sequence[int] | None = None,
    transposed_weight: bool = False,
    opset: int = 15,
    dtype: int = FLOAT,
    seed: int = 0,
) -> onnx.ModelProto:
    """x -> MatMul(x, W) ("mm") [-> Add ("add"), constant first when add == "before"]
    [-> Transpose(perm)] -> BatchNormalization over the channels it then has on axis 1."""
    g = Graph(dtype, seed)
    x = g.input("x", list(x_shape))
    k = x_shape[-1]
    if transposed_weight:
        w = g.node("Transpose", [g.weight("w", [n, k])], name="w_t", perm=[1, 0])
    else:
        w = g.weight("w", [k, n])
    y = g.node("MatMul", [x, w], name="mm")
    out_shape = list(x_shape[:-1]) + [n]
    if add is not None:
        shape = bias_shape if bias_shape is not None else (n,)
        b = g.init("b", g.uniform(int(np.prod(shape)), True).reshape(shape))
        y = g.node("Add", [b, y] if add == "before" else [y, b], name="add")
    if perm is not None:
        y = g.node("Transpose", [y], name="transpose", perm=list(perm))
        out_shape = [out_shape[p] for p in perm]
    g.output(g.bn(y, out_shape[1]))
    return g.model(opset=opset)


PRODUCER_TARGET = {"conv": "conv", "conv_transpose": "conv", "gemm": "gemm", "matmul": "mm"}


def producer_model(kind: str, bias: bool, opset: int, dtype: int = FLOAT, seed: int = 0):
    """One producer of ``kind`` ("conv", "conv_transpose", "gemm", "matmul") followed by a
    BatchNorm named "bn"; the producer has a bias (MatMul: an Add of a constant) or not."""
    if kind == "conv":
        return conv_model(bias=bias, opset=opset, dtype=dtype, seed=seed, pads=[1, 0, 1, 2])
    if kind == "conv_transpose":
        return conv_model(
            bias=bias, opset=opset, dtype=dtype, seed=seed, transpose=True, cin=4, cout=6, group=2
        )
    if kind == "gemm":
        return gemm_model(
            c_shape=(4,) if bias else None, opset=opset, dtype=dtype, seed=seed, trans_b=1
        )
    return matmul_model(add="after" if bias else None, opset=opset, dtype=dtype, seed=seed)


def export_torch(model, x, dynamo: bool, **kw) -> onnx.ModelProto:
    """``model`` exported by ``torch.onnx.export`` without its chatter: ``dynamo=True`` with
    ``optimize=False`` (the exporter's own fusions would hide the BatchNorms), or the
    TorchScript exporter without constant folding (which fuses Conv+BN itself)."""
    import contextlib
    import io
    import logging
    import warnings

    import torch

    f = io.BytesIO()
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if dynamo:
                program = torch.onnx.export(
                    model, (x,), dynamo=True, optimize=False, verbose=False, **kw
                )
                return program.model_proto
            kw.setdefault("input_names", ["x"])
            torch.onnx.export(model, (x,), f, dynamo=False, do_constant_folding=False, **kw)
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return onnx.load_from_string(f.getvalue())


def shared_scale_model(pairs: int, elements: int, channels: int = 2, seed: int = 0):
    """``pairs`` Conv + BatchNorm branches off one input, summed, whose BatchNorm scales all
    read one shared constant subgraph that materialises ``elements`` floats:
    ``scale_i = gamma_i * Div(n, n)`` with ``n = Cast(Shape(Expand(1, [elements])))``."""
    g = Graph(seed=seed)
    x = g.input("x", [1, channels, 3, 3])
    fill = g.constant("fill", np.array(1.0))
    size = g.constant("size", np.array([elements]), INT64)
    big = g.node("Expand", [fill, size], name="expand")
    n = g.node("Cast", [g.node("Shape", [big], name="shape")], name="cast", to=FLOAT)
    one = g.node("Div", [n, n], name="one")
    total = None
    for i in range(pairs):
        y = g.node("Conv", [x, g.weight(f"w{i}", [channels, channels, 1, 1])], name=f"conv{i}")
        params = g.bn_params(channels, f"bn{i}")
        params[0] = g.node("Mul", [one, params[0]], name=f"scale{i}")
        y = g.bn(y, channels, name=f"bn{i}", params=params)
        total = y if total is None else g.node("Add", [total, y], name=f"sum{i}")
    g.output(total, shape=[1, channels, 3, 3])
    return g.model(infer=False)
