"""Model-output fuzzing: thousands of generated answers through the real SDK and engine.

Two machines take the answers: `router` routes on free text with guards that parse it the
way users write them (a label search, a strict `FlowDecision(...)` parse, a named branch from
the text), and `verdict` asks for structured output whose schema allows two values. For
every answer the outcome must be a transition the state declares to the state its table
names, or a recorded error with no transition; refusals, truncated and empty answers never
become a decision; nothing crashes.
"""

from __future__ import annotations

import asyncio
import random
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from statemachine_orch import (
    END,
    Branch,
    Engine,
    FlowDecision,
    InvalidOutput,
    LLMState,
    Machine,
    SQLiteStore,
    StepContext,
    guard,
)
from statemachine_orch.testing import FakeMessagesAPI, Reply
from statemachine_orch.trace import Tracer

from ..helpers import (
    Figures,
    scaled,
)

ANSWERS = scaled(1_200, 10_000)
SEED = 20261124
NEAR_MISSES = ["terminate ", " continue", "TERMINATE", "Continue.", "branch_a ", "branch:escalate ",
               "retry!", "skip\n", "positive", "POSITIVE!!", "neg ative", "negative?", "neutral-ish",
               "branch:", "branch:../etc", "branch:escalate\x00", "continue\u200b", "ｃｏｎｔｉｎｕｅ"]


class Verdict(BaseModel):
    verdict: Literal["approve", "reject"]
    confidence: float


@guard(FlowDecision.BRANCH_A, FlowDecision.BRANCH_B, FlowDecision.CONTINUE)
def by_label(output: str, ctx: StepContext) -> FlowDecision:
    text = output.lower()
    if "positive" in text:
        return FlowDecision.BRANCH_A
    if "negative" in text:
        return FlowDecision.BRANCH_B
    return FlowDecision.CONTINUE


@guard(FlowDecision.CONTINUE, FlowDecision.TERMINATE, FlowDecision.SKIP)
def strict(output: str, ctx: StepContext) -> FlowDecision:
    return FlowDecision(output)  # junk raises: a recorded GuardError, never a transition


@guard(Branch("escalate"), FlowDecision.CONTINUE)
def named(output: str, ctx: StepContext) -> Any:
    return Branch(output[len("branch:"):]) if output.startswith("branch:") else FlowDecision.CONTINUE


@guard(FlowDecision.BRANCH_A, FlowDecision.BRANCH_B, FlowDecision.RETRY)
def on_verdict(output: Any, ctx: StepContext) -> FlowDecision:
    if isinstance(output, InvalidOutput):
        return FlowDecision.RETRY
    return FlowDecision.BRANCH_A if output.verdict == "approve" else FlowDecision.BRANCH_B


ROUTER = Machine("router", source_file="fuzz_router.py", states=[
    LLMState("label", prompt="Classify.", max_tokens=50, guard=by_label,
             on={FlowDecision.BRANCH_A: "parse", FlowDecision.BRANCH_B: "name"}),
    LLMState("parse", prompt="Decide.", max_tokens=50, guard=strict),
    LLMState("name", prompt="Name a branch.", max_tokens=50, guard=named,
             on={Branch("escalate"): "tail", FlowDecision.CONTINUE: END}),
    LLMState("tail", prompt="Wrap up.", max_tokens=50),
])
VERDICT = Machine("verdict", source_file="fuzz_verdict.py", states=[
    LLMState("judge", prompt="Judge.", max_tokens=50, output=Verdict, repairs=1, on_invalid="guard",
             guard=on_verdict, retry_limit=2, on={FlowDecision.BRANCH_A: "approved", FlowDecision.BRANCH_B: END}),
    LLMState("approved", prompt="Approved.", max_tokens=50),
])


def garbage(rng: random.Random) -> str:
    alphabet = string.printable + "\x00\x1b\x7f\u202e\ud7ff\u3000é漢"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))


