"""Exception types raised by bnfold.

Every error a user can meet is a :class:`BnfoldError`; the message says what is wrong and what
to do about it. A refused fold is *not* an error: it is recorded in the
:class:`~bnfold.core.report.FoldReport` with its reason.
"""

from __future__ import annotations


class BnfoldError(Exception):
    """Base class of every error bnfold raises on purpose."""


class TrainingModeError(BnfoldError):
    """The model is in training mode, so its BatchNorms use batch statistics."""


class TracingError(BnfoldError):
    """bnfold could not find the model's data flow (symbolic tracing and export both failed)."""


class UnsupportedModelError(BnfoldError):
    """The object passed is not a model type bnfold handles (or its frontend is not installed)."""


class InvalidArgumentError(BnfoldError, ValueError):
    """An argument to a bnfold function is not one it accepts."""


class ModelFileError(BnfoldError):
    """A model file is missing, unreadable, not of a format bnfold knows, or cannot be written."""


class VerificationError(BnfoldError):
    """The folded model's outputs differ from the original's by more than the tolerance."""


class FoldRefused(Exception):
    """Internal: a fold is not exact or not valid; ``reason`` goes into the report.

    Raised by the algebra and caught by the frontends, which record a skip instead of folding.
    It never reaches the user.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), for one-line errors."""
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
