"""FoldReport: one entry per BatchNorm or affine chain, folded into what or kept and why."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal

Action = Literal["folded", "skipped"]
# What an entry is about: a BatchNorm (an op, a module, or arithmetic that scales channel by
# channel as one does), or a chain of plain per-channel arithmetic (``Mul``/``Add``/... by
# constants) after a layer, which converters leave behind.
Kind = Literal["batchnorm", "affine"]


@dataclass(frozen=True)
class FoldEntry:
    """The outcome for one BatchNorm.

    ``bn`` and ``target`` are names in the model (module paths or node names); ``target`` is the
    layer the BatchNorm was folded into (or would have been), ``None`` when there is none.
    ``rule`` names the legality rule that failed (see :mod:`bnfold.core.rules`), ``reason`` says why
    in words; both are empty for a fold. ``note`` says how a fold was done when there is more
    than one way (a pt2e QAT chain: exactly after the dequantize, or into the conv's bias).
    ``kind`` is ``"batchnorm"`` or ``"affine"``: an affine entry is a chain of elementwise ops
    by constants (``bn`` names its nodes, ``bn_type`` their op types) folded into ``target``.
    """

    bn: str
    target: str | None
    action: Action
    reason: str = ""
    rule: str | None = None
    bn_type: str = ""
    target_type: str = ""
    note: str = ""
    kind: Kind = "batchnorm"

    @property
    def folded(self) -> bool:
        return self.action == "folded"


@dataclass
class FoldReport:
    """What a fold did (or ``analyze`` would do) to every BatchNorm of a model.

    Iterate it for the entries; ``str(report)`` is a table for people, ``to_list()`` plain data.
    """

    entries: list[FoldEntry] = field(default_factory=list)
    model: str = ""
    notes: list[str] = field(default_factory=list)  # caveats that apply to the whole model

    def __iter__(self) -> Iterator[FoldEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def folded(self) -> list[FoldEntry]:
        return [e for e in self.entries if e.folded]

    @property
    def skipped(self) -> list[FoldEntry]:
        return [e for e in self.entries if not e.folded]

    @property
    def batch_norms(self) -> list[FoldEntry]:
        """The BatchNorm entries (folded and kept)."""
        return [e for e in self.entries if e.kind == "batchnorm"]

    @property
    def affines(self) -> list[FoldEntry]:
        """The affine-chain entries (folded and kept)."""
        return [e for e in self.entries if e.kind == "affine"]

    def entry(self, bn: str) -> FoldEntry:
        """The entry of the BatchNorm (or affine chain) named ``bn``."""
        for e in self.entries:
            if e.bn == bn:
                return e
        raise KeyError(f"no BatchNorm named {bn!r} in this report")

    def to_list(self) -> list[dict]:
        """The entries as plain dictionaries (for JSON)."""
        return [asdict(e) for e in self.entries]

    def summary(self) -> str:
        bns = self.batch_norms
        n = len(bns)
        plural = "s" if n != 1 else ""
        folded = sum(e.folded for e in bns)
        text = f"{folded} of {n} BatchNorm{plural} folded, {n - folded} kept"
        affines = self.affines
        if affines:
            m = len(affines)
            done = sum(e.folded for e in affines)
            text += f"; {done} of {m} affine chain{'s' if m != 1 else ''} folded"
        return text

    def __str__(self) -> str:
        head = (
            "BatchNorm / affine chain" if self.affines else "BatchNorm",
            "type",
            "action",
            "into / reason",
        )
        rows = []
        for e in self.entries:
            what = f"{e.target} ({e.target_type})" if e.folded else f"[{e.rule}] {e.reason}"
            if e.folded and e.note:
                what += f": {e.note}"
            rows.append(tuple(map(_printable, (e.bn, e.bn_type, e.action, what))))
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head[:3])]
        lines = []
        model = f" for {_printable(self.model)}" if self.model else ""
        title = f"bnfold report{model}: {self.summary()}"
        lines.append(title)
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        lines.append(fmt.format(*head))
        lines.append(fmt.format(*("-" * w for w in widths), "-" * len(head[3])))
        for r in rows:
            lines.append(fmt.format(*r))
        lines.extend(f"note: {_printable(n)}" for n in self.notes)
        return "\n".join(lines)


def _printable(text: object) -> str:
    """``text`` with control characters escaped: names come from model files, and a newline or
    a terminal escape in one must not break the table or reach the terminal."""
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text)
    )
