"""What each package of bnfold may import, and what its wheel holds.

* Importing any module of ``bnfold.core`` imports no framework (torch, onnx, onnx_ir,
  onnxruntime, jax): the core is the part every frontend shares.
* Importing any module of ``bnfold.onnx`` never imports torch, any module of ``bnfold.torch``
  never imports onnx, onnx_ir, onnxruntime or jax, and any module of ``bnfold.stablehlo`` never
  imports torch or onnx: a user of one framework does not pay for (or need) the others.

The modules are found with ``pkgutil.walk_packages``, so a new module is covered when it is
added; each package's modules are imported in a fresh interpreter, and a module that pulls a
forbidden framework in is named.

* The wheel ``pip wheel`` builds from the sources holds every module of ``bnfold`` (every
  ``.py`` file, every subpackage's ``__init__.py``) and nothing else of the repository.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import bnfold

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "bnfold"

FORBIDDEN = {
    "bnfold.core": ("torch", "onnx", "onnx_ir", "onnxruntime", "jax"),
    "bnfold.onnx": ("torch",),
    "bnfold.torch": ("onnx", "onnx_ir", "onnxruntime", "jax"),
    "bnfold.stablehlo": ("torch", "onnx", "onnx_ir", "onnxruntime"),
}

# Which module of a package imports what it must not (empty: none); every one is a finding to
# fix in bnfold, marked xfail(strict=True) until then.
KNOWN_VIOLATIONS: dict[str, str] = {}


def modules_of(package: str) -> list[str]:
    """The package and every module and subpackage under it."""
    pkg = importlib.import_module(package)
    found = [package] + [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")]
    return sorted(found)


# Imports each module in turn, and says which one first brought each forbidden module in.
_PROBE = """
import importlib, json, sys
modules, forbidden = json.loads(sys.argv[1]), json.loads(sys.argv[2])
present = lambda: {f for f in forbidden if f in sys.modules}
culprits = {}
already = present()
for name in modules:
    importlib.import_module(name)
    for f in sorted(present() - already - set(culprits)):
        culprits[f] = name
print(json.dumps({"before": sorted(already), "culprits": culprits}))
"""


def _probe(modules: list[str], forbidden: tuple[str, ...]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(modules), json.dumps(list(forbidden))],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return json.loads(out.stdout)


def test_every_package_has_modules_to_check():
    for package in FORBIDDEN:
        modules = modules_of(package)
        assert len(modules) > 2, modules
        files = {p for p in (SOURCE / package.split(".")[1]).rglob("*.py")}
        assert len(modules) == len(files), (modules, files)  # walk_packages missed none


@pytest.mark.parametrize(
    "package",
    [
        pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=KNOWN_VIOLATIONS[p]))
        if p in KNOWN_VIOLATIONS
        else p
        for p in FORBIDDEN
    ],
)
def test_importing_a_package_imports_no_forbidden_framework(package):
    found = _probe(modules_of(package), FORBIDDEN[package])
    assert found["before"] == [], "the interpreter had them before any bnfold module"
    assert found["culprits"] == {}, f"{package}: {found['culprits']} (framework: first importer)"


def test_the_probe_sees_a_forbidden_import():
    """The probe is not blind: a bnfold module that does import torch is named."""
    found = _probe(["bnfold.core.rules", "bnfold.torch.verify"], ("torch",))
    assert found["culprits"] == {"torch": "bnfold.torch.verify"}


# --------------------------------------------------------------------------------------------
# The wheel


def test_the_wheel_holds_every_module(tmp_path):
    """``pip wheel`` (offline, with the setuptools of this environment) on a copy of the
    sources, so that no build directory is left in the repository."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(SOURCE, src / "bnfold", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "-w",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = out.glob("bnfold-*.whl")
    assert wheel.name.startswith(f"bnfold-{bnfold.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {n for n in names if n.endswith(".py")}
    in_source = {p.relative_to(ROOT).as_posix() for p in SOURCE.rglob("*.py")}
    assert in_wheel == in_source, (
        f"missing from the wheel: {sorted(in_source - in_wheel)}; "
        f"not in the sources: {sorted(in_wheel - in_source)}"
    )
    packages = {p.parent.relative_to(ROOT).as_posix() for p in SOURCE.rglob("__init__.py")}
    assert packages >= {
        "bnfold",
        "bnfold/core",
        "bnfold/onnx",
        "bnfold/torch",
        "bnfold/stablehlo",
    }
    assert {f"{p}/__init__.py" for p in packages} <= in_wheel
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]
