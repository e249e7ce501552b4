"""Random networks folded in every form (a few examples here; ``make fuzz`` runs 10,000).

See ``tests/fuzz/networks.py`` for what is generated and what a correct fold means.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bnfold
from tests.fuzz.networks import (
    COMPILE_FORMS,
    DTYPES,
    QAT_FORMS,
    STABLEHLO_FORMS,
    AffineChain,
    Case,
    Net,
    check_case,
    draw_case,
)
from tests.helpers.forms import WrongResult
from tests.helpers.support import randomize_all

EXAMPLES = 12


def examples(n: int):
    """Hypothesis runs a test over ``n`` drawn examples, the same ones every time."""

    def wrap(test):
        return settings(
            max_examples=n,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )(given(st.data())(test))

    return wrap


@pytest.mark.parametrize("part", [0, 1])
def test_random_networks_fold_exactly_in_every_form(part):
    # two parts, so that two workers share the examples
    @examples(EXAMPLES)
    def run(data):
        data.draw(st.just(part))
        data.draw(st.integers(0, 1))
        case = draw_case(data)
        check_case(case, draw=data.draw)

    run()


def test_random_networks_fold_exactly_through_torch_compile():
    # the bnfold dynamo backend and the FoldPass in a dynamo backend (``--forms``): a known
    # pair, then a few random networks (dynamo compiles take about a second each)
    outcomes = check_case(_small_case(), COMPILE_FORMS)
    assert [(o.form, o.folded, o.note) for o in outcomes] == [
        ("compile", 1, ""),
        ("compile_pass", 1, ""),
    ]

    @examples(3)
    def run(data):
        check_case(draw_case(data), COMPILE_FORMS, draw=data.draw)

    run()


def test_random_networks_fold_exactly_after_torchao_qat():
    # the pt2e QAT forms (``--forms qat,qat_bias``): the known conv + BatchNorm through a real
    # torchao flow, each chain checked on its own output
    outcomes = check_case(_small_case(), QAT_FORMS)
    assert [(o.form, o.folded, o.note) for o in outcomes] == [("qat", 1, ""), ("qat_bias", 1, "")]


def test_random_networks_fold_exactly_as_stablehlo():
    # the StableHLO form (also in the default forms, so in the test above): the known pair
    # translated to JAX in each dtype the fuzzer draws, folded as the Exported, then as text
    pytest.importorskip("jax")
    for dtype in DTYPES:
        outcomes = check_case(_small_case(dtype), STABLEHLO_FORMS)
        assert [(o.form, o.folded, o.note) for o in outcomes] == [("stablehlo", 1, "")], dtype
    # the form's only draw is whether to fold the text
    (text,) = check_case(_small_case(), STABLEHLO_FORMS, draw=lambda strategy: True)
    assert (text.folded, text.limits) == (1, {"folded as StableHLO text": 1})


def test_the_stablehlo_check_catches_a_fold_wrong_by_a_thousandth(monkeypatch):
    pytest.importorskip("jax")
    from tests.helpers import jax_forms

    case = _small_case()
    wrong = copy.deepcopy(case.model)
    with torch.no_grad():
        wrong.layers["conv0"].weight.mul_(1.001)
    real_fold = bnfold.fold

    def slightly_wrong(model, *args, **kwargs):
        folded, report = real_fold(model, *args, **kwargs)
        return real_fold(jax_forms.export(wrong, case.x)), report

    monkeypatch.setattr(bnfold, "fold", slightly_wrong)
    with pytest.raises(WrongResult, match="stablehlo: output 0 error"):
        check_case(case, STABLEHLO_FORMS)


def _small_case(dtype: str = "float32") -> Case:
    layers = {"conv0": nn.Conv2d(3, 4, 3, padding=1), "bn1": nn.BatchNorm2d(4)}
    steps = [("call", "conv0", [0]), ("call", "bn1", [1]), ("relu", None, [2])]
    model = randomize_all(Net(layers, steps, [3]), seed=1).to(DTYPES[dtype])
    return Case(model, torch.randn(2, 3, 6, 6).to(DTYPES[dtype]), dtype)


def _affine_case(dtype: str = "float32") -> Case:
    """conv -> chain (mul by a [C, 1, 1] buffer, add 0.5) -> BatchNorm -> chain (neg, a
    parameter [C] viewed as [C, 1, 1] minus the value) -> relu."""
    k = torch.tensor([0.5, -1.5, 2.0, -0.75]).reshape(4, 1, 1)
    t = torch.tensor([0.25, -1.0, 0.5, 2.0])
    first = AffineChain([("mul", "k", True, 1.0), ("add", 0.5, True, 1.0)], {"k": (k, False)})
    second = AffineChain(
        [("neg", None, True, 1.0), ("sub", "t", False, 1.0)], {"t": (t, True)}, {"t": (4, 1, 1)}
    )
    layers = {"conv0": nn.Conv2d(3, 4, 3, padding=1), "affine1": first,
              "bn2": nn.BatchNorm2d(4), "affine3": second}  # fmt: skip
    steps = [("call", "conv0", [0]), ("call", "affine1", [1]), ("call", "bn2", [2]),
             ("call", "affine3", [3]), ("relu", None, [4])]  # fmt: skip
    model = randomize_all(Net(layers, steps, [5]), seed=1).to(DTYPES[dtype])
    return Case(model, torch.randn(2, 3, 6, 6).to(DTYPES[dtype]), dtype)


def test_the_check_passes_a_correct_affine_fold():
    # eager folds no arithmetic (the BatchNorm reads a chain, no layer); the graph forms fold
    # the BatchNorm with the chain before it and the chain after it; StableHLO sees one chain
    # with two layers that scale per channel (two BatchNorm entries)
    outcomes = check_case(_affine_case())
    assert [
        (o.form, o.folded, o.affine_folded, sum(o.affine_refused.values())) for o in outcomes
    ] == [
        ("eager", 0, 0, 0),
        ("export", 1, 1, 0),
        ("graph_module", 1, 1, 0),
        ("onnx", 1, 1, 0),
        ("stablehlo", 2, 0, 0),
    ]


def test_the_check_catches_an_affine_chain_reported_folded_but_left(monkeypatch):
    real_fold = bnfold.fold

    def lying(model, *args, **kwargs):
        report = real_fold(model, *args, **kwargs)[1]
        kwargs["affine"] = False  # the chains stay
        return real_fold(model, *args, **kwargs)[0], report

    monkeypatch.setattr(bnfold, "fold", lying)
    layers = {"conv0": nn.Conv2d(3, 4, 3), "affine1": _affine_case().model.layers["affine3"]}
    model = Net(layers, [("call", "conv0", [0]), ("call", "affine1", [1])], [2]).eval()
    case = Case(model, torch.randn(2, 3, 6, 6), "float32")
    with pytest.raises(AssertionError, match="folded, .* still in the graph"):
        check_case(case, forms=("graph_module",))


def test_the_check_passes_a_correct_fold():
    outcomes = check_case(_small_case())
    assert [o.folded for o in outcomes] == [1, 1, 1, 1, 1]


def test_the_check_catches_a_fold_wrong_by_a_thousandth(monkeypatch):
    real_fold = bnfold.fold

    def slightly_wrong(model, *args, **kwargs):
        folded, report = real_fold(model, *args, **kwargs)
        with torch.no_grad():
            folded.layers["conv0"].weight.mul_(1.001)
        return folded, report

    monkeypatch.setattr(bnfold, "fold", slightly_wrong)
    with pytest.raises(WrongResult, match="eager: output 0 error"):
        check_case(_small_case(), forms=("eager",))


def test_the_check_catches_a_kept_batchnorm_reported_as_folded(monkeypatch):
    real_fold = bnfold.fold

    def lying(model, *args, **kwargs):
        folded, report = real_fold(model, *args, **kwargs)
        folded.layers["bn1"] = model.layers["bn1"]
        return folded, report

    monkeypatch.setattr(bnfold, "fold", lying)
    with pytest.raises(AssertionError, match="folded but still a BatchNorm"):
        check_case(_small_case(), forms=("eager",))
