"""Per-channel affine chains: the elementwise arithmetic a BatchNorm decomposes into.

Exporters do not always leave a BatchNorm op. JAX writes ``(x - mean) * (scale *
rsqrt(var + eps)) + bias`` as separate ops, after a convolution's own bias ``add``; pt2e QAT
graphs divide by and multiply with a scale factor; converters leave ``Mul``/``Add`` pairs. Each
op of such a tail computes ``z <op> a`` (or ``a <op> z``) from the value ``z`` flowing down the
chain and a constant ``a`` that is a scalar or varies along one axis only, the channel axis. The
whole tail is then one per-channel affine map ``y = k*z + c``, which folds into the producer
like a BatchNorm's ``s`` and ``t``.

This module holds what is the same for every graph form:

- :class:`Link` and :func:`chains`: a graph adapter describes each elementwise op that reads
  a chain value and a per-channel or scalar operand (whether that operand is constant or not is
  a fact for the rules, not for the chain); :func:`chains` groups them, in program order, into
  maximal chains along one axis, each value between two links read by the next link only;
- :class:`Step` and :func:`compose`: the numbers of each link (float64, one value per channel
  or one for all) composed into ``(k, c)``, refusing what is not a finite affine map.

No framework is imported here: adapters read their IR and constants and hand over numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..errors import FoldRefused

# What a link computes from the chain value z and its operand a:
#   add: z + a      sub: z - a (a - z when the chain is second)      mul: z * a
#   div: z / a (a / z is not affine, so it is never a link)          neg: -z
#   affine: s*z + t, a = (s, t) (an inference BatchNorm op, read as its factors)
#   widen: z itself, converted to a wider floating-point type (exact: every value is kept)
LinkOp = Literal["add", "sub", "mul", "div", "neg", "affine", "widen"]
LINK_OPS: tuple[str, ...] = ("add", "sub", "mul", "div", "neg", "affine", "widen")


@dataclass(frozen=True)
class Link:
    """One elementwise op of a chain, as an adapter describes it.

    ``input`` is the chain value it reads and ``output`` what it computes (values of the
    adapter's IR); ``axis`` is the activation axis along which its operand varies, ``None``
    when the operand is one number for every element (it then fits a chain along any axis).
    ``operand`` is the adapter's handle for the operand, read later by :meth:`Step`-making
    code of the adapter.
    """

    node: Any
    input: Any
    output: Any
    op: LinkOp
    axis: int | None = None
    chain_first: bool = True
    operand: Any = None

    @property
    def scales(self) -> bool:
        """Whether this link scales channel by channel (what makes a chain a BatchNorm)."""
        return self.op == "affine" or (self.op in ("mul", "div") and self.axis is not None)


@dataclass
class Chain:
    """Links in order, each reading the previous one's output, which nothing else reads."""

    links: list[Link] = field(default_factory=list)
    axis: int | None = None

    @property
    def input(self) -> Any:
        """The value the chain starts from (a producer's output, when it folds)."""
        return self.links[0].input

    @property
    def output(self) -> Any:
        """The value the chain computes: what its users read."""
        return self.links[-1].output

    @property
    def is_batch_norm(self) -> bool:
        """A chain that scales per channel, or holds a BatchNorm op: what the report counts as
        a BatchNorm. A bias ``add`` alone, or arithmetic by scalars, is not one."""
        return any(link.scales for link in self.links)

    def ops(self) -> str:
        """The link ops, for messages: ``"add, sub, mul, add"``."""
        return ", ".join(link.op for link in self.links)


def chains(
    links: Iterable[Link],
    users: Callable[[Any], int],
    key: Callable[[Any], Hashable] = lambda v: v,
) -> list[Chain]:
    """Group ``links`` (in program order) into maximal chains.

    A link continues the chain whose last output it reads when that output has no other user
    (``users(value)`` counts them) and the two agree on the axis; otherwise it starts a chain.
    """
    found: list[Chain] = []
    open_ends: dict[Hashable, Chain] = {}
    for link in links:
        chain = open_ends.pop(key(link.input), None)
        if (
            chain is None
            or users(link.input) != 1
            or (link.axis is not None and chain.axis is not None and link.axis != chain.axis)
        ):
            chain = Chain()
            found.append(chain)
        chain.links.append(link)
        if chain.axis is None:
            chain.axis = link.axis
        open_ends[key(link.output)] = chain
    return found


# --------------------------------------------------------------------------------------------
# The numbers


@dataclass(frozen=True)
class Step:
    """The numbers of one link: ``value`` is a float64 array of one value per channel or a
    single value (``(s, t)`` for ``affine``, nothing for ``neg``); ``where`` names the op in
    messages."""

    op: LinkOp
    value: Any = None
    chain_first: bool = True
    where: str = "an op of the chain"


def _per_channel(a: Any, n: int, where: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64).reshape(-1)
    if arr.size not in (1, n):
        raise FoldRefused(f"the operand of {where} has {arr.size} values for {n} channels")
    if not np.isfinite(arr).all():
        i = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise FoldRefused(f"the operand of {where} is not finite ({arr[i]} at index {i})")
    return np.broadcast_to(arr, (n,))


def compose(steps: Sequence[Step], channels: int) -> tuple[np.ndarray, np.ndarray]:
    """``(k, c)`` in float64 such that applying ``steps`` in order to ``z`` gives
    ``k*z + c``, channel by channel.

    Raises :class:`FoldRefused` for an operand that is not finite or has the wrong number of
    values, a division by zero, or a composed map that is not finite.
    """
    n = channels
    k, c = np.ones(n), np.zeros(n)
    with np.errstate(all="ignore"):
        for step in steps:
            if step.op == "neg":
                k, c = -k, -c
                continue
            if step.op == "widen":
                continue
            if step.op == "affine":
                s, t = step.value
                s = _per_channel(s, n, step.where)
                t = _per_channel(t, n, step.where)
                k, c = k * s, c * s + t
                continue
            a = _per_channel(step.value, n, step.where)
            if step.op == "add":
                c = c + a
            elif step.op == "sub":
                k, c = (k, c - a) if step.chain_first else (-k, a - c)
            elif step.op == "mul":
                k, c = k * a, c * a
            elif step.op == "div":
                if not step.chain_first:
                    raise FoldRefused(f"{step.where} divides by the chain: not an affine map")
                if (a == 0).any():
                    i = int(np.flatnonzero(a == 0)[0])
                    raise FoldRefused(
                        f"{step.where} divides by 0 at channel {i}: the output is not finite there"
                    )
                k, c = k / a, c / a
            else:
                raise ValueError(f"unknown link op {step.op!r}")
    for name, v in (("scale", k), ("shift", c)):
        if not np.isfinite(v).all():
            i = int(np.flatnonzero(~np.isfinite(v))[0])
            raise FoldRefused(f"the chain's composed {name} is not finite at channel {i}")
    return k, c


__all__ = ["LINK_OPS", "Chain", "Link", "LinkOp", "Step", "chains", "compose"]
