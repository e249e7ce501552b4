"""The PyTorch frontends: eager modules, ATen graphs (torch.export programs), .pt2 files, and
torch.compile (a dynamo backend and an Inductor pre-grad pass).

The torch.compile names are imported on first use, so that ``import bnfold.torch`` does not
import dynamo and Inductor.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "Backend": "compile",
    "compile_backend": "compile",
    "last_reports": "compile",
    "FoldPass": "inductor",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfold.torch' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = list(_LAZY)
