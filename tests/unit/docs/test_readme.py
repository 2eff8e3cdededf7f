"""The README's commands are real: every `stream-detector ...` line parses with the CLI, and
the make targets it names exist."""

from __future__ import annotations

import re
import shlex

import pytest

from stream_detector.cli import build_parser
from tests.paths import REPO_ROOT as ROOT

README = (ROOT / "README.md").read_text()


def _shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", README, flags=re.S)


def _cli_lines() -> list[str]:
    lines = []
    for block in _shell_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            if "stream-detector " in line:
                lines.append(line.split("stream-detector ", 1)[1])
    return lines


@pytest.mark.parametrize("line", _cli_lines())
def test_readme_command_parses(line: str) -> None:
    build_parser().parse_args(shlex.split(line))


def test_readme_make_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z]+):", makefile, flags=re.M))
    used = {m for block in _shell_blocks() for m in re.findall(r"^make (\w+)", block, flags=re.M)}
    assert used, "README shows no make command"
    assert used <= targets


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in README
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")
