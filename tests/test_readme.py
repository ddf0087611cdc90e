"""Every `cascade-clip ...` command the README shows exists and carries its required options.

Commands come from fenced code blocks (backslash continuations joined) and inline code spans.
A span that only names a stage in running prose (`cascade-clip gpu-run`, no arguments) is a
mention, not a command, and is only checked to exist; in tables and code blocks every command
must be complete, since that is what readers copy.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PROG = "cascade-clip"
PLACEHOLDER_STAGE = "STAGE"  # `cascade-clip STAGE --help`: any stage


@dataclass(frozen=True)
class Command:
    line: int
    text: str
    strict: bool  # a table row or a code block: must be runnable as written

    @property
    def tokens(self) -> list[str]:
        return shlex.split(self.text, comments=True)


def extract_commands(markdown: str) -> list[Command]:
    """The `cascade-clip ...` commands of a markdown text, with their line numbers."""
    out: list[Command] = []
    lines = markdown.splitlines()
    fenced = False
    pending: tuple[int, str] | None = None  # a code-block line ending in a backslash
    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith("```"):
            fenced, pending = not fenced, None
            continue
        if fenced:
            start, text = pending if pending else (number, "")
            text += line
            if text.rstrip().endswith("\\"):
                pending = (start, text.rstrip()[:-1] + " ")
                continue
            pending = None
            match = re.search(rf"(?:^|[\s;&|(]){re.escape(PROG)}(?=\s|$)", text)
            if match:
                command = text[match.start():].strip()
                out.append(Command(start, command, strict=True))
            continue
        for span in re.findall(r"`([^`]+)`", line):
            if span.split()[:1] == [PROG]:
                out.append(Command(number, span.strip(), strict=line.lstrip().startswith("|")))
    return out


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from cascade_clip.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def problems(command: Command, subparsers: dict[str, argparse.ArgumentParser]) -> list[str]:
    """What is wrong with one README command (empty when it is complete)."""
    tokens = command.tokens
    where = f"README.md:{command.line}: `{command.text}`"
    assert tokens[0] == PROG, where
    if len(tokens) == 1 or tokens[1].startswith("-") or tokens[1] == PLACEHOLDER_STAGE:
        return []  # the program itself, its global options, or any stage's --help
    stage = tokens[1]
    if stage not in subparsers:
        return [f"{where}: no stage {stage!r}; stages: {sorted(subparsers)}"]
    args = [t[1:-1] if t.startswith("[") and t.endswith("]") else t for t in tokens[2:]]
    if not args and not command.strict:
        return []  # prose naming the stage
    if "-h" in args or "--help" in args:
        return []
    sub = subparsers[stage]
    found = []
    for action in sub._actions:
        if action.required and action.option_strings:
            if not any(a == o or a.startswith(o + "=") for o in action.option_strings for a in args):
                found.append(f"{where}: lacks the required option {'/'.join(action.option_strings)}")
    # Required positionals (predict's IMAGE...): parse as argparse would, with the value checks
    # off, since the README writes placeholders (N, DIR, I/N) for values.
    for action in sub._actions:
        action.type, action.choices = None, None
    sub.exit_on_error = False
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            sub.parse_known_args(args)
    except (argparse.ArgumentError, SystemExit) as err:
        message = stderr.getvalue().strip().splitlines()[-1:] or [str(err)]
        found.append(f"{where}: does not parse: {message[0]}")
    return found


COMMANDS = extract_commands(README.read_text())


def test_readme_has_the_stage_commands():
    stages = {c.tokens[1] for c in COMMANDS if c.strict and len(c.tokens) > 1}
    missing = set(_subparsers()) - {"gpu-run"} - stages
    assert not missing, f"stages with no complete README command (table or code block): {missing}"


@pytest.mark.parametrize("command", COMMANDS, ids=[f"L{c.line}" for c in COMMANDS])
def test_readme_command_is_complete(command):
    assert not problems(command, _subparsers())


def test_every_readme_stage_has_help():
    """`cascade-clip STAGE --help` works, through the installed console script when there is one."""
    exe = shutil.which(PROG)
    base = [exe] if exe else [sys.executable, "-m", "cascade_clip.cli"]
    stages = {c.tokens[1] for c in COMMANDS if len(c.tokens) > 1}
    if PLACEHOLDER_STAGE in stages:
        stages = (stages - {PLACEHOLDER_STAGE}) | set(_subparsers())
    stages = sorted(s for s in stages if not s.startswith("-"))
    assert stages
    for stage in [*stages, None]:
        argv = [*base, *([stage] if stage else []), "--help"]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, (argv, res.stderr[-2000:])
        assert "usage:" in res.stdout


# --- the checker itself --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expect",
    [
        ("| predict | `cascade-clip predict --config C --checkpoint K --classes a --out D X.png` |", None),
        ("| predict | `cascade-clip predict --config C --checkpoint K --classes a X.png` |", "--out"),
        ("| predict | `cascade-clip predict --config C --checkpoint K --classes a --out D` |", "parse"),
        ("| x | `cascade-clip make-shapes` |", "--config"),
        ("| x | `cascade-clip cache-join --inputs a.h5 --out=j.h5` |", None),
        ("| x | `cascade-clip no-such-stage --config C` |", "no stage"),
        ("The world (`cascade-clip make-shapes`) is made.", None),
        ("```bash\ncascade-clip split --config C \\\n    --out s.json   # note\n```", None),
        ("```bash\ncascade-clip split --config C \\\n    --set a=1\n```", "--out"),
    ],
)
def test_checker_catches_a_dropped_required_option(text, expect):
    commands = extract_commands(text)
    assert len(commands) == 1
    found = problems(commands[0], _subparsers())
    if expect is None:
        assert not found
    else:
        assert found and any(expect in p for p in found), found
