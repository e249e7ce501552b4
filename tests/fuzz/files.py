"""File fuzzer for the ``bnfold`` command line: damaged ``.onnx``, ``.pt2``, ``.mlir`` and
``.jaxexport`` files.

A seed corpus of small valid models (ONNX written with ``onnx.helper`` and by
``torch.onnx.export``, ``.pt2`` archives written by ``torch.export.save``, flax models exported
with ``jax.export`` as serialized programs and as StableHLO text) is mutated by named
strategies: byte-level (bit flips, overwrites, insertions and deletions, truncation, random
bytes, splicing), protobuf-aware for ONNX (absurd dims, bad element types, raw data of the wrong
size, bogus external data, undefined names, cycles, bad attributes, constant subgraphs that
promise huge values, ...) and zip/JSON-aware for ``.pt2`` (members corrupted, deleted,
duplicated; JSON mutated; zip directory sizes that promise far more than the file holds;
weights mutated; pickles that would run code), text-aware for StableHLO text (lines, tokens,
constants, deep nesting, encodings, custom calls, huge shapes, other dialects) and
flatbuffer-aware for ``jax.export`` programs (offsets, fields, the module's bytecode, pytrees
that share nodes, legacy sharding protos, custom calls); and for all, output names that collide
with the input (its data file, a data file that is the input, a named pipe, another format).

Every input goes through ``bnfold.cli.main(argv)`` in-process, and the run must keep the
command line's promises for a bad file: no exception escapes, the exit status is 0 or 1, a
failure prints exactly one ``bnfold: error:`` line and leaves no output file (nor data or
temporary file), the input is unchanged, an output written with status 0 loads, and the run
finishes in seconds without allocating memory the file does not justify. An output named in
the input directory may change only its own files, never the input's (unless it is the input).

As a script (``python tests/fuzz/files.py --inputs 10000 --seed 0``) the inputs run in worker
subprocesses, so that a native crash (a segfault in protobuf, onnxruntime, torch or jaxlib) is
recorded
with the input that caused it and the run goes on; every finding's input is saved to
``--save-dir`` with a ``repro.txt``, and a summary table is printed. The exit status is 1 when
there is any finding. ``tests/fuzz/test_files.py`` runs a few hundred inputs in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import resource
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SLOW_SECONDS = 5.0
MEMORY_SLACK = 200 * 2**20  # bytes a run may grow the peak RSS by, beyond the input's size
DEFAULT_SAVE_DIR = "/tmp/bnfold-fuzz-findings"
VERIFY_FRACTION = 0.05
# The share of the inputs each format gets (every strategy of a format an equal part of it).
FORMAT_SHARES = {"onnx": 0.52, "pt2": 0.24, "mlir": 0.12, "jaxexport": 0.12}
# The formats fuzzed (--formats narrows them).
FORMATS = tuple(FORMAT_SHARES)
PWNED = "bnfold-fuzz-pwned"  # the file a malicious pickle in a fuzzed .pt2 creates in the cwd
HERE = Path(__file__).resolve()

# Findings: a broken promise of the command line. Notes are only counted.
FINDINGS = (
    "native_crash",
    "hang",
    "escaped",
    "internal",
    "bad_exit",
    "multi_line",
    "bad_message",
    "leftover",
    "input_changed",
    "bad_output",
    "code_exec",
    "slow",
    "memory",
    "outside_changed",
    "unsafe_ran",
)

# Files a run may never touch: OUTSIDE holds VICTIM (which must stay as it is) and must never
# gain a file (a program's from_file or custom op aims there, outside every scratch directory).
OUTSIDE = Path(tempfile.gettempdir()) / "bnfold-fuzz-outside"
VICTIM = "victim.bin"
VICTIM_BYTES = b"bnfold fuzz: must stay unchanged\n"


# =============================================================================================
# Seed corpus


@dataclass
class Seed:
    """A valid model: its files (the model and any external data file) by name."""

    name: str
    fmt: str  # "onnx", "pt2", "mlir" or "jaxexport" (also the model file's suffix)
    main: str
    files: dict[str, bytes]

    @property
    def data(self) -> bytes:
        return self.files[self.main]


def _bn_arrays(rng: Any, c: int, dtype: Any) -> list[Any]:
    """Non-trivial BatchNorm parameters: scale, bias, mean, var."""
    return [
        rng.uniform(0.5, 1.5, c).astype(dtype),
        rng.normal(0.0, 0.5, c).astype(dtype),
        rng.normal(0.0, 0.5, c).astype(dtype),
        rng.uniform(0.5, 2.0, c).astype(dtype),
    ]


class _OnnxBuilder:
    def __init__(self, rng: Any, dtype: Any = None) -> None:
        import numpy as np
        from onnx import TensorProto

        self.np = np
        self.rng = rng
        self.dtype = dtype or np.float32
        self.elem = TensorProto.FLOAT16 if self.dtype == np.float16 else TensorProto.FLOAT
        self.nodes: list[Any] = []
        self.inits: list[Any] = []

    def init(self, name: str, array: Any) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(self.np.asarray(array), name))
        return name

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        return self.init(name, self.rng.normal(0, 0.5, shape).astype(self.dtype))

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs: Any) -> None:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))

    def bn(self, x: str, y: str, c: int, name: str, eps: float = 1e-3) -> None:
        arrays = _bn_arrays(self.rng, c, self.dtype)
        names = [self.init(f"{name}.{k}", a) for k, a in zip("sbmv", arrays, strict=True)]
        self.node("BatchNormalization", [x, *names], [y], name, epsilon=eps)

    def graph(self, name: str, inputs: list[Any], outputs: list[Any]) -> Any:
        from onnx import helper

        return helper.make_graph(self.nodes, name, inputs, outputs, self.inits)

    def model(self, inputs: list[Any], outputs: list[Any], opset: int) -> Any:
        from onnx import helper

        g = self.graph("g", inputs, outputs)
        return helper.make_model(
            g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8, producer_name="fuzz"
        )


def _vi(name: str, elem: int, shape: list[Any] | None) -> Any:
    from onnx import helper

    return helper.make_tensor_value_info(name, elem, shape)


def _onnx_conv_bn(rng: Any, dtype: Any = None) -> Any:
    b = _OnnxBuilder(rng, dtype)
    b.node(
        "Conv",
        ["x", b.weight("conv.w", (4, 3, 3, 3)), b.weight("conv.b", (4,))],
        ["c"],
        "conv",
        pads=[1, 1, 1, 1],
    )
    b.bn("c", "n", 4, "bn")
    b.node("Relu", ["n"], ["y"], "relu")
    return b.model([_vi("x", b.elem, ["N", 3, 6, 6])], [_vi("y", b.elem, ["N", 4, 6, 6])], 15)


def _onnx_conv_transpose_bn(rng: Any) -> Any:
    b = _OnnxBuilder(rng)
    w = b.weight("up.w", (4, 3, 3, 3))  # groups 2: 6 output channels
    b.node("ConvTranspose", ["x", w], ["c"], "up", group=2, strides=[2, 2], output_padding=[1, 1])
    b.bn("c", "y", 6, "bn")
    return b.model([_vi("x", b.elem, [1, 4, 3, 3])], [_vi("y", b.elem, [1, 6, 8, 8])], 13)


def _onnx_gemm_bn(rng: Any) -> Any:
    b = _OnnxBuilder(rng)
    b.node("Gemm", ["x", b.weight("fc.w", (6, 5)), b.weight("fc.b", (6,))], ["c"], "fc", transB=1)
    b.bn("c", "y", 6, "bn")
    return b.model([_vi("x", b.elem, ["N", 5])], [_vi("y", b.elem, ["N", 6])], 14)


def _onnx_matmul_bn(rng: Any) -> Any:
    b = _OnnxBuilder(rng)
    b.node("MatMul", ["x", b.weight("mm.w", (5, 6))], ["m"], "mm")
    b.node("Add", ["m", b.weight("mm.b", (6,))], ["c"], "add")
    b.bn("c", "y", 6, "bn")
    return b.model([_vi("x", b.elem, ["N", 5])], [_vi("y", b.elem, ["N", 6])], 15)


def _onnx_if(rng: Any) -> Any:
    from onnx import TensorProto, helper

    branches = []
    for side in ("then", "else"):
        s = _OnnxBuilder(rng)
        s.node("Conv", ["x", s.weight(f"{side}.w", (2, 3, 1, 1))], [f"{side}.c"], f"{side}.conv")
        s.bn(f"{side}.c", f"{side}.y", 2, f"{side}.bn")
        branches.append(s.graph(side, [], [_vi(f"{side}.y", TensorProto.FLOAT, [1, 2, 4, 4])]))
    b = _OnnxBuilder(rng)
    b.node("If", ["cond"], ["y"], "if", then_branch=branches[0], else_branch=branches[1])
    g = b.graph(
        "g",
        [_vi("cond", TensorProto.BOOL, []), _vi("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [_vi("y", TensorProto.FLOAT, [1, 2, 4, 4])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


def _onnx_constants(rng: Any) -> Any:
    """BatchNorm statistics from Constant nodes and a small constant subgraph; one weight
    shared by two convolutions, each with its own BatchNorm."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    b = _OnnxBuilder(rng)
    w = b.weight("w", (2, 2, 1, 1))
    b.node("Conv", ["x", w], ["c1"], "conv1")
    b.bn("c1", "n1", 2, "bn1")
    b.node("Conv", ["n1", w], ["c2"], "conv2")
    s, bias, mean, _ = _bn_arrays(rng, 2, np.float32)
    b.node("Constant", [], ["bn2.s"], "k_s", value=numpy_helper.from_array(s, "k_s"))
    b.node("Constant", [], ["bn2.b"], "k_b", value=numpy_helper.from_array(bias, "k_b"))
    b.node("Constant", [], ["bn2.m"], "k_m", value_floats=[float(v) for v in mean])
    b.node("Constant", [], ["v_fill"], "k_fill", value_float=1.5)
    b.node("Constant", [], ["v_shape"], "k_shape", value_ints=[2])
    b.node("Expand", ["v_fill", "v_shape"], ["bn2.v"], "expand")
    b.node("BatchNormalization", ["c2", "bn2.s", "bn2.b", "bn2.m", "bn2.v"], ["y"], "bn2")
    g = b.graph(
        "g",
        [_vi("x", TensorProto.FLOAT, [1, 2, 5, 5])],
        [_vi("y", TensorProto.FLOAT, [1, 2, 5, 5])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


def _onnx_torch_export(seed: int) -> bytes:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12, 4),
        nn.BatchNorm1d(4),
    ).eval()
    _randomize_bn(m, seed)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            m,
            (torch.randn(1, 2, 4, 4),),
            buf,
            dynamo=False,
            opset_version=17,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n"}},
        )
    return buf.getvalue()


def _onnx_external(rng: Any, tmp: Path) -> dict[str, bytes]:
    import onnx

    model = _onnx_conv_bn(rng)
    path = tmp / "model.onnx"
    onnx.save(
        model,
        os.fspath(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    return {
        "model.onnx": path.read_bytes(),
        "model.onnx.data": (tmp / "model.onnx.data").read_bytes(),
    }


def _randomize_bn(model: Any, seed: int) -> None:
    """Non-trivial statistics for every BatchNorm (what the tests' ``randomize_all`` does)."""
    from bnfold.demo import randomize_batchnorms

    randomize_batchnorms(model, seed=seed)


def _pt2(model: Any, example: tuple, seed: int, **kw: Any) -> bytes:
    import torch

    extra = kw.pop("extra_files", None)
    decompose = kw.pop("decompose", False)
    _randomize_bn(model, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model.eval(), example, **kw)
        if decompose:
            ep = ep.run_decompositions()
        buf = io.BytesIO()
        torch.export.save(ep, buf, extra_files=extra)
    return buf.getvalue()


def build_corpus(seed: int = 0) -> list[Seed]:
    """The seed models, the same for the same ``seed``."""
    import numpy as np
    import onnx
    import torch
    from torch import nn

    rng = np.random.default_rng(seed)
    seeds: list[Seed] = []

    def add_onnx(name: str, model: Any) -> None:
        data = model if isinstance(model, bytes) else model.SerializeToString()
        seeds.append(Seed(name, "onnx", "model.onnx", {"model.onnx": data}))

    add_onnx("conv_bn", _onnx_conv_bn(rng))
    add_onnx("convT_bn", _onnx_conv_transpose_bn(rng))
    add_onnx("gemm_bn", _onnx_gemm_bn(rng))
    add_onnx("matmul_bn", _onnx_matmul_bn(rng))
    add_onnx("if_sub", _onnx_if(rng))
    add_onnx("constants", _onnx_constants(rng))
    add_onnx("fp16", _onnx_conv_bn(rng, np.float16))
    add_onnx("torch_onnx", _onnx_torch_export(seed))
    with tempfile.TemporaryDirectory() as tmp:
        seeds.append(Seed("external", "onnx", "model.onnx", _onnx_external(rng, Path(tmp))))
    for s in seeds:  # the builders must have made valid models
        if s.name != "external":
            onnx.checker.check_model(onnx.load_from_string(s.data), full_check=True)

    torch.manual_seed(seed)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
    up = nn.Sequential(
        nn.ConvTranspose2d(4, 4, 3, stride=2, groups=2, bias=False), nn.BatchNorm2d(4)
    )
    lin = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    batch = torch.export.Dim("batch", min=2, max=64)

    def add_pt2(name: str, data: bytes) -> None:
        seeds.append(Seed(name, "pt2", "model.pt2", {"model.pt2": data}))

    add_pt2("pt2_conv", _pt2(conv, (torch.randn(1, 2, 5, 5),), seed))
    add_pt2("pt2_convT", _pt2(up, (torch.randn(1, 4, 3, 3),), seed + 1))
    add_pt2(
        "pt2_linear",
        _pt2(
            lin,
            (torch.randn(2, 4),),
            seed + 2,
            dynamic_shapes=({0: batch},),
            extra_files={"note.txt": "fuzz seed"},
        ),
    )
    add_pt2("pt2_decomposed", _pt2(conv, (torch.randn(1, 2, 5, 5),), seed + 3, decompose=True))
    seeds += _stablehlo_seeds(seed)
    return seeds


# =============================================================================================
# Cases


@dataclass
class Case:
    """One fuzzed input: files to write into the input directory and the command line."""

    index: int
    fmt: str  # the format of the seed (and of the output name)
    strategy: str
    seed: str
    main: str
    files: dict[str, bytes]
    detail: str = ""
    args: list[str] = field(default_factory=list)
    write_output: bool = True
    # ("symlink", name, target), ("hardlink", name, existing), ("mkdir", name, ""),
    # ("fifo", name, "")
    links: list[tuple[str, str, str]] = field(default_factory=list)
    # A program given side-effecting ops (m_pt2_side_effect): --verify must refuse it.
    unsafe: bool = False
    # The output's name in the input directory (m_output_collision), else out/folded.<fmt>.
    output: str = ""

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.files.values())


class Skip(Exception):
    """A strategy cannot apply to this seed; another is drawn."""


Mutator = Callable[[random.Random, Seed, list[Seed], Case], None]


def _pick(rng: random.Random, seq: list[Any] | tuple[Any, ...]) -> Any:
    if not seq:
        raise Skip("nothing to choose from")
    return seq[rng.randrange(len(seq))]


# ---------------------------------------------------------------------------------------------
# Byte-level mutations (both formats)

_BYTES = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0x08, 0x0A, 0x12, 0x1A, 0x22, 0x3A, 0x42)


def _k(rng: random.Random) -> int:
    return _pick(rng, (1, 1, 1, 2, 2, 3, 4, 8, 16, 64))


