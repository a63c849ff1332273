"""The documentation keeps up with the code.

Fails when a CLI command has no `## orch NAME` section in docs/cli.md, when an option of a
command is not documented (global options in the "Global options" section, the others in
their command's section), when a public name is not mentioned as code in docs/*.md, or when
a relative link in README.md or docs/*.md points to a missing file or heading.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from pathlib import Path

import pytest

import statemachine_orch
from statemachine_orch.cli._main import build_parser

from .helpers import (
    ROOT,
)

DOCS = ROOT / "docs"
CLI_DOC = DOCS / "cli.md"
PAGES = ["concepts.md", "tutorial.md", "patterns.md", "cli.md", "storage.md", "testing.md"]
GLOBAL_SECTION = "Global options"

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.DOTALL | re.MULTILINE)
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


# --------------------------------------------------------------------------- helpers


def strip_fences(text: str) -> str:
    return _FENCE.sub("", text)


def code_text(text: str) -> str:
    """Everything that is code in a markdown text: fenced blocks and inline code spans."""
    blocks = [m.group(0) for m in _FENCE.finditer(text)]
    spans = _INLINE_CODE.findall(strip_fences(text))
    return "\n".join(blocks + spans)


def sections(text: str, level: int = 2) -> dict[str, str]:
    """Heading text -> body, for headings of exactly `level` (fenced code ignored)."""
    out: dict[str, str] = {}
    current: str | None = None
    marker = "#" * level + " "
    for line in strip_fences(text).splitlines():
        if line.startswith(marker):
            current = line[len(marker):].strip()
            out[current] = ""
        elif re.match(rf"#{{1,{level}}} ", line):
            current = None  # a higher-level heading ends the section
        elif current is not None:
            out[current] += line + "\n"
    return out


def mentions_option(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {
        opt
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        for opt in action.option_strings
    }


def missing_command_sections(cli_doc: str, commands: Iterable[str]) -> list[str]:
    headings = set(sections(cli_doc))
    return [name for name in commands if f"orch {name}" not in headings]


def missing_options(cli_doc: str, parser: argparse.ArgumentParser) -> list[str]:
    """'command: option' for every option its section (or Global options) does not mention."""
    by_heading = sections(cli_doc)
    global_opts = option_strings(parser)
    problems = [f"(global): {opt}" for opt in sorted(global_opts)
                if not mentions_option(by_heading.get(GLOBAL_SECTION, ""), opt)]
    for name, sub in subcommands(parser).items():
        body = by_heading.get(f"orch {name}", "")
        problems += [f"{name}: {opt}" for opt in sorted(option_strings(sub) - global_opts)
                     if not mentions_option(body, opt)]
    return problems


def missing_names(docs_text: str, names: Iterable[str]) -> list[str]:
    code = code_text(docs_text)
    return [n for n in names if not re.search(rf"(?<![\w.]){re.escape(n)}\b", code)]


def github_anchor(heading: str) -> str:
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in strip_fences(text).splitlines():
        match = re.match(r"(#{1,6}) (.+)", line)
        if not match:
            continue
        slug = github_anchor(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def broken_links(md_file: Path) -> list[str]:
    text = md_file.read_text(encoding="utf-8")
    problems = []
    for target in _LINK.findall(strip_fences(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # http:, https:, mailto: ...
        path_part, _, anchor = target.partition("#")
        dest = (md_file.parent / path_part).resolve() if path_part else md_file
        if not dest.exists():
            problems.append(f"{md_file.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"{md_file.name}: {target} (no such heading)")
    return problems


def all_docs_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*.md")))


def public_names() -> list[str]:
    return [n for n in statemachine_orch.__all__ if n != "__version__"]


# --------------------------------------------------------------------------- the checks


def test_the_documentation_pages_exist() -> None:
    missing = [p for p in PAGES if not (DOCS / p).is_file()]
    assert not missing, f"missing docs pages: {missing}"


def test_every_cli_command_has_a_section() -> None:
    commands = subcommands(build_parser())
    assert commands, "build_parser() has no subcommands?"
    missing = missing_command_sections(CLI_DOC.read_text(encoding="utf-8"), commands)
    assert not missing, f"docs/cli.md has no '## orch NAME' section for: {missing}"


def test_every_cli_option_is_documented() -> None:
    missing = missing_options(CLI_DOC.read_text(encoding="utf-8"), build_parser())
    assert not missing, "options not mentioned in their docs/cli.md section:\n" + "\n".join(missing)


def test_every_public_name_is_documented() -> None:
    missing = missing_names(all_docs_text(), public_names())
    assert not missing, f"public names never mentioned as code in docs/*.md: {missing}"


@pytest.mark.parametrize("md_file", [ROOT / "README.md", *sorted(DOCS.glob("*.md"))],
                         ids=lambda p: p.name)
def test_relative_links_resolve(md_file: Path) -> None:
    problems = broken_links(md_file)
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- the checks bite


def _section_pattern(heading: str) -> re.Pattern[str]:
    """The raw text of a `## heading` section, up to the next `## ` heading."""
    return re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)


def _without_section(text: str, heading: str) -> str:
    """`text` with the `## heading` section cut out."""
    cut, count = _section_pattern(heading).subn("", text)
    assert count == 1, f"no section {heading!r} to cut"
    return cut


def test_a_removed_command_section_is_reported() -> None:
    text = _without_section(CLI_DOC.read_text(encoding="utf-8"), "orch replay")
    assert missing_command_sections(text, subcommands(build_parser())) == ["replay"]
    assert "replay: --all" in missing_options(text, build_parser())


def test_a_removed_option_is_reported() -> None:
    text = CLI_DOC.read_text(encoding="utf-8")
    assert mentions_option(sections(text)["orch run"], "--offline")
    text = _section_pattern("orch run").sub(
        lambda m: m.group(0).replace("--offline", "--o-f-f-line"), text)
    assert missing_options(text, build_parser()) == ["run: --offline"]


def test_a_removed_global_option_is_reported() -> None:
    text = _without_section(CLI_DOC.read_text(encoding="utf-8"), GLOBAL_SECTION)
    missing = missing_options(text, build_parser())
    assert {"(global): --db", "(global): -q", "(global): --quiet"} <= set(missing)


def test_a_removed_public_name_is_reported() -> None:
    text = all_docs_text()
    scrubbed = re.sub(r"\bVisitLimitError\b", "VisitLimit", text)
    assert missing_names(scrubbed, public_names()) == ["VisitLimitError"]
    prose_only = "VisitLimitError is only mentioned in prose here."
    assert missing_names(prose_only, ["VisitLimitError"]) == ["VisitLimitError"]


def test_a_broken_link_is_reported(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# Title\n\n## A section: with `code`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md) [ok](there.md#a-section-with-code) [web](https://example.com)\n"
        "[gone](missing.md) [bad anchor](there.md#nope)\n"
        "```\n[in code](ignored.md)\n```\n"
    )
    assert broken_links(page) == ["page.md: missing.md (no such file)",
                                  "page.md: there.md#nope (no such heading)"]


# --------------------------------------------------------------------------- the test commands


def test_ci_runs_the_test_commands_the_readme_gives() -> None:
    """.ci/run runs the commands of README.md's Tests section, exactly and in order, after setting
    up what the tests need (a PostgreSQL server) and running no test before them."""
    section = _section_pattern("Tests").search((ROOT / "README.md").read_text(encoding="utf-8"))
    assert section, "README.md has no '## Tests' section"
    readme = [line for block in re.findall(r"^```bash\n(.*?)^```", section.group(0), re.DOTALL | re.MULTILINE)
              for line in block.splitlines() if line.strip()]
    ci = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert re.search(r"\.venv/bin/python -m pytest -q( -n \d+)?$", readme[0])  # the default run comes first
    setup, ci = ci[:-len(readme)], ci[-len(readme):]
    assert ci == readme
    assert not [line for line in setup if "pytest" in line]
