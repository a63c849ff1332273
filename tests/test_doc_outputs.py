"""The command output that README.md and docs/*.md show is what the commands print.

A ```console block right after an `<!-- output: SESSION [EDIT ...] -->` comment is run: each
`$ command` line in it goes to bash in the session's directory (the real `orch` and `python`
of this environment on PATH, offline: the SDK points at a closed port), and what the command
prints, stdout and stderr together, must equal the lines that follow it up to the next `$`
line. Times, generated run ids, latencies, hashes and the directories in paths are masked,
and runs of spaces are one space (masked values change a table's column widths).

A session is one fresh directory (with a copy of machines/, as a checkout has) and one
database; its blocks run in page order (pages sorted by name). Its files come from the pages
that show its blocks: a fenced block right after `<!-- file: NAME -->`, and every heredoc
`cat > NAME <<'EOF'` of a ```bash block. EDIT names one of `EDITS`, a change to a file that
the page describes in prose ("fix the guard"), in force for that block.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from .helpers import CLOSED_PORT, MACHINES, ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_OUTPUT = re.compile(r"^<!-- output: (\S+)((?: \S+)*) -->\n```console\n(.*?)^```", re.MULTILINE | re.DOTALL)
_FILE = re.compile(r"^<!-- file: (\S+) -->\n```\w*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_BASH = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
_HEREDOC = re.compile(r"^cat > (\S+) <<'EOF'\n(.*?)^EOF$", re.MULTILINE | re.DOTALL)

EDITS: dict[str, tuple[str, str, str]] = {  # name: (file, text, replacement), as the page describes it
    "no-branch-a": ("triage.py", '            on={FlowDecision.BRANCH_A: "escalate"},\n', ""),
    "fixed-guard": ("triage.py", "topic = output.strip().lower()", 'topic = output.strip().strip(".").lower()'),
    "billing-answered": ("triage.py", '"billing": FlowDecision.BRANCH_A,  # money questions go to a person',
                         '"billing": FlowDecision.CONTINUE,  # the answer step handles money questions now'),
}

_MASKS = [
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+Z)?"), "<time>"),
    (re.compile(r"\b[0-9A-HJKMNP-TV-Z]{26}\b"), "<run id>"),  # a generated (ULID-like) run id
    (re.compile(r"\b[0-9a-f]{12}\b"), "<hash>"),
    (re.compile(r"(?<![\w.])/(?:[\w.-]+/)+"), "<dir>/"),
    (re.compile(r"(latency_ms=)[\d.]+"), r"\1<ms>"),
    (re.compile(r"(?<=\s)\d+\.\d(?=\s)"), "<ms>"),  # the latency_ms column of a log table
    (re.compile(r"[ \t]+"), " "),
]


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    session: str
    edits: tuple[str, ...]
    commands: tuple[tuple[str, str], ...]  # (command, what it prints)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _commands(text: str) -> Iterator[tuple[str, str]]:
    """(command, output) for each `$ ` line of a console block."""
    command: str | None = None
    output: list[str] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            if command is not None:
                yield command, "\n".join(output).strip("\n")
            command, output = line[2:], []
        else:
            output.append(line)
    if command is not None:
        yield command, "\n".join(output).strip("\n")


def blocks(pages: Sequence[Path] = PAGES) -> list[Block]:
    found = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for m in _OUTPUT.finditer(text):
            found.append(Block(page, text.count("\n", 0, m.start()) + 1, m.group(1), tuple(m.group(2).split()),
                               tuple(_commands(m.group(3)))))
    return found


def files(pages: Sequence[Path]) -> dict[str, str]:
    """The files the pages write: marked blocks and the heredocs of their bash blocks."""
    found: dict[str, str] = {}
    for page in pages:
        text = page.read_text(encoding="utf-8")
        found.update((m.group(1), m.group(2)) for m in _FILE.finditer(text))
        for bash in _BASH.finditer(text):
            found.update((m.group(1), m.group(2)) for m in _HEREDOC.finditer(bash.group(1)))
    return found


def masked(text: str, workdir: Path) -> list[str]:
    text = text.replace(str(workdir), "/work-dir")
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def _edited(content: dict[str, str], edits: Sequence[str]) -> dict[str, str]:
    out = dict(content)
    for name in edits:
        file, old, new = EDITS[name]
        assert out[file].count(old) == 1, f"edit {name}: {old!r} is not in {file} once"
        out[file] = out[file].replace(old, new)
    return out


def _run(command: str, workdir: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               ANTHROPIC_BASE_URL=CLOSED_PORT, PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)
    return done.stdout


FAST_SESSIONS = {"concepts"}  # one short session in the default run; the longer ones are `slow`
SESSIONS = [pytest.param(s, marks=() if s in FAST_SESSIONS else pytest.mark.slow)
            for s in sorted({block.session for block in blocks()})]


@pytest.mark.parametrize("session", SESSIONS)
def test_the_documented_output_is_what_the_commands_print(session: str, tmp_path: Path) -> None:
    mine = [block for block in blocks() if block.session == session]
    content = files(sorted({block.page for block in mine}))
    shutil.copytree(MACHINES, tmp_path / "machines", ignore=shutil.ignore_patterns("__pycache__"))
    drift = []
    for block in mine:
        for name, text in _edited(content, block.edits).items():
            (tmp_path / name).write_text(text, encoding="utf-8")
        for command, shown in block.commands:
            printed = masked(_run(command, tmp_path), tmp_path)
            if printed != masked(shown, tmp_path):
                drift.append(f"{block.where}: $ {command}\n  shown:\n    " + "\n    ".join(masked(shown, tmp_path))
                             + "\n  printed:\n    " + "\n    ".join(printed))
    assert not drift, "\n\n".join(drift)


# --------------------------------------------------------------------------- the check bites


def test_a_marked_block_is_read_with_its_session_edits_and_commands(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- file: a.json -->\n```json\n{}\n```\n\n```bash\ncat > b.txt <<'EOF'\nhi\nEOF\n```\n\n"
                    "<!-- output: demo fixed-guard -->\n```console\n$ orch runs\nrun_id  x\n\n$ orch log r\nseq\n```\n"
                    "\n```console\n$ orch unmarked\n```\n")
    (block,) = blocks([page])
    assert (block.session, block.edits, block.line) == ("demo", ("fixed-guard",), 12)
    assert block.commands == (("orch runs", "run_id  x"), ("orch log r", "seq"))
    assert files([page]) == {"a.json": "{}\n", "b.txt": "hi\n"}


def test_masking_hides_what_changes_from_run_to_run_and_nothing_else(tmp_path: Path) -> None:
    run = ("2026-11-24T07:58:10.571494Z [info ] run_started machine_hash=ee3beb1cbadb run_id=01M866MPZ1EBC2RQXRPAWCSXNF"
           f" latency_ms=16.923\n1    classify    escalate  1        16.9        35  $0.0001  {tmp_path}/answers.json")
    assert masked(run, tmp_path) == [
        "<time> [info ] run_started machine_hash=<hash> run_id=<run id> latency_ms=<ms>",
        "1 classify escalate 1 <ms> 35 $0.0001 <dir>/answers.json"]
    assert masked("$0.0005 72 in / 20 out tokens", tmp_path) == ["$0.0005 72 in / 20 out tokens"]
