"""Asking a state's guard for its decision: the call, and what it may return."""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import GuardError
from ..types import Branch, FlowDecision, StepContext, Verdict
from ._fsm import Plan
from ._user_code import CodeError, UserCode


def ask_guard(plan: Plan, output: Any, ctx: StepContext, code: UserCode, run_id: str) -> tuple[str, str]:
    """(decision value, reason) the guard of `plan` gives `output`; a guard that raises, or
    returns what the state may not decide, fails the step (`GuardError`)."""
    assert plan.guard is not None
    name = plan.guard_name
    try:
        result: Any = code.run(plan.guard, output, ctx, timeout=plan.state.timeout)
    except CodeError as err:
        raise GuardError(err.message(f"guard {name} raised ", f"guard {name} of state '{plan.state.name}'"),
                         run_id=run_id, state=plan.state.name) from err.cause
    reason = ""
    if isinstance(result, Verdict):
        result, reason = result.decision, str(result.reason)
    try:
        decision = plan.allowed.get(result)
    except TypeError:  # unhashable, so not a decision
        decision = None
    if decision is None:
        raise _not_allowed(plan, result, run_id)
    return decision, reason or f"{plan.guard_name} saw {_excerpt(output)} -> {decision}"


def _not_allowed(plan: Plan, result: Any, run_id: str) -> GuardError:
    allowed = sorted(plan.allowed.values())
    if isinstance(result, (FlowDecision, Branch)):
        return GuardError(
            f"guard {plan.guard_name} returned {result.value}, which state '{plan.state.name}' has no "
            f"transition for (allowed: {allowed})", fix="add it to on={...} and @guard(...)",
            run_id=run_id, state=plan.state.name)
    if inspect.isawaitable(result) and hasattr(result, "close"):
        result.close()
    return GuardError(
        f"guard {plan.guard_name} returned {_excerpt(result)}, which is not a decision",
        fix=f"return a FlowDecision or Branch (allowed here: {allowed})", run_id=run_id, state=plan.state.name)


def _excerpt(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
