"""The command line: `bnfold demo`, errors as one line and a non-zero status."""

from __future__ import annotations

import subprocess
import sys

from bnfold.cli import main


def test_demo_folds_and_verifies(capsys):
    assert main(["demo", "--batch", "2", "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert "16 of 16 BatchNorms folded" in out
    assert "BatchNorm modules: 16 before, 0 after" in out
    assert "verified: outputs match" in out
    assert "ConvTranspose2d" in out and "Linear" in out


def test_usage_error_is_one_line(capsys):
    assert main(["--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnfold: error:") and err.count("\n") == 1


def test_no_command_prints_usage(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert "bnfold" in capsys.readouterr().out
    assert main(["--help"]) == 0


def test_python_dash_m_runs_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "bnfold", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("bnfold ")


def test_demo_runs_with_batch_one(capsys):
    assert main(["demo", "--batch", "1", "--size", "16"]) == 0
    assert "verified: outputs match" in capsys.readouterr().out


def test_demo_arguments_are_validated_as_usage_errors(capsys):
    for argv in (["--batch", "0"], ["--size", "-3"], ["--seed", "9" * 20], ["--batch", "x"]):
        assert main(["demo", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bnfold: error: argument") and err.count("\n") == 1
