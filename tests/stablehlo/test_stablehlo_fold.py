"""The StableHLO frontend on the model zoo of ``tests.helpers.jax_models``.

Every case (flax linen and nnx models, plain JAX convolutions and matmuls with hand-written
BatchNorms, StableHLO text with ``stablehlo.batch_norm_inference``, and the negatives: a conv
output used twice, parameters passed as arguments, constants along another axis, a reciprocal,
a negative variance) is folded with ``bnfold.fold`` and checked for:

* the outputs: the folded model's against the original's, run by XLA on the case's inputs and
  on fresh ones, within the case's tolerance (``max|folded - original| <= tol * max(1,
  max|original|)``: 1e-4 for float32, 2**-5 for bfloat16, see ``jax_models.BF16_TOL``), and bit
  for bit when nothing was folded (then nothing may have changed);
* the report: the number of folded entries, each with a target, and of skipped ones by rule,
  with a reason; ``analyze`` saying the same as ``fold``;
* the input: the ``Exported`` (its serialized module, avals, trees) as it was;
* the module: no multiply, divide, subtract, rsqrt, sqrt or batch_norm_inference left of a
  folded chain and at most one add per chain, the convolutions and dot_generals all kept;
* idempotence: folding the folded model folds nothing more and changes nothing;
* serialization: the folded ``Exported`` round-trips through ``jax.export.deserialize`` with
  the same calling convention and outputs; folded text parses;
* ``bnfold.verify``.

A check that passes whatever the fold does proves nothing, so the statistics are checked to be
far from the identity, and a fold done by hand in float64 (``linen_conv_bn_reference``) is
checked to agree with the original while each classic folding mistake (forgetting epsilon, the
mean, scaling the bias, scaling the input channels) is checked to exceed the tolerance.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")

import bnfold  # noqa: E402
from tests.helpers import jax_models as jm  # noqa: E402

NAMES = list(jm.CASES)
EXPORTED = [n for n in NAMES if not n.startswith("text_")]
TEXT = [n for n in NAMES if n.startswith("text_")]
PRODUCERS = ("convolution", "dot_general")


@functools.cache
def folded_of(name: str) -> tuple:
    """``bnfold.fold(case.model, return_report=True)``, once per process."""
    return bnfold.fold(jm.case(name).model, return_report=True)


def input_sets(case: jm.JaxCase) -> list[tuple]:
    """The case's own inputs and two sets the fold never saw."""
    return [case.inputs, case.fresh(0), case.fresh(1)]


@functools.cache
def outputs(name: str, which: str, k: int) -> list[np.ndarray]:
    """The outputs of the original (``which="original"``) or folded model on input set ``k``."""
    case = jm.case(name)
    model = case.model if which == "original" else folded_of(name)[0]
    return jm.run(model, input_sets(case)[k])


def rule_counts(report: bnfold.FoldReport) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in report.skipped:
        counts[e.rule] = counts.get(e.rule, 0) + 1
    return counts


def check_counts(case: jm.JaxCase, report: bnfold.FoldReport) -> None:
    """As many folded entries and skipped entries by rule as the case expects."""
    got = rule_counts(report)
    assert len(report.folded) == case.expect_folded, str(report)
    for rule, n in case.expect_skipped.items():
        assert got.get(rule, 0) == n, f"{rule}: {got}\n{report}"
    unexpected = set(got) - set(case.expect_skipped) - case.optional_skips
    assert not unexpected, f"skipped under {unexpected}\n{report}"


# --------------------------------------------------------------------------------------------
# The cases themselves


@pytest.mark.parametrize("name", NAMES)
def test_statistics_are_not_the_identity(name):
    """Every BatchNorm of every case has statistics that change its input a lot: random means
    and biases, variances away from 1 (positive, but for the case about a negative one) and
    scales away from 1, so a fold that dropped any of them would be seen."""
    case = jm.case(name)
    assert case.bn_stats, "a case without BatchNorm parameters"
    for mean, var, scale, bias in case.bn_stats:
        mean, var, scale, bias = (np.asarray(a, np.float64) for a in (mean, var, scale, bias))
        assert np.abs(mean).max() > 0.2 and np.ptp(mean) > 0.2
        assert np.abs(var - 1).max() > 0.2
        if name == "text_nhwc_bni_negative_var":
            assert (var + jm.EPS <= 0).sum() == 1
        else:
            assert var.min() >= 0.5
        if name != "linen_bn_no_affine":  # the BatchNorm without scale and bias
            assert np.abs(np.abs(scale) - 1).max() > 0.2 and (scale < 0).any()
            assert np.abs(bias).max() > 0.2


