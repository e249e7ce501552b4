"""bnfold.core.logs: what libraries log and warn is dropped for the duration of a call, in any
number of threads at once, and flows again afterwards."""

from __future__ import annotations

import logging
import threading
import warnings

import pytest

from bnfold.core.logs import quiet, quiet_logs, quiet_warnings


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture
def records(request):
    """A handler on the root of the test's own logger tree, ``<test>`` (records propagate)."""
    root = logging.getLogger(request.node.name)
    root.setLevel(logging.DEBUG)
    handler = _Records()
    root.addHandler(handler)
    yield root.name, handler.messages
    root.removeHandler(handler)


def test_named_loggers_and_those_below_are_dropped_then_flow_again(records):
    top, messages = records
    lib, sub, other = (logging.getLogger(f"{top}.{n}") for n in ("lib", "lib.sub", "library"))
    with quiet_logs(f"{top}.lib"):
        lib.warning("dropped")
        sub.error("dropped")
        other.warning("kept: only the name's own tree is quiet")
    lib.warning("kept: after the call")
    sub.info("kept too")
    assert messages == [
        f"{top}.library: kept: only the name's own tree is quiet",
        f"{top}.lib: kept: after the call",
        f"{top}.lib.sub: kept too",
    ]


def test_a_named_logger_made_during_the_call_is_quiet(records):
    """A library may create its logger on a lazy import, inside the call."""
    top, messages = records
    with quiet(f"{top}.lazy.package"):
        logging.getLogger(f"{top}.lazy.package").warning("dropped")
    logging.getLogger(f"{top}.lazy.package").warning("kept")
    assert messages == [f"{top}.lazy.package: kept"]


def test_loggers_may_be_given_as_loggers(records):
    top, messages = records
    with quiet_logs(logging.getLogger(f"{top}.a")):
        logging.getLogger(f"{top}.a").warning("dropped")
    assert messages == []


def test_overlapping_calls_in_threads_do_not_undo_each_other(records):
    top, messages = records
    log = logging.getLogger(f"{top}.shared")
    entered, first_left, done = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with quiet_logs(log.name):
            entered.set()
            done.wait(5)  # held until the second call has entered
        first_left.set()

    thread = threading.Thread(target=first)
    thread.start()
    entered.wait(5)
    with quiet_logs(log.name):
        done.set()
        first_left.wait(5)  # the first call has removed its filter; this one's is still there
        log.warning("dropped")
    thread.join(5)
    log.warning("kept")
    assert messages == [f"{top}.shared: kept"]


def test_warnings_are_ignored_meanwhile_and_filters_restored():
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_warnings():
            warnings.warn("dropped", UserWarning, stacklevel=1)
        with quiet_warnings(DeprecationWarning):
            warnings.warn("dropped", DeprecationWarning, stacklevel=1)
            warnings.warn("kept: another category", UserWarning, stacklevel=1)
        warnings.warn("kept: after the call", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["kept: another category", "kept: after the call"]
    assert warnings.filters == before


def test_onnx_quiet_logs_covers_onnx_and_onnx_ir():
    pytest.importorskip("onnx_ir")
    from bnfold.onnx.constants import quiet_logs as onnx_quiet_logs

    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnx_ir.serde", "onnx")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with onnx_quiet_logs():
            for logger in loggers:
                logger.warning("dropped")
        loggers[1].warning("kept")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert handler.messages == ["onnx_ir.serde: kept"] * 2  # its handler and its parent's
