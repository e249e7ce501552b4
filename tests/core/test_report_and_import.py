"""FoldReport as table and data; `import bnfold` stays free of frameworks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bnfold.core.report import FoldEntry, FoldReport


def _report() -> FoldReport:
    return FoldReport(
        [
            FoldEntry(
                "layer1.bn", "layer1.conv", "folded", bn_type="BatchNorm2d", target_type="Conv2d"
            ),
            FoldEntry(
                "head.bn",
                "head.fc",
                "skipped",
                "head.fc's output is 3-D",
                "channel-axis",
                "BatchNorm1d",
                "Linear",
            ),
        ],
        model="Net",
    )


def test_report_table_lists_every_entry():
    text = str(_report())
    assert "1 of 2 BatchNorms folded, 1 kept" in text
    assert "layer1.bn" in text and "layer1.conv (Conv2d)" in text
    assert "[channel-axis] head.fc's output is 3-D" in text


def test_report_as_data():
    r = _report()
    data = r.to_list()
    assert json.loads(json.dumps(data)) == data
    assert [e["action"] for e in data] == ["folded", "skipped"]
    assert set(data[0]) >= {"bn", "target", "action", "reason", "rule"}
    assert r.entry("head.bn").rule == "channel-axis"
    assert len(r) == 2 and [e.bn for e in r.folded] == ["layer1.bn"]
    with pytest.raises(KeyError):
        r.entry("nope")


def test_import_bnfold_imports_no_framework():
    code = (
        "import sys, bnfold, bnfold.core.algebra, bnfold.core.rules, bnfold.core.report\n"
        "import bnfold.cli\n"
        "frameworks = ('torch', 'onnx', 'onnx_ir', 'jax', 'onnxruntime')\n"
        "bad = [m for m in frameworks if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_unsupported_model_type_is_a_clear_error():
    import bnfold

    with pytest.raises(bnfold.UnsupportedModelError, match="nn.Module"):
        bnfold.fold(object())
