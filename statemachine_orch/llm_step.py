"""One LLM state's step: build the request, check budget and cache, call, check, repair, fall back.

Every model call the step makes lands in the step's record: the one that answered in the
row itself, the others (retried errors, invalid answers that were re-asked, the failure
that sent the step to its fallback) as `Attempt`s. Usage and cost add up over all of them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from .definition import LLMState, Machine, PythonState
from .errors import BudgetExceededError, LLMError, OrchError
from .faults import kill_point
from .llm import TRANSIENT_KINDS, completion_from_response
from .ownership import Owner
from .prices import PriceTable
from .snapshot import first_error, restore_output
from .store import Store
from .types import (
    Attempt,
    Budget,
    Completion,
    InvalidOutput,
    LLMRequest,
    ModelClient,
    StepContext,
    TransitionRecord,
    Usage,
    now_iso,
)

CHARS_PER_TOKEN_ESTIMATE = 3  # conservative: English averages nearer 4 characters per token

PythonOverride = Callable[[PythonState | LLMState, StepContext], Any]
"""Replaces running Python code of a state (a Python state, or an LLM state's fallback
function); replay serves recorded outputs through it."""


@dataclass(frozen=True, slots=True)
class BudgetRoute:
    """The budget cannot cover the call and the state routes that to `on_budget` instead."""

    reason: str


@dataclass(slots=True)
class Spent:
    """What a run has paid so far (and how long it has been active)."""

    cost_usd: float = 0.0
    usage: Usage = field(default_factory=Usage)  # the run's own usage object, summed as it commits
    seconds: float = 0.0


def request_hash(body: dict[str, Any]) -> str:
    """Identity of a request for the step cache: model, system, messages, parameters, schema."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def paid_tokens(usage: Usage) -> int:
    """Every token a call is billed for: input, output, cache writes and cache reads."""
    return (usage.input_tokens + usage.output_tokens + usage.cache_read_tokens
            + usage.cache_write_tokens)


def estimate_input_tokens(body: dict[str, Any]) -> int:
    return math.ceil(len(json.dumps(body, ensure_ascii=False)) / CHARS_PER_TOKEN_ESTIMATE)


