"""Damaged model files through the command line, in-process: a few hundred inputs of the file
fuzzer (``tests/fuzz/files.py``, which ``make fuzz`` runs on 10,000 in worker processes), and
ONNX and ``.pt2`` headers that promise absurd sizes, one by one.

For every bad file ``bnfold.cli.main`` must return 1 with one ``bnfold: error:`` line, let no
exception escape, write nothing, leave the input as it was, and finish quickly without
allocating what the file does not hold.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fuzz import files as ff

FUZZ_SEED = 1  # make fuzz uses seed 0: these are other inputs
N_INPUTS = 200
# Peak RSS growth a refused file may cause (its bytes aside).
SMALL_GROWTH = 64 * 2**20


@pytest.fixture(scope="module")
def corpus() -> list[ff.Seed]:
    return ff.build_corpus(0)


def _show(outcomes: list[ff.Outcome]) -> str:
    return "\n".join(
        f"#{o.index} {o.fmt}/{o.strategy} ({o.seed}) {'+'.join(o.findings)} exit {o.rc} "
        f"{o.elapsed:.1f}s +{o.rss_growth / 2**20:.0f}MiB: {o.detail[:80]} -> {o.message[:160]} "
        f"{o.extra[:300]}"
        for o in outcomes
    )


def test_fuzzed_files(corpus: list[ff.Seed], tmp_path: Path) -> None:
    outcomes = ff.run_in_process(corpus, FUZZ_SEED, range(N_INPUTS), tmp_path)
    assert len(outcomes) == N_INPUTS
    # every strategy of every format ran, and most inputs were refused
    ran = {(o.fmt, o.strategy) for o in outcomes}
    assert len(ran) == sum(len(strategies) for strategies in ff.STRATEGIES.values())
    assert sum(o.rc == 1 for o in outcomes) > N_INPUTS // 2
    found = [o for o in outcomes if o.findings]
    assert not found, f"{len(found)} findings:\n{_show(found)}"


def test_cases_are_deterministic(corpus: list[ff.Seed]) -> None:
    for i in (0, 7, 123, 1539):
        a, b = ff.make_case(corpus, 5, i), ff.make_case(corpus, 5, i)
        assert (a.files, a.args, a.detail, a.links) == (b.files, b.args, b.detail, b.links)


# ---------------------------------------------------------------------------------------------
# Headers that promise absurd sizes


@pytest.fixture(autouse=True)
def _scratch_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in a working directory of the test's own (the harness watches it for new files)."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


def _run(
    corpus: list[ff.Seed], tmp_path: Path, seed: str, mutate, args: tuple[str, ...] = ()
) -> ff.Outcome:
    s = next(s for s in corpus if s.name == seed)
    case = ff.Case(0, s.fmt, "targeted", s.name, s.main, dict(s.files), args=list(args))
    mutate(case)
    with ff.memory_limit(2 * 2**30):
        return ff.run_case(case, tmp_path)


def _assert_refused(outcome: ff.Outcome, *words: str) -> None:
    assert outcome.rc == 1, _show([outcome])
    assert not outcome.findings, _show([outcome])  # one line, nothing written or changed
    assert outcome.message.startswith("bnfold: error:")
    for word in words:
        assert word in outcome.message, outcome.message
    assert outcome.rss_growth < SMALL_GROWTH + outcome.size, _show([outcome])
    assert outcome.elapsed < 2.0


def _onnx(case: ff.Case, edit) -> None:
    """Parse the case's model, let ``edit`` change it, store it back."""
    import onnx

    m = onnx.ModelProto()
    m.ParseFromString(case.files[case.main])
    edit(m)
    case.files[case.main] = m.SerializeToString()


def _initializer(m, name: str):
    return next(t for t in m.graph.initializer if t.name == name)


