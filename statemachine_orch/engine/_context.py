"""What a state's code and its guard may read: the run's input and the outputs the state needs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..definition._states import State
from ..errors import StepError
from ..types import StepContext


class Needs(dict[str, Any]):
    """The outputs a state declared in `needs`; reading any other one says which line to fix
    (a bare KeyError would not). `get()` and `in` answer as for any mapping."""

    __slots__ = ("_run_id", "_state")

    def __init__(self, values: Mapping[str, Any], *, run_id: str, state: State) -> None:
        super().__init__(values)
        self._run_id = run_id
        self._state = state

    def __missing__(self, name: str) -> Any:
        state = self._state
        if name in state.needs:
            raise KeyError(name)  # declared, but its state has not run on this run's path
        raise StepError(f"state '{state.name}' read ctx.outputs[{name!r}], which is not in its needs",
                        fix=f"add {name!r} to needs=[...] of state '{state.name}'",
                        run_id=self._run_id, state=state.name)


def context(run_id: str, state: State, attempt: int, input: Any, outputs: Mapping[str, Any]) -> StepContext:
    """The context of one step of `state`, with the outputs of its `needs` taken from `outputs`."""
    needs = Needs({n: outputs[n] for n in state.needs if n in outputs}, run_id=run_id, state=state)
    return StepContext(run_id, state.name, attempt, input, needs)
