"""The access line's direct write (service.observability.bare_line_stream / write_line) writes the
exact bytes the logging chain would, and only under the configuration where that holds."""

from __future__ import annotations

import io
import logging

import pytest

from service.observability import bare_line_stream, write_line

LINE = '{"request_id":"abc","status":200,"path":"/v1/chat/completions"}'


@pytest.fixture
def logger() -> logging.Logger:
    """A logger outside the manager's tree (pytest's log capture attaches to those it knows)."""
    log = logging.Logger("test.access.direct", logging.INFO)
    log.propagate = False
    return log


def _handler(stream: io.StringIO, fmt: str = "%(message)s") -> logging.StreamHandler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(fmt))
    return handler


def test_same_bytes_as_the_logging_chain(logger):
    via_logging, direct = io.StringIO(), io.StringIO()
    logger.addHandler(_handler(via_logging))
    logger.info(LINE)
    logger.handlers[0] = _handler(direct)
    handler = bare_line_stream(logger)
    assert handler is logger.handlers[0]
    write_line(handler, LINE)
    assert direct.getvalue() == via_logging.getvalue() == LINE + "\n"


@pytest.mark.parametrize(
    "change",
    [
        lambda log: setattr(log, "propagate", True),  # e.g. pytest's caplog, a root handler
        lambda log: log.addFilter(lambda record: True),
        lambda log: log.addHandler(logging.NullHandler()),
        lambda log: log.handlers[0].setFormatter(logging.Formatter("%(asctime)s %(message)s")),
        lambda log: log.handlers[0].addFilter(lambda record: True),
        lambda log: log.handlers[0].setLevel(logging.WARNING),
    ],
)
def test_any_other_configuration_keeps_the_logging_chain(logger, change):
    logger.addHandler(_handler(io.StringIO()))
    assert bare_line_stream(logger) is not None
    change(logger)
    assert bare_line_stream(logger) is None


def test_a_failing_stream_is_reported_not_raised(logger, capsys):
    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise OSError("disk full")

    logger.addHandler(_handler(Broken()))
    write_line(bare_line_stream(logger), LINE)
    assert "disk full" in capsys.readouterr().err