class LLMStep:
    """Runs LLM states for one run."""

    def __init__(
        self,
        *,
        run_id: str,
        machine: Machine,
        tools: dict[str, tuple[str, dict[str, Any]]],
        model: Callable[[], ModelClient],
        store: Store,
        prices: PriceTable,
        budget: Budget,
        python_override: PythonOverride | None,
        owner: Owner,
        in_doubt_seq: int | None = None,
    ) -> None:
        self.run_id = run_id
        self.machine = machine
        self.tools = tools
        self._model = model
        self.store = store
        self.prices = prices
        self.budget = budget
        self.python_override = python_override
        self.owner = owner
        self.in_doubt_seq = in_doubt_seq  # a call of this step was in flight when a process died

    def body(self, state: LLMState, values: Callable[[tuple[str, ...]], dict[str, Any]]) -> dict[str, Any]:
        prompt, system = self.machine.templates[state.name]
        body: dict[str, Any] = {
            "model": state.model or self.machine.model,
            "max_tokens": state.max_tokens,
            "messages": [{"role": "user", "content": prompt.render(values(prompt.names))}],
        }
        if system is not None:
            text = system.render(values(system.names))
            body["system"] = ([{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]
                              if state.prompt_cache else text)
        body.update(state.params)
        tool = self.tools.get(state.name)
        if tool is not None:
            body["tools"] = [tool[1]]
            body["tool_choice"] = {"type": "tool", "name": tool[0]}
        return body

    async def execute(self, state: LLMState, rec: TransitionRecord, ctx: StepContext,
                      values: Callable[[tuple[str, ...]], dict[str, Any]], spent: Spent) -> Any:
        """The state's output (validated), an InvalidOutput to route, or a BudgetRoute."""
        body = self.body(state, values)
        rec.request = body
        tool_name = self.tools[state.name][0] if state.name in self.tools else None
        if state.cache:
            rec.request_hash = request_hash(body)
            hit = self.store.find_cached(rec.request_hash)
            if hit is not None and hit.response is not None:
                rec.source, rec.cost_usd = "cache", 0.0
                rec.response, rec.request_id = hit.response, hit.request_id
                rec.reason = f"cache hit: same request as run {hit.run_id} seq {hit.seq}"
                completion = completion_from_response(hit.response, tool_name, hit.request_id)
                output, problem = _check(state, completion, tool_name)
                if problem is None:
                    return output
                rec.source, rec.response, rec.request_id, rec.reason = "llm", None, None, None
        call = _Call(self, state, rec, tool_name, spent)
        return await call.run(body, ctx)


class _Call:
    """The calls of one step: accumulates attempts, usage and cost into the record."""

    __slots__ = ("call_started", "marked", "rec", "spent", "state", "step", "tool_name")

    def __init__(self, step: LLMStep, state: LLMState, rec: TransitionRecord, tool_name: str | None,
                 spent: Spent) -> None:
        self.step = step
        self.state = state
        self.rec = rec
        self.tool_name = tool_name
        self.spent = spent
        self.call_started = rec.started_at
        self.marked = False  # the record is fresh: no usage, cost 0.0 until calls are paid

    async def run(self, body: dict[str, Any], ctx: StepContext) -> Any:
        state = self.state
        first = body
        repairs = state.repairs
        while True:
            route = self._afford(body)
            if route is not None:
                return route
            try:
                completion = await self._complete(body)
            except LLMError as exc:
                if exc.kind not in TRANSIENT_KINDS or state.fallback is None:
                    raise
                return await self._fallback(first, ctx, exc)
            output, problem = _check(state, completion, self.tool_name)
            if problem is None:
                self._answered(completion)
                return output
            kind, error = problem
            if kind != "invalid_output" or repairs == 0:
                return self._unusable(completion, kind, error)
            repairs -= 1
            self._record_invalid(completion, kind, error, body)
            body = _reask(body, completion, error, self.tool_name)

    async def _complete(self, body: dict[str, Any]) -> Completion:
        state, rec = self.state, self.rec
        request = LLMRequest(run_id=rec.run_id, state=state.name, body=body, tool_name=self.tool_name,
                             timeout_s=state.timeout,
                             retry=state.retry_policy or self.step.machine.retry_policy)
        rec.request = body
        model = self.step._model()
        if not self.marked:  # the step's first call: it starts with the step
            kill_point("before_request")
            if getattr(model, "bills", False):
                self.step.store.mark_in_flight(rec.run_id, self.step.owner, rec.seq, state.name)
            self.marked = True
        else:
            self.call_started = now_iso()
        if rec.seq == self.step.in_doubt_seq:
            rec.in_doubt = True
        try:
            completion = await model.complete(request)
        except OrchError:
            raise
        except Exception as exc:  # an adapter bug must still be recorded against the step
            raise LLMError(f"model client failed: {type(exc).__name__}: {exc}", kind="unexpected",
                           run_id=rec.run_id, state=state.name) from exc
        finally:  # also when the step is cancelled mid-retry: the tries already made are logged
            self._add_attempts(request.attempts)
        self._pay(body["model"], completion.usage)
        return completion

    def _add_attempts(self, attempts: list[Attempt]) -> None:
        offset = len(self.rec.attempts)
        for attempt in attempts:
            attempt.number += offset
            self.rec.attempts.append(attempt)

    def _pay(self, model: str, usage: Usage) -> None:
        self.rec.usage.add(usage)
        cost = self.step.prices.cost(model, usage)
        if cost is None or self.rec.cost_usd is None:
            self.rec.cost_usd = None
        else:
            self.rec.cost_usd += cost

    def _answered(self, completion: Completion) -> None:
        self.rec.response = completion.response
        self.rec.request_id = completion.request_id

    def _record_invalid(self, completion: Completion, kind: str, error: str, body: dict[str, Any]) -> None:
        """An answer that will be re-asked: kept as an attempt with its response."""
        self.rec.attempts.append(Attempt(
            number=len(self.rec.attempts) + 1, started_at=self.call_started, kind=kind, error=error,
            request_id=completion.request_id, usage=completion.usage,
            cost_usd=self.step.prices.cost(body["model"], completion.usage),
            request=body, response=completion.response))

    def _unusable(self, completion: Completion, kind: str, error: str) -> Any:
        self._answered(completion)
        if self.state.on_invalid == "guard":
            return InvalidOutput(kind, error, completion.text, completion.data)
        raise LLMError(error, kind=kind, request_id=completion.request_id, run_id=self.rec.run_id,
                       state=self.state.name)

    async def _fallback(self, body: dict[str, Any], ctx: StepContext, failure: LLMError) -> Any:
        state, rec = self.state, self.rec
        fallback = state.fallback
        rec.source = "fallback"
        name = fallback if isinstance(fallback, str) else getattr(fallback, "__name__", "function")
        rec.reason = f"answered by fallback {name} after: {failure}"
        if isinstance(fallback, str):
            fallback_body = {**body, "model": fallback}
            # cache the fallback's answer under its own request, never under the primary's
            rec.request_hash = request_hash(fallback_body) if state.cache else None
            route = self._afford(fallback_body)
            if route is not None:
                return route
            try:
                completion = await self._complete(fallback_body)
            except LLMError as exc:
                raise LLMError(f"{failure}; fallback {fallback} failed too: {exc}", kind=exc.kind,
                               status_code=exc.status_code, request_id=exc.request_id,
                               run_id=rec.run_id, state=state.name) from None
            output, problem = _check(state, completion, self.tool_name)
            if problem is not None:
                return self._unusable(completion, *problem)
            self._answered(completion)
            return output
        assert fallback is not None
        rec.request_hash = None
        override = self.step.python_override
        try:
            result = override(state, ctx) if override is not None else fallback(ctx)
            if inspect.isawaitable(result):
                result = await result
        except OrchError:
            raise
        except Exception as exc:
            raise LLMError(f"{failure}; fallback {name} failed too: {type(exc).__name__}: {exc}",
                           kind=failure.kind, run_id=rec.run_id, state=state.name) from exc
        try:
            result = restore_output(state, result)  # as a Python state's value: validated, storable
        except (TypeError, ValueError) as exc:
            raise LLMError(f"fallback answer {exc}", kind="invalid_output", run_id=rec.run_id,
                           state=state.name) from None
        rec.request = None
        return result

    def _afford(self, body: dict[str, Any]) -> BudgetRoute | None:
        """Check the run's budget against this call's worst case before sending it."""
        budget, spent, state = self.step.budget, self.spent, self.state
        if budget.max_cost_usd is None and budget.max_tokens is None:
            return None
        estimate = estimate_input_tokens(body)
        worst_tokens = estimate + state.max_tokens
        so_far_tokens = paid_tokens(spent.usage) + paid_tokens(self.rec.usage)
        problem = None
        if budget.max_tokens is not None and so_far_tokens + worst_tokens > budget.max_tokens:
            problem = (f"tokens: spent {so_far_tokens} + worst case {worst_tokens} (about {estimate} in, "
                       f"{state.max_tokens} out) > max_tokens {budget.max_tokens}")
        if problem is None and budget.max_cost_usd is not None:
            worst_usage = (Usage(cache_write_tokens=estimate, output_tokens=state.max_tokens)
                           if state.prompt_cache else
                           Usage(input_tokens=estimate, output_tokens=state.max_tokens))
            worst = self.step.prices.cost(body["model"], worst_usage)
            so_far = spent.cost_usd + (self.rec.cost_usd or 0.0)
            if worst is None:
                problem = (f"cost: no price known for model {body['model']!r}, so max_cost_usd cannot "
                           "be checked")
            elif so_far + worst > budget.max_cost_usd:
                problem = (f"cost: spent ${so_far:.4f} + worst case ${worst:.4f} > max_cost_usd "
                           f"${budget.max_cost_usd:.4f}")
        if problem is None:
            return None
        if state.on_budget is not None:
            return BudgetRoute(f"budget exhausted before calling {state.name} ({problem}); "
                               f"routed to {state.on_budget.value}")
        fix = ("add the model's price (--prices FILE or PriceTable) and resume" if "no price" in problem
               else "raise the limit and resume")
        raise BudgetExceededError(f"budget exceeded before calling {state.name}: {problem}; {fix}",
                                  run_id=self.rec.run_id, state=state.name)


def _check(state: LLMState, completion: Completion, tool_name: str | None) -> tuple[Any, tuple[str, str] | None]:
    """(output, None) for a usable answer, else (None, (kind, error))."""
    if completion.stop_reason == "refusal":
        return None, ("refusal", "the model refused to answer (stop_reason=refusal)")
    if completion.stop_reason == "max_tokens":
        return None, ("truncated", f"the answer was cut off at max_tokens={state.max_tokens}; raise "
                                   f"max_tokens for state '{state.name}' and resume")
    if state.output is None:
        if not completion.text.strip():
            return None, ("empty", "the model returned an empty answer")
        return completion.text, None
    if completion.data is None:
        return None, ("invalid_output", f"the model did not call the {tool_name} tool")
    try:
        return state.output.model_validate(completion.data), None
    except ValidationError as exc:
        return None, ("invalid_output", f"answer does not match {state.output.__name__}: "
                                        f"{first_error(exc)}")


def _reask(body: dict[str, Any], completion: Completion, error: str, tool_name: str | None) -> dict[str, Any]:
    """The same request, continued with the invalid answer and what was wrong with it."""
    content = completion.response.get("content") or []
    note = (f"That answer was not valid: {error}. Call {tool_name} again with input that matches "
            "its schema exactly.")
    tool_use = next((b for b in content if isinstance(b, dict) and b.get("type") == "tool_use"), None)
    reply: Any = note
    if tool_use is not None:
        reply = [{"type": "tool_result", "tool_use_id": tool_use.get("id"), "is_error": True,
                  "content": note}]
    messages = [*body["messages"], {"role": "assistant", "content": content},
                {"role": "user", "content": reply}]
    return {**body, "messages": messages}
