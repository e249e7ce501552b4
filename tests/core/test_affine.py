"""bnfold.core.affine: per-channel affine chains, with numpy only (no framework).

``compose`` against a direct float64 evaluation of random step sequences, its refusals, and
``chains`` grouping links into maximal chains along one axis.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.core.affine import LINK_OPS, Chain, Link, Step, chains, compose
from bnfold.errors import FoldRefused

EPS = np.finfo(np.float64).eps


# --------------------------------------------------------------------------------------------
# compose against a direct evaluation


def _vector(value: Any) -> np.ndarray:
    """An operand as the reference reads it: one value, or one per channel."""
    return np.asarray(value, dtype=np.float64).reshape(-1)


def _evaluate(steps: list[Step], z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` applied to ``z`` (samples x channels) op by op in float64, and a bound on
    every intermediate's magnitude (the same ops on absolute values) that scales rounding."""
    y, bound = z.copy(), np.abs(z)
    for step in steps:
        if step.op in ("neg", "widen"):
            y = -y if step.op == "neg" else y
            continue
        if step.op == "affine":
            s, t = (_vector(v) for v in step.value)
            y, bound = s * y + t, np.abs(s) * bound + np.abs(t)
            continue
        a = _vector(step.value)
        if step.op == "add":
            y = y + a if step.chain_first else a + y
            bound = bound + np.abs(a)
        elif step.op == "sub":
            y = y - a if step.chain_first else a - y
            bound = bound + np.abs(a)
        elif step.op == "mul":
            y = y * a if step.chain_first else a * y
            bound = bound * np.abs(a)
        else:
            assert step.op == "div" and step.chain_first
            y, bound = y / a, bound / np.abs(a)
    return y, bound


_FINITE = st.floats(-8.0, 8.0, allow_nan=False, allow_infinity=False, allow_subnormal=False)
_DIVISOR = _FINITE.filter(lambda v: abs(v) >= 1e-2)


@st.composite
def _operand(draw: st.DrawFn, n: int, values: st.SearchStrategy[float]) -> Any:
    """One value for every channel or one per channel, in the forms an adapter may hand over."""
    if draw(st.booleans()):
        v = draw(values)
        return draw(st.sampled_from([v, np.float64(v), np.array(v), [v], np.array([[v]])]))
    vs = draw(st.lists(values, min_size=n, max_size=n))
    return draw(st.sampled_from([vs, np.array(vs), np.array(vs).reshape(1, n, 1)]))


@st.composite
def _step(draw: st.DrawFn, n: int) -> Step:
    op = draw(st.sampled_from(LINK_OPS))
    where = f"op_{draw(st.integers(0, 99))}"
    if op in ("neg", "widen"):
        return Step(op, where=where)
    if op == "affine":
        return Step(op, (draw(_operand(n, _FINITE)), draw(_operand(n, _FINITE))), where=where)
    if op == "div":
        return Step(op, draw(_operand(n, _DIVISOR)), where=where)
    return Step(op, draw(_operand(n, _FINITE)), draw(st.booleans()), where=where)  # type: ignore[arg-type]


@st.composite
def _sequences(draw: st.DrawFn) -> tuple[list[Step], int]:
    n = draw(st.integers(1, 6))
    return draw(st.lists(_step(n), max_size=10)), n


@settings(max_examples=300, deadline=None)
@given(_sequences(), st.integers(0, 2**32 - 1))
def test_compose_matches_the_steps_evaluated_one_by_one(case, seed):
    steps, n = case
    k, c = compose(steps, n)
    assert k.shape == c.shape == (n,) and k.dtype == c.dtype == np.float64
    z = np.random.default_rng(seed).normal(0, 4, (16, n))
    z[0] = 0.0  # the shift alone
    z[1] = 1.0
    direct, bound = _evaluate(steps, z)
    tol = 8 * (len(steps) + 2) * EPS * (bound + 1e-300)
    assert (np.abs(k * z + c - direct) <= tol).all()


def test_no_steps_is_the_identity():
    k, c = compose([], 3)
    assert (k == 1).all() and (c == 0).all() and k.shape == c.shape == (3,)