@pytest.mark.parametrize("name", TEXT)
def test_case_text_parses_and_runs(name):
    """The hand-written modules are valid StableHLO that XLA compiles and runs."""
    from jax.interpreters import mlir as jax_mlir
    from jaxlib.mlir import ir

    case = jm.case(name)
    with jax_mlir.make_ir_context():
        ir.Module.parse(case.text)
    (out,) = jm.run_text(case.text, case.inputs)
    assert out.dtype == np.float32 and out.ndim in (2, 4)


def test_hand_fold_reference_and_wrong_folds():
    """``linen_conv_bn`` agrees with its BatchNorm folded by hand in float64, and each classic
    folding mistake moves the output well past the float32 tolerance: the comparisons of this
    module would catch them."""
    case = jm.case("linen_conv_bn")
    x = case.inputs[0]
    (original,) = jm.run(case.model, case.inputs)
    reference = jm.linen_conv_bn_reference(x)
    assert jm.rel_error([reference], [original.astype(np.float64)]) < 1e-5
    for mistake in ("no-eps", "no-mean", "input-scale", "bias-unscaled"):
        wrong = jm.linen_conv_bn_reference(x, mistake).astype(np.float32)
        assert jm.rel_error([original], [wrong]) > 5 * jm.F32_TOL, mistake
    # and the fold itself is as close to the float64 reference as the original is
    (folded,) = outputs("linen_conv_bn", "folded", 0)
    assert jm.rel_error([reference], [folded.astype(np.float64)]) < 1e-5


# --------------------------------------------------------------------------------------------
# Folding every case


@pytest.mark.parametrize("name", NAMES)
def test_outputs_match(name):
    """The folded model computes what the original computes, on the case's inputs and on
    fresh ones; bit for bit when nothing was folded."""
    case = jm.case(name)
    folded, report = folded_of(name)
    assert type(folded) is type(case.model)
    for k in range(len(input_sets(case))):
        before, after = outputs(name, "original", k), outputs(name, "folded", k)
        if report.folded:
            err = jm.rel_error(before, after)
            assert err <= case.tol, f"input set {k}: {err:.3g} > {case.tol:.3g}\n{report}"
        else:
            assert jm.bit_equal(before, after), f"input set {k}: nothing folded, yet changed"


@pytest.mark.parametrize("name", NAMES)
def test_report(name):
    """The report counts what the case expects; a folded entry names its target, a skipped
    one its rule and a reason."""
    case = jm.case(name)
    _, report = folded_of(name)
    assert isinstance(report, bnfold.FoldReport)
    check_counts(case, report)
    assert len({e.bn for e in report}) == len(report), "BatchNorm names are not unique"
    for e in report.folded:
        assert e.action == "folded" and e.target and not e.rule, e
    for e in report.skipped:
        assert e.action == "skipped" and e.rule and e.reason, e
        if e.rule in case.reasons:
            assert case.reasons[e.rule] in e.reason, e


@pytest.mark.parametrize("name", NAMES)
def test_analyze_matches_fold(name):
    case = jm.case(name)
    _, report = folded_of(name)
    assert bnfold.analyze(case.model).to_list() == report.to_list()


@pytest.mark.parametrize("name", EXPORTED)
def test_input_unchanged(name):
    """``analyze`` and ``fold`` leave the ``Exported`` as it was, and return a new one."""
    case = jm.case(name)
    exp = case.exported

    def snapshot():
        return (
            bytes(exp.mlir_module_serialized),
            exp.in_avals,
            exp.out_avals,
            exp.in_tree,
            exp.out_tree,
            exp.fun_name,
        )

    before = snapshot()
    bnfold.analyze(exp)
    folded = bnfold.fold(exp)
    assert snapshot() == before
    assert folded is not exp


@pytest.mark.parametrize("name", NAMES)
def test_folded_chains_leave_one_add(name):
    """A folded chain leaves no multiply, divide, subtract, (r)sqrt or batch_norm_inference and
    at most one add (the new bias); every convolution and dot_general stays. Nothing folded:
    the module's ops are the same."""
    case = jm.case(name)
    folded, report = folded_of(name)
    before, after = jm.op_counts(case.model), jm.op_counts(folded)
    for op in PRODUCERS:
        assert after[op] == before[op], op
    if not report.folded:
        assert after == before
        return
    scaled = ("multiply", "divide", "batch_norm_inference")
    assert sum(after[op] for op in scaled) < sum(before[op] for op in scaled)
    if not report.skipped:
        for op in jm.CHAIN_OPS:
            assert after[op] == case.kept_ops.get(op, 0), (op, dict(after))
        assert after["add"] <= case.kept_ops.get("add", 0) + len(report.folded), dict(after)


