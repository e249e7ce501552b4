"""Model files: which file frontend reads a file, and writing results atomically.

A result is written to a temporary file in the target directory, flushed to disk and renamed
over the target, so a failure at any point leaves no partial file and the input is never
touched unless the output names it. A result of two files (a model and the data file it refers
to) is written the same way, through a temporary directory, and renamed into place data file
first; a failure between the two renames puts the old data file back
(:func:`write_pair_atomically`).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import BnfoldError, ModelFileError, first_line
from . import frontend


def model_format(path: str | os.PathLike[str]) -> str:
    """The format of the model file at ``path``, as its file frontend is registered
    (:mod:`bnfold.core.frontend`): ``"onnx"`` or ``"pt2"``. A registered suffix decides; a
    file named otherwise is recognised by its leading bytes.

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
            head = f.read(max(len(fr.magic) for fr in frontend.FILE_FRONTENDS))
    except OSError as e:
        raise ModelFileError(f"cannot read {p}: {e.strerror or e}") from e
    suffix = p.suffix.lower()
    registered = frontend.FILE_FRONTENDS
    named = next((fr for fr in registered if fr.suffix == suffix), None)
    if named is None:
        named = next((fr for fr in registered if head.startswith(fr.magic)), None)
    if named is not None:
        return named.format
    names = [fr.description for fr in registered]
    expected = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)
    raise ModelFileError(f"{p} is not a model file bnfold reads: expected {expected}")


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
    result = frontend.file_frontend(fmt)
    for name in dict.fromkeys((Path(os.fspath(path)).name, target.name)):
        suffix = Path(name).suffix.lower()
        named = next((fr for fr in frontend.FILE_FRONTENDS if fr.suffix == suffix), None)
        if named is not None and named is not result:
            raise ModelFileError(
                f"cannot write {os.fspath(path)}: {name} is named like {named.description}, "
                f"but the result is {result.description}, the input's format; give the output "
                f"the suffix {result.suffix} (bnfold does not convert between formats)"
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


def _finish(path: Path, target: Path) -> None:
    """Flush a written file to disk and give it the permissions ``target`` should have."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    result_permissions(path, target)


def _keep_previous(data: Path, tmp: Path) -> Path:
    """A name in ``tmp`` for the existing data file, so that a failure between the two renames
    can put it back: a hard link (the old file stays in place throughout), or, where the file
    system has none, the file itself moved there (put back on any failure)."""
    backup = tmp / ".previous"
    try:
        os.link(data, backup, follow_symlinks=False)
    except OSError:
        os.replace(data, backup)
    return backup


def write_pair_atomically(
    target: Path,
    data: Path,
    write: Callable[[Path], tuple[Path, Path]],
    before_replacing_data: Callable[[], None] | None = None,
) -> None:
    """Write a model ``target`` and the data file ``data`` it refers to, each in one step.

    ``write`` is called with a temporary directory beside ``target`` and writes both files
    there, returning where it put the model and the data file. Both are flushed to disk and
    given the permissions of the files they replace, then renamed into place, the data file
    first (the model refers to it); if the second rename fails, the old data file is put back,
    so the old model still reads its own. A data file left empty (nothing was large enough to go
    there) is not written, and a file already at ``data`` is left as it is.
    ``before_replacing_data`` is called just before the old data file is replaced (a reader of
    it can map it then). A failure at any point leaves no partial or temporary file and the
    targets as they were: :class:`ModelFileError` (a :class:`BnfoldError` from ``write`` as it
    is).
    """
    directory = target.parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".tmp", dir=directory))
    except OSError as e:
        raise ModelFileError(f"cannot write to {directory}: {e.strerror or e}") from e
    try:
        tmp_model, tmp_data = write(tmp)
        written = tmp_data.exists() and tmp_data.stat().st_size > 0
        for f, final in ((tmp_data, data), (tmp_model, target)):
            if f is tmp_model or written:
                _finish(f, final)
        if not written:
            os.replace(tmp_model, target)
            return
        if before_replacing_data is not None:
            before_replacing_data()
        existed = os.path.lexists(data)
        backup = _keep_previous(data, tmp) if existed else None
        try:
            os.replace(tmp_data, data)
            os.replace(tmp_model, target)
        except BaseException:
            # Undo the first rename: the old model (if any) needs the old data file.
            if backup is not None:
                os.replace(backup, data)
            elif not existed:
                with contextlib.suppress(OSError):
                    os.unlink(data)
            raise
    except BnfoldError:
        raise
    except OSError as e:
        raise ModelFileError(f"cannot write {target}: {e.strerror or e}") from e
    except Exception as e:
        raise ModelFileError(f"cannot write {target}: {type(e).__name__}: {first_line(e)}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