@pytest.mark.parametrize(
    ("step", "k", "c"),
    [
        (Step("add", [1.0, 2.0, 3.0]), [1, 1, 1], [1, 2, 3]),
        (Step("add", 2.0, chain_first=False), [1, 1, 1], [2, 2, 2]),
        (Step("sub", [1.0, 2.0, 3.0]), [1, 1, 1], [-1, -2, -3]),
        (Step("sub", [1.0, 2.0, 3.0], chain_first=False), [-1, -1, -1], [1, 2, 3]),
        (Step("mul", [1.0, -2.0, 0.5]), [1, -2, 0.5], [0, 0, 0]),
        (Step("mul", 4.0, chain_first=False), [4, 4, 4], [0, 0, 0]),
        (Step("div", [1.0, -2.0, 0.5]), [1, -0.5, 2], [0, 0, 0]),
        (Step("neg"), [-1, -1, -1], [0, 0, 0]),
        (Step("widen"), [1, 1, 1], [0, 0, 0]),
        (Step("affine", ([2.0, 3.0, 4.0], 1.0)), [2, 3, 4], [1, 1, 1]),
        (Step("affine", (2.0, [1.0, 2.0, 3.0])), [2, 2, 2], [1, 2, 3]),
    ],
    ids=lambda v: v.op if isinstance(v, Step) else "",
)
def test_each_op_alone(step, k, c):
    got_k, got_c = compose([step], 3)
    np.testing.assert_array_equal(got_k, k)
    np.testing.assert_array_equal(got_c, c)


def test_the_qat_tail_is_a_shift_when_the_scale_factor_is_the_batch_norms_scale():
    """``conv / sf + b -> batch_norm`` with ``sf = gamma/sqrt(var+eps)``: ``k = 1`` up to
    rounding and ``c = (b - mean) * s + beta`` (torchao's converted QAT graphs)."""
    rng = np.random.default_rng(0)
    n = 8
    gamma, beta, mean = rng.normal(0, 1, n), rng.normal(0, 1, n), rng.normal(0, 1, n)
    var, b = rng.uniform(0.1, 2.0, n), rng.normal(0, 1, n)
    s = gamma / np.sqrt(var + 1e-5)
    t = beta - mean * s
    k, c = compose([Step("div", s), Step("add", b), Step("affine", (s, t))], n)
    np.testing.assert_allclose(k, 1.0, rtol=4 * EPS)
    np.testing.assert_allclose(c, (b - mean) * s + beta, rtol=1e-12, atol=1e-12)


def test_a_decomposed_batch_norm_is_its_factors():
    """JAX's ``(x - mean) * (gamma * rsqrt(var + eps)) + beta`` after a conv bias."""
    rng = np.random.default_rng(1)
    n = 5
    bias, mean, beta = rng.normal(0, 1, n), rng.normal(0, 1, n), rng.normal(0, 1, n)
    scale = rng.uniform(-2, 2, n)
    k, c = compose([Step("add", bias), Step("sub", mean), Step("mul", scale), Step("add", beta)], n)
    np.testing.assert_allclose(k, scale, rtol=4 * EPS)
    np.testing.assert_allclose(c, (bias - mean) * scale + beta, rtol=1e-12, atol=1e-12)


def test_compose_leaves_its_operands_alone():
    a = np.array([1.0, 2.0, 3.0])
    s, t = np.array([2.0, 2.0, 2.0]), np.array([1.0, 0.0, -1.0])
    k, c = compose([Step("mul", a), Step("affine", (s, t)), Step("neg")], 3)
    k[:] = 0
    c[:] = 0
    assert a.tolist() == [1, 2, 3] and s.tolist() == [2, 2, 2] and t.tolist() == [1, 0, -1]


# --------------------------------------------------------------------------------------------
# compose's refusals


@pytest.mark.parametrize(
    ("value", "channel"),
    [([1.0, 0.0, 2.0], 1), ([1.0, 2.0, -0.0], 2), (0.0, 0), ([[0.0]], 0)],
)
def test_division_by_zero_names_the_channel(value, channel):
    with pytest.raises(FoldRefused, match=rf"^div_7 divides by 0 at channel {channel}: "):
        compose([Step("add", 1.0), Step("div", value, where="div_7")], 3)


def test_a_constant_divided_by_the_chain_is_refused():
    with pytest.raises(FoldRefused, match=r"^div_1 divides by the chain: not an affine map"):
        compose([Step("div", 2.0, chain_first=False, where="div_1")], 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "affine-scale", "affine-shift"])
def test_a_non_finite_operand_is_refused(op, bad):
    value = [1.0, 2.0, bad, 4.0]
    if op == "affine-scale":
        step = Step("affine", (value, 0.0), where="bn_3")
    elif op == "affine-shift":
        step = Step("affine", (1.0, value), where="bn_3")
    else:
        step = Step(op, value, where="bn_3")  # type: ignore[arg-type]
    with pytest.raises(
        FoldRefused, match=rf"^the operand of bn_3 is not finite \({bad} at index 2\)"
    ):
        compose([step], 4)