@pytest.mark.parametrize("name", NAMES)
def test_folding_again_folds_nothing(name):
    """The folded model has nothing left to fold: the same skipped entries, no fold, and
    folding it again changes no output bit."""
    case = jm.case(name)
    folded, report = folded_of(name)
    again, report2 = bnfold.fold(folded, return_report=True)
    assert not report2.folded, str(report2)
    assert rule_counts(report2) == rule_counts(report), str(report2)
    assert jm.bit_equal(jm.run(again, case.inputs), outputs(name, "folded", 0))


@pytest.mark.parametrize("name", EXPORTED)
def test_serialization_round_trip(name):
    """The folded ``Exported`` serializes, deserializes with the original's calling
    convention, and computes what it computed."""
    case = jm.case(name)
    folded, _ = folded_of(name)
    back = jax.export.deserialize(folded.serialize())
    assert back.in_avals == case.exported.in_avals
    assert back.out_avals == case.exported.out_avals
    assert back.in_tree == case.exported.in_tree
    assert back.out_tree == case.exported.out_tree
    assert jm.bit_equal(jm.run(back, case.fresh(0)), outputs(name, "folded", 1))


@pytest.mark.parametrize("name", TEXT)
def test_folded_text_parses(name):
    from jax.interpreters import mlir as jax_mlir
    from jaxlib.mlir import ir

    folded, _ = folded_of(name)
    assert isinstance(folded, str)
    with jax_mlir.make_ir_context():
        ir.Module.parse(folded)


@pytest.mark.parametrize("name", NAMES)
def test_verify(name):
    """``bnfold.verify`` on the case's inputs measures what this module measures."""
    case = jm.case(name)
    folded, report = folded_of(name)
    abs_err, rel_err = bnfold.verify(case.model, folded, case.inputs)
    if not report.folded:
        assert (abs_err, rel_err) == (0.0, 0.0)
        return
    scale = max(float(np.abs(o.astype(np.float64)).max()) for o in outputs(name, "original", 0))
    assert rel_err <= case.tol * max(1.0, scale) / scale
    assert abs_err == pytest.approx(rel_err * scale, rel=1e-6)
    assert abs_err == pytest.approx(
        jm.rel_error(outputs(name, "original", 0), outputs(name, "folded", 0)) * max(1, scale),
        rel=1e-6,
    )


@pytest.mark.parametrize("name", ["linen_resnet_projection", "text_nchw_bni"])
def test_verify_with_random_inputs(name):
    """``example_inputs`` may be left out: bnfold draws inputs for the program's types."""
    case = jm.case(name)
    folded, _ = folded_of(name)
    _, rel_err = bnfold.verify(case.model, folded)
    assert rel_err <= case.tol


# --------------------------------------------------------------------------------------------
# producers=


@pytest.mark.parametrize(
    "name, kind, other",
    [
        ("linen_conv_bn", "conv", "linear"),
        ("linen_conv_transpose_bn", "conv_transpose", "conv"),
        ("jax_grouped_conv_transpose_bn", "conv_transpose", "conv"),
        ("linen_dense_bn", "linear", ["conv", "conv_transpose"]),
        ("text_dot_bni", "linear", "conv"),
    ],
)
def test_producers(name, kind, other):
    """A producer of the selected kind is folded; of another kind, kept as not selected, and
    the model left bit for bit. A transposed conv (``lhs_dilation``) is ``conv_transpose``."""
    case = jm.case(name)
    folded, report = bnfold.fold(case.model, producers=[kind], return_report=True)
    assert len(report.folded) == 1 and not report.skipped, str(report)
    assert jm.bit_equal(jm.run(folded, case.inputs), outputs(name, "folded", 0))
    kept, report = bnfold.fold(case.model, producers=other, return_report=True)
    assert not report.folded and rule_counts(report) == {"not-selected": 1}, str(report)
    assert jm.bit_equal(jm.run(kept, case.inputs), outputs(name, "original", 0))


def test_inplace_is_refused():
    """An ``Exported`` is immutable: ``inplace=True`` cannot be honoured."""
    with pytest.raises(bnfold.InvalidArgumentError):
        bnfold.fold(jm.case("linen_conv_bn").exported, inplace=True)
