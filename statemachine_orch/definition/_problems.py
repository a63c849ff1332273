"""Definition problems, one line each: where (the machine's file), what (state or machine), the fix."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._machine import Machine


class Problems(list[str]):
    """The problems found in one machine, worded alike by the table builder and the validator."""

    def __init__(self, machine: Machine) -> None:
        super().__init__()
        self.states: list[str | None] = []  # whose problem each line is
        self.machine_name = machine.name
        where = machine.source_file
        if where:
            try:
                where = str(Path(where).resolve().relative_to(Path.cwd()))
            except ValueError:
                pass
        self.where = where or "<unknown module>"

    def add(self, state: str | None, problem: str, fix: str) -> None:
        """A problem of `state` (None: of the machine as a whole) and how to fix it."""
        subject = f"state '{state}'" if state is not None else f"machine '{self.machine_name}'"
        self.append(f"{self.where}: {subject}: {problem}; fix: {fix}")
        self.states.append(state)

    def adopt(self, lines: list[str], inner: str, state: str, role: str) -> None:
        """The problems of a machine a state builds for its child runs (`inner`: that machine's
        one state, the state's `role`: "each= state", "branch"), said of `state`."""
        for line in lines:
            what = line.split(": ", 1)[1].replace(f"state '{inner}'", f"its {role} '{inner}'", 1)
            self.append(f"{self.where}: state '{state}': {what}")
            self.states.append(state)

    def take(self, other: Problems, state: str | None) -> None:
        """Add `other`'s lines about `state` (None: about the machine)."""
        for line, whose in zip(other, other.states, strict=True):
            if whose == state:
                self.append(line)
                self.states.append(whose)