def test_a_non_finite_scalar_operand_is_refused_even_where_the_map_stays_finite():
    """``z / inf`` is ``0*z``, finite, but an operand that is not a number is refused."""
    with pytest.raises(FoldRefused, match=r"^the operand of d is not finite \(inf at index 0\)"):
        compose([Step("div", np.inf, where="d")], 2)


@pytest.mark.parametrize(
    ("step", "size"),
    [
        (Step("add", [1.0, 2.0], where="x"), 2),
        (Step("mul", np.ones((2, 2)), where="x"), 4),
        (Step("affine", ([1.0, 2.0], 0.0), where="x"), 2),
        (Step("affine", (1.0, np.zeros(5)), where="x"), 5),
        (Step("sub", [], where="x"), 0),
    ],
)
def test_the_wrong_number_of_values_is_refused(step, size):
    with pytest.raises(FoldRefused, match=rf"^the operand of x has {size} values for 3 channels$"):
        compose([step], 3)


@pytest.mark.parametrize(
    ("steps", "what", "channel"),
    [
        ([Step("mul", 1e200), Step("mul", 1e200)], "scale", 0),
        ([Step("mul", [1.0, 1.0, 1e300]), Step("div", 1e-300)], "scale", 2),
        ([Step("add", [0.0, 1e308, 0.0]), Step("mul", 10.0)], "shift", 1),
        ([Step("affine", (1.0, [1e308, 0.0, 1e308])), Step("add", 1e308)], "shift", 0),
        ([Step("add", 1e308), Step("mul", 10.0), Step("mul", 0.0)], "shift", 0),  # inf*0
    ],
)
def test_overflow_to_inf_is_refused(steps, what, channel):
    with pytest.raises(
        FoldRefused, match=rf"^the chain's composed {what} is not finite at channel {channel}$"
    ):
        compose(steps, 3)


