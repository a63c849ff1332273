"""What a state's code and its guard may read: the run's input, the outputs the state needs,
and what the run's states produced on earlier visits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

from ..definition._states import State
from ..errors import StepError
from ..types import StepContext


class Needs(dict[str, Any]):
    """The outputs a state declared in `needs` or `needs_if_ran`; reading any other one says
    which line to fix (a bare KeyError would not). `get()` and `in` answer as for any mapping."""

    __slots__ = ("_run_id", "_state")

    def __init__(self, values: Mapping[str, Any], *, run_id: str, state: State) -> None:
        super().__init__(values)
        self._run_id = run_id
        self._state = state

    def __missing__(self, name: str) -> Any:
        state = self._state
        if name in state.needs or name in state.needs_if_ran:
            raise KeyError(name)  # declared, but its state has not run on this run's path
        raise StepError(f"state '{state.name}' read ctx.outputs[{name!r}], which is not in its needs",
                        fix=f"add {name!r} to needs=[...] (or needs_if_ran=[...]) of state '{state.name}'",
                        run_id=self._run_id, state=state.name)


class History(Mapping[str, Sequence[Any]]):
    """State name -> the outputs it committed in this run, oldest first: one live view per
    run, read through `StepContext.history`. A name that is not a state is a mistake to fix."""

    __slots__ = ("_names", "_outputs", "_run_id")

    def __init__(self, outputs: dict[str, list[Any]], names: Mapping[str, Any], run_id: str) -> None:
        self._outputs = outputs
        self._names = names
        self._run_id = run_id

    def __getitem__(self, name: str) -> Sequence[Any]:
        if name not in self._names:
            raise StepError(f"ctx.history({name!r}) names no state of this machine",
                            fix=f"use one of {sorted(self._names)}", run_id=self._run_id)
        return self._outputs.get(name, ())

    def __iter__(self) -> Iterator[str]:
        return iter(self._outputs)

    def __len__(self) -> int:
        return len(self._outputs)


def context(run_id: str, state: State, attempt: int, input: Any, outputs: Mapping[str, Any], visit: int,
            history: History, run_child: Callable[..., Awaitable[Any]] | None) -> StepContext:
    """The context of one step of `state`, with the outputs it reads taken from `outputs`."""
    reads = {n: outputs[n] for n in (*state.needs, *state.needs_if_ran) if n in outputs}
    return StepContext(run_id, state.name, attempt, input, Needs(reads, run_id=run_id, state=state), visit,
                       history, run_child)
