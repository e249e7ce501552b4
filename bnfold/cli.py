"""The ``bnfold`` command line.

``bnfold MODEL -o OUT [--verify] [--report]`` folds a model file (an ONNX model, ``.onnx``; a
torch.export archive, ``.pt2``, pt2e-quantized ones included: ``--qat``; StableHLO text,
``.mlir``; a serialized ``jax.export`` program, ``.jaxexport``); ``bnfold demo``
folds the built-in example network. Errors print one line to stderr and return a non-zero
status; :func:`main` never lets an exception escape.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from . import __version__
from .core.report import FoldReport
from .core.rules import PRODUCER_KINDS, QAT_MODES
from .errors import BnfoldError, UnsupportedModelError, VerificationError, first_line

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


_DESCRIPTION = "Fold BatchNorm into the neighbouring Conv, ConvTranspose and Linear layers."
_EPILOG = "Run 'bnfold demo' to fold the built-in example network."


def _producers(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in PRODUCER_KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(
            f"must be a comma-separated list of {', '.join(PRODUCER_KINDS)}, not {text!r}"
        )
    return kinds


def _file_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bnfold",
        usage="bnfold MODEL [-o OUTPUT] [--verify] [--report] [--producers KINDS] [--no-affine] "
        "[--remove-initializer-inputs] [--qat {exact,bias}]\n"
        "       bnfold demo [--seed N] [--batch N] [--size N]",
        description=_DESCRIPTION,
        epilog=_EPILOG,
    )
    p.add_argument("--version", action="version", version=f"bnfold {__version__}")
    p.add_argument(
        "model",
        metavar="MODEL",
        help="model file: an ONNX model (.onnx, external data beside it is kept external), a "
        "torch.export archive (.pt2), StableHLO MLIR text (.mlir) or a serialized jax.export "
        "program (.jaxexport, the bytes of Exported.serialize())",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="OUTPUT",
        help="where to write the folded model, in the input's format: a new name or a regular "
        "file, never the input's data files (written atomically; without it nothing is "
        "written and bnfold only reports what it would fold)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="run the original and the folded model on random inputs (ONNX models in "
        "onnxruntime, StableHLO with XLA on the CPU) and fail, writing nothing, if they "
        "differ by more than the dtype's tolerance",
    )
    p.add_argument("--report", action="store_true", help="print one line per BatchNorm")
    p.add_argument(
        "--producers",
        type=_producers,
        metavar="KINDS",
        help="only fold into these layer kinds (comma-separated: conv, conv_transpose, linear; "
        "ONNX Gemm and MatMul are linear)",
    )
    p.add_argument(
        "--no-affine",
        dest="affine",
        action="store_false",
        help="leave plain per-channel arithmetic alone: by default, chains of Mul/Div by "
        "constants and Add/Sub of constants after a layer (as converters leave BatchNorm) are "
        "folded into it too, and reported as affine chains",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of --verify's inputs (default 0)")
    p.add_argument(
        "--remove-initializer-inputs",
        action="store_true",
        help="ONNX: initializers also listed as graph inputs are defaults a caller may override, "
        "so they are not folded; this removes them from the inputs first (as onnxruntime's "
        "remove_initializer_from_input.py does), making them constants",
    )
    p.add_argument(
        "--qat",
        choices=QAT_MODES,
        default=None,  # None: not given (the check of format-specific options tells them apart)
        help="torch.export archives: where the BatchNorm of a pt2e quantization-aware training "
        "chain (conv -> quantize -> dequantize -> div -> add -> batch_norm, as torchao's "
        "convert_pt2e leaves it) goes. exact (the default): one per-channel add after the "
        "dequantize, equal to the original up to float rounding; bias: into the conv's bias "
        "before the quantize where that provably moves outputs by at most about one "
        "quantization step, exact elsewhere (--report says which, and why)",
    )
    return p


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bnfold", description=_DESCRIPTION)
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


def _one_line(text: str) -> str:
    """``text`` on one line (a file name may hold a newline)."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


# Options of the file parser that only some formats take (their file frontends' ``options``):
# given (not None, not False), they are refused for other formats before any work.
_FORMAT_OPTIONS = ("remove_initializer_inputs", "qat")


def _fold_file(args: argparse.Namespace) -> int:
    """``bnfold MODEL -o OUTPUT``: load, fold, optionally verify, then write atomically, by the
    file frontend of the model's format (:mod:`bnfold.core.frontend`)."""
    from .core import files, frontend

    registered = frontend.file_frontend(files.model_format(args.model))
    if args.output is not None:
        files.check_output(args.output, registered.format)  # fail before the work, not after it
    for name in _FORMAT_OPTIONS:
        if getattr(args, name) not in (None, False) and name not in registered.options:
            takers = " and ".join(f.plural for f in frontend.FILE_FRONTENDS if name in f.options)
            flag = "--" + name.replace("_", "-")
            raise UnsupportedModelError(f"{flag} applies to {takers} only")
    job = frontend.file_module(registered).open_file(args.model)
    if args.output is not None:
        job.check_output(args.output)
    for line in job.prepare(**{name: getattr(args, name) for name in registered.options}):
        print(f"bnfold: {line}")
    start = time.perf_counter()
    report = job.fold(args.producers, affine=args.affine)
    _print_outcome(args, report, time.perf_counter() - start)
    if args.verify:
        result = job.check(args.seed)
        if not result.passed:
            raise _verification_failed(args, result.summary(), report)
        print(f"bnfold: verified {job.verified_where}: {result.summary()}")
    if args.output is not None:
        job.save(args.output)
        print(f"bnfold: wrote {os.fspath(args.output)}")
    return 0


def _print_outcome(args: argparse.Namespace, report: FoldReport, elapsed: float) -> None:
    if args.report:
        print(report)
    else:
        print(f"bnfold: {report.summary()} in {elapsed:.2f} s")


def _verification_failed(
    args: argparse.Namespace, summary: str, report: FoldReport
) -> VerificationError:
    written = "" if args.output is None else f"; {args.output} not written"
    why = ""
    if args.qat == "bias" and report.folded:
        # --verify holds the folded model to the float tolerance, which a rounding moved on
        # purpose need not meet.
        why = (
            " (--qat bias: a chain folded into a conv's bias may move outputs by up to about "
            "one output quantization step, beyond --verify's float tolerance; --report says "
            "which chains were, and --qat exact folds exactly)"
        )
    return VerificationError(f"verification failed on random inputs: {summary}{why}{written}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    file_mode = not argv or argv[0] != "demo"
    parser = _file_parser() if file_mode else _parser()
    if not argv:
        parser.print_usage(sys.stderr)
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        print(f"bnfold: error: {_one_line(str(e))} (see 'bnfold --help')", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help and --version
        return int(e.code or 0)
    try:
        if file_mode:
            return _fold_file(args)
        if args.command == "demo":
            from . import demo

            return demo.run(sys.stdout, seed=args.seed, batch=args.batch, size=args.size)
        parser.print_usage(sys.stderr)
        return EXIT_USAGE
    except BnfoldError as e:
        print(f"bnfold: error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("bnfold: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI promises one line, never a traceback
        first = first_line(e) if str(e).strip() else ""
        print(f"bnfold: internal error: {type(e).__name__}: {_one_line(first)}", file=sys.stderr)
        return EXIT_INTERNAL
