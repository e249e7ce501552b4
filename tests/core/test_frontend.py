"""bnfold.core.frontend: model objects go to the frontend that claims their type, files to the
frontend of their format (by suffix, else by content), and nothing is imported before a model
of its kind arrives."""

from __future__ import annotations

import subprocess
import sys

import pytest

import bnfold
from bnfold.core import files, frontend
from bnfold.errors import ModelFileError, UnsupportedModelError

_UNSUPPORTED = (
    "bnfold cannot fold a builtins.object: pass a torch.nn.Module, a "
    "torch.export.ExportedProgram, an ATen GraphModule, an onnx.ModelProto, an onnx_ir.Model, "
    "a jax.export.Exported or StableHLO text"
)


def test_unsupported_object_lists_every_registered_kind():
    with pytest.raises(UnsupportedModelError) as excinfo:
        frontend.model_frontend(object())
    assert str(excinfo.value) == _UNSUPPORTED
    for call in (bnfold.fold, bnfold.analyze):
        with pytest.raises(UnsupportedModelError) as excinfo:
            call(object())
        assert str(excinfo.value) == _UNSUPPORTED
    with pytest.raises(UnsupportedModelError, match="builtins.str"):
        bnfold.verify("model.onnx", "folded.onnx", None)


def test_claiming_imports_no_framework():
    """An object of no framework is refused without importing one, and a file's format is
    found without importing its frontend."""
    code = (
        "import sys, tempfile, os\n"
        "from bnfold.core import files, frontend\n"
        "try:\n"
        "    frontend.model_frontend(3.5)\n"
        "except Exception as e:\n"
        "    print(type(e).__name__)\n"
        "d = tempfile.mkdtemp()\n"
        "p = os.path.join(d, 'm.bin')\n"
        "open(p, 'wb').write(b'PK\\x03\\x04rest')\n"
        "print(files.model_format(p))\n"
        "mods = ('torch', 'onnx', 'onnx_ir', 'onnxruntime', 'bnfold.torch', 'bnfold.onnx')\n"
        "print(','.join(m for m in mods if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:3] == ["UnsupportedModelError", "pt2", ""]


@pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr Node:UserWarning")
def test_torch_models_go_to_the_eager_or_the_graph_frontend():
    torch = pytest.importorskip("torch")
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 8, 8)
    ep = torch.export.export(model, (x,))
    eager = "bnfold.torch.eager.module"
    graph = "bnfold.torch.export"
    assert frontend.model_frontend(model).__name__ == eager
    assert frontend.model_frontend(ep).__name__ == graph
    assert frontend.model_frontend(ep.module()).__name__ == graph  # an ATen GraphModule
    assert frontend.model_frontend(torch.fx.symbolic_trace(model)).__name__ == eager
    unflattened = torch.export.unflatten(ep)
    with pytest.raises(UnsupportedModelError, match=r"torch.export.unflatten: fold the Export"):
        frontend.model_frontend(unflattened)
    with pytest.raises(UnsupportedModelError, match="builtins.int"):
        frontend.model_frontend(3)  # torch imported, but not a torch model


def test_onnx_models_go_to_the_onnx_frontend():
    onnx = pytest.importorskip("onnx")
    ir = pytest.importorskip("onnx_ir")
    from onnx import TensorProto, helper

    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "xy")
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    proto = helper.make_model(graph)
    onnx_frontend = next(f for f in frontend.MODEL_FRONTENDS if "an onnx.ModelProto" in f.kinds)
    assert frontend.model_frontend(proto).__name__ == onnx_frontend.module
    assert (
        frontend.model_frontend(ir.serde.deserialize_model(proto)).__name__ == onnx_frontend.module
    )
    assert onnx_frontend.module.startswith("bnfold.onnx.")
    with pytest.raises(UnsupportedModelError, match="onnx.onnx_ml_pb2.GraphProto"):
        frontend.model_frontend(proto.graph)  # onnx imported, but not a model
    assert isinstance(proto, onnx.ModelProto)


