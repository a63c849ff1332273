"""Loading machines from `path/file.py[:attr]` and `dotted.module[:attr]`, in process and via the CLI."""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from statemachine_orch import DefinitionError, Machine, load_machine
from statemachine_orch.cli._render import mermaid
from statemachine_orch.errors import MachineNotFoundError

from .helpers import (
    EXAMPLE_MACHINES,
    MACHINES,
    ROOT,
    Orch,
    one_error_line,
    run_orch,
    shown,
)

HEADER = """\
from statemachine_orch import END, FlowDecision, LLMState, Machine, PythonState


def run(ctx):
    return None

"""

BAD_MACHINE = HEADER + """\
machine = Machine("bad", [
    LLMState("a", prompt="Summarise {missing}", max_tokens=0),
])
"""


def machines(*names: str) -> str:
    """Module source defining one valid single-state machine per name."""
    return HEADER + "".join(f"{n} = Machine({n!r}, [PythonState('only', run=run)])\n" for n in names)


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    importlib.invalidate_caches()  # the files appear while this process runs
    return path


def bad_machine_problems(where: str) -> list[str]:
    return [
        (f"{where}: state 'a': max_tokens=0 is not a positive integer; "
         "fix: set max_tokens to the answer's budget, e.g. 500"),
        (f"{where}: state 'a': prompt uses {{missing}}, which no input field, needed state or vars= entry "
         "provides; fix: add the field to input_model or input_vars, compute it with "
         "vars={'missing': lambda ctx: ...}, or fix the spelling"),
    ]


def problems(spec: str, error: type[DefinitionError] = DefinitionError) -> list[str]:
    with pytest.raises(error) as info:
        load_machine(spec)
    assert type(info.value) is error
    return info.value.problems


@pytest.fixture(autouse=True)
def isolated_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Restore sys.path afterwards and forget every module imported from this test's tmp_path."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    root = str(tmp_path.resolve())
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(root):
            del sys.modules[name]


# --------------------------------------------------------------------------- by file


def test_load_by_file_path(tmp_path: Path) -> None:
    path = write(tmp_path / "flow.py", machines("flow"))
    loaded = load_machine(str(path))
    assert isinstance(loaded.machine, Machine)
    assert loaded.machine.name == "flow"
    assert loaded.ref == f"{path.resolve()}:flow"
    assert loaded.machine.ref == loaded.ref
    assert loaded.machine.source_file == str(path.resolve())


def test_load_by_relative_file_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "sub" / "flow.py", machines("flow"))
    monkeypatch.chdir(tmp_path)
    loaded = load_machine("sub/flow.py")
    assert loaded.machine.name == "flow"
    assert loaded.ref == f"{path.resolve()}:flow"  # stored refs do not depend on the cwd


def test_load_by_file_path_with_attr(tmp_path: Path) -> None:
    path = write(tmp_path / "two.py", machines("first", "second"))
    for name in ("first", "second"):
        loaded = load_machine(f"{path}:{name}")
        assert loaded.machine.name == name
        assert loaded.ref == f"{path.resolve()}:{name}"


def test_a_machine_imported_from_elsewhere_is_not_the_modules_own(tmp_path: Path) -> None:
    write(tmp_path / "orchtest_shared.py", machines("shared"))
    path = write(tmp_path / "flow.py", "from orchtest_shared import shared\n" + machines("own"))
    assert load_machine(str(path)).machine.name == "own"
    assert load_machine(f"{path}:shared").machine.name == "shared"


def test_a_machine_module_imports_its_sibling_modules(tmp_path: Path) -> None:
    write(tmp_path / "flows" / "orchtest_prompts.py", 'GREETING = "Say hello to {text}."\n')
    path = write(tmp_path / "flows" / "greet.py", HEADER + """\
from orchtest_prompts import GREETING

machine = Machine("greet", [LLMState("hello", prompt=GREETING)], input_vars={"text": str})
""")
    loaded = load_machine(str(path))
    assert [s.prompt for s in loaded.machine.states] == ["Say hello to {text}."]  # type: ignore[attr-defined]
    assert str(path.parent) not in sys.path  # the directory is on sys.path only while importing


# --------------------------------------------------------------------------- by dotted module


def test_load_by_dotted_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "orchtest_pkg" / "__init__.py", "")
    write(tmp_path / "orchtest_pkg" / "flows.py", machines("first", "second"))
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_machine("orchtest_pkg.flows:second")
    assert loaded.machine.name == "second"
    assert loaded.ref == "orchtest_pkg.flows:second"
    assert problems("orchtest_pkg.flows", MachineNotFoundError) == [
        ("orchtest_pkg.flows: defines several machines (first, second); "
         "pick one with orchtest_pkg.flows:NAME")]


def test_load_dotted_module_from_the_current_directory(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "orchtest_here.py", machines("here"))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    monkeypatch.chdir(tmp_path)
    loaded = load_machine("orchtest_here")
    assert loaded.machine.name == "here"
    assert loaded.ref == "orchtest_here:here"


