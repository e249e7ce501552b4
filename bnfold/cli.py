"""The ``bnfold`` command line.

``bnfold demo`` folds the built-in example network. Later frontends add model files
(``bnfold IN -o OUT``) to the same entry point. Errors print one line to stderr and return a
non-zero status; :func:`main` never lets an exception escape.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .errors import BnfoldError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and returns instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def _whole(text: str, low: int, high: int | None, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
    return value


def _positive(text: str) -> int:
    return _whole(text, 1, None, "a positive whole number")


def _seed(text: str) -> int:
    return _whole(text, 0, 2**63 - 1, "a whole number from 0 to 2**63 - 1")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bnfold",
        description="Fold BatchNorm into the neighbouring Conv, ConvTranspose and Linear layers.",
    )
    p.add_argument("--version", action="version", version=f"bnfold {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="fold the built-in example CNN and report what happened")
    demo.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--batch", type=_positive, default=8, help="batch size for timing (default 8)"
    )
    demo.add_argument(
        "--size", type=_positive, default=64, help="input height and width (default 64)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        print(f"bnfold: error: {e} (see 'bnfold --help')", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help and --version
        return int(e.code or 0)
    try:
        if args.command == "demo":
            from . import demo

            return demo.run(sys.stdout, seed=args.seed, batch=args.batch, size=args.size)
        parser.print_usage(sys.stderr)
        return EXIT_USAGE
    except BnfoldError as e:
        print(f"bnfold: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("bnfold: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI promises one line, never a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"bnfold: internal error: {type(e).__name__}: {first}", file=sys.stderr)
        return EXIT_INTERNAL