def _write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "name, data, fmt",
    [
        ("m.onnx", b"\x08\x07rest", "onnx"),
        ("m.pt2", b"PK\x03\x04rest", "pt2"),
        ("m.PT2", b"PK\x03\x04rest", "pt2"),
        ("m.ONNX", b"\x08", "onnx"),
        # the suffix decides, whatever the content (the frontend then says what is wrong)
        ("m.pt2", b"\x08\x07rest", "pt2"),
        ("m.onnx", b"PK\x03\x04rest", "onnx"),
        # no known suffix: the leading bytes decide
        ("model.bin", b"PK\x03\x04rest", "pt2"),
        ("model", b"\x08\x07rest", "onnx"),
    ],
)
def test_files_by_suffix_then_content(tmp_path, name, data, fmt):
    assert files.model_format(_write(tmp_path, name, data)) == fmt
    assert frontend.file_frontend(fmt).format == fmt


@pytest.mark.parametrize("data", [b"PK\x03", b"{json}", b"", b"\x00\x08"])
def test_unknown_files_are_refused_naming_every_format(tmp_path, data):
    path = _write(tmp_path, "model.bin", data)
    with pytest.raises(ModelFileError) as excinfo:
        files.model_format(path)
    assert str(excinfo.value) == (
        f"{path} is not a model file bnfold reads: expected an ONNX model (.onnx), a "
        "torch.export archive (.pt2), a StableHLO module in MLIR text (.mlir) or a serialized "
        "jax.export program (.jaxexport)"
    )


def test_output_suffix_of_another_format_is_refused(tmp_path):
    with pytest.raises(ModelFileError) as excinfo:
        files.check_output(tmp_path / "out.onnx", "pt2")
    assert str(excinfo.value) == (
        f"cannot write {tmp_path / 'out.onnx'}: out.onnx is named like an ONNX model (.onnx), "
        "but the result is a torch.export archive (.pt2), the input's format; give the output "
        "the suffix .pt2 (bnfold does not convert between formats)"
    )
    assert files.check_output(tmp_path / "out.bin", "onnx") == tmp_path / "out.bin"


def test_a_new_model_frontend_is_one_registration(monkeypatch):
    """A toy frontend, registered, gets fold, analyze and verify; its kind is listed when
    another object is refused."""
    import types

    class Toy:
        pass

    calls = []
    module = types.ModuleType("toy_frontend")
    module.fold = lambda m, x, **kw: calls.append(("fold", x, kw)) or "folded"
    module.analyze = lambda m, x, **kw: calls.append(("analyze", x, kw)) or "report"
    module.verify = lambda a, b, x: (0.5, 0.25)
    monkeypatch.setitem(sys.modules, "toy_frontend", module)
    monkeypatch.setattr(frontend, "MODEL_FRONTENDS", list(frontend.MODEL_FRONTENDS))
    frontend.register_model_frontend("toy_frontend", lambda m: isinstance(m, Toy), "a Toy")
    toy = Toy()
    assert bnfold.fold(toy, 1, producers="conv") == "folded"
    assert bnfold.analyze(toy, 2) == "report"
    assert bnfold.verify(toy, toy, 3) == (0.5, 0.25)
    assert calls == [
        ("fold", 1, {"inplace": False, "producers": "conv", "return_report": False}),
        ("analyze", 2, {"producers": None}),
    ]
    with pytest.raises(
        UnsupportedModelError, match=r"a jax.export.Exported, StableHLO text or a Toy$"
    ):
        bnfold.fold(object())


def test_a_file_format_is_registered_once(monkeypatch):
    monkeypatch.setattr(frontend, "FILE_FRONTENDS", list(frontend.FILE_FRONTENDS))
    with pytest.raises(ValueError, match="'onnx'"):
        frontend.register_file_frontend(frontend.file_frontend("onnx"))
    with pytest.raises(KeyError):
        frontend.file_frontend("tflite")
