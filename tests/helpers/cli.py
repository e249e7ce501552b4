"""What the command-line tests check about a directory and a refusal."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path


def listing(directory: Path) -> dict[str, tuple[int, str]]:
    """Every entry's type, and a regular file's content hash."""
    out = {}
    for p in sorted(Path(directory).iterdir()):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
        out[p.name] = (stat.S_IFMT(st.st_mode), digest)
    return out


def refused_before_any_work(capsys, *words: str) -> str:
    """The run printed one error line naming ``words`` and nothing else: it stopped before
    folding (a fold prints its summary on stdout)."""
    captured = capsys.readouterr()
    assert captured.err.startswith("bnfold: error:") and captured.err.count("\n") == 1
    assert captured.out == "", "the output was checked after the fold"
    for word in words:
        assert word in captured.err, captured.err
    return captured.err