def test_an_unknown_op_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown link op 'pow'"):
        compose([Step("pow", 2.0)], 1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# chains


def _link(i: str, o: str, op: str = "add", axis: int | None = 1) -> Link:
    return Link(node=f"n_{o}", input=i, output=o, op=op, axis=axis)  # type: ignore[arg-type]


def _grouped(links: list[Link], users: dict[str, int] | None = None) -> list[list[str]]:
    found = chains(links, lambda v: (users or {}).get(v, 1))
    grouped = [link.output for chain in found for link in chain.links]
    assert sorted(grouped) == sorted(link.output for link in links)  # every link once
    return [[link.output for link in chain.links] for chain in found]


def test_a_straight_line_is_one_chain():
    links = [_link("x", "a"), _link("a", "b", "mul"), _link("b", "c", "sub")]
    (chain,) = chains(links, lambda v: 1)
    assert chain.links == links and chain.axis == 1
    assert chain.input == "x" and chain.output == "c" and chain.ops() == "add, mul, sub"


def test_a_value_with_another_user_ends_the_chain():
    links = [_link("x", "a"), _link("a", "b"), _link("b", "c")]
    assert _grouped(links, {"a": 2}) == [["a"], ["b", "c"]]
    assert _grouped(links, {"b": 3}) == [["a", "b"], ["c"]]
    assert _grouped(links, {"a": 0}) == [["a"], ["b", "c"]]  # a miscount never merges


def test_two_links_reading_one_value_start_two_chains():
    links = [_link("x", "a"), _link("a", "b"), _link("a", "c")]
    assert _grouped(links, {"a": 2}) == [["a"], ["b"], ["c"]]


def test_unconnected_links_are_separate_chains():
    links = [_link("x", "a"), _link("y", "b"), _link("a", "c"), _link("b", "d")]
    assert _grouped(links) == [["a", "c"], ["b", "d"]]


def test_axes_must_agree():
    links = [_link("x", "a", axis=1), _link("a", "b", axis=3), _link("b", "c", axis=3)]
    found = chains(links, lambda v: 1)
    assert [[li.output for li in ch.links] for ch in found] == [["a"], ["b", "c"]]
    assert [ch.axis for ch in found] == [1, 3]


def test_a_scalar_link_fits_any_axis():
    links = [
        _link("x", "a", axis=None),
        _link("a", "b", "mul", axis=2),
        _link("b", "c", "neg", axis=None),
        _link("c", "d", axis=2),
        _link("d", "e", axis=None),
    ]
    (chain,) = chains(links, lambda v: 1)
    assert chain.axis == 2 and len(chain.links) == 5
    # the axis is the first per-channel link's; a later different one starts a chain
    more = [*links, _link("e", "f", axis=1), _link("f", "g", axis=None)]
    found = chains(more, lambda v: 1)
    assert [(len(ch.links), ch.axis) for ch in found] == [(5, 2), (2, 1)]
    scalars = chains([_link("x", "a", axis=None), _link("a", "b", "mul", axis=None)], lambda v: 1)
    assert [(len(ch.links), ch.axis) for ch in scalars] == [(2, None)]


def test_values_are_matched_through_the_key():
    class Value:  # compares by identity, but unhashable
        __hash__ = None  # type: ignore[assignment]

    x, a, b = Value(), Value(), Value()
    links = [Link("n1", x, a, "add"), Link("n2", a, b, "mul")]
    (chain,) = chains(links, lambda v: 1, key=id)
    assert chain.input is x and chain.output is b


@pytest.mark.parametrize(
    ("ops", "axes", "expected"),
    [
        (["add"], [1], False),  # a bias add
        (["add", "sub", "neg", "widen"], [1, 1, None, None], False),
        (["mul"], [None], False),  # a scalar scale
        (["div", "mul"], [None, None], False),
        (["mul"], [1], True),
        (["add", "div"], [1, 1], True),
        (["affine"], [None], True),  # a BatchNorm op, whatever its axis says
        (["affine"], [1], True),
    ],
)
def test_is_batch_norm_needs_a_per_channel_scale_or_an_affine_link(ops, axes, expected):
    values = ["x"] + [f"v{i}" for i in range(len(ops))]
    links = [
        _link(values[i], values[i + 1], op, ax)
        for i, (op, ax) in enumerate(zip(ops, axes, strict=True))
    ]
    (chain,) = chains(links, lambda v: 1)
    assert chain.is_batch_norm is expected
    assert [link.scales for link in links] == [
        op == "affine" or (op in ("mul", "div") and ax is not None)
        for op, ax in zip(ops, axes, strict=True)
    ]


@st.composite
def _graphs(draw: st.DrawFn) -> tuple[list[Link], dict[str, int]]:
    """Links in program order, each reading a fresh value or an earlier link's output, and
    each value's user count (the links reading it and maybe other ops)."""
    links: list[Link] = []
    readers: dict[str, int] = {}
    for i in range(draw(st.integers(0, 14))):
        outputs = [link.output for link in links]
        if outputs and draw(st.integers(0, 3)):
            source = draw(st.sampled_from(outputs))
        else:
            source = f"in{i}"
        readers[source] = readers.get(source, 0) + 1
        op = draw(st.sampled_from(LINK_OPS))
        axis = draw(st.sampled_from([None, None, 1, 2]))
        links.append(Link(f"n{i}", source, f"v{i}", op, axis))
    users = {v: r + draw(st.sampled_from([0, 0, 0, 1])) for v, r in readers.items()}
    return links, users


@settings(max_examples=300, deadline=None)
@given(_graphs())
def test_chains_are_maximal_and_connected(graph):
    links, users = graph
    found = chains(links, lambda v: users.get(v, 0))
    order = {id(link): i for i, link in enumerate(links)}
    assert sorted(order[id(link)] for ch in found for link in ch.links) == list(range(len(links)))
    for chain in found:  # in program order, each chain and the chains by their first links
        assert [order[id(link)] for link in chain.links] == sorted(
            order[id(link)] for link in chain.links
        )
    assert [order[id(ch.links[0])] for ch in found] == sorted(
        order[id(ch.links[0])] for ch in found
    )
    chain_of = {link.output: ch for ch in found for link in ch.links}
    for chain in found:
        axes = {link.axis for link in chain.links} - {None}
        assert len(axes) <= 1 and chain.axis == (axes.pop() if axes else None)
        for prev, link in itertools.pairwise(chain.links):
            assert link.input == prev.output and users[prev.output] == 1
        assert chain.is_batch_norm == any(link.scales for link in chain.links)
        # maximal: the first link could not have continued the chain of what it reads
        first = chain.links[0]
        before = chain_of.get(first.input)
        if before is not None and users[first.input] == 1:
            assert before.links[-1].output == first.input
            assert first.axis is not None and before.axis not in (None, first.axis)


# --------------------------------------------------------------------------------------------
# no framework


def test_the_affine_module_imports_no_framework():
    code = (
        "import sys, bnfold.core.affine\n"
        "mods = ('torch', 'onnx', 'onnx_ir', 'onnxruntime', 'jax', 'jaxlib', 'mlir')\n"
        "print(','.join(m for m in mods if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_chain_starts_empty():
    chain = Chain()
    assert chain.links == [] and chain.axis is None and chain.ops() == ""
    assert not chain.is_batch_norm
