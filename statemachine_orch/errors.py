"""One exception hierarchy, rooted in `OrchError`.

Every error carries the data a caller needs to act (state, run_id, path, status code...) and a
message that says what went wrong and where; `fix` says how to fix it in terms of the Python
API. The CLI words the fix in its own terms (flags, commands) from the same data.
`exit_code` is what the CLI returns for it: 1 a run failed (recorded, resumable), 2 nothing was
run (usage, definition or input), 3 the run is busy in another process.
"""

from __future__ import annotations

from collections.abc import Sequence


class OrchError(Exception):
    """Root of every error raised by statemachine_orch.

    `what` says what went wrong and where, `fix` how to fix it (None when the message says it);
    `str(error)` is both, joined by "; "."""

    exit_code: int = 1

    def __init__(self, what: str, *, fix: str | None = None) -> None:
        self.what = what
        self.fix = fix
        super().__init__(f"{what}; {fix}" if fix else what)


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
    """The run input is not acceptable (not JSON, not an object, fails the input model).
    `model` names the input model it fails, when that is why."""

    exit_code = 2

    def __init__(self, what: str, *, fix: str | None = None, model: str | None = None) -> None:
        super().__init__(what, fix=fix)
        self.model = model


class UsageError(OrchError):
    """The command line or API was used in a way that cannot work (nothing was run)."""

    exit_code = 2


class MachineChangedError(UsageError):
    """The machine's code changed since the run started and its recorded steps no longer replay."""

    def __init__(self, what: str, *, run_id: str) -> None:
        super().__init__(what, fix="fix the machine, or resume anyway with allow_changed=True")
        self.run_id = run_id


class NoCredentialsError(UsageError):
    """The Anthropic model client has no API key or auth token to call with."""

    def __init__(self) -> None:
        super().__init__("ANTHROPIC_API_KEY is not set",
                         fix="export it to call the API, or run on an offline model")


# --------------------------------------------------------------------------- run time


class RunError(OrchError):
    """A run failed; the failure is recorded and the run can be resumed."""

    def __init__(self, message: str, *, run_id: str | None = None, state: str | None = None,
                 fix: str | None = None) -> None:
        super().__init__(message, fix=fix)
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
    "invalid_output", "refusal", "truncated", "empty" or "unexpected".
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
    """The run's budget (cost, tokens or time) cannot cover the next step.

    `unpriced_model` names the model whose price is missing when that is why."""

    def __init__(self, message: str, *, run_id: str | None = None, state: str | None = None,
                 fix: str | None = None, unpriced_model: str | None = None) -> None:
        super().__init__(message, run_id=run_id, state=state, fix=fix)
        self.unpriced_model = unpriced_model


# --------------------------------------------------------------------------- storage


class StoreError(OrchError):
    """The database could not be read or written. `where` names the database (a path or URL)."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        super().__init__(what, fix=fix)
        self.where = where


class DatabaseNotFoundError(UsageError):
    """No database exists where one was expected (and creating one was not asked for)."""

    def __init__(self, where: str) -> None:
        super().__init__(f"no database at {where}", fix="start a run first, or open another database")
        self.where = where


class ForeignDatabaseError(StoreError):
    """The file is not a statemachine_orch database (another application's, or not ours)."""

    def __init__(self, what: str, *, where: str) -> None:
        super().__init__(what, where=where, fix="use a new database file")


class CorruptRunError(StoreError):
    """A stored run holds data that is not what statemachine_orch writes (JSON only)."""


class TamperedRunError(CorruptRunError):
    """A run's rows fail its audit chain: something edited, inserted or removed them since
    they were written. `problem` names the first bad row."""

    def __init__(self, run_id: str, problem: str, *, where: str) -> None:
        super().__init__(f"run {run_id} fails its audit chain: {problem}", where=where,
                         fix="check every run with Store.verify_chain and restore the database from a backup")
        self.run_id = run_id
        self.problem = problem


class AuditKeyError(UsageError):
    """A run's audit chain cannot be checked with the audit key configured: it was keyed with
    another key, or with one while none is set, or keyless while one is set."""

    def __init__(self, what: str, *, run_id: str, fix: str) -> None:
        super().__init__(what, fix=fix)
        self.run_id = run_id


class SchemaVersionError(StoreError):
    """The database was written by a newer (or unknown) schema version."""

    exit_code = 2


class RunNotFoundError(StoreError):
    """No run with that id is stored."""

    exit_code = 2

    def __init__(self, run_id: str, *, where: str, why: str | None = None) -> None:
        super().__init__(why or f"no run {run_id!r} in {where}", where=where)
        self.run_id = run_id


class RunExistsError(UsageError):
    """A run with that id is stored already."""

    def __init__(self, run_id: str, *, where: str) -> None:
        super().__init__(f"run {run_id} already exists in {where}", fix="resume it, or choose another run id")
        self.run_id = run_id
        self.where = where


class RunFinishedError(UsageError):
    """The run already completed or terminated: there is nothing left to drive."""

    def __init__(self, run_id: str, status: str) -> None:
        super().__init__(f"run {run_id} is already {status}; nothing to resume")
        self.run_id = run_id
        self.status = status


class ReviewDecidedError(UsageError):
    """A decision for a review that was already decided (or timed out): the first one stands."""

    def __init__(self, what: str, *, run_id: str) -> None:
        super().__init__(what, fix="a review takes one decision; fork the run to try another")
        self.run_id = run_id


class RunBusyError(StoreError):
    """Another live process owns the run."""

    exit_code = 3

    def __init__(self, run_id: str, *, holder: str, proven: bool = True) -> None:
        super().__init__(f"run {run_id} is being driven by {holder}",
                         fix="wait for it to finish or stop it first" if proven else
                         "wait for it to finish; if that process is gone for sure (its host or container "
                         "stopped), resume with --take-over")
        self.run_id = run_id
        self.holder = holder


class OwnershipLostError(StoreError):
    """This process no longer owns the run (another process claimed it); nothing was written."""

    exit_code = 3


class LeaseLostError(OwnershipLostError):
    """This process's lease on the run expired (it was paused or cut off past its TTL), so it
    may no longer write to the run, which another worker may have taken over; nothing was
    written."""
