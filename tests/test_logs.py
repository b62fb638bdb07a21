"""The one logging setup (`loracast.logs`) and the `loracast --log-level` option that sets it."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator

import pytest

from loracast.logs import configure_logging
from loracast_cli.cli import main

LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (?P<level>[A-Z]+) (?P<name>\S+): (?P<message>.*)")


@pytest.fixture(autouse=True)
def restored_logging() -> Iterator[None]:
    """Each test's setup is undone, so that no other test runs with it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(text: str) -> list[dict[str, str]]:
    parsed = [LINE.fullmatch(line) for line in text.splitlines()]
    assert all(parsed), text  # every line in the one format
    return [match.groupdict() for match in parsed]


def test_our_records_show_at_the_level_asked_for_and_libraries_from_warning(capsys):
    configure_logging("debug")
    logging.getLogger("worker.adapter_store").debug("installed adapter %s", "abc")
    logging.getLogger("urllib3.connectionpool").info("a library's chatter")
    logging.getLogger("urllib3.connectionpool").warning("a library's warning")
    assert _lines(capsys.readouterr().err) == [
        {"level": "DEBUG", "name": "worker.adapter_store", "message": "installed adapter abc"},
        {"level": "WARNING", "name": "urllib3.connectionpool", "message": "a library's warning"},
    ]


def test_a_second_setup_replaces_the_first_instead_of_doubling_each_line(capsys):
    configure_logging("debug")
    configure_logging("warning")
    logging.getLogger("coordinator.server").info("not shown at warning")
    logging.getLogger("coordinator.server").warning("shown once")
    assert [line["message"] for line in _lines(capsys.readouterr().err)] == ["shown once"]


def test_an_unknown_level_is_refused_by_name():
    with pytest.raises(ValueError, match="debug, info, warning, error"):
        configure_logging("verbose")


def test_the_loracast_command_sets_the_level_before_its_subcommand_runs(capsys):
    with socket.socket() as unused:  # a port nothing listens on: bound, never listening
        unused.bind(("127.0.0.1", 0))
        worker = f"127.0.0.1:{unused.getsockname()[1]}"
        question = "What is the vault code LCQUESTION?"
        assert main(["--log-level", "debug", "ask", "--worker", worker, "--task", "t", question]) == 2
    *logged, error = capsys.readouterr().err.splitlines()
    assert error.startswith("loracast: error: UNAVAILABLE: ")
    assert {
        "level": "DEBUG",
        "name": "edge_client.cli",
        "message": f"asking the worker at {worker}, the adapter by task",
    } in _lines("\n".join(logged))
    assert "LCQUESTION" not in "\n".join(logged)  # the log holds where and how, never what was asked


def test_an_unknown_log_level_on_the_command_line_names_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--log-level", "loud", "demo"])
    assert exit_.value.code == 2 and "invalid choice: 'loud'" in capsys.readouterr().err
