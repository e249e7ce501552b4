"""`bnfold model.mlir|model.jaxexport -o OUT [--verify] [--report]` end to end: StableHLO text and
serialized jax.export programs of a flax Conv+BatchNorm model (parameters closed over, random
batch statistics), folded, written and run; runs that must refuse (custom calls under
--verify, programs --verify cannot run here, options of other formats, damaged files) print one
line and write nothing."""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")

from bnfold.cli import main  # noqa: E402
from bnfold.errors import UnsupportedModelError  # noqa: E402
from bnfold.stablehlo import files as hlo_files  # noqa: E402
from bnfold.stablehlo import mlir as hlo_mlir  # noqa: E402
from bnfold.stablehlo import run  # noqa: E402
from tests.helpers.cli import listing, one_line_error, refused_before_any_work  # noqa: E402

SUFFIX = {"mlir": ".mlir", "jaxexport": ".jaxexport"}


class _ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.Conv(6, (3, 3))(x)
        return nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-3)(y))


@functools.cache
def _exported() -> jax.export.Exported:
    """The model exported with its variables closed over: random kernels and biases, and
    BatchNorm statistics nothing like the identity (mean, var in [0.5, 2], scale, bias)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    model = _ConvBN()
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)

    def fill(path, s):
        if path[-1].key == "var":
            return rng.uniform(0.5, 2.0, s.shape).astype(s.dtype)
        return rng.normal(0.0, 0.7, s.shape).astype(s.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    stats = variables["batch_stats"]["BatchNorm_0"]
    assert np.abs(stats["mean"]).max() > 0.1 and np.abs(stats["var"] - 1).max() > 0.1
    return jax.export.export(jax.jit(functools.partial(model.apply, variables)))(x)


def _model_bytes(fmt: str, exported: jax.export.Exported | None = None, **kw) -> bytes:
    exported = exported or _exported()
    if fmt == "mlir":
        return exported.mlir_module().encode()
    return bytes(exported.serialize(**kw))


def _write(tmp_path, fmt: str, name: str = "model", **kw) -> str:
    path = tmp_path / (name + SUFFIX[fmt])
    path.write_bytes(_model_bytes(fmt, **kw))
    return str(path)


def _read(path, fmt: str):
    """A written model, as bnfold.stablehlo.run runs it (text, or an Exported)."""
    if fmt == "mlir":
        return open(path).read()
    return jax.export.deserialize(bytearray(open(path, "rb").read()))


def _inputs(seed: int = 1) -> list[np.ndarray]:
    return [np.random.default_rng(seed).normal(size=(2, 8, 8, 3)).astype(np.float32)]


def _op_counts(model) -> dict[str, int]:
    text = model if isinstance(model, str) else model.mlir_module()
    ops = ("convolution", "multiply", "rsqrt", "subtract", "add")
    return {op: len(re.findall(rf"= stablehlo\.{op}\b", text)) for op in ops}


def _with_op(text: str, line: str) -> str:
    """``text`` with ``line`` inserted before @main's return (``{t}``: the argument's type)."""
    t = "tensor<2x8x8x3xf32>"
    at = text.index("    return")
    return text[:at] + "    " + line.replace("{t}", t) + "\n" + text[at:]


CUSTOM_CALL = (
    "%u = stablehlo.custom_call @xla_ffi_python_cpu_callback(%arg0) {has_side_effect = true, "
    "api_version = 4 : i32} : ({t}) -> {t}"
)


# ---------------------------------------------------------------------------------------------
# Folding, writing, verifying


@pytest.mark.parametrize("verify", [False, True], ids=["fold", "verify"])
@pytest.mark.parametrize("fmt", ["mlir", "jaxexport"])
def test_fold_write_and_run(tmp_path, capsys, fmt, verify):
    src = _write(tmp_path, fmt)
    out = tmp_path / ("folded" + SUFFIX[fmt])
    before = listing(tmp_path)
    assert main([src, "-o", str(out), *(["--verify"] if verify else [])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bnfold: 1 of 1 BatchNorm folded, 0 kept in ")
    if verify:
        assert lines[1].startswith("bnfold: verified with XLA on the CPU: max abs err ")
    assert lines[-1] == f"bnfold: wrote {out}"
    after = listing(tmp_path)
    assert {k: after[k] for k in before} == before  # the input is untouched
    assert set(after) - set(before) == {out.name}  # and nothing but the output is new
    original, folded = _read(src, fmt), _read(out, fmt)
    # conv, bias add, then the chain (subtract, add eps, rsqrt, multiply twice, add): folded,
    # one add of the composed shift is left
    assert _op_counts(original) == {
        "convolution": 1,
        "multiply": 2,
        "rsqrt": 1,
        "subtract": 1,
        "add": 3,
    }
    assert _op_counts(folded) == {
        "convolution": 1,
        "multiply": 0,
        "rsqrt": 0,
        "subtract": 0,
        "add": 1,
    }
    x = _inputs()
    expected, got = run.outputs(original, x), run.outputs(folded, x)
    assert len(got) == 1 and got[0].shape == expected[0].shape == (2, 8, 8, 6)
    assert np.abs(got[0] - expected[0]).max() <= 1e-5 * np.abs(expected[0]).max()


def test_written_program_keeps_its_calling_convention_and_vjp(tmp_path, capsys):
    src = _write(tmp_path, "jaxexport", vjp_order=1)
    out = tmp_path / "folded.jaxexport"
    assert main([src, "-o", str(out)]) == 0
    original, folded = _read(src, "jaxexport"), _read(out, "jaxexport")
    assert folded.has_vjp() and folded.vjp().in_avals == original.vjp().in_avals
    for field in ("fun_name", "in_tree", "out_tree", "in_avals", "out_avals", "platforms"):
        assert getattr(folded, field) == getattr(original, field), field
    x = _inputs(2)
    # the program is a jax function again: called through jax.jit, it agrees with the original
    np.testing.assert_allclose(
        jax.jit(folded.call)(x[0]), original.call(x[0]), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("fmt", ["mlir", "jaxexport"])
def test_report_and_no_output(tmp_path, capsys, fmt):
    src = _write(tmp_path, fmt)
    before = listing(tmp_path)
    assert main([src, "--report"]) == 0
    text = capsys.readouterr().out
    assert "1 of 1 BatchNorm folded, 0 kept" in text
    assert "_ConvBN/BatchNorm_0" in text and "_ConvBN/Conv_0 (stablehlo.convolution)" in text
    assert listing(tmp_path) == before  # without -o nothing is written


def test_text_without_locations_is_written_without_them(tmp_path, capsys):
    ctx = hlo_mlir.context()
    plain = hlo_mlir.to_text(hlo_mlir.parse_text(_exported().mlir_module(), ctx), debug_info=False)
    src = tmp_path / "plain.mlir"
    src.write_text(plain)
    out = tmp_path / "folded.mlir"
    assert main([str(src), "-o", str(out), "--verify"]) == 0
    assert "loc(" not in plain and "loc(" not in out.read_text()
    assert "loc(" in _exported().mlir_module()


@pytest.mark.parametrize("fmt", ["mlir", "jaxexport"])
def test_writing_over_the_input_itself(tmp_path, capsys, fmt):
    """-o naming the input is an in-place write (as for the other formats): the input is read
    whole before the fold, and the result renamed over it."""
    src = _write(tmp_path, fmt)
    expected = run.outputs(_read(src, fmt), _inputs())
    assert main([src, "-o", src]) == 0
    assert os.listdir(tmp_path) == [os.path.basename(src)]
    folded = _read(src, fmt)
    assert _op_counts(folded)["rsqrt"] == 0
    got = run.outputs(folded, _inputs())
    assert np.abs(got[0] - expected[0]).max() <= 1e-5 * np.abs(expected[0]).max()


@pytest.mark.parametrize("fmt", ["mlir", "jaxexport"])
def test_a_failed_write_leaves_no_partial_file(tmp_path, capsys, monkeypatch, fmt):
    """The output is written to a temporary file renamed into place: a write failing half-way
    leaves the old output (and the input) as they were, and no temporary file."""
    src = _write(tmp_path, fmt)
    out = tmp_path / ("out" + SUFFIX[fmt])
    out.write_bytes(b"the previous output")
    real = hlo_files.write_atomically

    def failing(path, write, **kw):
        def half(f):
            class Full:
                def write(self, data):
                    f.write(data[: len(data) // 2])
                    raise OSError(28, "No space left on device")

            write(Full())

        real(path, half, **kw)

    monkeypatch.setattr(hlo_files, "write_atomically", failing)
    before = listing(tmp_path)
    assert main([src, "-o", str(out)]) == 1
    one_line_error(capsys, "cannot write", "No space left on device")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("fmt", ["mlir", "jaxexport"])
def test_failed_verification_writes_nothing(tmp_path, capsys, monkeypatch, fmt):
    src = _write(tmp_path, fmt)
    outputs = run.outputs
    calls = []

    def wrong_second_run(model, inputs):
        calls.append(model)
        result = outputs(model, inputs)
        return [r * 1.01 for r in result] if len(calls) == 2 else result

    monkeypatch.setattr(run, "outputs", wrong_second_run)
    before = listing(tmp_path)
    assert main([src, "-o", src, "--verify"]) == 1  # even over the input: nothing is written
    one_line_error(capsys, "verification failed on random inputs", f"{src} not written")
    assert listing(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# What --verify does not run


@pytest.fixture
def no_runs(monkeypatch):
    """Fail the test if anything is run."""

    def refuse(*args, **kw):
        raise AssertionError("a module ran")

    monkeypatch.setattr(run, "outputs", refuse)


@pytest.mark.parametrize("fmt", ["mlir", "jaxexport"])
def test_verify_refuses_a_custom_call(tmp_path, capsys, no_runs, fmt):
    """A custom call (here the target of Python callbacks) could run code through --verify:
    refused with one line before anything runs. Folding alone runs nothing, so it proceeds."""
    text = _with_op(_exported().mlir_module(), CUSTOM_CALL)
    src = tmp_path / ("unsafe" + SUFFIX[fmt])
    if fmt == "mlir":
        src.write_text(text)
    else:
        artifact = hlo_mlir.to_artifact(hlo_mlir.parse_text(text, hlo_mlir.context()))
        program = dataclasses.replace(_exported(), mlir_module_serialized=artifact)
        src.write_bytes(_model_bytes(fmt, program))
    out = tmp_path / ("out" + SUFFIX[fmt])
    before = listing(tmp_path)
    assert main([str(src), "-o", str(out), "--verify"]) == 1
    one_line_error(capsys, "--verify does not run modules with stablehlo.custom_call")
    assert listing(tmp_path) == before
    assert main([str(src), "-o", str(out)]) == 0
    assert "1 of 1 BatchNorm folded" in capsys.readouterr().out
    assert "stablehlo.custom_call @xla_ffi_python_cpu_callback" in _op_text(out, fmt)


def _op_text(path, fmt: str) -> str:
    model = _read(path, fmt)
    return model if fmt == "mlir" else model.mlir_module()


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"platforms": ("cuda",)}, "lowered for cuda"),
        ({"nr_devices": 8}, "lowered for 8"),
    ],
    ids=["cuda", "8-devices"],
)
def test_verify_refuses_programs_it_cannot_run_here(tmp_path, capsys, no_runs, changes, words):
    program = dataclasses.replace(_exported(), **changes)
    src = tmp_path / "model.jaxexport"
    src.write_bytes(_model_bytes("jaxexport", program))
    before = listing(tmp_path)
    assert main([str(src), "-o", str(tmp_path / "out.jaxexport"), "--verify"]) == 1
    one_line_error(capsys, words, "fold without --verify")
    assert listing(tmp_path) == before


def test_verify_refuses_programs_with_effects(no_runs):
    class Effect:
        def __repr__(self):
            return "SomeEffect"

    program = dataclasses.replace(_exported(), ordered_effects=(Effect(),))
    with pytest.raises(UnsupportedModelError, match="effects .SomeEffect."):
        hlo_files.check(program, program)


def test_verify_refuses_inputs_or_results_beyond_its_budget(tmp_path, capsys, no_runs):
    big = "tensor<4294967296x4294967296xf32>"
    text = "\n".join(
        [
            "module @huge {",
            f"  func.func public @main(%arg0: {big}) -> {big} {{",
            f"    return %arg0 : {big}",
            "  }",
            "}",
        ]
    )
    src = tmp_path / "huge.mlir"
    src.write_text(text)
    assert main([str(src), "--verify"]) == 1
    one_line_error(capsys, "the inputs take 68,719,476,736.00 GiB (one is float32 [4294967296,")
    splat = _with_op(
        _exported().mlir_module(),
        "%h = stablehlo.constant dense<1.5> : tensor<65536x65536xf32>",
    )
    src.write_text(splat)
    assert main([str(src), "--verify"]) == 1
    one_line_error(capsys, "results take 16.0 GiB, more than the 2 GiB it allows")


# ---------------------------------------------------------------------------------------------
# Options of other formats, damaged and hostile files


@pytest.mark.parametrize("fmt", ["mlir", "jaxexport"])
@pytest.mark.parametrize(
    "option, words",
    [
        (["--qat", "exact"], "--qat applies to torch.export archives only"),
        (["--remove-initializer-inputs"], "--remove-initializer-inputs applies to ONNX models"),
    ],
    ids=["qat", "remove-initializer-inputs"],
)
def test_options_of_other_formats_are_refused(tmp_path, capsys, fmt, option, words):
    src = _write(tmp_path, fmt)
    before = listing(tmp_path)
    assert main([src, "-o", str(tmp_path / ("out" + SUFFIX[fmt])), *option]) == 1
    refused_before_any_work(capsys, words)
    assert listing(tmp_path) == before


def test_output_named_like_the_other_format_is_refused(tmp_path, capsys):
    src = _write(tmp_path, "mlir")
    assert main([src, "-o", str(tmp_path / "out.jaxexport")]) == 1
    refused_before_any_work(capsys, "is named like a serialized jax.export program (.jaxexport)")


def _program() -> bytes:
    return _model_bytes("jaxexport")


def _text() -> bytes:
    return _model_bytes("mlir")


DAMAGED = {
    "empty.mlir": (lambda: b"", "is empty (0 bytes)"),
    "empty.jaxexport": (lambda: b"", "is empty (0 bytes)"),
    "truncated.jaxexport": (lambda: _program()[: len(_program()) // 2], "not a readable jax"),
    "tail.jaxexport": (lambda: _program()[:-200], "not a readable jax.export program"),
    "noise.jaxexport": (lambda: np.random.default_rng(0).bytes(3000), "not a readable jax"),
    "noise.mlir": (lambda: np.random.default_rng(0).bytes(3000), "is not MLIR text"),
    "text.jaxexport": (_text, "not a readable jax.export program"),
    "program.mlir": (_program, "is not MLIR text"),
    "prose.mlir": (lambda: b"Hello, world.\n", "holds no module, function or stablehlo op"),
    "truncated.mlir": (lambda: _text()[: len(_text()) // 2], "Unable to parse module assembly"),
    "llvm.mlir": (
        lambda: (
            b"module {\n  llvm.func @main(%a: i32) -> i32 {\n    llvm.return %a : i32\n  }\n}\n"
        ),
        "holds the op 'llvm.func' of the llvm dialect",
    ),
    "nested.mlir": (
        lambda: b"#a = " + b"[" * 200_000 + b"]" * 200_000 + b"\nmodule {}",
        "crashed on it (SIG",
    ),
    "huge_dims.mlir": (
        lambda: _text().replace(b"tensor<2x8x8x6xf32>", b"tensor<2x8x8x99999999999xf32>"),
        "is not a StableHLO module in MLIR text",
    ),
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_files_are_one_line_errors(tmp_path, capsys, name):
    """Every damaged or hostile file is refused with one line, exit status 1, nothing written;
    a text that crashes jaxlib's parser crashes only the reader process."""
    make, words = DAMAGED[name]
    src = tmp_path / name
    src.write_bytes(make())
    out = tmp_path / ("out" + os.path.splitext(name)[1])
    before = listing(tmp_path)
    assert main([str(src), "-o", str(out), "--verify"]) == 1
    one_line_error(capsys, words)
    assert listing(tmp_path) == before


def test_a_program_is_known_by_its_suffix_only(tmp_path, capsys):
    src = tmp_path / "model.bin"
    src.write_bytes(_program())
    assert main([str(src)]) == 1
    one_line_error(capsys, "is not a model file bnfold reads", "(.jaxexport)")