def test_unknown_dotted_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("orchtest_nowhere", "orchtest_nowhere.flows"):
        assert problems(spec, MachineNotFoundError) == [
            f"{spec}: no such module; pass path/to/machine.py or a dotted module on sys.path"]


@pytest.mark.parametrize(
    ("module", "missing"),
    [("orchtest_flow", "orchtest_absent"),
     # the missing import's name is a prefix of the module's own name: still not "no such module"
     ("orchtest_flow_v2", "orchtest_flow")],
)
def test_dotted_module_with_a_failing_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             module: str, missing: str) -> None:
    write(tmp_path / f"{module}.py", f"import {missing}\n" + machines("flow"))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert problems(module) == [
        f"{module}: importing the module raised ModuleNotFoundError: No module named {missing!r}; fix the module"]


def test_dotted_module_with_a_syntax_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "orchtest_broken.py", "x = 1\n\ndef broken(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    [line] = problems("orchtest_broken")
    assert line.startswith(f"{path}:3: syntax error: ")
    assert line.endswith("; fix the module")


# --------------------------------------------------------------------------- what cannot be loaded


def test_module_with_several_machines(tmp_path: Path) -> None:
    path = write(tmp_path / "two.py", machines("second", "first"))
    assert problems(str(path), MachineNotFoundError) == [
        f"{path}: defines several machines (first, second); pick one with {path}:NAME"]


def test_module_with_no_machine(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.py", HEADER)
    assert problems(str(path), MachineNotFoundError) == [
        f"{path}: defines no Machine; create one at module level"]


@pytest.mark.parametrize(("attr", "what"), [("nope", "missing"), ("run", "not a Machine"),
                                            ("END", "not a Machine")])
def test_attr_that_is_not_a_machine(tmp_path: Path, attr: str, what: str) -> None:
    path = write(tmp_path / "flow.py", machines("flow"))
    assert problems(f"{path}:{attr}", MachineNotFoundError) == [
        f"{path}: '{attr}' is {what}; pass the name of a module-level Machine"]


def test_nonexistent_file(tmp_path: Path) -> None:
    spec = str(tmp_path / "missing.py")
    assert problems(spec, MachineNotFoundError) == [
        f"{spec}: no such file; pass path/to/machine.py or a dotted module"]
    assert problems(f"{spec}:machine", MachineNotFoundError) == [
        f"{spec}: no such file; pass path/to/machine.py or a dotted module"]


def test_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.py", "x = 1\n\ndef broken(:\n    pass\n")
    [line] = problems(str(path))
    assert line.startswith(f"{path}:3: syntax error: ")
    assert line.endswith("; fix the module")


def test_module_raising_at_import(tmp_path: Path) -> None:
    path = write(tmp_path / "boom.py", machines("flow") + "raise RuntimeError('boom')\n")
    with pytest.raises(DefinitionError) as info:
        load_machine(str(path))
    assert info.value.problems == [
        f"{path}: importing the module raised RuntimeError: boom; fix the module"]
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_invalid_machine_reports_its_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "bad.py", BAD_MACHINE)
    assert problems(str(path)) == bad_machine_problems(shown(path))  # outside the cwd: absolute
    monkeypatch.chdir(tmp_path)
    assert problems("bad.py") == bad_machine_problems("bad.py")  # under the cwd: relative


def test_a_failed_load_can_be_retried_after_fixing_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "flow.py", BAD_MACHINE)
    problems(str(path))
    write(path, machines("flow"))
    assert load_machine(str(path)).machine.name == "flow"


# --------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("path", EXAMPLE_MACHINES, ids=lambda p: p.name)
def test_cli_validate_accepts_the_seed_machines(path: Path) -> None:
    machine = load_machine(str(path)).machine
    edges = sum(len(machine.edges(s.name)) for s in machine.states)
    result = run_orch("validate", f"machines/{path.name}", cwd=ROOT)
    assert (result.code, result.stderr) == (0, "")
    assert result.stdout == f"ok: machine '{machine.name}' ({len(machine.states)} states, {edges} transitions)\n"


def test_cli_validate_a_dotted_module_in_the_current_directory(tmp_path: Path) -> None:
    write(tmp_path / "orchtest_cli_flow.py", machines("first", "second"))
    result = run_orch("validate", "orchtest_cli_flow:second", cwd=tmp_path)
    assert (result.code, result.stdout, result.stderr) == (
        0, "ok: machine 'second' (1 states, 1 transitions)\n", "")


def test_cli_validate_reports_every_problem_one_line_each(tmp_path: Path) -> None:
    write(tmp_path / "bad.py", BAD_MACHINE)
    result = run_orch("validate", "bad.py", cwd=tmp_path)
    assert result.code == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"orch: error: {line}" for line in bad_machine_problems("bad.py")]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("files", "spec", "line"),
    [
        ({}, "missing.py", "missing.py: no such file; pass path/to/machine.py or a dotted module"),
        ({"two.py": machines("a", "b")}, "two.py",
         "two.py: defines several machines (a, b); pick one with two.py:NAME"),
        ({"boom.py": "raise ValueError('no config')\n"}, "boom.py",
         "boom.py: importing the module raised ValueError: no config; fix the module"),
    ],
    ids=["missing file", "several machines", "raises at import"],
)
def test_cli_validate_load_errors_are_one_line(tmp_path: Path, files: dict[str, str], spec: str,
                                               line: str) -> None:
    for name, source in files.items():
        write(tmp_path / name, source)
    result = run_orch("validate", spec, cwd=tmp_path)
    assert (result.code, result.stdout, result.stderr) == (2, "", f"orch: error: {line}\n")


