"""The README's Quick start is what CI runs, and every code block in the README runs as written."""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

from converter.cli import main

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


# ------------------------------------------------ every code block, as written

#: Commands the README shows that this test does not run: installing is CI's job (.ci/run),
#: and the test command is the suite this test belongs to.
_NOT_RUN = ("pip install", "python -m pytest")
_EXPECTED_EXIT = re.compile(r"\s+#\s*exit (\d+)\b.*$")


def readme_blocks() -> list[tuple[str, str]]:
    """Every fenced block of the README as (language, body), in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)


def test_every_block_says_what_it_is():
    languages = {language for language, _ in readme_blocks()}
    assert languages <= {"sh", "python", "text"}, "tag each block sh, python or text"


def _run_shell_block(body: str) -> None:
    for line in body.replace("\\\n", " ").splitlines():
        expected = _EXPECTED_EXIT.search(line)
        command = _EXPECTED_EXIT.sub("", line).strip()
        for segment in (s.strip() for s in command.split("&&")):
            if not segment or segment.startswith(_NOT_RUN):
                continue
            args = shlex.split(segment)
            if args[0] in ("mkdir", "mkfifo"):
                for name in (a for a in args[1:] if not a.startswith("-")):
                    Path(name).mkdir(parents=True, exist_ok=True) if args[
                        0
                    ] == "mkdir" else os.mkfifo(name)
                continue
            assert args[0] == "onnx-fuse", f"the README test cannot run {segment!r}"
            code = main(args[1:])
            assert code == int(expected.group(1) if expected else 0), segment


def test_every_code_block_runs_as_written(tmp_path, monkeypatch):
    """``sh`` blocks through the CLI and ``python`` blocks as scripts, in order, in one folder
    holding a copy of models/ (so that a block can use what an earlier one wrote)."""
    shutil.copytree(ROOT / "models", tmp_path / "models", ignore=shutil.ignore_patterns("*.py"))
    monkeypatch.chdir(tmp_path)
    ran = 0
    for language, body in readme_blocks():
        if language == "sh":
            _run_shell_block(body)
        elif language == "python":
            exec(compile(body, "README.md", "exec"), {"__name__": "__readme__"})
        ran += language != "text"
    assert ran >= 8
