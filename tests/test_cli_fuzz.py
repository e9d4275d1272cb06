"""Any command line and environment either starts the server or ends in one line on
stderr and exit status 2: never a traceback."""

from __future__ import annotations

import contextlib
import io
import os
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import services.app
from services.cli import build_parser

FLAGS = sorted(
    option
    for action in build_parser()._actions
    for option in action.option_strings
    if option.startswith("--") and option != "--help"
)
NAMES = [flag.removeprefix("--").replace("-", "_").upper() for flag in FLAGS]
# Values near every edge the checks have, and anything at all.
TRICKY = [
    "", " ", "0", "-0", "1", "-1", "3", "65535", "65536", "1e309", "nan", "inf", "-inf",
    "0x10", "1_000", "٣", "10000", "100001", "4096", "32768", "65537", "executor", "queue",
    "threads", "ready", "connection", "127.0.0.1", "::1", "0.0.0.0", "localhost", "DEBUG",
    "info", "--model",
]  # fmt: skip
values = st.one_of(st.sampled_from(TRICKY), st.text(max_size=12))
env_values = st.one_of(
    st.sampled_from(TRICKY),
    # What an environment can hold: no NUL; undecodable bytes arrive as surrogate escapes.
    st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]), max_size=12),
    st.binary(min_size=1, max_size=4)
    .filter(lambda raw: b"\0" not in raw)
    .map(lambda raw: raw.decode("utf-8", "surrogateescape")),
)
# Mostly a valid model first, so that the rest gets past the first check.
model: st.SearchStrategy[list[str]] = st.one_of(
    st.sampled_from(["executor", "queue", "threads"]).map(lambda name: ["--model", name]),
    st.just([]),
)
words = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(FLAGS), values).map(list),
        st.tuples(st.sampled_from(FLAGS)).map(list),  # a flag with no value
        st.tuples(values).map(list),  # a stray argument
    ),
    max_size=6,
).map(lambda parts: [word for part in parts for word in part])
argv = st.tuples(model, words).map(lambda both: both[0] + both[1])
environment = st.dictionaries(st.sampled_from(NAMES).map("ECHO_".__add__), env_values, max_size=4)


def run_main(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """`main(args)` under `env`, the server itself replaced: (exit status, stderr)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_")}
    stderr = io.StringIO()
    with (
        mock.patch.dict(os.environ, {**clean, **env}, clear=True),
        mock.patch.object(services.app, "run_until_stopped", return_value=0),
        contextlib.redirect_stderr(stderr),
    ):
        try:
            code = services.app.main(args)
        except SystemExit as leaving:  # argparse's own exit
            code = leaving.code if isinstance(leaving.code, int) else 1
    return code, stderr.getvalue()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=argv, env=environment)
def test_any_argv_and_environment_starts_or_is_one_line_and_exit_2(
    args: list[str], env: dict[str, str]
) -> None:
    code, stderr = run_main(args, env)
    assert code in (0, 2), (code, stderr)
    if code == 2:
        assert len(stderr.strip().splitlines()) == 1, stderr
        assert "Traceback" not in stderr
    else:
        assert stderr == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "queue", "--workers"], "expected one argument"),
        (["--model", "queue", "--port", "1e309"], "is not a valid port number"),
        (["--model", "queue", "--idle-timeout", "-1"], "is not a valid seconds"),
        (["--model", "queue", "stray\r\nline"], "unrecognized arguments: stray\\r\\nline"),
        (["--model", "threads", "--stack-size", "٣"], "--stack-size"),
    ],
)
def test_examples_of_bad_input(args: list[str], message: str) -> None:
    code, stderr = run_main(args, {})
    assert code == 2 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