def test_cli_validate_syntax_error(tmp_path: Path) -> None:
    write(tmp_path / "broken.py", "x = 1\n\ndef broken(:\n    pass\n")
    result = run_orch("validate", "broken.py", cwd=tmp_path)
    assert result.code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("orch: error: broken.py:3: syntax error: ")
    assert "Traceback" not in result.stderr


def test_cli_graph_support_router() -> None:
    result = run_orch("graph", "machines/support_router.py", cwd=ROOT)
    assert (result.code, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        "stateDiagram-v2",
        "    [*] --> sentiment_analysis",
        "    sentiment_analysis --> upsell: branch_a",
        "    sentiment_analysis --> support: branch_b",
        "    sentiment_analysis --> standard_reply: continue",
        "    standard_reply --> [*]: continue",
        "    upsell --> [*]: continue",
        "    support --> [*]: continue",
    ]


def test_graph_shows_only_the_decisions_a_state_can_take(tmp_path: Path) -> None:
    path = write(tmp_path / "loop.py", HEADER + """\
from statemachine_orch import guard


@guard(FlowDecision.CONTINUE, FlowDecision.RETRY, FlowDecision.BRANCH_A)
def review_guard(output, ctx):
    return FlowDecision.CONTINUE


machine = Machine("loop", [
    PythonState("draft", run=run, max_visits=3),
    PythonState("review", run=run, guard=review_guard, on={FlowDecision.BRANCH_A: "draft"}),
])
""")
    assert mermaid(load_machine(str(path)).machine).splitlines() == [
        "stateDiagram-v2",
        "    [*] --> draft",
        "    draft --> review: continue",
        "    review --> draft: branch_a",
        "    review --> [*]: continue",
        "    review --> review: retry",
    ]


# --------------------------------------------------------------------------- what the machine hash covers


GREET = HEADER + """\
import json

import pydantic

from orchtest_hash_prompts import GREETING

machine = Machine("greet", [LLMState("hello", prompt=GREETING)], input_vars={"text": str})
"""


def test_the_hash_covers_the_project_modules_a_machine_imports(tmp_path: Path) -> None:
    prompts = write(tmp_path / "flows" / "orchtest_hash_prompts.py",
                    'from orchtest_hash_words import WORD\n\nGREETING = "Say " + WORD + " to {text}."\n')
    words = write(tmp_path / "flows" / "orchtest_hash_words.py", 'WORD = "hello"\n')
    unused = write(tmp_path / "flows" / "orchtest_hash_unused.py", "X = 1\n")
    path = write(tmp_path / "flows" / "greet.py", GREET)
    hashes = [load_machine(str(path)).machine.source_hash]
    unused.write_text("X = 2\n")  # a file beside it that it does not import
    hashes.append(load_machine(str(path)).machine.source_hash)
    prompts.write_text(prompts.read_text() + "# edited\n")
    hashes.append(load_machine(str(path)).machine.source_hash)
    words.write_text('WORD = "hi"\n')  # imported by what it imports
    hashes.append(load_machine(str(path)).machine.source_hash)
    assert hashes[0] == hashes[1] and len(set(hashes)) == 3


def test_a_machine_importing_only_libraries_hashes_as_its_own_file() -> None:
    """The library, pydantic and the standard library are not the machine's: runs stored before
    imports were hashed keep their hash."""
    report = MACHINES / "report.py"
    assert load_machine(str(report)).machine.source_hash == hashlib.sha256(report.read_bytes()).hexdigest()


def test_resume_refuses_a_run_whose_imported_prompts_changed_its_recorded_steps(tmp_path: Path) -> None:
    prompts = write(tmp_path / "orchtest_hash_prompts.py", 'GREETING = "Say hello to {text}."\n')
    path = write(tmp_path / "greet.py", HEADER + """\
from orchtest_hash_prompts import GREETING

machine = Machine("greet", [LLMState("hello", prompt=GREETING), LLMState("bye", prompt="Bye.")],
                  input_vars={"text": str})
""")
    answers = write(tmp_path / "answers.json", json.dumps({"hello": "hi", "bye": [{"error": 400}, "bye"]}))
    cli = Orch(tmp_path / "orch.db")
    failed = cli("run", path, "--offline", answers, "--run-id", "greet-1")
    assert failed.code == 1, failed.stderr
    prompts.write_text('GREETING = "Say goodbye to {text}."\n')
    refused = cli("resume", "greet-1")
    assert refused.code == 2, refused.stdout
    assert "changed since run greet-1 started" in one_error_line(refused)
    assert "state hello" in one_error_line(refused)