@pytest.mark.parametrize(
    "dims", [[2**40, 3, 3, 3], [2**31, 2**31, 3, 3], [2**63 - 1], [4, 3, 3, 3, 2**40]]
)
def test_initializer_dims_promise_too_much(corpus, tmp_path, dims) -> None:
    def edit(m) -> None:
        _initializer(m, "conv.w").dims[:] = dims  # the 432 bytes of data stay

    outcome = _run(corpus, tmp_path, "conv_bn", lambda c: _onnx(c, edit), ("--verify",))
    _assert_refused(outcome, "conv.w", "holds 432 bytes")


def test_constant_node_with_huge_dims(corpus, tmp_path) -> None:
    from onnx import helper, numpy_helper

    def edit(m) -> None:
        import numpy as np

        value = numpy_helper.from_array(np.ones(4, np.float32), "")
        value.dims[:] = [2**40]
        m.graph.node.insert(0, helper.make_node("Constant", [], ["k"], name="k", value=value))
        m.graph.node[2].input.append("k")  # read by a node, so that a fold would look at it

    outcome = _run(corpus, tmp_path, "conv_bn", lambda c: _onnx(c, edit))
    _assert_refused(outcome, "Constant")


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("length", str(2**50), ("declares 1125899906842624 bytes",)),
        ("offset", str(2**60), ("which holds only",)),
        ("offset", str(2**64), ("which holds only",)),
    ],
)
def test_external_data_promises_too_much(corpus, tmp_path, key, value, words) -> None:
    def edit(m) -> None:
        t = _initializer(m, "conv.w")
        entries = {e.key: e.value for e in t.external_data}
        entries[key] = value
        del t.external_data[:]
        for k, v in entries.items():
            e = t.external_data.add()
            e.key, e.value = k, v

    outcome = _run(corpus, tmp_path, "external", lambda c: _onnx(c, edit), ("--verify",))
    _assert_refused(outcome, "conv.w", *words)


def test_external_tensor_with_huge_dims(corpus, tmp_path) -> None:
    def edit(m) -> None:
        t = _initializer(m, "conv.w")
        t.dims[:] = [2**40, 3, 3, 3]
        for e in t.external_data:
            if e.key == "length":
                e.value = str(2**40 * 27 * 4)

    outcome = _run(corpus, tmp_path, "external", lambda c: _onnx(c, edit))
    _assert_refused(outcome, "conv.w", "which holds only")


@pytest.mark.parametrize("dim", [2**40, 2**62])
def test_graph_input_dims_promise_too_much_for_verify(corpus, tmp_path, dim) -> None:
    def edit(m) -> None:
        m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = dim

    outcome = _run(corpus, tmp_path, "conv_bn", lambda c: _onnx(c, edit), ("--verify",))
    _assert_refused(outcome, "GiB of random inputs")


def _central_usize(data: bytes, member: str, size: int) -> bytes:
    """``data`` with the central directory declaring ``size`` bytes for ``member``."""
    z = ff._Zip(data)
    cd = next(cd for cd, _, name in z.entries if name.endswith(member))
    z.set(cd, z.CD, "usize", size)
    return bytes(z.data)


@pytest.mark.parametrize("member", ["models/model.json", "data/weights/weight_0"])
def test_pt2_zip_directory_claims_huge_member(corpus, tmp_path, member) -> None:
    def edit(case: ff.Case) -> None:
        case.files[case.main] = _central_usize(case.files[case.main], member, 2**32 - 1)

    outcome = _run(corpus, tmp_path, "pt2_conv", edit, ("--verify",))
    _assert_refused(outcome, "declares 4096 MiB of contents")


def test_pt2_zip64_directory_claims_2_62_bytes(corpus, tmp_path) -> None:
    def edit(case: ff.Case) -> None:
        data = case.files[case.main]
        case.files[case.main] = ff.zip64_size(data, ff._Zip(data).entries[0][2], 2**62)

    outcome = _run(corpus, tmp_path, "pt2_linear", edit)
    _assert_refused(outcome, "MiB of contents")


# ---------------------------------------------------------------------------------------------
# Output names colliding with the input

