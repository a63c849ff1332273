"""One LLM state's step: build the request, check budget and cache, call, check, repair, fall back.

Every model call the step makes lands in the step's record: the one that answered in the
row itself, the others (retried errors, invalid answers that were re-asked, the failure
that sent the step to its fallback, a call in doubt after a crash) as `Attempt`s. Usage and
cost add up over all of them. With a model that bills, each call is marked in flight with the
step so far before it is sent, and each answer is kept as it arrives (`_progress`): a resume
picks the step up where its process stopped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from ..definition._states import LLMState, PythonState
from ..definition._templates import as_text
from ..errors import BudgetExceededError, LLMError, OrchError, StepError, UsageError
from ..llm._client import TRANSIENT_KINDS, Completion, LLMRequest, completion_from_response, estimate_input_tokens
from ..store._owner import Owner
from ..types import Attempt, Budget, InvalidOutput, OutputProblem, StepContext, TransitionRecord, Usage, now_iso
from ._fork import ParentAnswers
from ._fsm import Compiled
from ._outputs import first_error, restore_output
from ._progress import Unfinished, answered, sending
from ._user_code import CodeError, UserCode

if TYPE_CHECKING:
    from ._run import Ports

IN_DOUBT = ("in flight when its process stopped, so it may have been paid; counted at its worst case "
            "(the estimated input and max_tokens)")

Values = Callable[[tuple[str, ...]], dict[str, Any]]
"""The template values of the given names (the run's input values and the outputs of needs)."""

PythonOverride = Callable[[PythonState | LLMState, StepContext], Any]
"""Replaces running Python code of a state (a Python state, or an LLM state's fallback
function); replay serves recorded outputs through it."""


@dataclass(frozen=True, slots=True)
class BudgetRoute:
    """The budget cannot cover the call and the state routes that to `on_budget` instead."""

    reason: str


@dataclass(slots=True)
class Spent:
    """The budget ledger of a run and its child runs: what they have paid (each adds its steps
    as they commit), the worst case of the calls they have in flight (`reserved_*`: so that
    children calling at once cannot overspend together), and how long the run has been active."""

    cost_usd: float = 0.0
    tokens: int = 0  # paid tokens
    seconds: float = 0.0
    reserved_usd: float = 0.0
    reserved_tokens: int = 0
    in_flight: int = 0  # calls holding a reservation
    _released: asyncio.Event | None = None  # set when a reservation is given back

    def add(self, tokens: int, cost_usd: float | None) -> None:
        self.tokens += tokens
        self.cost_usd += cost_usd or 0.0

    def reserve(self, tokens: int, cost_usd: float | None, sign: int = 1) -> None:
        """Hold (sign 1) or give back (sign -1) a call's worst case while it is in flight."""
        self.in_flight += sign
        self.reserved_tokens += sign * tokens
        self.reserved_usd = self.reserved_usd + sign * (cost_usd or 0.0) if self.in_flight else 0.0  # no drift
        if sign < 0 and self._released is not None:
            self._released.set()
            self._released = None

    async def settled(self) -> None:
        """Wait until a call in flight gives back its reservation."""
        if self._released is None:
            self._released = asyncio.Event()
        await self._released.wait()


def request_hash(body: dict[str, Any]) -> str:
    """Identity of a request for the step cache: model, system, messages, parameters, schema."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class LLMStep:
    """Runs the LLM states of one run: a step's calls (the first, re-asks of invalid answers,
    a fallback model) all land in the step's record."""

    def __init__(self, *, run_id: str, compiled: Compiled, ports: Ports, budget: Budget, owner: Owner,
                 code: UserCode, left: Unfinished | None = None, reuse: ParentAnswers | None = None) -> None:
        self.run_id = run_id
        self.machine = compiled.machine
        self.tools = compiled.tools
        self.bodies = compiled.bodies
        self.model = ports.model
        self.bills = getattr(ports.model, "bills", False)  # paid calls are marked in flight first
        self.store = ports.store
        self.prices = ports.prices
        self.budget = budget
        self._budgeted = budget.max_cost_usd is not None or budget.max_tokens is not None
        self.python_override = ports.python_override
        self.owner = owner
        self.code = code
        self.left = left  # a step a stopped process left with a call in flight
        self.reuse = reuse
        # what this step's answers added to the ledger as they arrived (`take_ledgered`)
        self.ledgered: tuple[int, float] = (0, 0.0)

    def take_ledgered(self) -> tuple[int, float]:
        """(tokens, USD) this step's answers added to the ledger as they arrived; reset for the next step."""
        taken, self.ledgered = self.ledgered, (0, 0.0)
        return taken

    def body(self, state: LLMState, values: Values, tool: tuple[str, dict[str, Any]] | None) -> dict[str, Any]:
        """The request body. Without placeholders (so without vars) it is the same on every call:
        built once per machine and shared by every step's request and record (nothing modifies a body)."""
        shared = self.bodies.get(state.name)
        if shared is not None:
            return shared
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
        if state.params:
            body.update(state.params)
        if tool is not None:
            body["tools"] = [tool[1]]
            body["tool_choice"] = {"type": "tool", "name": tool[0]}
        if not prompt.names and (system is None or not system.names):
            self.bodies[state.name] = body
        return body

    async def execute(self, state: LLMState, rec: TransitionRecord, ctx: StepContext, values: Values,
                      spent: Spent, *, position: int = 0) -> Any:
        """The state's output (validated), an InvalidOutput to route, or a BudgetRoute.
        `position`: the run's committed steps so far (where a fork looks for its parent's answer)."""
        tool = self.tools.get(state.name)
        tool_name = tool[0] if tool is not None else None
        if state.vars:  # a body with vars is never shared: validation has each var in a template
            values = await self._with_vars(state, ctx, values)
        body = self.body(state, values, tool)
        rec.request = body
        picked_up, reask, repairs = self._pick_up(state, rec, tool_name)
        if self.reuse is not None and not picked_up:
            found = await self.reuse.answer(position, state.name, body)
            if found is not None:
                served, output = self._serve(state, rec, "reused", *found, tool_name)
                if served:
                    return output
        if state.cache and not picked_up:
            rec.request_hash = request_hash(body)
            hit = await self.store.find_cached(rec.request_hash)
            if hit is not None and hit.response is not None:
                served, output = self._serve(state, rec, "cache", hit,
                                             f"cache hit: same request as run {hit.run_id} seq {hit.seq}", tool_name)
                if served:
                    return output
        return await self._ask(state, rec, ctx, spent, body, tool_name, repairs, None, reask)

    def _serve(self, state: LLMState, rec: TransitionRecord, source: Literal["reused", "cache"],
               found: TransitionRecord, note: str, tool_name: str | None) -> tuple[bool, Any]:
        """(True, output) of an answer recorded in `found` taken for `rec` at no cost; (False,
        None), `rec` as it was, when it is not usable now. A reused answer that was routed as
        invalid (`on_invalid="guard"`) is routed so again, as the run it came from routed it."""
        assert found.response is not None
        rec.source, rec.cost_usd, rec.reason = source, 0.0, note
        rec.response, rec.request_id = found.response, found.request_id
        completion = completion_from_response(found.response, tool_name, found.request_id)
        output, problem = self._check(state, completion, tool_name)
        if problem is None:
            return True, output
        if source == "reused" and state.on_invalid == "guard":
            return True, self._unusable(state, rec, completion, *problem)
        rec.source, rec.response, rec.request_id, rec.reason = "llm", None, None, None
        return False, None

    async def _with_vars(self, state: LLMState, ctx: StepContext, values: Values) -> Values:
        """`values` and the state's `vars`, each computed from the step's context as user code
        (a timeout or a stop reaches it) and turned into prompt text at once."""
        computed: dict[str, str] = {}
        for name, fn in state.vars.items():
            var = f"vars[{name!r}] of state '{state.name}'"
            try:
                computed[name] = as_text(await self.code.call(fn, ctx, timeout=state.timeout))
            except CodeError as err:
                if isinstance(err.cause, OrchError):
                    raise err.cause from None
                raise StepError(err.message(f"{var} raised ", var), fix="fix the function and resume",
                                run_id=self.run_id, state=state.name) from err.cause
            except (TypeError, ValueError) as exc:
                raise StepError(f"{var} returned a value that cannot be put in a prompt: {exc}",
                                fix="return text or JSON data", run_id=self.run_id, state=state.name) from None

        def with_vars(names: tuple[str, ...]) -> dict[str, Any]:
            found = values(tuple(n for n in names if n not in computed))
            found.update((n, computed[n]) for n in names if n in computed)
            return found

        return with_vars

    def _check(self, state: LLMState, completion: Completion, tool_name: str | None
               ) -> tuple[Any, tuple[OutputProblem, str] | None]:
        """(output, None) for a usable answer, else (None, (kind, error))."""
        if completion.stop_reason == "refusal":
            return None, ("refusal", "the model refused to answer (stop_reason=refusal)")
        if completion.stop_reason == "max_tokens":
            return None, ("truncated", f"the answer was cut off at max_tokens={state.max_tokens}; raise "
                                       f"max_tokens for state '{state.name}' and resume")
        if state.output is None:
            if not completion.text.strip():
                return None, ("empty", "the model returned an empty answer")
            return (completion.text, None) if state.parse is None else self._parsed(state, completion.text)
        if completion.data is None:
            return None, ("invalid_output", f"the model did not call the {tool_name} tool")
        try:
            return state.output.model_validate(completion.data), None
        except ValidationError as exc:
            return None, ("invalid_output", f"answer does not match {state.output.__name__}: "
                                            f"{first_error(exc)}")

    def _parsed(self, state: LLMState, text: str) -> tuple[Any, tuple[OutputProblem, str] | None]:
        """A text answer through the state's `parse` (user code, like a guard): what it raises
        makes the answer invalid; a value that cannot be stored is a bug of the parser."""
        assert state.parse is not None
        try:
            value = self.code.run(state.parse, text, timeout=state.timeout)
        except CodeError as err:
            return None, ("invalid_output", err.message("parse failed: ", "parse"))
        try:
            return restore_output(state, value), None
        except (TypeError, ValueError) as exc:
            raise StepError(f"parse of state '{state.name}' returned a value that cannot be stored: {exc}",
                            fix="return JSON data (a dict, list, str, number) or a pydantic model",
                            run_id=self.run_id, state=state.name) from None

    def parse_again(self, state: LLMState, rec: TransitionRecord) -> Any:
        """The output of `rec`'s recorded text answer by the state's `parse` as it is now (a
        resume judging a paid answer again); one it rejects now is unusable, never re-asked."""
        assert rec.response is not None
        completion = completion_from_response(rec.response, None, rec.request_id)
        output, problem = self._check(state, completion, None)
        return output if problem is None else self._unusable(state, rec, completion, *problem)

    def _pick_up(self, state: LLMState, rec: TransitionRecord, tool_name: str | None
                 ) -> tuple[bool, dict[str, Any] | None, int]:
        """(picked up, the re-ask to send, repairs left) for this step. A step a stopped process
        left unfinished gets back what it paid for; the call it had in flight is in doubt; it goes
        on with the re-ask of its last paid answer, if it had one, else with its first request."""
        left = self.left
        if left is None or left.step.seq != rec.seq:
            return False, None, state.repairs
        self.left = None
        was = left.step
        rec.attempts, rec.usage, rec.cost_usd, rec.in_doubt = was.attempts, was.usage, was.cost_usd, True
        if left.calling is not None:
            rec.attempts.append(left.calling)
            rec.cost_usd = _plus(rec.cost_usd, left.calling.cost_usd)
        paid = [a for a in rec.attempts if a.kind == "invalid_output" and a.response is not None]
        if not paid:
            return True, None, state.repairs
        last = paid[-1]
        assert last.request is not None and last.response is not None
        completion = completion_from_response(last.response, tool_name, last.request_id)
        return True, _reask(last.request, completion, last.error, tool_name), state.repairs - len(paid)

    async def keep(self, rec: TransitionRecord) -> None:
        """Keep the answer that arrived for `rec` with its in-flight mark, before anything
        (a hook, the guard) sees it: a resume commits it without calling again."""
        if self.bills:
            await self.store.keep_answer(rec.run_id, self.owner, seq=rec.seq, state=rec.from_state,
                                         progress=answered(rec))

    async def _ask(self, state: LLMState, rec: TransitionRecord, ctx: StepContext, spent: Spent,
                   body: dict[str, Any], tool_name: str | None, repairs: int, primary: LLMError | None,
                   reask: dict[str, Any] | None = None) -> Any:
        """Call until an answer is usable: re-ask an invalid one up to `repairs` times, hand a
        transient failure to the state's fallback. `primary` is set when this is the fallback
        model answering for a call that failed; `reask` is the re-ask to send first instead of
        `body` (a step picked up after its process stopped)."""
        model = self.model
        if model is None:
            raise UsageError(f"state '{state.name}' calls a model, but the engine was given none",
                             fix="pass Engine(store, model=AnthropicModel())")
        first = body
        body = reask or body
        started = rec.started_at if primary is None else now_iso()  # the step's first call starts with it
        while True:
            held: tuple[int, float | None] | None = None
            worst = self._worst_case(state, body) if self._budgeted or self.bills else None
            if self._budgeted:
                assert worst is not None
                short = self._over_budget(state, rec, spent, body, worst)
                while short is not None and spent.in_flight:
                    await spent.settled()  # a sibling's call in flight may cost less than its worst case
                    short = self._over_budget(state, rec, spent, body, worst)
                if short is not None:
                    return self._budget_route(state, rec, body, short)
                held = (worst[1].paid_tokens, worst[2])
                spent.reserve(*held)
            if self.bills:
                assert worst is not None
                call = Attempt(number=len(rec.attempts) + 1, started_at=started, kind="in_doubt",
                               error=IN_DOUBT, usage=worst[1], cost_usd=worst[2])
                await self.store.mark_in_flight(rec.run_id, self.owner, seq=rec.seq, state=state.name,
                                                progress=sending(rec, call))
            request = LLMRequest(run_id=rec.run_id, state=state.name, body=body, tool_name=tool_name,
                                 timeout_s=state.timeout, retry=state.retry_policy or self.machine.retry_policy)
            rec.request = body
            failure: OrchError | None = None
            try:
                completion = await model.complete(request)
            except OrchError as exc:
                failure = exc
            except Exception as exc:  # an adapter bug must still be recorded against the step
                failure = LLMError(f"model client failed: {type(exc).__name__}: {exc}", kind="unexpected",
                                   run_id=rec.run_id, state=state.name)
                failure.__cause__ = exc
            finally:  # also when the step is cancelled mid-retry: the tries already made are logged
                if held is not None:
                    spent.reserve(*held, sign=-1)
                if request.attempts:
                    self._add_attempts(rec, request.attempts)
            if failure is not None:
                if not isinstance(failure, LLMError):
                    raise failure
                if primary is not None:
                    raise LLMError(f"{primary}; fallback {body['model']} failed too: {failure}",
                                   kind=failure.kind, status_code=failure.status_code,
                                   request_id=failure.request_id, run_id=rec.run_id, state=state.name) from None
                if failure.kind not in TRANSIENT_KINDS or state.fallback is None:
                    raise failure
                return await self._fallback(state, rec, ctx, spent, first, tool_name, failure)
            usage = completion.usage
            rec.usage.add(usage)
            cost = self.prices.cost(body["model"], usage)
            rec.cost_usd = _plus(rec.cost_usd, cost)
            # into the ledger now, as the reservation is given back: not at the commit, which
            # may wait (a group commit, a locked file) while siblings check the budget
            spent.add(usage.paid_tokens, cost)
            self.ledgered = (self.ledgered[0] + usage.paid_tokens, self.ledgered[1] + (cost or 0.0))
            output, problem = self._check(state, completion, tool_name)
            if problem is None:
                rec.response = completion.response
                rec.request_id = completion.request_id
                return output
            kind, error = problem
            if kind != "invalid_output" or repairs == 0:
                return self._unusable(state, rec, completion, kind, error)
            repairs -= 1
            rec.attempts.append(Attempt(
                number=len(rec.attempts) + 1, started_at=started, kind=kind, error=error,
                request_id=completion.request_id, usage=completion.usage,
                cost_usd=cost, request=body,
                response=completion.response))  # an answer that will be re-asked, kept with its response
            body = _reask(body, completion, error, tool_name)
            started = now_iso()

    @staticmethod
    def _add_attempts(rec: TransitionRecord, attempts: list[Attempt]) -> None:
        offset = len(rec.attempts)
        for attempt in attempts:
            attempt.number += offset
            rec.attempts.append(attempt)

    @staticmethod
    def _unusable(state: LLMState, rec: TransitionRecord, completion: Completion, kind: OutputProblem,
                  error: str) -> Any:
        rec.response = completion.response
        rec.request_id = completion.request_id
        if state.on_invalid == "guard":
            return InvalidOutput(kind, error, completion.text, completion.data)
        raise LLMError(error, kind=kind, request_id=completion.request_id, run_id=rec.run_id, state=state.name)

    async def _fallback(self, state: LLMState, rec: TransitionRecord, ctx: StepContext, spent: Spent,
                        body: dict[str, Any], tool_name: str | None, failure: LLMError) -> Any:
        fallback = state.fallback
        rec.source = "fallback"
        name = fallback if isinstance(fallback, str) else getattr(fallback, "__name__", "function")
        rec.reason = f"answered by fallback {name} after: {failure}"
        if isinstance(fallback, str):
            fallback_body = {**body, "model": fallback}
            # cache the fallback's answer under its own request, never under the primary's
            rec.request_hash = request_hash(fallback_body) if state.cache else None
            return await self._ask(state, rec, ctx, spent, fallback_body, tool_name, 0, failure)
        assert fallback is not None
        rec.request_hash = None
        override = self.python_override
        try:
            result = await (self.code.call(fallback, ctx, timeout=state.timeout) if override is None
                            else self.code.call(override, state, ctx, timeout=None))
        except CodeError as err:
            if isinstance(err.cause, OrchError):
                raise err.cause from None
            raise LLMError(f"{failure}; fallback {name} failed too: {err.message('', 'it')}",
                           kind=failure.kind, run_id=rec.run_id, state=state.name) from err.cause
        try:
            result = restore_output(state, result)  # as a Python state's value: validated, storable
        except (TypeError, ValueError) as exc:
            raise LLMError(f"fallback answer {exc}", kind="invalid_output", run_id=rec.run_id,
                           state=state.name) from None
        rec.request = None
        return result

    def _worst_case(self, state: LLMState, body: dict[str, Any]) -> tuple[int, Usage, float | None]:
        """What a call of `body` can cost at most: (estimated input tokens, usage, price)."""
        estimate = estimate_input_tokens(body)
        usage = (Usage(cache_write_tokens=estimate, output_tokens=state.max_tokens) if state.prompt_cache
                 else Usage(input_tokens=estimate, output_tokens=state.max_tokens))
        return estimate, usage, self.prices.cost(body["model"], usage)

    def _over_budget(self, state: LLMState, rec: TransitionRecord, spent: Spent, body: dict[str, Any],
                     worst_case: tuple[int, Usage, float | None]) -> str | None:
        """Why the budget cannot cover this call's worst case (`_worst_case`) on top of what is
        spent and reserved, or None when it can."""
        budget = self.budget
        estimate, worst_usage, worst = worst_case
        worst_tokens = worst_usage.paid_tokens
        own_tokens, own_usd = self.ledgered  # this step's answers, in the ledger and in `rec` both
        so_far_tokens = spent.tokens + spent.reserved_tokens + rec.usage.paid_tokens - own_tokens
        problem = None
        if budget.max_tokens is not None and so_far_tokens + worst_tokens > budget.max_tokens:
            problem = (f"tokens: spent {so_far_tokens} + worst case {worst_tokens} (about {estimate} in, "
                       f"{state.max_tokens} out) > max_tokens {budget.max_tokens}")
        if problem is None and budget.max_cost_usd is not None:
            so_far = spent.cost_usd + spent.reserved_usd + (rec.cost_usd or 0.0) - own_usd
            if worst is None:
                problem = (f"cost: no price known for model {body['model']!r}, so max_cost_usd cannot "
                           "be checked")
            elif so_far + worst > budget.max_cost_usd:
                problem = (f"cost: spent ${so_far:.4f} + worst case ${worst:.4f} > max_cost_usd "
                           f"${budget.max_cost_usd:.4f}")
        return problem

    def _budget_route(self, state: LLMState, rec: TransitionRecord, body: dict[str, Any], problem: str) -> BudgetRoute:
        """The state's `on_budget` route for a call the budget cannot cover, else BudgetExceededError."""
        if state.on_budget is not None:
            return BudgetRoute(f"budget exhausted before calling {state.name} ({problem}); "
                               f"routed to {state.on_budget.value}")
        unpriced = body["model"] if "no price" in problem else None
        raise BudgetExceededError(f"budget exceeded before calling {state.name}: {problem}",
                                  fix="add the model's price (--prices FILE or PriceTable) and resume" if unpriced
                                  else "raise the limit and resume", unpriced_model=unpriced,
                                  run_id=rec.run_id, state=state.name)


def _plus(cost: float | None, more: float | None) -> float | None:
    """Two costs added up; None (unknown) when either is."""
    return None if cost is None or more is None else cost + more


def _reask(body: dict[str, Any], completion: Completion, error: str, tool_name: str | None) -> dict[str, Any]:
    """The same request, continued with the invalid answer and what was wrong with it."""
    content = completion.response.get("content") or []
    again = (f"Call {tool_name} again with input that matches its schema exactly." if tool_name is not None
             else "Answer again, in the format the instructions ask for.")
    note = f"That answer was not valid: {error}. {again}"
    tool_use = next((b for b in content if isinstance(b, dict) and b.get("type") == "tool_use"), None)
    reply: Any = note
    if tool_use is not None:
        reply = [{"type": "tool_result", "tool_use_id": tool_use.get("id"), "is_error": True,
                  "content": note}]
    messages = [*body["messages"], {"role": "assistant", "content": content},
                {"role": "user", "content": reply}]
    return {**body, "messages": messages}
