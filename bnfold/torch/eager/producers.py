"""PyTorch producer layers: which modules a BatchNorm can be folded into, and how.

A producer is a Conv, ConvTranspose or Linear module (subclasses included) whose forward is
torch's own; this module says what kind it is, where its weight keeps the output channels, and
why its forward or parameters might not be what they seem.
"""

from __future__ import annotations

from torch import nn

from ...core.algebra import CONV, LINEAR, OutputLayout, conv_transpose_layout
from ...torch.eager.batchnorm import defining_class, forward_changed_reason, is_torch_class


def producer_kind(m: nn.Module) -> str | None:
    """``"conv"``, ``"conv_transpose"``, ``"linear"`` or ``None`` for other modules."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return "conv_transpose" if m.transposed else "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    return None


# The methods through which a producer's forward computes its output.
_FORWARD_METHODS = ("forward", "_conv_forward", "_output_padding")


def custom_forward_reason(m: nn.Module) -> str:
    """Why ``m``'s forward may do more than its torch base class's, or ``""``."""
    for method in _FORWARD_METHODS:
        owner = defining_class(type(m), method)
        if owner is not None and not is_torch_class(owner):
            return (
                f"{type(m).__name__} overrides {method}(); bnfold cannot prove that folding "
                "keeps what it does"
            )
    return forward_changed_reason(m)


def params_not_constant(m: nn.Module) -> bool:
    """Whether ``m``'s own parameters are computed (parametrized) or not yet created (lazy)."""
    from torch.nn.parameter import UninitializedParameter
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(m):
        return True
    return any(isinstance(p, UninitializedParameter) for p in m.parameters(recurse=False))


def output_layout(m: nn.Module) -> OutputLayout:
    """Where producer ``m``'s weight keeps its output channels."""
    kind = producer_kind(m)
    if kind == "conv_transpose":
        return conv_transpose_layout(m.groups)
    return CONV if kind == "conv" else LINEAR
