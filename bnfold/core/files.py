"""Model files: which frontend reads a file, and writing results atomically.

A result is written to a temporary file in the target directory, flushed to disk and renamed
over the target, so a failure at any point leaves no partial file and the input is never
touched unless the output names it.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ModelFileError

_ZIP_MAGIC = b"PK\x03\x04"
# An ONNX file is a ModelProto whose first field is ir_version (field 1, varint): byte 0x08.
_ONNX_FIRST_BYTE = b"\x08"


def model_format(path: str | os.PathLike[str]) -> str:
    """The format of the model file at ``path``: ``"pt2"`` (a torch.export archive) or
    ``"onnx"``.

    Raises :class:`ModelFileError` for a missing or unreadable file, or one of a kind bnfold
    does not read.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise ModelFileError(f"{p}: no such file") from None
    except OSError as e:  # a name too long, a loop of links, no permission
        raise ModelFileError(f"cannot read {p}: {e.strerror or e}") from e
    if stat.S_ISDIR(mode):
        raise ModelFileError(f"{p} is a directory, not a model file")
    if not stat.S_ISREG(mode):  # a pipe or device would block or never end
        raise ModelFileError(f"{p} is not a regular file")
    try:
        with p.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelFileError(f"cannot read {p}: {e.strerror or e}") from e
    suffix = p.suffix.lower()
    if suffix == ".pt2" or (suffix != ".onnx" and head == _ZIP_MAGIC):
        return "pt2"
    if suffix == ".onnx" or head[:1] == _ONNX_FIRST_BYTE:
        return "onnx"
    raise ModelFileError(
        f"{p} is not a model file bnfold reads: expected an ONNX model (.onnx) or a "
        "torch.export archive (.pt2)"
    )


_SUFFIX_FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
_FORMAT_NAMES = {"onnx": "an ONNX model (.onnx)", "pt2": "a torch.export archive (.pt2)"}


def _kind_of(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def check_replaceable(path: Path, what: str = "") -> None:
    """Refuse to write ``path`` when something other than a regular file is there (after
    following symbolic links): the result is renamed over it, so a device such as /dev/null
    or a named pipe would be replaced by a regular file. Nothing there is fine."""
    label = f"{path} ({what})" if what else str(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return  # a new file, or a symbolic link to one
    except OSError as e:  # a loop of links, no permission
        raise ModelFileError(f"cannot write {label}: {e.strerror or e}") from e
    if stat.S_ISDIR(mode):
        raise ModelFileError(f"cannot write {label}: it is a directory")
    if not stat.S_ISREG(mode):
        raise ModelFileError(
            f"cannot write {label}: it is {_kind_of(mode)}, not a regular file, and bnfold "
            "writes its result by renaming a new file over the old one; name a regular file "
            "or a new one"
        )


def output_target(path: str | os.PathLike[str]) -> Path:
    """Where writing ``path`` puts the file (a symbolic link is followed, as ``cp`` does);
    :class:`ModelFileError` if it cannot be a file there, or if something other than a regular
    file is there (:func:`check_replaceable`). Checked before any work is done."""
    text = os.fspath(path)
    if text.endswith(("/", os.sep)):
        raise ModelFileError(f"cannot write {text}: a file name is needed, not a directory")
    try:
        target = Path(os.path.realpath(text)) if os.path.islink(text) else Path(text)
        directory = target.parent if str(target.parent) else Path(".")
        directory.stat()
    except FileNotFoundError:
        raise ModelFileError(
            f"cannot write {text}: directory {Path(text).parent} does not exist"
        ) from None
    except OSError as e:  # a name too long, a loop of links, no permission
        raise ModelFileError(f"cannot write {text}: {e.strerror or e}") from e
    if not directory.is_dir():
        raise ModelFileError(f"cannot write {target}: {directory} is not a directory")
    check_replaceable(target)
    return target


def check_output(path: str | os.PathLike[str], fmt: str) -> Path:
    """:func:`output_target` for a result in format ``fmt`` (``"onnx"`` or ``"pt2"``), also
    refusing a name whose suffix (``.onnx``, ``.pt2``; the link's and its target's) says the
    other format. A name without either suffix is fine."""
    target = output_target(path)
    for name in dict.fromkeys((Path(os.fspath(path)).name, target.name)):
        suffix = Path(name).suffix.lower()
        named = _SUFFIX_FORMATS.get(suffix)
        if named is not None and named != fmt:
            wanted = next(s for s, f in _SUFFIX_FORMATS.items() if f == fmt)
            raise ModelFileError(
                f"cannot write {os.fspath(path)}: {name} is named like {_FORMAT_NAMES[named]}, "
                f"but the result is {_FORMAT_NAMES[fmt]}, the input's format; give the output "
                f"the suffix {wanted} (bnfold does not convert between formats)"
            )
    return target


def temp_prefix(target: Path) -> str:
    """The prefix of a temporary file written beside ``target``: its name, shortened so that
    the temporary name still fits the file system's limit (255 bytes)."""
    return f".{target.name[:64]}."


def result_permissions(path: str | os.PathLike[str], target: Path) -> None:
    """Give the written file ``path`` the permissions of the file it replaces (as ``cp``
    does: a private output stays private), or normal ones (0o666 less the umask)."""
    try:
        mode = os.stat(target).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask  # temporary files are made private; a new result is normal
    os.chmod(path, mode)


class _HeldBackErrors(io.RawIOBase):
    """A binary file whose write failures are held back until the writer is done.

    torch's zip writer cannot survive a failed write: it loses the error (raising its own
    "unexpected pos" instead) and, destroyed half-written, aborts the process. So it is told
    every write succeeded; the first failure (a full disk, Ctrl-C) is raised when it returns.
    """

    def __init__(self, f: BinaryIO) -> None:
        super().__init__()
        self._f = f
        self._pos = f.tell()
        self.error: BaseException | None = None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos  # where the writer believes it is, even after a held-back failure

    def seek(self, offset: int, whence: int = 0) -> int:
        if self.error is None:
            try:
                self._pos = self._f.seek(offset, whence)
                return self._pos
            except BaseException as e:  # noqa: BLE001 - raised once the writer returns
                self.error = e
        self._pos = offset if whence == io.SEEK_SET else self._pos + offset
        return self._pos

    def write(self, data: Any) -> int:
        if self.error is None:
            try:
                self._f.write(data)
            except BaseException as e:  # noqa: BLE001 - raised once the writer returns
                self.error = e
        n = memoryview(data).nbytes
        self._pos += n
        return n

    def flush(self) -> None:
        if self.error is None:
            try:
                self._f.flush()
            except BaseException as e:  # noqa: BLE001 - raised once the writer returns
                self.error = e


def write_atomically(
    path: str | os.PathLike[str],
    write: Callable[[BinaryIO], None],
    hold_back_errors: bool = False,
) -> None:
    """Call ``write`` with a binary file, then put what it wrote at ``path`` in one step.

    With ``hold_back_errors`` a failing write does not interrupt ``write`` (for writers that
    cannot recover from one, such as torch's zip writer); the failure is raised after it."""
    target = output_target(path)
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".tmp", dir=directory)
    except OSError as e:
        raise ModelFileError(f"cannot write to {directory}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            if hold_back_errors:
                held = _HeldBackErrors(f)
                write(held)  # type: ignore[arg-type]
                if held.error is not None:
                    raise held.error
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        result_permissions(tmp, target)
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise ModelFileError(f"cannot write {target}: {e.strerror or e}") from e
        raise