def flip_bits(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    b = bytearray(data)
    k = _k(rng)
    for _ in range(k):
        if b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    return bytes(b), f"{k} bit flips"


def overwrite_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    b = bytearray(data)
    k = _k(rng)
    for _ in range(k):
        if b:
            i = rng.randrange(len(b))
            b[i] = _pick(rng, _BYTES) if rng.random() < 0.5 else rng.randrange(256)
    return bytes(b), f"{k} bytes overwritten"


def insert_delete(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    b = bytearray(data)
    ops = []
    for _ in range(rng.randint(1, 3)):
        if b and rng.random() < 0.5:
            i = rng.randrange(len(b))
            n = rng.randint(1, min(64, len(b) - i))
            del b[i : i + n]
            ops.append(f"del {n}@{i}")
        else:
            i = rng.randrange(len(b) + 1)
            kind = rng.random()
            if kind < 0.3:  # a varint that promises a huge length
                ins = _pick(rng, (b"\xff\xff\xff\xff\x07", b"\xff\xff\xff\xff\xff\xff\xff\x7f"))
            elif kind < 0.6:
                ins = bytes([_pick(rng, _BYTES)]) * rng.randint(1, 16)
            else:
                ins = rng.randbytes(rng.randint(1, 32))
            b[i:i] = ins
            ops.append(f"ins {len(ins)}@{i}")
    return bytes(b), ", ".join(ops)


def truncate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    n = len(data)
    cut = _pick(rng, (0, 1, 2, 4, n // 2, n - 1, n - 22, rng.randrange(max(n, 1))))
    cut = min(max(cut, 0), max(n - 1, 0))
    return data[:cut], f"truncated to {cut} of {n} bytes"


def _random_length(rng: random.Random) -> int:
    return int(2 ** rng.uniform(0, 16)) - 1


def _random_proto(rng: random.Random, depth: int = 0) -> bytes:
    """Random but well-formed protobuf: fields of every wire type, nested messages."""
    out = bytearray()
    for _ in range(rng.randint(1, 8)):
        number = rng.randint(1, 20)
        wire = _pick(rng, (0, 2, 2, 5, 1))
        out += _varint(number << 3 | wire)
        if wire == 0:
            out += _varint(_pick(rng, (0, 1, 3, 8, 2**31, 2**40, 2**63, rng.getrandbits(64))))
        elif wire == 1:
            out += rng.randbytes(8)
        elif wire == 5:
            out += rng.randbytes(4)
        else:
            body = (
                _random_proto(rng, depth + 1)
                if depth < 4 and rng.random() < 0.6
                else (rng.randbytes(rng.randint(0, 40)))
            )
            out += _varint(len(body)) + body
    return bytes(out)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def m_bitflip(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    case.files[case.main], case.detail = flip_bits(rng, seed.data)


def m_overwrite(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    case.files[case.main], case.detail = overwrite_bytes(rng, seed.data)


def m_insert_delete(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    case.files[case.main], case.detail = insert_delete(rng, seed.data)


def m_truncate(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    case.files[case.main], case.detail = truncate(rng, seed.data)


def m_random_bytes(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    n = _random_length(rng)
    case.files[case.main] = rng.randbytes(n)
    case.detail = f"{n} random bytes"


def m_random_magic(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    if seed.fmt == "onnx":
        if rng.random() < 0.5:
            body = b"\x08" + _varint(rng.randint(0, 12)) + _random_proto(rng)
            case.detail = "random protobuf after ir_version"
        else:
            body = b"\x08" + rng.randbytes(_random_length(rng))
            case.detail = "0x08 and random bytes"
    elif seed.fmt == "pt2":
        body = b"PK\x03\x04" + rng.randbytes(_random_length(rng))
        case.detail = "zip magic and random bytes"
    elif seed.fmt == "mlir":
        body = _pick(rng, (b"module {", b"#loc = loc(", b"func.func @main(")) + bytes(
            rng.choice(b" {}()<>%:=,.@x0123456789abfistuvw\n") for _ in range(_random_length(rng))
        )
        case.detail = "an MLIR start and random ASCII"
    else:  # a flatbuffer's root offset and vtable start, as jax writes them, and random bytes
        body = seed.data[:8] + rng.randbytes(_random_length(rng))
        case.detail = "the flatbuffer header and random bytes"
    case.files[case.main] = body


def m_splice(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    same = [s for s in corpus if s.fmt == seed.fmt]
    other = _pick(rng, same if rng.random() < 0.8 else corpus)
    a, b = seed.data, other.data
    if rng.random() < 0.2:  # protobuf merges concatenated messages; zip finds the last directory
        case.files[case.main] = a + b
        case.detail = f"{seed.name} + {other.name} concatenated"
        return
    i, j = rng.randrange(len(a) + 1), rng.randrange(len(b) + 1)
    case.files[case.main] = a[:i] + b[j:]
    case.detail = f"{seed.name}[:{i}] + {other.name}[{j}:]"


_BYTE_MUTATORS = (flip_bits, overwrite_bytes, insert_delete, truncate)


def m_suffix(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """A model, sometimes damaged, under a name whose suffix misleads or is missing."""
    data = seed.data
    note = "intact"
    if rng.random() < 0.3:
        data, note = _pick(rng, _BYTE_MUTATORS)(rng, data)
    if seed.fmt == "onnx":
        name = _pick(
            rng, "model.pt2 model model.bin model.ONNX model.onnx.pt2 model.zip .onnx".split()
        )
    elif seed.fmt == "pt2":
        name = _pick(
            rng, ("model.onnx", "model", "model.PT2", "model.zip", "model.pt2.onnx", "model.bin")
        )
    elif seed.fmt == "mlir":
        name = _pick(rng, ("model.jaxexport", "model", "model.MLIR", "model.txt", "model.onnx"))
    else:
        name = _pick(rng, ("model.mlir", "model", "model.JAXEXPORT", "model.bin", "model.pt2"))
    del case.files[case.main]
    case.main = name
    case.files[name] = data
    case.detail = f"named {name!r}, {note}"


# ---------------------------------------------------------------------------------------------
# Output names colliding with the input (every format)

Link = tuple[str, str, str]


def _output_collisions(case: Case) -> dict[str, tuple[str, list[Link], str]]:
    """Outputs that collide with an input or name no file to replace, by name: (the output's
    name in the input directory, links to make there, a new name for the input model or "")."""
    main, out = case.main, f"out.{case.fmt}"
    ops: dict[str, tuple[str, list[Link], str]] = {
        "fifo": (out, [("fifo", out, "")], ""),
        "fifo_link": (out, [("fifo", "pipe", ""), ("symlink", out, "pipe")], ""),
        "other_suffix": ("out.pt2" if case.fmt == "onnx" else "out.onnx", [], ""),
        "in_place": (main, [], ""),
        "link_to_input": (out, [("symlink", out, main)], ""),
        "hardlink_to_input": (out, [("hardlink", out, main)], ""),
    }
    if case.fmt != "onnx":
        return ops
    data = out + ".data"  # the output's data file, written when the model has external data
    ops.update(
        {
            "data_fifo": (out, [("fifo", data, "")], ""),
            "data_is_input": ("a.onnx", [], "a.onnx.data"),
            "data_link_to_input": (out, [("symlink", data, main)], ""),
            "data_hardlink_to_input": (out, [("hardlink", data, main)], ""),
        }
    )
    stored = sorted(n for n in case.files if n != main)
    if stored:  # the seed's external data file
        ops["input_data"] = (stored[0], [], "")
        ops["link_to_input_data"] = (out, [("symlink", out, stored[0])], "")
        if stored[0].endswith(".data"):  # an output named like the input, the input renamed
            ops["shares_data"] = (stored[0].removesuffix(".data"), [], "a.onnx")
    return ops


def output_collision(case: Case, op: str) -> None:
    """Give ``case`` the output ``op`` of :func:`_output_collisions` (tests pick one by name)."""
    output, links, rename = _output_collisions(case)[op]
    if rename:
        case.files[rename] = case.files.pop(case.main)
        case.main = rename
    case.links.extend(links)
    case.output = output
    case.detail = f"output {output!r}: {op}"


def m_output_collision(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """An intact model whose output collides with an input or names no file to replace (a
    named pipe, a name of the other format): the run must refuse, or write only the output's
    own files (see :func:`_may_write`)."""
    output_collision(case, _pick(rng, sorted(_output_collisions(case))))


# ---------------------------------------------------------------------------------------------
# ONNX protobuf-aware mutations


def _proto(seed: Seed) -> Any:
    import onnx

    m = onnx.ModelProto()
    m.ParseFromString(seed.data)
    return m


def _graphs(g: Any) -> list[Any]:
    out = [g]
    for n in g.node:
        for a in n.attribute:
            if a.HasField("g"):
                out.extend(_graphs(a.g))
            for sub in a.graphs:
                out.extend(_graphs(sub))
    return out


def _all_graphs(m: Any) -> list[Any]:
    return _graphs(m.graph) if m.HasField("graph") else []


def _all_nodes(m: Any) -> list[Any]:
    nodes = [n for g in _all_graphs(m) for n in g.node]
    nodes += [n for f in m.functions for n in f.node]
    return nodes


def _all_tensors(m: Any) -> list[Any]:
    tensors = [t for g in _all_graphs(m) for t in g.initializer]
    for n in _all_nodes(m):
        for a in n.attribute:
            if a.HasField("t"):
                tensors.append(a.t)
            tensors.extend(a.tensors)
    return tensors


def _store(case: Case, m: Any) -> None:
    case.files[case.main] = m.SerializeToString()


_HUGE = (2**40, 2**62, 2**63 - 1, 2**31, 2**32 + 3, 2**24 + 1, 10**12, -1, -(2**63), 0)


def _expected_nbytes(t: Any) -> int:
    sizes = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
    return math.prod(t.dims) * sizes.get(t.data_type, 4)


def m_onnx_dims(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    m = _proto(seed)
    t = _pick(rng, _all_tensors(m))
    op = _pick(rng, ("set", "set", "append", "clear", "zero_huge", "many", "consistent"))
    if op == "set" and t.dims:
        t.dims[rng.randrange(len(t.dims))] = _pick(rng, _HUGE)
    elif op == "append":
        t.dims.append(_pick(rng, _HUGE))
    elif op == "clear":
        del t.dims[:]
    elif op == "zero_huge":  # no elements at all, whatever the other dims say
        t.dims[:] = [0, _pick(rng, (2**40, 2**62, 2**63 - 1))]
        t.raw_data = b""
    elif op == "many":
        t.dims[:] = [1] * _pick(rng, (9, 64, 1000, 100_000))
    else:  # dims matching the data, in an absurd arrangement (2**k ones)
        n = math.prod(t.dims)
        t.dims[:] = [n] + [1] * rng.randint(0, 40)
    case.detail = f"{t.name or 'attribute tensor'}: {op} -> dims {list(t.dims)[:6]}"
    _store(case, m)


_DTYPES = (
    0,
    17,
    18,
    21,
    22,
    23,
    24,
    25,
    26,
    27,
    30,
    40,
    999,
    -1,
    2**31 - 1,
    8,
    9,
    2,
    3,
    6,
    7,
    10,
    11,
    14,
    15,
    16,
)


def m_onnx_dtype(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    m = _proto(seed)
    if rng.random() < 0.75:
        t = _pick(rng, _all_tensors(m))
        t.data_type = _pick(rng, _DTYPES)
        case.detail = f"{t.name or 'attribute tensor'}: data_type {t.data_type}"
    else:
        vs = [*m.graph.input, *m.graph.output, *m.graph.value_info]
        v = _pick(rng, vs)
        v.type.tensor_type.elem_type = _pick(rng, _DTYPES)
        case.detail = f"value {v.name}: elem_type {v.type.tensor_type.elem_type}"
    _store(case, m)


def m_onnx_raw_data(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    import numpy as np

    m = _proto(seed)
    tensors = [t for t in _all_tensors(m) if t.HasField("raw_data")]
    t = _pick(rng, tensors)
    raw = t.raw_data
    op = _pick(
        rng, "shorter longer clear empty float_data both nan inf zero huge tiny negative".split()
    )
    item = max(len(raw) // max(math.prod(t.dims), 1), 1)
    fill = {
        "nan": np.float32(np.nan),
        "inf": np.float32(np.inf),
        "zero": np.float32(0),
        "huge": np.float32(3e38),
        "tiny": np.float32(1e-44),
        "negative": np.float32(-1.0),
    }
    if op == "shorter":
        t.raw_data = raw[: rng.randrange(max(len(raw), 1))]
    elif op == "longer":
        t.raw_data = raw + rng.randbytes(rng.randint(1, 64))
    elif op == "clear":
        t.ClearField("raw_data")
    elif op == "empty":
        t.raw_data = b""
    elif op == "float_data":
        t.ClearField("raw_data")
        t.float_data.extend([1.0] * (math.prod(t.dims) + rng.randint(-2, 2)))
    elif op == "both":
        t.float_data.extend([1.0] * math.prod(t.dims))
    else:
        value = fill[op]
        if item == 2:
            value = np.float16(value)
        elif item == 8:
            value = np.float64(value)
        t.raw_data = np.full(math.prod(t.dims), value).tobytes()[: len(raw)]
    case.detail = f"{t.name or 'attribute tensor'} raw_data {op} ({len(raw)} -> {len(t.raw_data)})"
    _store(case, m)


_LOCATIONS = (
    "../outside.bin",
    "../../etc/passwd",
    "/etc/passwd",
    "model.onnx.data",
    "model.onnx",
    "",
    "missing.bin",
    "sub/../data.bin",
    ".",
    "..",
    "./",
    "sub",
    "link.bin",
    "a" * 300,
    "C:\\evil.bin",
    "\\\\host\\share\\x",
    "data.bin/..",
    "~/x",
    "%2e%2e/x",
    "data.bin",
    "fifo.bin",
    "dirlink",
)
_NUMBERS = (
    "0",
    "-1",
    "1",
    "4",
    str(2**50),
    str(2**60),
    str(2**63),
    str(2**64),
    "abc",
    "",
    "0x10",
    " 4",
    "1e3",
    str(10**30),
    "-0",
)


def _helper_files(rng: random.Random, case: Case) -> None:
    """Files and links external data might point at (beside and outside the model)."""
    if rng.random() < 0.5:
        case.files["data.bin"] = rng.randbytes(rng.choice((0, 4, 64, 4096)))
    if rng.random() < 0.3:
        case.files["../outside.bin"] = rng.randbytes(4096)
    if rng.random() < 0.2:
        case.links.append(("symlink", "link.bin", "/etc/passwd"))
    if rng.random() < 0.2:
        case.links.append(("mkdir", "sub", ""))
    if rng.random() < 0.1:
        case.links.append(("fifo", "fifo.bin", ""))
    if rng.random() < 0.1:
        case.links.append(("symlink", "dirlink", "/"))


def m_onnx_external(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    from onnx import TensorProto

    m = _proto(seed)
    t = _pick(rng, _all_tensors(m))
    existing = {e.key: e.value for e in t.external_data}
    t.data_location = TensorProto.EXTERNAL
    if rng.random() < 0.7:
        t.ClearField("raw_data")
    entries: list[tuple[str, str]] = []
    if existing and rng.random() < 0.5:  # keep the file, change offset or length
        entries = list(existing.items())
        key = _pick(rng, ("offset", "length"))
        entries = [(k, v) for k, v in entries if k != key] + [(key, _pick(rng, _NUMBERS))]
    else:
        entries.append(("location", _pick(rng, _LOCATIONS)))
        if rng.random() < 0.6:
            entries.append(("offset", _pick(rng, _NUMBERS)))
        if rng.random() < 0.6:
            entries.append(("length", _pick(rng, (*_NUMBERS, str(_expected_nbytes(t))))))
        if rng.random() < 0.1:
            entries.append(("location", _pick(rng, _LOCATIONS)))  # a second location
        if rng.random() < 0.1:
            entries.append((_pick(rng, ("checksum", "basepath", "", "LOCATION")), "x"))
        if rng.random() < 0.1:
            entries = entries[1:]  # no location at all
    del t.external_data[:]
    for k, v in entries:
        e = t.external_data.add()
        e.key, e.value = k, v
    _helper_files(rng, case)
    case.detail = f"{t.name or 'attribute tensor'} external {entries}"[:300]
    _store(case, m)


def m_onnx_data_file(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """Damage the external data file of a model that has one."""
    names = [n for n in case.files if n != case.main]
    if not names:
        raise Skip("no data file")
    name = names[0]
    data = case.files[name]
    op = _pick(
        rng,
        (
            "truncate delete empty directory symlink_out symlink_in "
            "hardlink random append fifo symlink_loop nan"
        ).split(),
    )
    if op == "truncate":
        case.files[name] = data[: rng.randrange(max(len(data), 1))]
    elif op == "delete":
        del case.files[name]
    elif op == "empty":
        case.files[name] = b""
    elif op == "directory":
        del case.files[name]
        case.links.append(("mkdir", name, ""))
    elif op == "symlink_out":
        del case.files[name]
        case.files["../outside.data"] = data
        case.links.append(("symlink", name, "../outside.data"))
    elif op == "symlink_in":
        del case.files[name]
        case.files["real.data"] = data
        case.links.append(("symlink", name, "real.data"))
    elif op == "hardlink":
        case.links.append(("hardlink", "copy.data", name))
    elif op == "random":
        case.files[name] = rng.randbytes(len(data))
    elif op == "append":
        case.files[name] = data + rng.randbytes(rng.randint(1, 4096))
    elif op == "fifo":
        del case.files[name]
        case.links.append(("fifo", name, ""))
    elif op == "symlink_loop":
        del case.files[name]
        case.links.append(("symlink", name, name))
    else:
        case.files[name] = b"\x00\x00\xc0\x7f" * (len(data) // 4)
    case.detail = f"data file {name}: {op}"


def m_onnx_graph(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """Names: undefined inputs, duplicates, cycles, missing or renamed values."""
    m = _proto(seed)
    g = _pick(rng, _all_graphs(m))
    nodes = list(g.node)
    op = _pick(
        rng,
        (
            "undefined empty_input dup_inputs extra_inputs drop_inputs "
            "rename_output dup_output cycle self_loop graph_output "
            "graph_input init_rename init_dup reverse op_type domain "
            "empty_output input_is_init"
        ).split(),
    )
    n = _pick(rng, nodes) if nodes else None
    if n is None and op not in ("graph_output", "graph_input", "init_rename", "init_dup"):
        raise Skip("graph without nodes")
    if op == "undefined" and n.input:
        n.input[rng.randrange(len(n.input))] = f"undefined_{rng.randrange(100)}"
    elif op == "empty_input" and n.input:
        n.input[rng.randrange(len(n.input))] = ""
    elif op == "dup_inputs" and n.input:
        n.input[:] = [n.input[0]] * rng.randint(1, 8)
    elif op == "extra_inputs":
        n.input.extend([_pick(rng, list(n.input) or [""])] * rng.randint(1, 5))
    elif op == "drop_inputs":
        del n.input[rng.randrange(len(n.input) + 1) :]
    elif op == "rename_output" and n.output:
        n.output[0] = "renamed"
    elif op == "dup_output" and len(nodes) > 1:
        other = _pick(rng, nodes)
        if other.output and n.output:
            other.output[0] = n.output[0]
    elif op == "cycle" and len(nodes) > 1:
        i, j = sorted(rng.sample(range(len(nodes)), 2))
        if nodes[i].input and nodes[j].output:
            nodes[i].input[0] = nodes[j].output[0]
    elif op == "self_loop" and n.input and n.output:
        n.input[0] = n.output[0]
    elif op == "graph_output" and g.output:
        choice = rng.random()
        if choice < 0.4:
            g.output[0].name = "undefined_out"
        elif choice < 0.7:
            g.output.add().CopyFrom(g.output[0])
        else:
            del g.output[:]
    elif op == "graph_input" and g.input:
        if rng.random() < 0.5:
            del g.input[rng.randrange(len(g.input))]
        else:
            g.input.add().CopyFrom(g.input[0])
    elif op == "init_rename" and g.initializer:
        _pick(rng, g.initializer).name = _pick(rng, ("x", "y", "", "renamed", "c"))
    elif op == "init_dup" and g.initializer:
        t = g.initializer.add()
        t.CopyFrom(_pick(rng, g.initializer))
        if t.dims and rng.random() < 0.5:
            t.dims[0] += 1
            t.raw_data = t.raw_data + t.raw_data
    elif op == "reverse":
        g.node.reverse()
    elif op == "op_type":
        n.op_type = _pick(
            rng,
            (
                "",
                "FooBar",
                "BatchNormalization",
                "Conv",
                "If",
                "Loop",
                "Identity",
                "Transpose",
                "MatMul",
            ),
        )
    elif op == "domain":
        n.domain = _pick(rng, ("com.microsoft", "ai.onnx.ml", "custom", "ai.onnx", " "))
    elif op == "empty_output" and n.output:
        n.output[0] = ""
    elif op == "input_is_init" and g.initializer and g.input:
        vi = g.input.add()
        vi.CopyFrom(g.input[0])
        vi.name = _pick(rng, g.initializer).name
    else:
        raise Skip(op)
    case.detail = f"graph {g.name}: {op}" + (f" on {n.name}" if n is not None else "")
    _store(case, m)


def m_onnx_structure(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """Model-level damage: no graph, no opsets, absurd IR and opset versions, functions."""
    from onnx import helper

    m = _proto(seed)
    op = _pick(
        rng,
        (
            "no_graph no_opset ir ir opset opset_dup no_nodes no_inits "
            "no_inputs function function_bad training_info metadata "
            "empty_model"
        ).split(),
    )
    if op == "no_graph":
        m.ClearField("graph")
    elif op == "no_opset":
        del m.opset_import[:]
    elif op == "ir":
        m.ir_version = _pick(rng, (0, 1, 2, 3, 4, 7, 11, 13, 14, 99, 2**62, -1))
    elif op == "opset":
        m.opset_import[0].version = _pick(rng, (0, -1, 1, 6, 7, 9, 13, 14, 99, 2**62))
    elif op == "opset_dup":
        o = m.opset_import.add()
        o.domain = _pick(rng, ("", "ai.onnx"))
        o.version = _pick(rng, (1, 7, 21, 99))
    elif op == "no_nodes":
        del m.graph.node[:]
    elif op == "no_inits":
        del m.graph.initializer[:]
    elif op == "no_inputs":
        del m.graph.input[:]
    elif op in ("function", "function_bad"):
        nodes = list(m.graph.node)
        f = helper.make_function(
            "fuzz",
            "F",
            ["fx"],
            ["fy" if op == "function" else "nothing"],
            [helper.make_node("Identity", ["fx"], ["fy"])],
            [helper.make_opsetid("", 15)],
        )
        m.functions.append(f)
        if nodes and nodes[0].input and rng.random() < 0.5:
            call = m.graph.node.add()
            call.op_type, call.domain = "F", "fuzz"
            call.input.append(nodes[0].input[0])
            call.output.append("f_out")
            o = m.opset_import.add()
            o.domain, o.version = "fuzz", 1
    elif op == "training_info":
        ti = m.training_info.add()
        ti.algorithm.CopyFrom(m.graph)
    elif op == "metadata":
        p = m.metadata_props.add()
        p.key, p.value = "\n" * 3 + "k", "v" * 10000
    else:
        m.Clear()
    case.detail = f"{op}"
    _store(case, m)


def _set_attr(rng: random.Random, node: Any, name: str) -> str:
    """Give attribute ``name`` of ``node`` an odd value, or an odd type."""
    from onnx import AttributeProto as A

    attrs = {a.name: a for a in node.attribute}
    a = attrs.get(name)
    if a is None:
        a = node.attribute.add()
        a.name = name
        a.type = A.INT
    choice = rng.random()
    if choice < 0.3:
        a.ClearField("ints")
        a.type = A.INT
        a.i = _pick(rng, (0, -1, 1, 2, 3, 2**31, 2**62, -(2**63)))
    elif choice < 0.55:
        a.ClearField("i")
        a.type = A.INTS
        val = _pick(rng, (0, 1, -1, 2, 2**40, -(2**40)))
        a.ints[:] = [val] * _pick(rng, (0, 1, 2, 3, 4, 6, 100))
    elif choice < 0.7:
        a.type = A.FLOAT
        a.f = _pick(rng, (float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e30))
    elif choice < 0.8:
        a.type = A.STRING
        a.s = _pick(rng, (b"SAME_UPPER", b"SAME_LOWER", b"VALID", b"NOTSET", b"BOGUS", b"\xff\xfe"))
    elif choice < 0.9:  # the declared type does not match the field that is set
        a.type = _pick(rng, (A.UNDEFINED, A.TENSOR, A.GRAPH, A.GRAPHS, A.STRINGS, A.FLOATS, 99))
    else:
        node.attribute.add().CopyFrom(a)  # the same attribute twice
        node.attribute[-1].i = 7
    return f"{node.op_type} {node.name}.{name}: type {a.type}"


_PRODUCER_ATTRS = {
    "Conv": ("group", "pads", "strides", "dilations", "kernel_shape", "auto_pad"),
    "ConvTranspose": (
        "group",
        "pads",
        "strides",
        "dilations",
        "kernel_shape",
        "output_padding",
        "output_shape",
        "auto_pad",
    ),
    "Gemm": ("transA", "transB", "alpha", "beta"),
    "Transpose": ("perm",),
    "If": ("then_branch", "else_branch"),
    "Flatten": ("axis",),
    "Constant": ("value_int", "value_ints", "value_float"),
    "Expand": ("foo",),
    "MatMul": ("foo",),
}


def m_onnx_attr(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    m = _proto(seed)
    nodes = [n for n in _all_nodes(m) if n.op_type in _PRODUCER_ATTRS]
    n = _pick(rng, nodes)
    case.detail = _set_attr(rng, n, _pick(rng, _PRODUCER_ATTRS[n.op_type]))
    _store(case, m)


def m_onnx_bn(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """BatchNormalization's epsilon, momentum, training_mode, inputs and outputs."""
    from onnx import AttributeProto as A

    m = _proto(seed)
    n = _pick(rng, [n for n in _all_nodes(m) if n.op_type == "BatchNormalization"])
    op = _pick(
        rng, "eps eps eps_type momentum training spatial unknown outputs inputs dup_eps".split()
    )
    if op == "eps":
        value = _pick(
            rng, (float("nan"), float("inf"), -float("inf"), -1.0, 0.0, -0.0, 1e30, 1e-45, -1e-5)
        )
        attrs = [a for a in n.attribute if a.name == "epsilon"]
        a = attrs[0] if attrs else n.attribute.add()
        a.name, a.type, a.f = "epsilon", A.FLOAT, value
        case.detail = f"epsilon {value}"
    elif op in ("eps_type", "momentum", "training", "spatial", "unknown"):
        name = {
            "eps_type": "epsilon",
            "momentum": "momentum",
            "training": "training_mode",
            "spatial": "spatial",
            "unknown": "foo",
        }[op]
        case.detail = _set_attr(rng, n, name)
    elif op == "outputs":
        n.output.extend([f"{n.name}_extra{i}" for i in range(_pick(rng, (1, 2, 4)))])
        case.detail = f"{len(n.output)} outputs"
    elif op == "inputs":
        k = _pick(rng, (0, 1, 3, 4, 6, 7))
        n.input[:] = (list(n.input) * 2)[:k]
        case.detail = f"{k} inputs"
    else:
        a = n.attribute.add()
        a.name, a.type, a.f = "epsilon", A.FLOAT, _pick(rng, (0.5, float("nan")))
        case.detail = "epsilon twice"
    case.detail = f"{n.name}: {case.detail}"
    _store(case, m)


def _tensor_proto(name: str, array: Any) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(array, name)


def m_onnx_constant(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """An initializer replaced by a Constant node whose tensor promises too much, or odd."""
    import numpy as np
    from onnx import TensorProto, helper

    m = _proto(seed)
    g = _pick(rng, [g for g in _all_graphs(m) if g.initializer])
    t = _pick(rng, g.initializer)
    op = _pick(
        rng,
        (
            "huge_dims huge_no_data zero_huge floats two_values none sparse string external valid"
        ).split(),
    )
    value = TensorProto()
    value.CopyFrom(t)
    value.name = ""
    attrs: dict[str, Any] = {}
    if op == "huge_dims":
        value.dims[:] = [_pick(rng, (2**40, 2**31, 2**62))] + list(value.dims)[1:]
        attrs["value"] = value
    elif op == "huge_no_data":
        value.dims[:] = [_pick(rng, (2**24, 2**30, 2**40))]
        value.ClearField("raw_data")
        attrs["value"] = value
    elif op == "zero_huge":
        value.dims[:] = [0, 2**62]
        value.raw_data = b""
        attrs["value"] = value
    elif op == "floats":
        attrs["value_floats"] = [1.0] * _pick(rng, (0, 1, 7, 2**16))
    elif op == "two_values":
        attrs["value"] = value
        attrs["value_float"] = 1.0
    elif op == "sparse":
        sp = helper.make_sparse_tensor(
            _tensor_proto("v", np.ones(1, np.float32)),
            _tensor_proto("i", np.zeros(1, np.int64)),
            [2**40],
        )
        attrs["sparse_value"] = sp
    elif op == "string":
        attrs["value_string"] = "x"
    elif op == "external":
        value.data_location = TensorProto.EXTERNAL
        value.ClearField("raw_data")
        e = value.external_data.add()
        e.key, e.value = "location", _pick(rng, ("/etc/passwd", "../outside.bin", "model.onnx"))
        attrs["value"] = value
    elif op == "valid":
        attrs["value"] = value
    node = helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", **attrs)
    g.initializer.remove(t)
    g.node.insert(0, node)
    case.detail = f"{t.name} as Constant: {op}"
    _store(case, m)


def m_onnx_const_graph(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """A BatchNorm parameter or bias computed by a constant subgraph that promises huge
    intermediate values (Expand, ConstantOfShape, Concat of repeats, chains of Add)."""
    import numpy as np
    from onnx import TensorProto, helper

    m = _proto(seed)
    candidates = []
    for g in _all_graphs(m):
        names = {t.name for t in g.initializer}
        for n in g.node:
            if n.op_type in ("BatchNormalization", "Conv", "Gemm", "Add"):
                for i, name in enumerate(n.input):
                    if i > 0 and name in names:
                        candidates.append((g, name))
    g, target = _pick(rng, candidates)
    t = next(t for t in g.initializer if t.name == target)
    g.initializer.remove(t)
    nodes = []
    p = "cg_"
    elem = t.data_type
    np_dtype = np.float16 if elem == TensorProto.FLOAT16 else np.float32

    def const(name: str, array: Any) -> str:
        nodes.append(
            helper.make_node(
                "Constant",
                [],
                [p + name],
                name=p + name + "_k",
                value=_tensor_proto("", np.asarray(array)),
            )
        )
        return p + name

    op = _pick(
        rng,
        ("expand", "constant_of_shape", "concat", "chain", "reshape", "double", "mul_broadcast"),
    )
    n = _pick(rng, (math.prod(t.dims), 2**20, 2**22, 2**24, 2**24 + 1, 2**40, -1, 0))
    if op == "expand":
        fill = const("fill", np.array(1.0, np_dtype))
        shape = const("shape", np.array([n], np.int64))
        nodes.append(helper.make_node("Expand", [fill, shape], [target], name=p + "expand"))
    elif op == "constant_of_shape":
        shape = const("shape", np.array([n], np.int64))
        nodes.append(
            helper.make_node(
                "ConstantOfShape",
                [shape],
                [target],
                name=p + "cos",
                value=_tensor_proto("", np.ones(1, np_dtype)),
            )
        )
    elif op == "concat":
        fill = const("fill", np.array(1.0, np_dtype))
        big = _pick(rng, (2**10, 2**20, 2**22, 2**24))
        shape = const("shape", np.array([big], np.int64))
        nodes.append(helper.make_node("Expand", [fill, shape], [p + "big"], name=p + "expand"))
        k = _pick(rng, (2, 16, 64, 1000))
        nodes.append(
            helper.make_node("Concat", [p + "big"] * k, [target], name=p + "concat", axis=0)
        )
        n = f"{k} x {big}"
    elif op == "chain":
        fill = const("fill", np.array(1.0, np_dtype))
        big = _pick(rng, (2**20, 2**22, 2**24))
        shape = const("shape", np.array([big], np.int64))
        nodes.append(helper.make_node("Expand", [fill, shape], [p + "v0"], name=p + "expand"))
        k = _pick(rng, (4, 16, 30))
        for i in range(k):
            last = target if i == k - 1 else f"{p}v{i + 1}"
            nodes.append(
                helper.make_node("Add", [f"{p}v{i}", f"{p}v{i}"], [last], name=f"{p}add{i}")
            )
        n = f"{k} adds of {big}"
    elif op == "reshape":
        src = const("src", np.ones(math.prod(t.dims), np_dtype))
        shape = const(
            "shape",
            np.array(_pick(rng, ([-1], [2**40, 0], [0, -1], [-1, -1], [2**62, 2**62])), np.int64),
        )
        nodes.append(helper.make_node("Reshape", [src, shape], [target], name=p + "reshape"))
    elif op == "double":  # float64 arrays, cast at the end
        fill = const("fill", np.array(1.0, np.float64))
        big = _pick(rng, (2**22, 2**24))
        shape = const("shape", np.array([big], np.int64))
        nodes.append(helper.make_node("Expand", [fill, shape], [p + "d"], name=p + "expand"))
        nodes.append(helper.make_node("Mul", [p + "d", p + "d"], [p + "d2"], name=p + "mul"))
        nodes.append(helper.make_node("Cast", [p + "d2"], [target], name=p + "cast", to=elem))
        n = big
    else:
        a = const("a", np.ones((2**12, 1), np_dtype))
        b = const("b", np.ones((1, _pick(rng, (2**12, 2**13))), np_dtype))
        nodes.append(helper.make_node("Mul", [a, b], [target], name=p + "mul"))
    for node in reversed(nodes):
        g.node.insert(0, node)
    case.detail = f"{target} = {op} ({n})"
    _store(case, m)


_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _bn_after_producer(g: Any) -> tuple[Any, Any]:
    """The first BatchNorm of ``g`` fed straight by a producer, with that producer."""
    producers = {o: n for n in g.node if n.op_type in _PRODUCERS for o in n.output}
    for n in g.node:
        if n.op_type == "BatchNormalization" and len(n.input) == 5 and n.input[0] in producers:
            return producers[n.input[0]], n
    raise Skip("no BatchNorm right after a producer")


def m_onnx_shared_const(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """Many BatchNorms whose parameter reads one expensive constant subgraph they share:
    ``Div(n, n)`` with ``n = Cast(Shape(Expand(1, [big])))``. The seed's producer + BatchNorm
    pair is repeated ``k`` times (each copy with a scale of its own) and the copies summed into
    the BatchNorm's output; every BatchNorm's scale, bias, mean or var then reads the shared
    value. The subgraph must be evaluated once per fold, within one budget, not once per
    BatchNorm (1,000 pairs took 12 s)."""
    import numpy as np
    from onnx import helper

    m = _proto(seed)
    g = m.graph
    producer, bn = _bn_after_producer(g)
    scale = next((t for t in g.initializer if t.name == bn.input[1]), None)
    if scale is None or len(scale.dims) != 1:
        raise Skip("the BatchNorm's scale is not a stored vector")
    elem = scale.data_type
    np_dtype = helper.tensor_dtype_to_np_dtype(elem)
    k = _pick(rng, (2, 30, 100, 300))  # within SLOW_SECONDS on a busy machine
    big = _pick(rng, (2**10, 2**20, 2**22, 2**24, 2**24 + 1, 2**40))
    param = _pick(rng, (1, 2, 3, 4))  # which BatchNorm input reads the shared value
    p = "sc_"
    shared = [
        helper.make_node(
            "Constant",
            [],
            [p + "fill"],
            name=p + "fill",
            value=_tensor_proto("", np.array(1.0, np.float32)),
        ),
        helper.make_node(
            "Constant",
            [],
            [p + "size"],
            name=p + "size",
            value=_tensor_proto("", np.array([big], np.int64)),
        ),
        helper.make_node("Expand", [p + "fill", p + "size"], [p + "big"], name=p + "expand"),
        helper.make_node("Shape", [p + "big"], [p + "n"], name=p + "shape"),
        helper.make_node("Cast", [p + "n"], [p + "nf"], name=p + "cast", to=elem),
        helper.make_node("Div", [p + "nf", p + "nf"], [p + "one"], name=p + "one"),
        helper.make_node("Sub", [p + "one", p + "one"], [p + "zero"], name=p + "zero"),
    ]
    # scale and var times one, bias and mean plus zero: the same numbers, computed
    op, other = ("Mul", p + "one") if param in (1, 4) else ("Add", p + "zero")
    out = bn.output[0]
    bn.output[0] = p + "y0"
    first = helper.make_node(op, [bn.input[param], other], [p + "param0"], name=p + "param0")
    bn.input[param] = p + "param0"
    copies: list[Any] = []
    total = p + "y0"
    for i in range(1, k):
        values = np.full(scale.dims[0], rng.uniform(0.5, 1.5) * rng.choice((-1, 1)), np_dtype)
        g.initializer.append(_tensor_proto(f"{p}scale{i}", values))
        params = [f"{p}scale{i}", *bn.input[2:]]
        params[param - 1] = f"{p}param{i}"
        source = f"{p}scale{i}" if param == 1 else bn.input[param]
        copy = helper.make_node(producer.op_type, producer.input, [f"{p}c{i}"], name=f"{p}p{i}")
        copy.attribute.extend(producer.attribute)
        bn_i = helper.make_node(
            "BatchNormalization", [f"{p}c{i}", *params], [f"{p}y{i}"], name=f"{p}bn{i}"
        )
        bn_i.attribute.extend(bn.attribute)
        last = out if i == k - 1 else f"{p}s{i}"
        copies += [
            helper.make_node(op, [source, other], [f"{p}param{i}"], name=f"{p}param{i}"),
            copy,
            bn_i,
            helper.make_node("Add", [total, f"{p}y{i}"], [last], name=f"{p}sum{i}"),
        ]
        total = last
    nodes = list(g.node)
    at = nodes.index(bn)
    del g.node[:]
    g.node.extend([*shared, *nodes[:at], first, bn, *copies, *nodes[at + 1 :]])
    case.detail = f"{k} BatchNorms' input {param} read Expand(1, [{big}]), shared"
    _store(case, m)


def m_onnx_value_info(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """Declared types and shapes: absurd input dims (which --verify would allocate), value_info
    that contradicts the graph, non-tensor types."""
    m = _proto(seed)
    g = m.graph
    op = _pick(
        rng,
        (
            "input_dims input_dims verify_dims rank no_type sequence "
            "value_info output_dims dim_param"
        ).split(),
    )
    inputs = [v for v in g.input if v.type.HasField("tensor_type")]
    v = _pick(rng, inputs) if inputs else None
    if v is None and op not in ("value_info", "output_dims"):
        raise Skip("no tensor input")
    if op == "input_dims":
        shape = v.type.tensor_type.shape
        if not shape.dim:
            shape.dim.add().dim_value = 1
        d = _pick(rng, shape.dim)
        d.dim_value = _pick(rng, (2**40, 2**31, 2**62, -1, -5, 0))
    elif op == "verify_dims":  # big but under --verify's 4 GiB limit of random inputs
        for d in v.type.tensor_type.shape.dim[1:]:
            d.dim_value = _pick(rng, (256, 1024, 4096))
        if "--verify" not in case.args:
            case.args.append("--verify")
    elif op == "rank":
        v.type.tensor_type.shape.dim.add().dim_value = 1
    elif op == "no_type":
        v.ClearField("type")
    elif op == "sequence":
        v.type.sequence_type.elem_type.tensor_type.elem_type = 1
    elif op == "dim_param":
        for d in v.type.tensor_type.shape.dim:
            d.dim_param = _pick(rng, ("N", "", "a b", "\n", "N" * 1000))
    elif op == "value_info":
        names = [o for n in g.node for o in n.output]
        vi = g.value_info.add()
        vi.name = _pick(rng, names) if names else "x"
        tt = vi.type.tensor_type
        tt.elem_type = _pick(rng, (1, 10, 11, 7, 9))
        for _ in range(_pick(rng, (0, 1, 2, 3, 4, 5))):
            tt.shape.dim.add().dim_value = _pick(rng, (1, 2, 3, 999, 2**40))
    else:
        o = _pick(rng, list(g.output))
        o.type.tensor_type.shape.Clear()
        for _ in range(_pick(rng, (1, 2, 4, 7))):
            o.type.tensor_type.shape.dim.add().dim_value = _pick(rng, (1, 5, 2**40))
    case.detail = f"{op}" + (f" on {v.name}" if v is not None else "")
    _store(case, m)


def _ld(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _nested_ifs(m: Any, depth: int) -> bytes:
    """The model with its graph wrapped in ``depth`` If nodes, written byte by byte (protobuf
    refuses to build messages deeper than it parses, and that limit is the point)."""
    from onnx import TensorProto

    g = type(m.graph)()
    g.CopyFrom(m.graph)
    del g.input[:]
    body = g.SerializeToString()
    outputs = b"".join(_ld(12, o.SerializeToString()) for o in g.output)
    out_names = b"".join(_ld(2, o.name.encode()) for o in g.output)

    def attr(name: bytes, graph: bytes) -> bytes:
        return _ld(1, name) + _ld(6, graph) + _varint(20 << 3) + _varint(5)

    inner = body
    for i in range(depth):
        node = (
            _ld(1, b"fz_cond")
            + out_names
            + _ld(3, f"if{i}".encode())
            + _ld(4, b"If")
            + _ld(5, attr(b"then_branch", inner))
            + _ld(5, attr(b"else_branch", body))
        )
        inner = _ld(1, node) + _ld(2, f"l{i}".encode()) + outputs
    inputs = b"".join(_ld(11, v.SerializeToString()) for v in m.graph.input)
    inputs += _ld(11, _vi("fz_cond", TensorProto.BOOL, []).SerializeToString())
    shell = type(m)()
    shell.CopyFrom(m)
    shell.ClearField("graph")
    return shell.SerializeToString() + _ld(7, inner + inputs)


def m_onnx_subgraph(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """If nodes: branches missing, empty, of the wrong kind, deeply nested; outer names."""
    from onnx import AttributeProto as A
    from onnx import TensorProto

    m = _proto(seed)
    ifs = [n for n in _all_nodes(m) if n.op_type == "If"]
    op = _pick(
        rng,
        (
            "nest nest clear_branch drop_branch swap graphs outer_name "
            "sub_inputs sub_outputs shadow"
        ).split(),
    )
    if op == "nest" or not ifs:
        depth = _pick(rng, (2, 10, 25, 31, 33, 40, 120, 400))
        case.files[case.main] = _nested_ifs(m, depth)
        case.detail = f"main graph nested in {depth} Ifs"
        return
    n = _pick(rng, ifs)
    attrs = {a.name: a for a in n.attribute}
    branch = attrs[_pick(rng, ("then_branch", "else_branch"))]
    if op == "clear_branch":
        branch.g.Clear()
    elif op == "drop_branch":
        n.attribute.remove(branch)
    elif op == "swap":
        branch.type = A.GRAPHS
        branch.graphs.add().CopyFrom(branch.g)
        branch.ClearField("g")
    elif op == "graphs":
        branch.type = A.INT
    elif op == "outer_name" and branch.g.node:
        branch.g.node[0].input[0] = _pick(rng, ("cond", "y", "undefined"))
    elif op == "sub_inputs":
        branch.g.input.append(_vi("x", TensorProto.FLOAT, [1]))
    elif op == "sub_outputs":
        if branch.g.output and rng.random() < 0.5:
            del branch.g.output[:]
        else:
            branch.g.output.add().CopyFrom(branch.g.output[0])
    elif op == "shadow" and branch.g.initializer:
        branch.g.initializer[0].name = "x"
    case.detail = f"{n.name}.{branch.name}: {op}"
    _store(case, m)


def _repeated(fd: Any) -> bool:
    if hasattr(fd, "is_repeated"):
        return bool(fd.is_repeated)
    return fd.label == fd.LABEL_REPEATED


def _proto_fields(msg: Any, out: list[tuple[Any, Any]], depth: int = 0) -> None:
    """Every (message, field) that is set, recursively, and some unset scalar fields."""
    for fd in msg.DESCRIPTOR.fields:
        if _repeated(fd):
            values = getattr(msg, fd.name)
            if len(values):
                out.append((msg, fd))
                if fd.type == fd.TYPE_MESSAGE and depth < 12:
                    for v in values:
                        _proto_fields(v, out, depth + 1)
        elif fd.type == fd.TYPE_MESSAGE:
            if msg.HasField(fd.name):
                out.append((msg, fd))
                if depth < 12:
                    _proto_fields(getattr(msg, fd.name), out, depth + 1)
        else:
            out.append((msg, fd))


_INTS = (0, 1, -1, 2, 3, 7, 8, 2**31 - 1, -(2**31), 2**40, 2**62, 2**63 - 1, -(2**63))
_FLOATS = (float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e38, 1e-45, -1.0)
_STRINGS = (
    "",
    "x",
    "../../etc/passwd",
    "/etc/passwd",
    "a" * 5000,
    "\x00",
    "\n\n",
    "y",
    "c",
    "BatchNormalization",
    "Conv",
    "ai.onnx",
    "com.microsoft",
    "model.onnx.data",
)


def _mutate_field(rng: random.Random, msg: Any, fd: Any) -> str:
    name = fd.name
    if _repeated(fd):
        values = getattr(msg, name)
        op = _pick(rng, ("delete", "duplicate", "clear", "swap"))
        if op == "delete":
            del values[rng.randrange(len(values))]
        elif op == "duplicate":
            i = rng.randrange(len(values))
            if fd.type == fd.TYPE_MESSAGE:
                values.add().CopyFrom(values[i])
            else:
                values.append(values[i])
        elif op == "clear":
            del values[:]
        elif len(values) > 1:
            i, j = rng.sample(range(len(values)), 2)
            if fd.type == fd.TYPE_MESSAGE:
                a, b = type(values[i])(), type(values[j])()
                a.CopyFrom(values[i])
                b.CopyFrom(values[j])
                values[i].CopyFrom(b)
                values[j].CopyFrom(a)
            else:
                values[i], values[j] = values[j], values[i]
        return f"{msg.DESCRIPTOR.name}.{name}[] {op}"
    if fd.type == fd.TYPE_MESSAGE:
        getattr(msg, name).Clear()
        return f"{msg.DESCRIPTOR.name}.{name} cleared"
    if fd.type in (fd.TYPE_INT32, fd.TYPE_SINT32, fd.TYPE_SFIXED32, fd.TYPE_ENUM):
        value: Any = _pick(rng, [v for v in _INTS if -(2**31) <= v < 2**31])
        if fd.type == fd.TYPE_ENUM:
            value = _pick(rng, [v.number for v in fd.enum_type.values])
    elif fd.type in (fd.TYPE_INT64, fd.TYPE_SINT64, fd.TYPE_SFIXED64):
        value = _pick(rng, _INTS)
    elif fd.type in (fd.TYPE_UINT64, fd.TYPE_FIXED64):
        value = _pick(rng, (0, 1, 2**63, 2**64 - 1))
    elif fd.type in (fd.TYPE_UINT32, fd.TYPE_FIXED32):
        value = _pick(rng, (0, 1, 2**32 - 1))
    elif fd.type in (fd.TYPE_FLOAT, fd.TYPE_DOUBLE):
        value = _pick(rng, _FLOATS)
    elif fd.type == fd.TYPE_BOOL:
        value = rng.random() < 0.5
    elif fd.type == fd.TYPE_STRING:
        value = _pick(rng, _STRINGS)
    elif fd.type == fd.TYPE_BYTES:
        old = getattr(msg, name)
        value = _pick(rng, (b"", old[: len(old) // 2], old + old, rng.randbytes(len(old) + 4)))
    else:
        return "unsupported field"
    try:
        setattr(msg, name, value)
    except (ValueError, TypeError) as e:  # closed enums, strings protobuf refuses
        raise Skip(str(e)) from e
    shown = repr(value)[:40]
    return f"{msg.DESCRIPTOR.name}.{name} = {shown}"


def m_onnx_generic(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """Random fields anywhere in the ModelProto, set to extreme values, cleared, duplicated."""
    m = _proto(seed)
    done = []
    for _ in range(rng.randint(1, 3)):
        fields: list[tuple[Any, Any]] = []
        _proto_fields(m, fields)
        msg, fd = _pick(rng, fields)
        done.append(_mutate_field(rng, msg, fd))
    case.detail = "; ".join(done)
    _store(case, m)


# ---------------------------------------------------------------------------------------------
# .pt2 (zip) mutations


def _members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def _pack(members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are the point
        with zipfile.ZipFile(buf, "w", compression=compression) as z:
            for name, content in members:
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = compression
                z.writestr(info, content)
    return buf.getvalue()


def _member_index(members: list[tuple[str, bytes]], pattern: str) -> list[int]:
    return [i for i, (n, _) in enumerate(members) if re.search(pattern, n)]


def m_pt2_member(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """One member's bytes mutated; the archive rebuilt with valid CRCs."""
    members = _members(seed.data)
    i = rng.randrange(len(members))
    name, content = members[i]
    new, what = _pick(rng, _BYTE_MUTATORS)(rng, content)
    members[i] = (name, new)
    compression = zipfile.ZIP_DEFLATED if rng.random() < 0.2 else zipfile.ZIP_STORED
    case.files[case.main] = _pack(members, compression)
    case.detail = f"{name}: {what}" + (" (deflated)" if compression else "")


def m_pt2_members(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """Members deleted, duplicated, renamed, added or reordered; the prefix changed."""
    members = _members(seed.data)
    prefix = members[0][0].split("/")[0]
    op = _pick(
        rng,
        (
            "delete delete duplicate rename add_program add_extra add_odd "
            "reorder prefix mixed_prefix dir_entry empty"
        ).split(),
    )
    i = rng.randrange(len(members))
    name = members[i][0]
    if op == "delete":
        del members[i]
    elif op == "duplicate":
        dup = members[i][1] if rng.random() < 0.5 else members[i][1][: len(members[i][1]) // 2]
        members.append((name, dup))
    elif op == "rename":
        members[i] = (name + _pick(rng, ("x", ".bak", "/")), members[i][1])
    elif op == "add_program":
        model = next(c for n, c in members if n.endswith("models/model.json"))
        members.append((f"{prefix}/models/{_pick(rng, ('other', 'model2', ''))}.json", model))
    elif op == "add_extra":
        members.append(
            (
                f"{prefix}/extra/{_pick(rng, ('a', '../x', '', 'd/', 'b' * 200))}",
                _pick(rng, (b"x", b"\xff\xfe\xfd", b"")),
            )
        )
    elif op == "add_odd":
        members.append(
            (_pick(rng, ("../../evil", "/abs/evil", "", f"{prefix}/../x", "x\x00y")), b"evil")
        )
    elif op == "reorder":
        rng.shuffle(members)
    elif op == "prefix":
        new = _pick(rng, ("other", "", "a/b", ".."))
        members = [(new + n[len(prefix) :], c) for n, c in members]
    elif op == "mixed_prefix":
        members[i] = ("other" + name[len(prefix) :], members[i][1])
    elif op == "dir_entry":
        members.append((f"{prefix}/models/", b""))
        members.append((f"{prefix}/extra/dir/", b""))
    else:
        members = []
    case.files[case.main] = _pack(members)
    case.detail = f"{op} {name}"


def _json_nodes(obj: Any, out: list[tuple[Any, Any]]) -> None:
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    )
    for k, v in items:
        out.append((obj, k))
        _json_nodes(v, out)


_JSON_STRINGS = (
    "",
    "x",
    "../../etc/passwd",
    "torch.ops.aten.empty.memory_format",
    "torch.ops.aten.randn.default",
    "builtins.eval",
    "os.system",
    "\u0000",
    "weight_0",
    "torch.ops.aten.batch_norm.default",
    "cuda",
    "meta",
)
_JSON_NUMBERS = (0, -1, 1, 2, 7, 2**31, 2**40, 2**63, -(2**63), 10**30, 1.5, float("nan"))


def _json_mutate(rng: random.Random, obj: Any) -> str:
    nodes: list[tuple[Any, Any]] = []
    _json_nodes(obj, nodes)
    parent, key = _pick(rng, nodes)
    v = parent[key]
    op = _pick(rng, ("delete", "null", "value", "value", "container", "type"))
    if op == "delete":
        del parent[key]
    elif op == "null":
        parent[key] = None
    elif op == "value" or not isinstance(v, (dict, list)):
        if isinstance(v, bool) or v is None:
            parent[key] = _pick(rng, (True, False, 0, "true"))
        elif isinstance(v, (int, float)):
            parent[key] = _pick(rng, _JSON_NUMBERS)
        elif isinstance(v, str):
            parent[key] = _pick(rng, (*_JSON_STRINGS, v + v))
        else:
            parent[key] = _pick(rng, ({}, []))
    elif op == "container":
        if isinstance(v, list):
            parent[key] = _pick(rng, ([], v * 2, v[::-1], v[:1]))
        else:
            parent[key] = _pick(rng, ({}, list(v.values())))
    else:
        parent[key] = _pick(rng, (str(v)[:50], [v], {"x": v}, 1))
    return f"{op} at {str(key)[:30]}"


def _json_targeted(rng: random.Random, obj: Any) -> str:
    """Fields that set sizes and types: sizes, strides, storage offsets, dtypes, paths."""
    nodes: list[tuple[Any, Any]] = []
    _json_nodes(obj, nodes)
    keys = (
        "sizes",
        "strides",
        "storage_offset",
        "dtype",
        "path_name",
        "use_pickle",
        "target",
        "layout",
        "device",
        "requires_grad",
        "as_int",
        "min_val",
        "max_val",
    )
    hits = [(p, k) for p, k in nodes if isinstance(p, dict) and k in keys]
    parent, key = _pick(rng, hits)
    v = parent[key]
    if key in ("sizes", "strides") and isinstance(v, list):
        if v and rng.random() < 0.7:
            v[rng.randrange(len(v))] = {"as_int": _pick(rng, (2**40, 2**62, -1, 0, 2**20, 2**31))}
        else:
            v.append({"as_int": _pick(rng, (1, 2**40, 2**28))})
        new: Any = v
    elif key in ("storage_offset", "as_int", "min_val", "max_val"):
        new = (
            _pick(rng, (2**40, -1, 2**63, 0, 10**30))
            if key != "storage_offset"
            else {"as_int": _pick(rng, (2**40, -1, 7))}
        )
        parent[key] = new
    elif key in ("dtype", "layout"):
        new = parent[key] = _pick(rng, (0, 99, -1, 1, 2, 5, 11, 12, 17, 44, "x"))
    elif key == "path_name":
        new = parent[key] = _pick(
            rng,
            (
                "../../etc/passwd",
                "weight_0",
                "missing",
                "",
                "/etc/passwd",
                "custom_obj_0",
                "opaque_obj_0",
                "tensor_constant_0",
            ),
        )
    elif key == "use_pickle":
        new = parent[key] = True
    elif key == "target":
        new = parent[key] = _pick(rng, _JSON_STRINGS)
    elif key == "device":
        new = parent[key] = {"type": _pick(rng, ("cuda", "meta", "xyz", "mps")), "index": 0}
    else:
        new = parent[key] = not v
    return f"{key} -> {str(new)[:60]}"


def m_pt2_json(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """The archive's JSON (program, weights and constants configs) or small text members."""
    members = _members(seed.data)
    candidates = _member_index(members, r"\.json$|archive_format|archive_version|byteorder|version")
    i = _pick(rng, candidates)
    name, content = members[i]
    if name.endswith(".json"):
        obj = json.loads(content)
        what = []
        for _ in range(rng.randint(1, 2)):
            if rng.random() < 0.5:
                what.append(_json_targeted(rng, obj))
            else:
                what.append(_json_mutate(rng, obj))
        new = json.dumps(obj).encode()
        detail = "; ".join(what)
    else:
        new = _pick(rng, (b"", b"big", b"99", b"-1", b"pt2" * 1000, b"\xff", b"0\n"))
        detail = f"= {new[:20]!r}"
    members[i] = (name, new)
    case.files[case.main] = _pack(members)
    case.detail = f"{name.split('/', 1)[-1]}: {detail}"


def m_pt2_weights(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """Weight records: wrong sizes, NaN, empty (torch then allocates what the config says),
    expanded (stride 0: one element stored for a huge tensor)."""
    import numpy as np

    members = _members(seed.data)
    weights = _member_index(members, r"data/weights/weight_\d+$")
    i = _pick(rng, weights)
    name, content = members[i]
    op = _pick(
        rng,
        (
            "truncate extend flip nan inf zero_length odd_length empty_huge_config "
            "expanded_config other_weight"
        ).split(),
    )
    if op == "truncate":
        new = content[: rng.randrange(max(len(content), 1))]
    elif op == "extend":
        new = content + rng.randbytes(_pick(rng, (4, 12, 4096, 2**20)))
    elif op == "flip":
        new = flip_bits(rng, content)[0]
    elif op in ("nan", "inf"):
        new = np.full(len(content) // 4, np.nan if op == "nan" else np.inf, np.float32).tobytes()
    elif op == "zero_length":
        new = b""
    elif op == "odd_length":
        new = content + b"\x00"
    elif op == "empty_huge_config":
        # An empty record makes torch allocate torch.zeros(sizes) from the config's sizes.
        new = b""
        k = next(j for j, (n, _) in enumerate(members) if n.endswith("model_weights_config.json"))
        config = json.loads(members[k][1])
        base = name.rsplit("/", 1)[-1]
        for meta in config["config"].values():
            if meta.get("path_name") == base:
                n = _pick(rng, (2**20, 2**26, 2**28, 2**30, 2**40))
                meta["tensor_meta"]["sizes"] = [{"as_int": n}]
                meta["tensor_meta"]["strides"] = [{"as_int": 1}]
                op = f"empty record, config sizes [{n}]"
        members[k] = (members[k][0], json.dumps(config).encode())
    elif op == "expanded_config":
        # What torch.export.save stores for an expanded parameter: one element on disk, every
        # stride 0, and sizes whose product is huge (the fold must not make it dense).
        new = np.ones(1, np.float32).tobytes()
        k = next(j for j, (n, _) in enumerate(members) if n.endswith("model_weights_config.json"))
        config = json.loads(members[k][1])
        base = name.rsplit("/", 1)[-1]
        for meta in config["config"].values():
            if meta.get("path_name") == base:
                rank = len(meta["tensor_meta"]["sizes"])
                n = _pick(rng, (2**7, 2**10, 2**14))
                meta["tensor_meta"]["sizes"] = [{"as_int": n}] * rank
                meta["tensor_meta"]["strides"] = [{"as_int": 0}] * rank
                meta["tensor_meta"]["storage_offset"] = {"as_int": 0}
                op = f"expanded: one stored element, sizes [{n}] * {rank}, strides 0"
        members[k] = (members[k][0], json.dumps(config).encode())
    else:
        new = members[_pick(rng, weights)][1]
    members[i] = (name, new)
    case.files[case.main] = _pack(members)
    case.detail = f"{name.rsplit('/', 1)[-1]}: {op}"


class _Zip:
    """The central directory of a zip file, editable field by field."""

    CD = {
        "flags": (8, "H"),
        "method": (10, "H"),
        "crc": (16, "I"),
        "csize": (20, "I"),
        "usize": (24, "I"),
        "fnlen": (28, "H"),
        "extralen": (30, "H"),
        "offset": (42, "I"),
    }
    LOCAL = {
        "flags": (6, "H"),
        "method": (8, "H"),
        "crc": (14, "I"),
        "csize": (18, "I"),
        "usize": (22, "I"),
        "fnlen": (26, "H"),
        "extralen": (28, "H"),
    }
    EOCD = {
        "disk_entries": (8, "H"),
        "entries": (10, "H"),
        "cd_size": (12, "I"),
        "cd_offset": (16, "I"),
        "comment_len": (20, "H"),
    }

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.eocd = data.rfind(b"PK\x05\x06")
        if self.eocd < 0:
            raise Skip("no end of central directory")
        entries, _, cd_offset = struct.unpack_from("<HII", data, self.eocd + 10)
        self.cd_offset = cd_offset
        self.entries: list[tuple[int, int, str]] = []  # (cd position, local position, name)
        pos = cd_offset
        for _ in range(entries):
            if data[pos : pos + 4] != b"PK\x01\x02":
                raise Skip("unexpected central directory")
            fnlen, extralen, commentlen = struct.unpack_from("<HHH", data, pos + 28)
            (local,) = struct.unpack_from("<I", data, pos + 42)
            name = data[pos + 46 : pos + 46 + fnlen].decode("utf-8", "replace")
            self.entries.append((pos, local, name))
            pos += 46 + fnlen + extralen + commentlen

    def set(self, base: int, table: dict[str, tuple[int, str]], key: str, value: int) -> None:
        offset, fmt = table[key]
        value &= (1 << (8 * struct.calcsize(fmt))) - 1
        struct.pack_into("<" + fmt, self.data, base + offset, value)


def zip64_size(data: bytes, member: str, size: int) -> bytes:
    """``data`` with the central directory entry of ``member`` declaring ``size`` bytes through
    a zip64 extra field (usize 0xFFFFFFFF); the directory sizes and the zip64 end records
    are kept consistent, so that only the declared size lies."""
    z = _Zip(data)
    cd = next(cd for cd, _, name in z.entries if name == member)
    extra = b"\x01\x00\x08\x00" + struct.pack("<Q", size)
    fnlen, extralen, commentlen = struct.unpack_from("<HHH", data, cd + 28)
    head = bytearray(data[cd : cd + 46 + fnlen + extralen])
    struct.pack_into("<I", head, 24, 0xFFFFFFFF)
    struct.pack_into("<H", head, 30, extralen + len(extra))
    end = cd + 46 + fnlen + extralen + commentlen
    out = bytearray(data[:cd] + bytes(head) + extra + data[cd + 46 + fnlen + extralen :])
    grow = len(extra)
    eocd = out.rfind(b"PK\x05\x06")
    (cd_size,) = struct.unpack_from("<I", out, eocd + 12)
    struct.pack_into("<I", out, eocd + 12, cd_size + grow)
    rec = out.rfind(b"PK\x06\x06", end)
    locator = out.rfind(b"PK\x06\x07", end)
    if rec >= 0 and locator >= 0:
        (size64,) = struct.unpack_from("<Q", out, rec + 40)
        struct.pack_into("<Q", out, rec + 40, size64 + grow)
        (where,) = struct.unpack_from("<Q", out, locator + 8)
        struct.pack_into("<Q", out, locator + 8, where + grow)
    return bytes(out)


def m_pt2_zip_header(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """Zip structures that lie: declared sizes (zip bombs), methods, CRCs, offsets, counts."""
    op = _pick(
        rng,
        (
            "cd_usize cd_usize cd_usize_all local_usize cd_csize method "
            "crc flags offset fnlen eocd zip64_bomb honest_bomb comment"
        ).split(),
    )
    if op == "honest_bomb":
        _honest_bomb(rng, seed, case)
        return
    z = _Zip(seed.data)
    cd, local, name = _pick(rng, z.entries)
    huge = (2**32 - 1, 2**31, 2**30, 2**28, 0, 1)
    if op == "cd_usize":
        value = _pick(rng, huge)
        z.set(cd, z.CD, "usize", value)
        detail = f"{name}: central usize {value}"
    elif op == "cd_usize_all":
        value = _pick(rng, huge[:4])
        for cd_i, _, _ in z.entries:
            z.set(cd_i, z.CD, "usize", value)
        detail = f"every central usize {value}"
    elif op == "local_usize":
        value = _pick(rng, huge)
        z.set(local, z.LOCAL, "usize", value)
        detail = f"{name}: local usize {value}"
    elif op == "cd_csize":
        value = _pick(rng, huge)
        z.set(cd, z.CD, "csize", value)
        z.set(local, z.LOCAL, "csize", value)
        detail = f"{name}: csize {value}"
    elif op == "method":
        value = _pick(rng, (8, 12, 14, 99, 6, 1))
        z.set(cd, z.CD, "method", value)
        if rng.random() < 0.5:
            z.set(local, z.LOCAL, "method", value)
        detail = f"{name}: method {value}"
    elif op == "crc":
        z.set(cd, z.CD, "crc", rng.getrandbits(32))
        z.set(local, z.LOCAL, "crc", rng.getrandbits(32))
        detail = f"{name}: crc"
    elif op == "flags":
        value = _pick(rng, (1, 8, 0x41, 0x800, 0xFFFF))
        z.set(cd, z.CD, "flags", value)
        z.set(local, z.LOCAL, "flags", value)
        detail = f"{name}: flags {value:#x}"
    elif op == "offset":
        value = _pick(rng, (0, 1, 2**32 - 1, len(seed.data), local + 1))
        z.set(cd, z.CD, "offset", value)
        detail = f"{name}: local header offset {value}"
    elif op == "fnlen":
        value = _pick(rng, (0, 1, 0xFFFF))
        z.set(cd, z.CD, "fnlen", value)
        detail = f"{name}: name length {value}"
    elif op == "eocd":
        key = _pick(rng, ("disk_entries", "entries", "cd_size", "cd_offset", "comment_len"))
        value = _pick(rng, (0, 1, 0xFFFF, 2**32 - 1))
        z.set(z.eocd, z.EOCD, key, value)
        detail = f"end of central directory {key} {value}"
    elif op == "comment":
        z.data += rng.randbytes(rng.randint(1, 200))
        detail = "trailing bytes after the directory"
    elif op == "eocd64":
        rec = bytes(z.data).rfind(b"PK\x06\x06")
        if rec < 0:
            raise Skip("no zip64 end of central directory")
        field_offset, what = _pick(
            rng, ((24, "entries on disk"), (32, "entries"), (40, "cd size"), (48, "cd offset"))
        )
        value = _pick(rng, (0, 1, 2**40, 2**63, 2**64 - 1))
        struct.pack_into("<Q", z.data, rec + field_offset, value)
        detail = f"zip64 end of central directory: {what} {value}"
    else:  # zip64: usize 0xFFFFFFFF and a zip64 extra field with an absurd size
        value = _pick(rng, (2**40, 2**62, 2**63 + 5, 2**34))
        z = _Zip(zip64_size(bytes(z.data), name, value))
        detail = f"{name}: zip64 usize {value}"
    case.files[case.main] = bytes(z.data)
    case.detail = detail


def _honest_bomb(rng: random.Random, seed: Seed, case: Case) -> None:
    """A member of zeros that deflates honestly to far more than the file: within the
    declared-size limit, but does reading it cost what the file is worth?"""
    import zlib  # noqa: F401 - zipfile needs it for ZIP_DEFLATED

    members = _members(seed.data)
    prefix = members[0][0].split("/")[0]
    size = _pick(rng, (64 * 2**20, 200 * 2**20, 250 * 2**20))
    target = _pick(
        rng, ("extra/blob.bin", "extra/note.txt", "data/junk.bin", "data/weights/weight_0")
    )
    full = f"{prefix}/{target}"
    members = [(n, c) for n, c in members if n != full]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, c in members:
            z.writestr(zipfile.ZipInfo(n, date_time=(1980, 1, 1, 0, 0, 0)), c)
        info = zipfile.ZipInfo(full, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        chunk = b"\x00" * 2**20
        with z.open(info, "w", force_zip64=True) as f:
            for _ in range(size // len(chunk)):
                f.write(chunk)
    case.files[case.main] = buf.getvalue()
    case.detail = f"{target}: {size // 2**20} MiB of zeros deflated to {len(buf.getvalue())} B"


def _pickle_payload() -> bytes:
    """A pickle that, when loaded, creates the file PWNED in the current directory."""
    return b"c__builtin__\nopen\n(V" + PWNED.encode() + b"\nVw\ntR."


def m_pt2_pickle(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """Pickled members: torch.export.load unpickles some of them with weights_only=False."""
    from torch.export.pt2_archive import constants as pc

    members = _members(seed.data)
    prefix = members[0][0].split("/")[0]
    op = _pick(
        rng,
        (
            "sample_inputs use_pickle_weight opaque_constant custom_obj "
            "pickled_constant legacy_weights"
        ).split(),
    )
    payload = _pickle_payload()
    if op == "sample_inputs":
        i = _pick(rng, _member_index(members, r"sample_inputs/"))
        members[i] = (members[i][0], payload)
    elif op == "use_pickle_weight":
        k = _pick(rng, _member_index(members, r"model_weights_config\.json$"))
        config = json.loads(members[k][1])
        meta = _pick(rng, list(config["config"].values()))
        meta["use_pickle"] = True
        members[k] = (members[k][0], json.dumps(config).encode())
        i = _pick(rng, _member_index(members, r"/" + re.escape(meta["path_name"]) + "$"))
        members[i] = (members[i][0], payload)
    elif op == "legacy_weights":
        members.append((f"{prefix}/data/weights/model.pt", payload))
    else:
        k = _pick(rng, _member_index(members, r"model_constants_config\.json$"))
        config = json.loads(members[k][1])
        file_prefix = {
            "opaque_constant": pc.OPAQUE_OBJ_FILENAME_PREFIX,
            "custom_obj": pc.CUSTOM_OBJ_FILENAME_PREFIX,
            "pickled_constant": pc.TENSOR_CONSTANT_FILENAME_PREFIX,
        }[op]
        config.setdefault("config", {})["fuzz"] = {
            "path_name": f"{file_prefix}0",
            "is_param": False,
            "use_pickle": True,
            "tensor_meta": None,
        }
        members[k] = (members[k][0], json.dumps(config).encode())
        members.append((f"{prefix}/data/constants/{file_prefix}0", payload))
    case.files[case.main] = _pack(members)
    case.detail = op


# ---------------------------------------------------------------------------------------------
# Programs that would touch the world when run, and sample inputs that promise huge tensors

SIDE_EFFECTS = (
    "from_file_write",
    "from_file_create",
    "print",
    "custom_op",
    "record_function",
    "input_mutation",
    "view_mutation",
    "random",
)


def fuzz_ops() -> Any:
    """The custom op ``bnfold_fuzz::touch(x, path)``, which creates ``path`` when it runs
    (registered once per process; a program naming it loads only where it is registered)."""
    import torch

    op = (
        getattr(torch.ops.bnfold_fuzz, "touch", None) if hasattr(torch.ops, "bnfold_fuzz") else None
    )
    if op is not None:
        return op.default

    # The schema is spelled out: this module's annotations are strings (__future__).
    @torch.library.custom_op(
        "bnfold_fuzz::touch", mutates_args=(), schema="(Tensor x, str path) -> Tensor"
    )
    def touch(x: torch.Tensor, path: str) -> torch.Tensor:
        Path(path).touch()
        return x.clone()

    @touch.register_fake
    def _(x: torch.Tensor, path: str) -> torch.Tensor:
        return torch.empty_like(x)

    return torch.ops.bnfold_fuzz.touch.default


def inject_side_effect(ep: Any, kind: str, path: str) -> None:
    """Put the side effect ``kind`` (one of SIDE_EFFECTS) into the program ``ep`` in place,
    aimed at ``path``; a tensor-valued one replaces the first user input where it is used."""
    import torch

    aten, g = torch.ops.aten, ep.graph
    user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    x = next(n for n in g.nodes if n.op == "placeholder" and n.name == user[0])
    first = next(n for n in g.nodes if n.op != "placeholder")

    def call(op: Any, args: tuple, val: Any, **kwargs: Any) -> Any:
        with g.inserting_before(first):
            node = g.call_function(op, args, kwargs)
        node.meta["val"] = val
        return node

    fake = x.meta["val"]
    if kind.startswith("from_file"):
        mapped = call(aten.from_file.default, (path,), torch.empty(16), shared=True, size=16)
        call(aten.fill_.Scalar, (mapped, 7.0), torch.empty(16))
        return
    if kind == "print":
        call(aten._print.default, ("bnfold fuzz: printed",), None)
        return
    if kind == "record_function":
        call(torch.ops.profiler._record_function_enter.default, ("fuzz", None), torch.empty(0))
        return
    if kind == "random":
        call(aten.randn.default, ([4],), torch.empty(4))
        return
    if kind == "custom_op":
        new = call(fuzz_ops(), (x, path), fake)
    elif kind == "input_mutation":
        new = call(aten.add_.Tensor, (x, 1.0), fake)
    else:  # view_mutation: through a view of the input
        view = call(aten.select.int, (x, 0, 0), fake[0])
        call(aten.mul_.Tensor, (view, 2.0), fake[0])
        return
    x.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)


def _outside_target(kind: str) -> str:
    """The file outside every scratch directory a side effect aims at."""
    return os.fspath(OUTSIDE / (VICTIM if kind == "from_file_write" else f"created-{kind}"))


def m_pt2_side_effect(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """A program given an op that reads or writes a file outside the scratch directory, runs
    a custom op, prints, profiles, draws random numbers or writes into its input: folding must
    not run it, and --verify must refuse it (unsafe_ran, outside_changed)."""
    import torch

    kind = _pick(rng, SIDE_EFFECTS)
    fuzz_ops()
    with warnings.catch_warnings(), _quiet_logs():
        warnings.simplefilter("ignore")
        ep = torch.export.load(io.BytesIO(seed.data))
        inject_side_effect(ep, kind, _outside_target(kind))
        buf = io.BytesIO()
        torch.export.save(ep, buf)
    case.files[case.main] = _pack(_members(buf.getvalue()))  # fixed dates: deterministic
    case.unsafe = True
    if rng.random() < 0.7:
        case.args.append("--verify")
    case.detail = kind


_SAMPLE_INPUTS = (
    "expanded_huge",
    "expanded_huge_rank",
    "wrong_shape",
    "extra_argument",
    "int64",
    "meta",
    "not_a_tuple",
)


def _sample_inputs(op: str, like: Any) -> Any:
    """Sample inputs ``(args, kwargs)`` for the strategy ``op``, from an example tensor."""
    import torch

    if op == "expanded_huge":  # 14 KB on disk, 1 GiB as a tensor
        return (torch.zeros(1).expand(16384, 16384),), {}
    if op == "expanded_huge_rank":  # the right rank, far too many elements
        return (torch.zeros(1).expand(2**24, *like.shape[1:]),), {}
    if op == "wrong_shape":
        return (torch.randn(*[d + 1 for d in like.shape]),), {}
    if op == "extra_argument":
        return (like, like), {}
    if op == "int64":
        return (torch.ones(like.shape, dtype=torch.int64),), {}
    if op == "meta":
        return (torch.empty(like.shape, device="meta"),), {}
    return like


def m_pt2_sample_inputs(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """Sample inputs (read weights-only) unlike what the program declares: huge expanded
    tensors that cost bytes on disk and gigabytes as random inputs, wrong shapes, dtypes,
    devices or counts. --verify must check them against the program first."""
    import torch

    members = _members(seed.data)
    i = _pick(rng, _member_index(members, r"sample_inputs/model\.pt$"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (like, *_), _ = torch.load(io.BytesIO(members[i][1]), weights_only=True)
        op = _pick(rng, _SAMPLE_INPUTS)
        buf = io.BytesIO()
        torch.save(_sample_inputs(op, like), buf)
    members[i] = (members[i][0], buf.getvalue())
    case.files[case.main] = _pack(members)
    if rng.random() < 0.7:
        case.args.append("--verify")
    case.detail = op


# ---------------------------------------------------------------------------------------------
# StableHLO: MLIR text (.mlir) and serialized jax.export programs (.jaxexport)


def _flax_variables(rng: Any, model: Any, x: Any) -> Any:
    """Random variables for a flax linen ``model``: non-trivial BatchNorm statistics."""
    import jax

    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)

    def fill(path: Any, s: Any) -> Any:
        name = getattr(path[-1], "key", "")
        if name == "var":
            return rng.uniform(0.5, 2.0, s.shape).astype(s.dtype)
        if name == "scale":
            return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
        return rng.normal(0.0, 0.5, s.shape).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _bni_text(rng: Any) -> str:
    """NHWC conv (3 -> 4 channels) + stablehlo.batch_norm_inference, as MLIR text."""
    import numpy as np

    def dense(a: Any) -> str:
        dims = "".join(f"{d}x" for d in a.shape)
        return f'dense<"0x{a.astype(np.float32).tobytes().hex().upper()}"> : tensor<{dims}f32>'

    w = rng.normal(0.0, 0.5, (3, 3, 3, 4))
    scale, offset, mean = (rng.normal(0.0, 0.5, 4) for _ in range(3))
    var = rng.uniform(0.5, 2.0, 4)
    x, y, p = "tensor<1x5x5x3xf32>", "tensor<1x5x5x4xf32>", "tensor<4xf32>"
    return "\n".join(
        [
            "module @bni {",
            f"  func.func public @main(%arg0: {x}) -> {y} {{",
            f"    %w = stablehlo.constant {dense(w)}",
            *(
                f"    %{k} = stablehlo.constant {dense(v)}"
                for k, v in (("s", scale), ("o", offset), ("m", mean), ("v", var))
            ),
            "    %0 = stablehlo.convolution(%arg0, %w) dim_numbers = [b, 0, 1, f]x[0, 1, i, o]->"
            "[b, 0, 1, f], window = {pad = [[1, 1], [1, 1]]} {batch_group_count = 1 : i64, "
            f"feature_group_count = 1 : i64}} : ({x}, tensor<3x3x3x4xf32>) -> {y}",
            '    %1 = "stablehlo.batch_norm_inference"(%0, %s, %o, %m, %v) {epsilon = 1.0e-03 : '
            f"f32, feature_index = 3 : i64}} : ({y}, {p}, {p}, {p}, {p}) -> {y}",
            f"    return %1 : {y}",
            "  }",
            "}",
            "",
        ]
    )


def _stablehlo_seeds(seed: int) -> list[Seed]:
    """flax Conv+BatchNorm and Dense+BatchNorm exported (parameters closed over, random
    statistics) as programs and as text (with and without locations), a program with a
    sharding and a VJP, and batch_norm_inference text."""
    import functools

    import flax.linen as nn
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from bnfold.stablehlo import mlir as hlo_mlir

    rng = np.random.default_rng(seed)

    class ConvBN(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            y = nn.BatchNorm(use_running_average=True, epsilon=1e-3)(nn.Conv(4, (3, 3))(x))
            return nn.relu(y)

    class DenseBN(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            return nn.BatchNorm(use_running_average=True, epsilon=1e-3)(nn.Dense(3)(x))

    def exported(model: Any, x: Any, **jit: Any) -> Any:
        fn = functools.partial(model.apply, _flax_variables(rng, model, x))
        return jax.export.export(jax.jit(fn, **jit))(x)

    conv = exported(ConvBN(), rng.normal(size=(1, 6, 6, 3)).astype(np.float32))
    dense = exported(DenseBN(), rng.normal(size=(2, 5)).astype(np.float32))
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    sharded = exported(
        DenseBN(),
        rng.normal(size=(2, 5)).astype(np.float32),
        in_shardings=NamedSharding(mesh, P("x")),
    )
    ctx = hlo_mlir.context()
    plain = hlo_mlir.to_text(hlo_mlir.parse_text(dense.mlir_module(), ctx), debug_info=False)

    def jax_seed(name: str, exp: Any, vjp_order: int = 0) -> Seed:
        data = bytes(exp.serialize(vjp_order=vjp_order))
        return Seed(name, "jaxexport", "model.jaxexport", {"model.jaxexport": data})

    def text_seed(name: str, text: str) -> Seed:
        return Seed(name, "mlir", "model.mlir", {"model.mlir": text.encode("utf-8")})

    return [
        jax_seed("jax_conv", conv),
        jax_seed("jax_dense", dense),
        jax_seed("jax_sharded_vjp", sharded, vjp_order=1),
        text_seed("mlir_conv", conv.mlir_module()),
        text_seed("mlir_plain", plain),
        text_seed("mlir_bni", _bni_text(rng)),
    ]


def _text(seed: Seed) -> str:
    return seed.data.decode("utf-8")


def _store_text(case: Case, text: str) -> None:
    case.files[case.main] = text.encode("utf-8")


def m_mlir_lines(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """Whole lines deleted, duplicated, swapped or moved; the text cut at a line."""
    lines = _text(seed).splitlines(keepends=True)
    op = _pick(rng, ("delete", "duplicate", "swap", "move", "cut"))
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    if op == "delete":
        del lines[i]
    elif op == "duplicate":
        lines.insert(j, lines[i])
    elif op == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    elif op == "move":
        lines.insert(j, lines.pop(i))
    else:
        lines = lines[:i]
    _store_text(case, "".join(lines))
    case.detail = f"{op} line {i} ({j})"


_MLIR_NUMBERS = ("0", "-1", "2", "7", "65536", "4294967296", "9223372036854775807", "99999999999")
_MLIR_TYPES = ("f16", "bf16", "f64", "i32", "i1", "ui8", "complex<f32>", "f8E4M3FN", "index")
_MLIR_OPS = (
    "add",
    "multiply",
    "subtract",
    "divide",
    "rsqrt",
    "convolution",
    "dot_general",
    "broadcast_in_dim",
    "reshape",
    "transpose",
    "custom_call",
    "while",
    "nonexistent",
)


def _mlir_token(rng: random.Random, text: str) -> tuple[str, str]:
    """One token of MLIR text changed: a number, an element type, an op, a value name, the
    hex payload of a constant, a dimension list."""
    kinds = {
        "number": r"(?<![%#\w])\d+(?![\w.])",
        "type": r"(?<=x)(f32|f16|i32|i64|i1)(?=>)",
        "op": r"(?<=stablehlo\.)[a-z_]+",
        "value": r"%[\w]+",
        "hex": r'"0x[0-9A-F]+"',
        "dims": r"\[[\d, ]*\]",
    }
    kind = _pick(rng, sorted(kinds))
    matches = list(re.finditer(kinds[kind], text))
    if not matches:
        raise Skip(f"no {kind} in the text")
    m = _pick(rng, matches)
    old = m.group(0)
    if kind == "number":
        new = _pick(rng, _MLIR_NUMBERS)
    elif kind == "type":
        new = _pick(rng, _MLIR_TYPES)
    elif kind == "op":
        new = _pick(rng, _MLIR_OPS)
    elif kind == "value":
        new = _pick(rng, ("%0", "%arg0", "%arg9", "%cst", "%999", "%"))
    elif kind == "hex":
        payload = old[3:-1]
        cut = rng.randrange(len(payload) + 1)
        new = _pick(
            rng,
            (
                f'"0x{payload[:cut]}"',
                f'"0x{payload}{payload}"',
                f'"0x{payload[:cut]}ZZ{payload[cut + 2 :]}"',
                '"0x"',
                f'"{payload}"',
            ),
        )
    else:
        new = _pick(
            rng, ("[]", "[0, 0]", "[9]", "[-1]", "[0, 1, 2, 3, 4, 5, 6, 7]", "[3, 2, 1, 0]")
        )
    return text[: m.start()] + new + text[m.end() :], f"{kind} {old[:20]!r} -> {new[:20]!r}"


def m_mlir_tokens(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """Numbers, element types, op names, value names, constants' hex payloads and dimension
    lists of the text changed (the text still parses, often; it verifies, sometimes)."""
    text, details = _text(seed), []
    for _ in range(_pick(rng, (1, 1, 1, 2, 3))):
        text, detail = _mlir_token(rng, text)
        details.append(detail)
    _store_text(case, text)
    case.detail = "; ".join(details)


def m_mlir_nesting(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """Deep nesting (attribute lists, types, regions, locations): MLIR's parser recurses, and
    overflows the stack on a few kilobytes of it."""
    n = _pick(rng, (50, 500, 5_000, 50_000, 300_000))
    kind = _pick(rng, ("array", "type", "module", "loc"))
    if kind == "array":
        text = "#a = " + "[" * n + "]" * n + "\n" + _text(seed)
    elif kind == "type":
        t = "tensor<" * n + "f32" + ">" * n
        text = _text(seed).replace("module", f"module attributes {{bnfold.t = {t}}}", 1)
    elif kind == "module":
        text = "module {\n" * n + "}\n" * n
    else:
        text = _text(seed).rstrip() + " loc(" + "callsite(" * n + '"a"' + ' at "b")' * n + ")\n"
    _store_text(case, text)
    case.detail = f"{kind} nested {n} deep"


# Ops that reach outside the computation, inserted before @main's return: --verify must refuse
# them (refuse_unsafe) and folding must not run them.
_UNSAFE_MLIR = (
    "%u = stablehlo.custom_call @xla_ffi_python_cpu_callback(%arg0) {has_side_effect = true, "
    "api_version = 4 : i32, backend_config = {index = 0 : ui64}} : ({t}) -> {t}",
    "%u = stablehlo.custom_call @bnfold_fuzz_touch(%arg0) {has_side_effect = true} : ({t}) -> {t}",
    '%tok = stablehlo.after_all : !stablehlo.token\n    %u = "stablehlo.outfeed"(%arg0, %tok) '
    '{outfeed_config = ""} : ({t}, !stablehlo.token) -> !stablehlo.token',
    '%u = "mhlo.custom_call"(%arg0) {call_target_name = "bnfold_fuzz_touch", has_side_effect = '
    "true} : ({t}) -> {t}",
)


def _with_unsafe_op(rng: random.Random, text: str) -> tuple[str, str]:
    m = re.search(r"func\.func public @main\(%arg0: (tensor<[^>]*>)", text)
    if m is None:
        raise Skip("no @main with a tensor argument")
    op = _pick(rng, _UNSAFE_MLIR).replace("{t}", m.group(1))
    ret = text.find("return", m.end())
    start = text.rfind("\n", 0, ret) + 1
    return text[:start] + "    " + op + "\n" + text[start:], op.split("(")[0][-40:]


def m_mlir_unsafe(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """A custom call (a Python callback, an unknown target) or an outfeed in @main: --verify
    must refuse to run it (unsafe_ran)."""
    text, detail = _with_unsafe_op(rng, _text(seed))
    _store_text(case, text)
    case.unsafe = True
    if rng.random() < 0.7:
        case.args.append("--verify")
    case.detail = detail


def m_mlir_encoding(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """Text that is not UTF-8, holds a NUL, a byte-order mark, CRLF line ends or one line."""
    text = _text(seed)
    op = _pick(rng, ("utf16", "latin1", "nul", "bom", "crlf", "one_line", "control"))
    if op == "utf16":
        data = text.encode("utf-16")
    elif op == "latin1":
        i = rng.randrange(len(text))
        data = (text[:i] + "\xe9\xff").encode("latin-1", "replace") + text[i:].encode()
    elif op == "nul":
        i = rng.randrange(len(text))
        data = (text[:i] + "\0" + text[i:]).encode()
    elif op == "bom":
        data = b"\xef\xbb\xbf" + text.encode()
    elif op == "crlf":
        data = text.replace("\n", "\r\n").encode()
    elif op == "one_line":
        data = text.replace("\n", " ").encode()
    else:
        i = rng.randrange(len(text))
        data = (text[:i] + "".join(chr(rng.randrange(1, 32)) for _ in range(4)) + text[i:]).encode()
    case.files[case.main] = data
    case.detail = op


def m_mlir_huge(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """Shapes far beyond the file: the batch dimension everywhere, an argument, or a splat
    constant broadcast to 2**40 elements. Folding must stay within its budget, --verify must
    refuse to allocate it."""
    text = _text(seed)
    # beyond --verify's budgets whatever the other dimensions (the budgets, not the harness's
    # memory slack, bound what a declared shape may make --verify allocate)
    big = _pick(rng, ("1099511627776", "4294967296", "16777217", "2147483648"))
    op = _pick(rng, ("batch", "argument", "splat", "broadcast"))
    m = re.search(r"@main\(%arg0: tensor<(\d+)x", text)
    if m is None:
        raise Skip("no ranked argument")
    if op == "batch":  # consistently: the module still verifies
        text = text.replace(f"tensor<{m.group(1)}x", f"tensor<{big}x")
    elif op == "argument":
        text = text[: m.start(1)] + big + text[m.end(1) :]
    else:
        ret = text.find("return", m.end())
        start = text.rfind("\n", 0, ret) + 1
        if op == "splat":
            line = f"%h = stablehlo.constant dense<1.5> : tensor<{big}x{big}xf32>"
        else:
            line = (
                "%h0 = stablehlo.constant dense<1.5> : tensor<f32>\n    %h = "
                f"stablehlo.broadcast_in_dim %h0, dims = [] : (tensor<f32>) -> tensor<{big}xf32>"
            )
        text = text[:start] + "    " + line + "\n" + text[start:]
    _store_text(case, text)
    if rng.random() < 0.7:
        case.args.append("--verify")
    case.detail = f"{op} {big}"


def m_mlir_dialect(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """Modules of other dialects, or other dialects' ops in a StableHLO module."""
    t = "tensor<2xf32>"
    modules = {
        "llvm": "module {\n  llvm.func @main(%a: i32) -> i32 {\n    llvm.return %a : i32\n  }\n}\n",
        "arith": f"module {{\n  func.func @main(%a: {t}) -> {t} {{\n    %0 = arith.addf %a, %a "
        f": {t}\n    return %0 : {t}\n  }}\n}}\n",
        "tosa": f"module {{\n  func.func @main(%a: {t}) -> {t} {{\n    %0 = tosa.abs %a : ({t}) "
        f"-> {t}\n    return %0 : {t}\n  }}\n}}\n",
        "unregistered": f'module {{\n  func.func @main(%a: {t}) -> {t} {{\n    %0 = "bnfold.x"'
        f"(%a) : ({t}) -> {t}\n    return %0 : {t}\n  }}\n}}\n",
        "memref": "module {\n  func.func @main(%a: memref<2xf32>) {\n    return\n  }\n}\n",
        "no_main": "module {\n}\n",
        "call": f"module {{\n  func.func @main(%a: {t}) -> {t} {{\n    %0 = func.call @missing"
        f"(%a) : ({t}) -> {t}\n    return %0 : {t}\n  }}\n}}\n",
    }
    op = _pick(rng, sorted(modules))
    _store_text(case, modules[op])
    if rng.random() < 0.3:
        case.args.append("--verify")
    case.detail = op


def _exported(seed: Seed) -> Any:
    import jax

    return jax.export.deserialize(bytearray(seed.data))


def _serialized(exp: Any, vjp_order: int = 0) -> bytes:
    return bytes(exp.serialize(vjp_order=vjp_order))


def _seed_vjp_order(seed: Seed) -> int:
    return 1 if "vjp" in seed.name else 0


def m_jax_artifact(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """The program's StableHLO portable artifact damaged byte by byte, in a sound flatbuffer:
    MLIR's bytecode reader crashes, aborts or never returns on some of these."""
    import dataclasses

    exp = _exported(seed)
    art, case.detail = _pick(rng, _BYTE_MUTATORS)(rng, exp.mlir_module_serialized)
    damaged = dataclasses.replace(exp, mlir_module_serialized=art)
    case.files[case.main] = _serialized(damaged)


def m_jax_words(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """32-bit words of the flatbuffer (offsets, lengths, vtable entries) set to extremes."""
    b = bytearray(seed.data)
    done = []
    for _ in range(_pick(rng, (1, 1, 2, 3))):
        i = rng.randrange(0, len(b) - 4) & ~3 if rng.random() < 0.8 else rng.randrange(len(b) - 4)
        v = _pick(rng, (0, 1, 4, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, len(b), len(b) - 4, i))
        b[i : i + 4] = v.to_bytes(4, "little")
        done.append(f"{v:#x}@{i}")
    case.files[case.main] = bytes(b)
    case.detail = ", ".join(done)


def m_jax_fields(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """Fields of the program changed and serialized by jax: platforms, devices, the inputs'
    shapes and dtypes, the name, the calling convention, the kept arguments, another program's
    module."""
    import dataclasses

    import jax
    import numpy as np

    exp = _exported(seed)
    field_ = _pick(
        rng,
        (
            "platforms",
            "nr_devices",
            "in_avals",
            "out_avals",
            "fun_name",
            "calling_convention",
            "kept",
            "module",
        ),
    )
    aval = exp.in_avals[0]
    if field_ == "platforms":
        value: Any = _pick(rng, (("cuda",), ("tpu", "cuda"), (), ("cpu", "cpu"), ("CPU",)))
        changed = {"platforms": value}
    elif field_ == "nr_devices":
        value = _pick(rng, (0, 2, 8, 2**31 - 1))
        changed = {"nr_devices": value}
    elif field_ in ("in_avals", "out_avals"):
        avals = list(getattr(exp, field_))
        shape = _pick(rng, ((), (2**40,), (2**20, 2**20), (0,), tuple(d + 1 for d in aval.shape)))
        dtype = _pick(rng, (aval.dtype, np.dtype(np.int8), np.dtype(np.float64)))
        avals[0] = jax.core.ShapedArray(shape, dtype)
        value = (shape, str(dtype))
        changed = {field_: tuple(avals)}
    elif field_ == "fun_name":
        value = _pick(rng, ("", "\x00", "é" * 5000, "a\nb"))
        changed = {"fun_name": value}
    elif field_ == "calling_convention":
        value = _pick(rng, (0, 1, 8, 99, -1))
        changed = {"calling_convention_version": value}
    elif field_ == "kept":
        value = _pick(rng, ((), (0, 0), (5,), (0, 1, 2)))
        changed = {"module_kept_var_idx": value}
    else:
        other = _pick(rng, [s for s in corpus if s.fmt == "jaxexport" and s is not seed])
        value = other.name
        changed = {"mlir_module_serialized": _exported(other).mlir_module_serialized}
    case.files[case.main] = _serialized(dataclasses.replace(exp, **changed))
    if rng.random() < 0.6:
        case.args.append("--verify")
    case.detail = f"{field_} = {str(value)[:40]!r}"


def _serialized_with(exp: Any, patches: dict[str, Any], generated: dict[str, Any]) -> bytes:
    """``exp`` serialized with functions of jax's serializer (and of its flatbuffer module)
    replaced, to write what jax itself never writes."""
    from jax._src.export import serialization as ser
    from jax._src.export import serialization_generated as fb

    saved = {k: getattr(ser, k) for k in patches} | {("fb", k): getattr(fb, k) for k in generated}
    try:
        for k, v in patches.items():
            setattr(ser, k, v)
        for k, v in generated.items():
            setattr(fb, k, v)
        return _serialized(exp)
    finally:
        for k, v in saved.items():
            if isinstance(k, tuple):
                setattr(fb, k[1], v)
            else:
                setattr(ser, k, v)


def _shared_pytree(builder: Any, depth: int, fanout: int, kind: str) -> int:
    """A pytree whose every node's children are one shared node: ``fanout**depth`` leaves in
    ``depth`` tables."""
    from jax._src.export import serialization_generated as fb

    fb.PyTreeDefStart(builder)
    fb.PyTreeDefAddKind(builder, fb.PyTreeDefKind.leaf)
    node = fb.PyTreeDefEnd(builder)
    for _ in range(depth):
        fb.PyTreeDefStartChildrenVector(builder, fanout)
        for _ in range(fanout):
            builder.PrependUOffsetTRelative(node)
        children = builder.EndVector()
        fb.PyTreeDefStart(builder)
        fb.PyTreeDefAddKind(builder, getattr(fb.PyTreeDefKind, kind))
        fb.PyTreeDefAddChildren(builder, children)
        node = fb.PyTreeDefEnd(builder)
    return node


def m_jax_pytree(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """An input or output pytree whose nodes share their children: a few hundred bytes that
    jax would expand into ``fanout**depth`` nodes (hours, or all memory)."""
    from jax._src.export import serialization as ser

    original = ser._serialize_pytreedef
    which = _pick(rng, (0, 1))  # the in_tree or the out_tree
    depth, fanout = _pick(rng, ((8, 2), (16, 2), (24, 2), (40, 2), (12, 4), (5, 16)))
    kind = _pick(rng, ("tuple", "list"))
    calls = {"top": 0, "inside": 0}

    def serialize_pytreedef(builder: Any, tree: Any) -> int:
        # jax's serializer calls this for the in_tree, then the out_tree (and, recursing, for
        # their children: those go to the original)
        if calls["inside"]:
            return original(builder, tree)
        calls["top"] += 1
        if calls["top"] == 1 + which:
            return _shared_pytree(builder, depth, fanout, kind)
        calls["inside"] += 1
        try:
            return original(builder, tree)
        finally:
            calls["inside"] -= 1

    exp = _exported(seed)
    case.files[case.main] = _serialized_with(exp, {"_serialize_pytreedef": serialize_pytreedef}, {})
    if rng.random() < 0.3:
        case.args.append("--verify")
    case.detail = f"{'out' if which else 'in'}_tree: {kind} {fanout}**{depth}"


def m_jax_legacy(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """Shardings as jax wrote them before January 2026: HloSharding protos, which jax reads in
    XLA's C++ (and XLA aborts on a damaged one)."""
    from jax._src.export import serialization_generated as fb

    exp = _exported(seed)
    protos = (
        b"",
        b"\x08\x00",  # REPLICATED
        b"\x08\x01",  # MAXIMAL, no device
        b"\x08\x03\x22\x02\x02\x01\x2a\x01\x00",  # OTHER, 2x1 tiles, one device
        bytes.fromhex("722b2a11ffffffffffffffffff0100808080808020280408015a12ffffffffffff"),
        _random_proto(rng),
    )
    proto = _pick(rng, protos) if rng.random() < 0.7 else _random_proto(rng)

    def sharding(builder: Any, s: Any, *, uniques: Any) -> int:
        vector = builder.CreateByteVector(proto)
        fb.ShardingStart(builder)
        fb.ShardingAddHloShardingProto(builder, vector)
        return fb.ShardingEnd(builder)

    def skip(builder: Any, offset: Any) -> None:
        pass

    case.files[case.main] = _serialized_with(
        exp,
        {"_serialize_sharding": sharding},
        {"ExportedAddInShardingsIdxs": skip, "ExportedAddOutShardingsIdxs": skip},
    )
    case.detail = f"HloSharding proto {proto.hex()[:40]}"


def m_jax_unsafe(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """A program whose module calls a Python callback or another custom call target, or feeds
    the host: --verify must refuse to run it (unsafe_ran)."""
    import dataclasses

    from bnfold.stablehlo import mlir as hlo_mlir

    exp = _exported(seed)
    text, case.detail = _with_unsafe_op(rng, exp.mlir_module())
    ctx = hlo_mlir.context()
    module = hlo_mlir.parse_text(text, ctx)
    unsafe = dataclasses.replace(exp, mlir_module_serialized=hlo_mlir.to_artifact(module))
    case.files[case.main] = _serialized(unsafe)
    case.unsafe = True
    if rng.random() < 0.7:
        case.args.append("--verify")


def m_jax_module(rng: random.Random, seed: Seed, corpus: list[Seed], case: Case) -> None:
    """The program's module edited as text (numbers, types, ops, constants) where it still
    parses and verifies, written back as an artifact: a sound file with an odd module."""
    import dataclasses

    from bnfold.stablehlo import mlir as hlo_mlir

    exp = _exported(seed)
    for _ in range(20):
        text, detail = _mlir_token(rng, exp.mlir_module())
        try:
            module = hlo_mlir.parse_text(text, hlo_mlir.context())
            art = hlo_mlir.to_artifact(module)
        except Exception:  # noqa: BLE001 - an edit MLIR refuses: try another
            continue
        case.files[case.main] = _serialized(dataclasses.replace(exp, mlir_module_serialized=art))
        if rng.random() < 0.5:
            case.args.append("--verify")
        case.detail = detail
        return
    raise Skip("no edit of the module verified")


def _outside_state() -> dict[str, str]:
    """OUTSIDE's files by content hash (VICTIM created first if missing)."""
    OUTSIDE.mkdir(exist_ok=True)
    victim = OUTSIDE / VICTIM
    if not victim.exists():
        victim.write_bytes(VICTIM_BYTES)
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "other"
        for p in OUTSIDE.iterdir()
    }


# ---------------------------------------------------------------------------------------------
# The schedule

_SHARED: dict[str, Mutator] = {
    "bitflip": m_bitflip,
    "overwrite": m_overwrite,
    "insert_delete": m_insert_delete,
    "truncate": m_truncate,
    "random_bytes": m_random_bytes,
    "random_magic": m_random_magic,
    "splice": m_splice,
    "suffix": m_suffix,
    "output_collision": m_output_collision,
}
ONNX_STRATEGIES: dict[str, Mutator] = {
    **_SHARED,
    "onnx_dims": m_onnx_dims,
    "onnx_dtype": m_onnx_dtype,
    "onnx_raw_data": m_onnx_raw_data,
    "onnx_external": m_onnx_external,
    "onnx_data_file": m_onnx_data_file,
    "onnx_graph": m_onnx_graph,
    "onnx_structure": m_onnx_structure,
    "onnx_attr": m_onnx_attr,
    "onnx_bn": m_onnx_bn,
    "onnx_constant": m_onnx_constant,
    "onnx_const_graph": m_onnx_const_graph,
    "onnx_shared_const": m_onnx_shared_const,
    "onnx_value_info": m_onnx_value_info,
    "onnx_subgraph": m_onnx_subgraph,
    "onnx_generic": m_onnx_generic,
}
PT2_STRATEGIES: dict[str, Mutator] = {
    **_SHARED,
    "pt2_member": m_pt2_member,
    "pt2_members": m_pt2_members,
    "pt2_json": m_pt2_json,
    "pt2_weights": m_pt2_weights,
    "pt2_zip_header": m_pt2_zip_header,
    "pt2_pickle": m_pt2_pickle,
    "pt2_side_effect": m_pt2_side_effect,
    "pt2_sample_inputs": m_pt2_sample_inputs,
}
MLIR_STRATEGIES: dict[str, Mutator] = {
    **_SHARED,
    "mlir_lines": m_mlir_lines,
    "mlir_tokens": m_mlir_tokens,
    "mlir_nesting": m_mlir_nesting,
    "mlir_unsafe": m_mlir_unsafe,
    "mlir_encoding": m_mlir_encoding,
    "mlir_huge": m_mlir_huge,
    "mlir_dialect": m_mlir_dialect,
}
JAX_STRATEGIES: dict[str, Mutator] = {
    **_SHARED,
    "jax_artifact": m_jax_artifact,
    "jax_words": m_jax_words,
    "jax_fields": m_jax_fields,
    "jax_pytree": m_jax_pytree,
    "jax_legacy": m_jax_legacy,
    "jax_unsafe": m_jax_unsafe,
    "jax_module": m_jax_module,
}
STRATEGIES: dict[str, dict[str, Mutator]] = {
    "onnx": ONNX_STRATEGIES,
    "pt2": PT2_STRATEGIES,
    "mlir": MLIR_STRATEGIES,
    "jaxexport": JAX_STRATEGIES,
}
# Strategies that need a particular kind of seed.
_SEED_FILTER: dict[str, Callable[[Seed], bool]] = {
    "onnx_data_file": lambda s: s.name == "external",
}


def schedule() -> list[tuple[str, str]]:
    """One cycle of (format, strategy), interleaved by smooth weighted round robin so that
    each format gets its FORMAT_SHARES of the inputs and every strategy its equal share of its
    format's."""
    weights = {
        (fmt, s): max(1, round(FORMAT_SHARES[fmt] * 1000 / len(strategies)))
        for fmt, strategies in STRATEGIES.items()
        for s in strategies
        if fmt in FORMATS
    }
    g = math.gcd(*weights.values())
    weights = {k: w // g for k, w in weights.items()}
    total = sum(weights.values())
    current = dict.fromkeys(weights, 0)
    out = []
    for _ in range(total):
        for k, w in weights.items():
            current[k] += w
        best = max(current, key=lambda k: current[k])
        current[best] -= total
        out.append(best)
    return out


_SCHEDULE: list[tuple[str, str]] | None = None


def make_case(corpus: list[Seed], seed: int, index: int) -> Case:
    """The ``index``-th input of the run with ``seed``: the same every time."""
    global _SCHEDULE
    if _SCHEDULE is None:
        _SCHEDULE = schedule()
    fmt, strategy = _SCHEDULE[index % len(_SCHEDULE)]
    mutate = STRATEGIES[fmt][strategy]
    keep = _SEED_FILTER.get(strategy, lambda s: True)
    seeds = [s for s in corpus if s.fmt == fmt and keep(s)]
    rng = random.Random(f"{seed}:{index}")
    last: Exception | None = None
    for _ in range(50):
        s = _pick(rng, seeds)
        case = Case(index, fmt, strategy, s.name, s.main, dict(s.files))
        try:
            mutate(rng, s, corpus, case)
        except Exception as e:  # noqa: BLE001 - Skip, or a mutation protobuf cannot build
            last = e
            continue
        _choose_args(rng, case)
        return case
    raise RuntimeError(f"strategy {strategy} found nothing to mutate: {last}")


def _choose_args(rng: random.Random, case: Case) -> None:
    if "--verify" not in case.args and rng.random() < VERIFY_FRACTION:
        case.args.append("--verify")
    if rng.random() < 0.3:
        case.args.append("--report")
    if rng.random() < 0.05:
        case.args += [
            "--producers",
            _pick(rng, ("conv", "linear", "conv_transpose", "conv,linear")),
        ]
    if case.fmt == "onnx" and rng.random() < 0.05:
        case.args.append("--remove-initializer-inputs")
    if case.fmt in ("mlir", "jaxexport") and rng.random() < 0.03:  # refused: not their options
        case.args += _pick(rng, (["--qat", "exact"], ["--remove-initializer-inputs"]))
    if rng.random() < 0.05:
        case.write_output = False


# =============================================================================================
# Running one input


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the peak RSS (Linux: /proc/self/clear_refs 5), so that each input's own peak can
    be measured; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss() -> int:
    """ru_maxrss in bytes."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


_libc = None


def _flush_c_stdio() -> None:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None)
        _libc.fflush(None)
    except Exception:  # noqa: BLE001 - best effort
        pass


@contextlib.contextmanager
def captured() -> Iterator[dict[str, str]]:
    """Capture stdout and stderr, Python-level and file-descriptor-level (what onnxruntime or
    torch write from C++), and give each run fresh warning filters as a new process would."""
    result = {"stdout": "", "stderr": ""}
    for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            s.flush()
    saved = [os.dup(1), os.dup(2)]
    files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    out, err = io.StringIO(), io.StringIO()
    try:
        os.dup2(files[0].fileno(), 1)
        os.dup2(files[1].fileno(), 2)
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            warnings.catch_warnings(),
        ):
            yield result
    finally:
        for s in (sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                s.flush()
        _flush_c_stdio()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        texts = []
        for f in files:
            f.seek(0)
            texts.append(f.read().decode("utf-8", "replace"))
            f.close()
        result["stdout"] = out.getvalue() + texts[0]
        result["stderr"] = err.getvalue() + texts[1]


def materialize(case: Case, in_dir: Path) -> None:
    """Write the case's files and links into ``in_dir`` (names may reach one level up)."""
    for name, content in case.files.items():
        p = in_dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
    for kind, name, target in case.links:
        p = in_dir / name
        if os.path.lexists(p):
            continue
        if kind == "symlink":
            os.symlink(target, p)
        elif kind == "hardlink":
            if (in_dir / target).exists():
                os.link(in_dir / target, p)
        elif kind == "mkdir":
            p.mkdir(parents=True, exist_ok=True)
        elif kind == "fifo":
            os.mkfifo(p)


def _snapshot(root: Path, skip: Path) -> dict[str, str]:
    """Every entry under ``root`` (but ``skip``): regular files by content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p == skip:
                continue
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                out[str(p.relative_to(root))] = "link:" + os.readlink(p)
            else:
                out[str(p.relative_to(root))] = f"mode:{stat.S_IFMT(st.st_mode)}"
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _may_write(case: Case, in_dir: Path, out: Path, case_dir: Path) -> set[str]:
    """The snapshot entries a successful run may change or add for an output in the input
    directory: the output (its link followed) and its data file, but never one that is a file
    of the input (the same file, by any link) or a pipe, unless the output is the input model
    itself. Computed before the run, while the entries are what the case made."""
    if not case.output:
        return set()
    target = Path(os.path.realpath(out))
    written = [target, target.with_name(target.name + ".data")]
    in_place = _same_file(target, in_dir / case.main)
    inputs = [in_dir / name for name in case.files]
    root = Path(os.path.realpath(case_dir))
    keys = set()
    for p in written:
        special = p.exists() and not p.is_file()
        if not in_place and (special or any(_same_file(p, i) for i in inputs)):
            continue
        with contextlib.suppress(ValueError):  # outside the case directory: never allowed
            keys.add(str(p.relative_to(root)))
    return keys


def _output_loads(path: Path, fmt: str) -> str | None:
    """Why the output at ``path`` does not load, or None."""
    try:
        if fmt == "onnx":
            import onnx

            onnx.load(os.fspath(path))
        elif fmt == "mlir":  # bnfold's own output: read here, not by a reader process
            from bnfold.stablehlo import mlir as hlo_mlir

            hlo_mlir.parse_text(path.read_text(), hlo_mlir.context())
        elif fmt == "jaxexport":
            import jax

            from bnfold.stablehlo import mlir as hlo_mlir

            exp = jax.export.deserialize(bytearray(path.read_bytes()))
            hlo_mlir.from_artifact(exp.mlir_module_serialized, hlo_mlir.context())
        else:
            import torch

            with warnings.catch_warnings(), _quiet_logs():
                warnings.simplefilter("ignore")
                torch.export.load(os.fspath(path))
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    return None


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def slow_seconds(case: Case) -> float:
    """How long a run may take: SLOW_SECONDS, and for StableHLO files the time the reader
    process is given before bnfold stops it (jaxlib's MLIR readers never return on some
    damaged inputs)."""
    if case.fmt in ("mlir", "jaxexport"):
        from bnfold.stablehlo import files as hlo_files

        return SLOW_SECONDS + hlo_files.READ_SECONDS + hlo_files.READ_SECONDS_PER_BYTE * case.size
    return SLOW_SECONDS


def _normalize(text: str, case_dir: Path) -> str:
    text = text.replace(str(case_dir / "in") + os.sep, "").replace(str(case_dir), "DIR")
    return text


@dataclass
class Outcome:
    index: int
    fmt: str
    strategy: str
    seed: str
    detail: str
    argv: list[str]
    size: int
    rc: int | None
    elapsed: float
    rss_growth: int  # bytes the peak RSS grew during the run
    maxrss: int  # ru_maxrss after the run, bytes
    message: str  # the first stderr line, paths shortened
    findings: list[str]
    notes: list[str]
    extra: str = ""  # what a finding is about

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def run_case(case: Case, root: Path, save_dir: Path | None = None) -> Outcome:
    """Run one input through ``bnfold.cli.main`` and check every promise."""
    from bnfold.cli import main

    case_dir = Path(tempfile.mkdtemp(prefix=f"c{case.index}-", dir=root))
    in_dir, out_dir = case_dir / "in", case_dir / "out"
    in_dir.mkdir()
    out_dir.mkdir()
    materialize(case, in_dir)
    before = _snapshot(case_dir, out_dir)
    cwd_before = set(os.listdir("."))
    if case.unsafe and case.fmt == "pt2":
        fuzz_ops()  # the program names it: loading it needs it registered
    outside_before = _outside_state()
    out = in_dir / case.output if case.output else out_dir / f"folded.{case.fmt}"
    may_write = _may_write(case, in_dir, out, case_dir) if case.write_output else set()
    argv = [os.fspath(in_dir / case.main)]
    if case.write_output:
        argv += ["-o", os.fspath(out)]
    argv += case.args
    rc: int | None = None
    escaped = ""
    exact_peak = _reset_peak()
    rss_before = (_status_kib("VmRSS") or 0) * 1024
    maxrss_before = _maxrss()
    start = time.perf_counter()
    with captured() as io_:
        try:
            rc = main(argv)
        except BaseException as e:  # noqa: BLE001 - exactly what must not happen
            escaped = f"{type(e).__name__}: {str(e)[:200]}"
    elapsed = time.perf_counter() - start
    maxrss_after = _maxrss()
    if exact_peak:
        growth = (_status_kib("VmHWM") or 0) * 1024 - rss_before
    else:
        growth = maxrss_after - maxrss_before
    findings: list[str] = []
    notes: list[str] = []
    extra = []
    lines = io_["stderr"].splitlines()
    message = _normalize(lines[0], case_dir) if lines else ""
    if escaped:
        findings.append("escaped")
        extra.append(escaped)
    elif rc == 3:
        findings.append("internal")
    elif rc not in (0, 1):
        findings.append("bad_exit")
    failed = escaped or rc != 0
    left = sorted(os.listdir(out_dir))
    if failed:
        if len(lines) > 1:
            findings.append("multi_line")
            extra.append(" | ".join(_normalize(x, case_dir) for x in lines[:6])[:600])
        elif rc != 3 and (not lines or not lines[0].startswith("bnfold: error:")):
            findings.append("bad_message")
        if left:
            findings.append("leftover")
            extra.append(f"left in the output directory: {left}")
    else:
        if io_["stderr"].strip():
            notes.append("stderr_on_success")
            message = _normalize(" | ".join(lines[:3]), case_dir)
        expected = {out.name, out.name + ".data"} if case.write_output else set()
        unexpected = [n for n in left if n not in expected]
        if unexpected:
            findings.append("leftover")
            extra.append(f"unexpected files in the output directory: {unexpected}")
        if case.write_output:
            if not out.exists():
                findings.append("bad_output")
                extra.append("exit 0 but no output file")
            else:
                why = _output_loads(out, case.fmt)
                if why is not None:
                    findings.append("bad_output")
                    extra.append(f"output does not load: {why}")
    after = _snapshot(case_dir, out_dir)
    written = may_write if not failed else set()
    changed = [k for k in before if after.get(k) != before[k] and k not in written]
    added = [k for k in after if k not in before and k not in written]
    if changed:
        findings.append("input_changed")
        extra.append(f"changed or removed: {changed}")
    if added:
        findings.append("leftover")
        extra.append(f"new files beside the input: {added}")
    cwd_added = set(os.listdir(".")) - cwd_before
    if PWNED in cwd_added or (case_dir / "in" / PWNED).exists():
        findings.append("code_exec")
        extra.append(f"a pickle in the input ran code: {PWNED} was created")
    elif cwd_added:
        findings.append("leftover")
        extra.append(f"new files in the working directory: {sorted(cwd_added)}")
    # Clean up only a working directory of our own (run_in_process and workers use one).
    for name in cwd_added if Path.cwd().resolve().is_relative_to(root.resolve()) else ():
        p = Path(name)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
    outside_after = _outside_state()
    if (
        outside_after != outside_before
        or outside_after[VICTIM] != hashlib.sha256(VICTIM_BYTES).hexdigest()
    ):
        findings.append("outside_changed")
        extra.append(f"files outside the scratch directory changed: {sorted(outside_after)}")
    if case.unsafe and "--verify" in case.args and rc == 0:
        findings.append("unsafe_ran")
        extra.append(f"--verify ran a program with {case.detail}")
    if elapsed > slow_seconds(case):
        findings.append("slow")
    if growth > MEMORY_SLACK + case.size:
        findings.append("memory")
        extra.append(f"peak RSS grew by {growth / 2**20:.0f} MiB for a {case.size} B input")
    findings = list(dict.fromkeys(findings))
    outcome = Outcome(
        case.index,
        case.fmt,
        case.strategy,
        case.seed,
        case.detail,
        [_normalize(a, case_dir) for a in argv],
        case.size,
        rc,
        elapsed,
        growth,
        maxrss_after,
        message,
        findings,
        notes,
        "; ".join(extra),
    )
    if findings and save_dir is not None:
        save_finding(case, outcome, save_dir, case_dir, io_)
    shutil.rmtree(case_dir, ignore_errors=True)
    return outcome


def _finding_dir(save_dir: Path, case: Case, findings: list[str]) -> Path:
    return save_dir / f"{case.index:05d}-{case.fmt}-{case.strategy}-{'+'.join(findings)}"


def save_finding(
    case: Case,
    outcome: Outcome | None,
    save_dir: Path,
    case_dir: Path | None = None,
    io_: dict[str, str] | None = None,
    findings: list[str] | None = None,
    note: str = "",
) -> Path:
    """Keep a finding's input (rebuilt from the case, with links) and how to reproduce it."""
    findings = findings or (outcome.findings if outcome else ["unknown"])
    target = _finding_dir(save_dir, case, findings)
    shutil.rmtree(target, ignore_errors=True)
    (target / "in").mkdir(parents=True)
    (target / "out").mkdir()
    materialize(case, target / "in")
    if case_dir is not None and (case_dir / "out").exists():
        for p in (case_dir / "out").iterdir():
            if p.is_file() and p.stat().st_size <= 2**20:  # large outputs are the problem
                shutil.copy2(p, target / "out" / p.name)
    out_name = f"out/folded.{case.fmt}"
    if case.output:
        out_name = f"in/{case.output}"
    cmd = ["bnfold", f"in/{case.main}"] + (["-o", out_name] if case.write_output else [])
    cmd += case.args
    lines = [
        f"# {' '.join(findings)}: input {case.index}, seed model {case.seed}, "
        f"strategy {case.strategy}",
        f"# mutation: {case.detail}",
        f"cd {target} && rm -rf out/* && {' '.join(cmd)}",
    ]
    if outcome is not None:
        lines += [
            f"# exit {outcome.rc} in {outcome.elapsed:.2f} s, peak RSS +"
            f"{outcome.rss_growth / 2**20:.0f} MiB",
            f"# {outcome.extra}",
        ]
    if note:
        lines.append(f"# {note}")
    if io_ is not None:
        lines += ["", "--- stderr", io_["stderr"], "--- stdout", io_["stdout"]]
    (target / "repro.txt").write_text("\n".join(lines) + "\n")
    return target


# =============================================================================================
# Workers


def _limit_memory(extra_bytes: int) -> None:
    """Cap the address space at what the process has plus ``extra_bytes``, so that a runaway
    allocation fails (a finding) instead of exhausting the machine."""
    size = (_status_kib("VmSize") or 0) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _one_thread() -> None:
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(k, "1")
    import torch

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


def warm_up(corpus: list[Seed], root: Path) -> list[str]:
    """Run every seed once (importing and initializing everything, so that first-use costs
    are not charged to a fuzzed input); the seeds that do not fold cleanly."""
    bad = []
    for i, s in enumerate(corpus):
        case = Case(-1 - i, s.fmt, "seed", s.name, s.main, dict(s.files), args=["--verify"])
        outcome = run_case(case, root)
        if outcome.rc == 0 and set(outcome.findings) <= {"slow", "memory"}:
            outcome = run_case(case, root)  # the first of a format imports its framework
        if outcome.rc != 0 or outcome.findings:
            bad.append(f"{s.name}: exit {outcome.rc} {outcome.findings} {outcome.message}")
    return bad


def worker_main(args: argparse.Namespace) -> int:
    state = Path(args.state)
    with open(args.corpus, "rb") as f:
        corpus = [Seed(**d) for d in pickle.load(f)]
    _one_thread()
    import bnfold.cli  # noqa: F401 - imports are not charged to the first input

    root = Path(tempfile.mkdtemp(prefix="w-", dir=state))
    scratch = root / "cwd"
    scratch.mkdir()
    os.chdir(scratch)
    bad = warm_up(corpus, root) if args.warm_up else []
    if bad:
        (state / "bad_seeds.txt").write_text("\n".join(bad) + "\n")
    _limit_memory(int(args.mem_limit_gb * 2**30))
    save_dir = Path(args.save_dir)
    with open(state / "results.jsonl", "a") as results:
        for index in range(args.start, args.end):
            (state / "current").write_text(f"{index} {time.time()}")
            if index == args.self_test_crash:
                os.abort()  # checks that the parent records a native crash
            case = make_case(corpus, args.seed, index)
            outcome = run_case(case, root, save_dir)
            results.write(outcome.to_json() + "\n")
            results.flush()
    (state / "current").write_text("done")
    shutil.rmtree(root, ignore_errors=True)
    return 0


@dataclass
class _Worker:
    proc: subprocess.Popen
    state: Path
    start: int
    end: int


def _spawn(
    work: Path, n: int, start: int, end: int, args: argparse.Namespace, corpus_path: Path
) -> _Worker:
    state = work / f"worker{n}"
    state.mkdir()
    cmd = [
        sys.executable,
        os.fspath(HERE),
        "--worker",
        "--state",
        os.fspath(state),
        "--corpus",
        os.fspath(corpus_path),
        "--seed",
        str(args.seed),
        "--start",
        str(start),
        "--end",
        str(end),
        "--save-dir",
        args.save_dir,
        "--mem-limit-gb",
        str(args.mem_limit_gb),
        "--self-test-crash",
        str(args.self_test_crash),
        "--formats",
        args.formats,
        "--warm-up",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    log = open(state / "log.txt", "wb")  # noqa: SIM115 - closed with the worker
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    log.close()
    return _Worker(proc, state, start, end)


def _read_results(state: Path) -> list[Outcome]:
    path = state / "results.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(Outcome(**json.loads(line)))
    return out


def _crash_summary(log: str) -> str:
    """The fatal error and the innermost frames of faulthandler's report in a worker's log."""
    lines = log.strip().splitlines()
    start = max((i for i, x in enumerate(lines) if "Fatal Python error" in x), default=0)
    fatal = lines[start : start + 1]
    frames = [x.strip() for x in lines[start:] if x.strip().startswith("File ")][:4]
    return " | ".join(fatal + frames)[:600]


def run_fuzz(args: argparse.Namespace) -> int:
    """The script: corpus, workers, summary."""
    started = time.perf_counter()
    save_dir = Path(args.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bnfold-fuzz-"))
    print(f"building the seed corpus (seed {args.seed}) ...", flush=True)
    corpus = build_corpus(args.seed)
    corpus_path = work / "corpus.pkl"
    corpus_path.write_bytes(pickle.dumps([asdict(s) for s in corpus]))
    print(
        f"{len(corpus)} seeds: "
        + ", ".join(f"{s.name} ({s.fmt}, {sum(map(len, s.files.values()))} B)" for s in corpus),
        flush=True,
    )
    pending: list[tuple[int, int]] = [
        (i, min(i + args.batch, args.inputs)) for i in range(0, args.inputs, args.batch)
    ]
    outcomes: list[Outcome] = []
    crashes: list[Outcome] = []
    bad_seeds: list[str] = []
    active: list[_Worker] = []
    spawned = 0
    last_report = time.perf_counter()
    while pending or active:
        while pending and len(active) < args.jobs:
            start, end = pending.pop(0)
            active.append(_spawn(work, spawned, start, end, args, corpus_path))
            spawned += 1
        time.sleep(0.2)
        for w in list(active):
            current = (w.state / "current").read_text() if (w.state / "current").exists() else ""
            hung = False
            if w.proc.poll() is None:
                parts = current.split()
                if len(parts) == 2 and time.time() - float(parts[1]) > args.hang_timeout:
                    os.killpg(w.proc.pid, 9)
                    w.proc.wait()
                    hung = True
                else:
                    continue
            active.remove(w)
            results = _read_results(w.state)
            outcomes.extend(results)
            if (w.state / "bad_seeds.txt").exists():
                bad_seeds.extend((w.state / "bad_seeds.txt").read_text().splitlines())
            done = {o.index for o in results}
            if current.strip() == "done" and w.proc.returncode == 0:
                continue
            parts = current.split()
            index = int(parts[0]) if parts and parts[0].lstrip("-").isdigit() else None
            log = (w.state / "log.txt").read_bytes().decode("utf-8", "replace")
            if index is None or index in done:  # died outside an input (start-up?)
                print(f"worker died outside an input (exit {w.proc.returncode}):\n{log[-3000:]}")
                index = (max(done) + 1) if done else w.start
                if index >= w.end:
                    continue
                if not results:  # no progress at all: do not loop forever
                    raise SystemExit(f"worker cannot start:\n{log[-3000:]}")
                pending.insert(0, (index, w.end))
                continue
            kind = "hang" if hung else "native_crash"
            case = make_case(corpus, args.seed, index)
            tail = _crash_summary(log)
            crash = Outcome(
                index,
                case.fmt,
                case.strategy,
                case.seed,
                case.detail,
                case.args,
                case.size,
                -9 if hung else w.proc.returncode,
                0.0,
                0,
                0,
                "",
                [kind],
                [],
                f"worker {'killed after ' + str(args.hang_timeout) + ' s' if hung else 'died'}"
                f" (status {w.proc.returncode}): {tail}",
            )
            crashes.append(crash)
            save_finding(case, crash, save_dir)
            (_finding_dir(save_dir, case, crash.findings) / "worker-log.txt").write_text(log)
            if index + 1 < w.end:
                pending.insert(0, (index + 1, w.end))
        if time.perf_counter() - last_report > 30:
            last_report = time.perf_counter()
            n_done = len(outcomes) + sum(len(_read_results(w.state)) for w in active)
            print(
                f"  {n_done} / {args.inputs} inputs, {time.perf_counter() - started:.0f} s",
                flush=True,
            )
    elapsed = time.perf_counter() - started
    all_outcomes = sorted(outcomes + crashes, key=lambda o: o.index)
    print(summarize(all_outcomes, elapsed, bad_seeds, save_dir))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if any(o.findings for o in all_outcomes) or bad_seeds else 0


# =============================================================================================
# Summary


def _message_key(message: str) -> str:
    text = message.removeprefix("bnfold: error: ")
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r"\d+", "N", text)
    return text[:60]


def summarize(
    outcomes: list[Outcome], elapsed: float, bad_seeds: list[str], save_dir: Path | None
) -> str:
    lines = []
    by = defaultdict(list)
    for o in outcomes:
        by[(o.fmt, o.strategy)].append(o)
    head = (
        f"{'format':9} {'strategy':18} {'inputs':>6} {'exit0':>6} {'exit1':>6} {'other':>5} "
        f"{'finds':>5} {'max s':>6} {'max MiB':>7}"
    )
    lines += ["", head, "-" * len(head)]
    for (fmt, strategy), os_ in sorted(by.items()):
        lines.append(
            f"{fmt:9} {strategy:18} {len(os_):6} {sum(o.rc == 0 for o in os_):6} "
            f"{sum(o.rc == 1 for o in os_):6} {sum(o.rc not in (0, 1) for o in os_):5} "
            f"{sum(bool(o.findings) for o in os_):5} {max(o.elapsed for o in os_):6.2f} "
            f"{max(o.rss_growth for o in os_) / 2**20:7.0f}"
        )
    lines.append("-" * len(head))
    for fmt in STRATEGIES:
        os_ = [o for o in outcomes if o.fmt == fmt]
        if os_:
            lines.append(
                f"{fmt:9} {'all':18} {len(os_):6} {sum(o.rc == 0 for o in os_):6} "
                f"{sum(o.rc == 1 for o in os_):6} {sum(o.rc not in (0, 1) for o in os_):5} "
                f"{sum(bool(o.findings) for o in os_):5} {max(o.elapsed for o in os_):6.2f} "
                f"{max(o.rss_growth for o in os_) / 2**20:7.0f}"
            )
    n = len(outcomes)
    total_time = sum(o.elapsed for o in outcomes)
    peak = max((o.maxrss for o in outcomes), default=0)
    lines += [
        "",
        f"{n} inputs in {elapsed:.0f} s wall ({total_time:.0f} s inside bnfold.cli.main, "
        f"{total_time / max(n, 1) * 1000:.0f} ms per input); peak RSS of a worker "
        f"{peak / 2**20:.0f} MiB; options: "
        f"--verify {sum('--verify' in o.argv for o in outcomes)}, "
        f"--report {sum('--report' in o.argv for o in outcomes)}, "
        f"no -o {sum('-o' not in o.argv for o in outcomes)}",
        "",
        "findings:",
    ]
    counts = Counter(f for o in outcomes for f in o.findings)
    for f in FINDINGS:
        lines.append(f"  {f:14} {counts.get(f, 0)}")
    notes = Counter(x for o in outcomes for x in o.notes)
    for x, c in notes.items():
        lines.append(f"  (note) {x}: {c}")
    if bad_seeds:
        lines.append("  seeds that did not fold cleanly: " + "; ".join(bad_seeds))
    slow = sorted(outcomes, key=lambda o: -o.elapsed)[:5]
    lines += ["", "slowest inputs:"]
    for o in slow:
        lines.append(
            f"  {o.elapsed:6.2f} s  #{o.index} {o.fmt}/{o.strategy} ({o.seed}): {o.detail[:70]}"
        )
    big = sorted(outcomes, key=lambda o: -o.rss_growth)[:5]
    lines += ["", "largest peak RSS growth:"]
    for o in big:
        lines.append(
            f"  {o.rss_growth / 2**20:6.0f} MiB #{o.index} {o.fmt}/{o.strategy} "
            f"({o.size} B input): {o.detail[:70]}"
        )
    messages = Counter(_message_key(o.message) for o in outcomes if o.rc == 1)
    lines += ["", "top error messages (exit 1):"]
    for msg, c in messages.most_common(25):
        lines.append(f"  {c:5}  {msg}")
    success_noise = Counter(o.message[:80] for o in outcomes if "stderr_on_success" in o.notes)
    if success_noise:
        lines += ["", "stderr on success:"]
        for msg, c in success_noise.most_common(5):
            lines.append(f"  {c:5}  {msg}")
    found = [o for o in outcomes if o.findings]
    if found:
        groups: dict[tuple, list[Outcome]] = defaultdict(list)
        for o in found:
            key = "+".join(o.findings)
            groups[(key, o.fmt, o.strategy, _message_key(o.message)[:40])].append(o)
        lines += [
            "",
            f"{len(found)} findings in {len(groups)} groups"
            + (f" (inputs in {save_dir})" if save_dir else "")
            + "; count, first input, what it did:",
        ]
        for (key, fmt, strategy, _), os_ in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            o = os_[0]
            lines.append(
                f"  {len(os_):4} x {key} {fmt}/{strategy}, e.g. #{o.index} ({o.seed}) exit {o.rc} "
                f"{o.elapsed:.1f}s: {o.detail[:70]} -> {o.message[:110]} {o.extra[:160]}"
            )
    return "\n".join(lines)


# =============================================================================================
# In-process runs (the pytest test)


@contextlib.contextmanager
def memory_limit(extra_bytes: int) -> Iterator[None]:
    """Cap this process's address space at its current size plus ``extra_bytes`` for a while."""
    previous = resource.getrlimit(resource.RLIMIT_AS)
    _limit_memory(extra_bytes)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, previous)


def run_in_process(
    corpus: list[Seed],
    seed: int,
    indices: range,
    root: Path,
    save_dir: Path | None = None,
    memory: int = 3 * 2**30,
) -> list[Outcome]:
    """Run inputs in this process (no protection from native crashes), in a scratch working
    directory and with the address space capped ``memory`` bytes above its current size."""
    cwd = os.getcwd()
    scratch = Path(tempfile.mkdtemp(prefix="cwd-", dir=root))
    os.chdir(scratch)
    try:
        with memory_limit(memory):
            return [run_case(make_case(corpus, seed, i), root, save_dir) for i in indices]
    finally:
        os.chdir(cwd)
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    global FORMATS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--save-dir", default=DEFAULT_SAVE_DIR)
    p.add_argument("--batch", type=int, default=1000, help="inputs per worker process")
    p.add_argument("--hang-timeout", type=float, default=120.0)
    p.add_argument(
        "--mem-limit-gb",
        type=float,
        default=4.0,
        help="address space a worker may add beyond its start-up size",
    )
    p.add_argument(
        "--formats",
        default=",".join(FORMATS),
        help=f"the formats fuzzed, comma-separated (default {','.join(FORMATS)})",
    )
    p.add_argument("--self-test-crash", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--warm-up", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--state", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--end", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    FORMATS = tuple(f for f in args.formats.split(",") if f)
    unknown = set(FORMATS) - set(FORMAT_SHARES)
    if unknown or not FORMATS:
        p.error(f"--formats: choose among {', '.join(FORMAT_SHARES)}")
    if args.worker:
        return worker_main(args)
    return run_fuzz(args)


if __name__ == "__main__":
    sys.path.insert(0, os.fspath(HERE.parents[2]))
    sys.exit(main())
