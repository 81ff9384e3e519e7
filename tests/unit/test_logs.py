"""Structured logs: one JSON object per line with time, level, logger, message, extra fields and exceptions."""

from __future__ import annotations

import json
import logging

import pytest

from cl_service.config import load_settings
from cl_service.logs import JsonFormatter, configure


def test_json_lines_carry_the_message_extras_and_exceptions() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord("cl_service.x", logging.WARNING, __file__, 1, "disk at %d%%", (97,), None)
    record.camera_id = "cam-1"
    entry = json.loads(formatter.format(record))
    assert entry["level"] == "WARNING" and entry["logger"] == "cl_service.x"
    assert entry["message"] == "disk at 97%" and entry["camera_id"] == "cam-1"
    assert entry["time"].endswith("+00:00")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.LogRecord("cl_service.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(formatter.format(failed))["exception"]


def test_configure_switches_the_root_handler(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure("info", "json")
        logging.getLogger("cl_service.test").info("hello %s", "there")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert json.loads(line)["message"] == "hello there"
        configure("info", "text")
        logging.getLogger("cl_service.test").info("plain")
        assert capsys.readouterr().err.strip().endswith("INFO cl_service.test: plain")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert load_settings(log_format="json").log_format == "json"
    with pytest.raises(ValueError, match="log_format"):
        load_settings(log_format="xml")
