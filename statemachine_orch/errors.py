"""One exception hierarchy, rooted in `OrchError`.

Every error carries the data a caller needs to act (state, run_id, status code...) and a
message that says what went wrong, where, and how to fix it. `exit_code` is what the CLI
returns for it: 1 a run failed (recorded, resumable), 2 nothing was run (usage, definition
or input), 3 the run is busy in another process.
"""

from __future__ import annotations

from collections.abc import Sequence


class OrchError(Exception):
    """Root of every error raised by statemachine_orch."""

    exit_code: int = 1


# --------------------------------------------------------------------------- definition time


class DefinitionError(OrchError):
    """A machine definition is invalid; `problems` lists every problem, one line each."""

    exit_code = 2

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems:\n" + "\n".join(self.problems)
        super().__init__(text)


class MachineNotFoundError(DefinitionError):
    """A machine reference (file, module or attribute) could not be loaded."""


class InputError(OrchError):
    """The run input is not acceptable (not JSON, not an object, fails the input model)."""

    exit_code = 2


class UsageError(OrchError):
    """The command line or API was used in a way that cannot work (nothing was run)."""

    exit_code = 2


# --------------------------------------------------------------------------- run time


class RunError(OrchError):
    """A run failed; the failure is recorded and the run can be resumed."""

    def __init__(self, message: str, *, run_id: str | None = None, state: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.state = state


class StepError(RunError):
    """A plain Python state raised."""


class GuardError(RunError):
    """A guard raised, or returned something outside the state's closed set of decisions."""


class RetryLimitError(RunError):
    """A state asked for RETRY more often than its retry limit allows."""


class VisitLimitError(RunError):
    """A state inside a cycle was entered more often than its `max_visits` allows."""


class LLMError(RunError):
    """The model call failed or its answer is unusable (refused, truncated, invalid).

    `kind`: "transient" (retries exhausted), "deterministic" (not retriable), "spend_limit",
    "invalid_output", "refusal", "truncated" or "unexpected".
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        status_code: int | None = None,
        request_id: str | None = None,
        run_id: str | None = None,
        state: str | None = None,
    ) -> None:
        super().__init__(message, run_id=run_id, state=state)
        self.kind = kind
        self.status_code = status_code
        self.request_id = request_id


class BudgetExceededError(RunError):
    """The run's budget (cost, tokens or time) cannot cover the next step."""


# --------------------------------------------------------------------------- storage


class StoreError(OrchError):
    """The database could not be read or written."""


class CorruptRunError(StoreError):
    """A stored run holds data that is not what statemachine_orch writes (JSON only)."""


class SchemaVersionError(StoreError):
    """The database was written by a newer (or unknown) schema version."""

    exit_code = 2


class RunNotFoundError(StoreError):
    """No run with that id is stored."""

    exit_code = 2


class RunBusyError(StoreError):
    """Another live process owns the run."""

    exit_code = 3


class OwnershipLostError(StoreError):
    """This process no longer owns the run (another process claimed it); nothing was written."""

    exit_code = 3
