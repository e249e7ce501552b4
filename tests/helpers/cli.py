"""What the command-line tests check about a directory and an error: a listing of every entry,
and one line on stderr (before any work, when nothing may be on stdout either)."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path


def listing(directory: Path, recursive: bool = False) -> dict[str, tuple[int, str]]:
    """Every entry (hidden ones too; under subdirectories when ``recursive``) by its path
    relative to ``directory``: its type, and a regular file's content hash. Two listings are
    equal when nothing was added, removed, replaced or changed."""
    directory = Path(directory)
    out = {}
    for p in sorted(directory.rglob("*") if recursive else directory.iterdir()):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
        out[p.relative_to(directory).as_posix()] = (stat.S_IFMT(st.st_mode), digest)
    return out


def _check_one_line(err: str, words: tuple[str, ...]) -> str:
    assert err.startswith("bnfold: error:"), err
    assert err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    return err


def one_line_error(capsys, *words: str) -> str:
    """The run printed one error line on stderr, naming ``words``."""
    return _check_one_line(capsys.readouterr().err, words)


def refused_before_any_work(capsys, *words: str) -> str:
    """The run printed one error line naming ``words`` and nothing else: it stopped before
    folding (a fold prints its summary on stdout)."""
    captured = capsys.readouterr()
    assert captured.out == "", "the output was checked after the fold"
    return _check_one_line(captured.err, words)
