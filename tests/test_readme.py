"""The README's Quick start is what CI runs: two fenced commands, the second one in .ci/run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.M | re.S)
    assert section, "README.md has no '## Quick start' section"
    return [b.strip() for b in re.findall(r"```\w*\n(.*?)```", section.group(1), re.S)]


def test_quick_start_has_exactly_two_commands():
    commands = quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "models/" in commands[0] and "onnx-fuse" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert quick_start_commands()[1] in ci
    assert not any(re.search(r"pip install[^#]*\btorch(?!==2\.13\.0)\b", line) for line in ci)


def test_quick_start_model_is_in_the_repository():
    command = quick_start_commands()[0]
    model = re.search(r"(models/\S+\.onnx)", command).group(1)
    assert (ROOT / model).is_file()