def text_answer(rng: random.Random) -> Reply:
    kind = rng.choices(["near", "garbage", "huge", "control", "empty", "refusal", "truncated"],
                       weights=[40, 30, 3, 10, 7, 5, 5])[0]
    if kind == "near":
        return Reply(text=rng.choice(NEAR_MISSES))
    if kind == "garbage":
        return Reply(text=garbage(rng))
    if kind == "huge":
        return Reply(text=rng.choice(NEAR_MISSES) * rng.randint(2_000, 20_000))
    if kind == "control":
        return Reply(text=rng.choice(NEAR_MISSES) + "\r\n\x1b[2J" + garbage(rng))
    if kind == "empty":
        return Reply(text=rng.choice(["", " ", "\n\t"]))
    return Reply(text=rng.choice(NEAR_MISSES), stop_reason="refusal" if kind == "refusal" else "max_tokens")


def verdict_answer(rng: random.Random) -> Reply:
    kind = rng.choices(["valid", "outside", "wrong_type", "missing", "extra", "text", "refusal"],
                       weights=[25, 25, 15, 10, 10, 10, 5])[0]
    if kind == "valid":
        return Reply(data={"verdict": rng.choice(["approve", "reject"]), "confidence": rng.random()})
    if kind == "outside":
        return Reply(data={"verdict": rng.choice(["maybe", "APPROVE", "approve ", "", "terminate"]),
                           "confidence": 0.5})
    if kind == "wrong_type":
        return Reply(data={"verdict": rng.choice([1, None, ["approve"], {"x": 1}]), "confidence": "high"})
    if kind == "missing":
        return Reply(data={"confidence": 0.1})
    if kind == "extra":
        return Reply(data={"verdict": "reject", "confidence": 0.9, "__class__": "x", "extra": [1] * 5})
    if kind == "text":
        return Reply(text=garbage(rng))
    return Reply(text="no", stop_reason=rng.choice(["refusal", "max_tokens"]))


def drive(machine: Machine, answers: Callable[[random.Random], Reply], runs: int, rng: random.Random,
          db: Path, figures: Figures) -> list[str]:
    fake = FakeMessagesAPI(default=lambda request: answers(rng))
    store = SQLiteStore(db, synchronous="NORMAL")

    async def all_runs() -> list[str]:
        engine = Engine(store, model=fake.model(), tracer=Tracer.null())
        ids = []
        for _ in range(runs):
            result = await engine.arun(machine)
            ids.append(result.run_id)
        return ids

    try:
        return asyncio.run(all_runs())
    finally:
        store.close()
        figures.add("generated_answers", fake.calls())


def check(machine: Machine, db: Path, run_ids: list[str], figures: Figures) -> None:
    store = SQLiteStore(db)
    try:
        for run_id in run_ids:
            run = store.get_run(run_id)
            assert run.status.value in ("completed", "terminated", "failed"), run
            for row in store.transitions(run_id):
                figures.add("steps_checked")
                stop = (row.response or {}).get("stop_reason")
                text = "".join(b.get("text", "") for b in (row.response or {}).get("content", []))
                if row.to_state is None:
                    assert row.error, row  # no transition: an explicit recorded error
                    assert row.decision is None or row.error.startswith(("RetryLimitError", "VisitLimitError"))
                    figures.add("recorded_errors")
                    continue
                assert row.decision in machine.decisions[row.from_state], row
                assert row.to_state == machine.table[row.from_state][row.decision], row
                figures.add("declared_transitions")
                if row.response is not None and (stop in ("refusal", "max_tokens") or (not text.strip()
                                                 and stop != "tool_use")):
                    # only a guard that routes InvalidOutput may act on it, never on its text
                    assert isinstance(row.output, dict) and "__orch_invalid_output__" in row.output, row
                    figures.add("invalid_outcomes_routed")
    finally:
        store.close()


def test_generated_answers_never_reach_an_undeclared_state(tmp_path: Path, figures: Figures) -> None:
    rng = random.Random(SEED)
    figures["seed"] = SEED
    for machine, answers in ((ROUTER, text_answer), (VERDICT, verdict_answer)):
        db = tmp_path / f"{machine.name}.db"
        run_ids = drive(machine, answers, ANSWERS // 3, rng, db, figures)
        check(machine, db, run_ids, figures)
    assert figures.values["generated_answers"] >= ANSWERS
    figures["crashes"] = 0  # any crash would have failed this test before this line