# The seeds collisions are tried on: format and files (the input model first).
_COLLISION_SEEDS = {
    "conv_bn": ("onnx", ["model.onnx"]),
    "external": ("onnx", ["model.onnx", "model.onnx.data"]),
    "pt2_conv": ("pt2", ["model.pt2"]),
}
# The collisions a run must refuse; the others (an output that is the input or a link to it, or
# whose data file is not written because the model has no external data) are written.
_REFUSED = {"fifo", "fifo_link", "other_suffix"}
_REFUSED_WITH_DATA = {
    "data_fifo",
    "data_is_input",
    "data_link_to_input",
    "data_hardlink_to_input",
    "input_data",
    "link_to_input_data",
    "shares_data",
}


def _collisions(seed: str) -> list[str]:
    fmt, names = _COLLISION_SEEDS[seed]
    case = ff.Case(0, fmt, "", seed, names[0], dict.fromkeys(names, b""))
    return sorted(ff._output_collisions(case))


def test_collision_seeds_are_the_corpus_seeds(corpus) -> None:
    for s in corpus:
        if s.name in _COLLISION_SEEDS:
            assert (s.fmt, [s.main, *sorted(set(s.files) - {s.main})]) == _COLLISION_SEEDS[s.name]


@pytest.mark.parametrize(
    "seed, op", [(seed, op) for seed in _COLLISION_SEEDS for op in _collisions(seed)]
)
def test_output_colliding_with_the_input(corpus, tmp_path, seed, op) -> None:
    """Refused with one line and nothing touched, or written changing only the output's own
    files (ff._may_write): never a pipe replaced or an input overwritten."""
    outcome = _run(corpus, tmp_path, seed, lambda case: ff.output_collision(case, op))
    refused = op in _REFUSED or (seed == "external" and op in _REFUSED_WITH_DATA)
    assert outcome.rc == (1 if refused else 0), _show([outcome])
    assert not outcome.findings, _show([outcome])


# ---------------------------------------------------------------------------------------------
# The harness itself


def test_harness_notices_broken_promises(corpus, tmp_path, monkeypatch) -> None:
    """A command line that writes a partial file, prints two lines and changes its input is
    caught on every count."""
    import bnfold.cli

    def broken_main(argv: list[str]) -> int:
        import sys

        Path(argv[2]).write_bytes(b"partial")
        with open(argv[0], "ab") as f:
            f.write(b"\x00")
        print("bnfold: error: first\nsecond", file=sys.stderr)
        return 1

    monkeypatch.setattr(bnfold.cli, "main", broken_main)
    s = corpus[0]
    case = ff.Case(0, s.fmt, "targeted", s.name, s.main, dict(s.files))
    outcome = ff.run_case(case, tmp_path)
    assert set(outcome.findings) == {"multi_line", "leftover", "input_changed"}

    def raising_main(argv: list[str]) -> int:
        raise ValueError("boom")

    monkeypatch.setattr(bnfold.cli, "main", raising_main)
    outcome = ff.run_case(case, tmp_path)
    assert "escaped" in outcome.findings


@pytest.mark.parametrize(
    "seed, op", [("conv_bn", "fifo"), ("conv_bn", "fifo_link"), ("external", "data_is_input")]
)
def test_harness_notices_an_output_written_over_an_input(corpus, tmp_path, monkeypatch, seed, op):
    """A command line that renames its output and data file over whatever is there (a pipe,
    the input model) and succeeds is caught."""
    import bnfold.cli

    def replace(path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def careless_main(argv: list[str]) -> int:
        out = Path(argv[2])
        replace(out, b"model")
        replace(out.with_name(out.name + ".data"), b"data")
        return 0

    monkeypatch.setattr(bnfold.cli, "main", careless_main)
    outcome = _run(corpus, tmp_path, seed, lambda case: ff.output_collision(case, op))
    assert "input_changed" in outcome.findings, _show([outcome])
