"""Evaluator-optimizer: generate, evaluate, and generate again with the feedback, as a cycle.

`generate` answers with `<thoughts>` and `<response>`; `evaluate` judges the response with
`<evaluation>` (PASS, NEEDS_IMPROVEMENT or FAIL) and `<feedback>`. NEEDS_IMPROVEMENT goes
back to `generate`, whose prompt then carries every earlier response and the latest feedback
(read with `ctx.history` and `needs_if_ran`), as the notebook's `loop()` builds its context.
PASS ends the run; FAIL ends it `terminated`. Unlike the notebook's `while True`, the loop is
bounded: `generate` runs at most 3 times, and an evaluation that still asks for improvement
then ends the run with the last response (`on_exhausted`; the log says so). The result is the
last response with the evaluation it got.

Input: {"task": "<the task>"}.
Run it offline:  orch run machines/optimize.py --input machines/optimize_input.json --offline

Prompts from anthropics/anthropic-cookbook (MIT License, Copyright (c) 2023 Anthropic),
patterns/agents/evaluator_optimizer.ipynb at commit 2a4fe5ef9543cf133c224632a24e29a872e223c2
(`generator_prompt` and `evaluator_prompt` verbatim, spelling included; the task is the input).
"""

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from statemachine_orch import END, Branch, FlowDecision, LLMState, Machine, StepContext, Verdict, guard, xml_tags


class Task(BaseModel):
    task: str


MAX_TOKENS = 4096  # as the cookbook's util.llm_call
ATTEMPTS = 3  # the most generations; the notebook has no bound

GENERATOR = """
Your goal is to complete the task based on <user input>. If there are feedback
from your previous generations, you should reflect on them to improve your solution

Output your answer concisely in the following format:

<thoughts>
[Your understanding of the task and feedback and how you plan to improve]
</thoughts>

<response>
[Your code implementation here]
</response>
"""

EVALUATOR = """
Evaluate this following code implementation for:
1. code correctness
2. time complexity
3. style and best practices

You should be evaluating only and not attemping to solve the task.
Only output "PASS" if all criteria are met and you have no further suggestions for improvements.
Output your evaluation concisely in the following format.

<evaluation>PASS, NEEDS_IMPROVEMENT, or FAIL</evaluation>
<feedback>
What needs improvement and why.
</feedback>
"""

VERDICTS = ("PASS", "NEEDS_IMPROVEMENT", "FAIL")
IMPROVE = Branch("improve")

_evaluation = xml_tags("evaluation", "feedback")


def judged(text: str) -> dict[str, str | None]:
    """`<evaluation>` (upper-cased) and `<feedback>`; an evaluation that is none of the three
    verdicts raises, so the model is asked again."""
    found = _evaluation(text)
    verdict = (found["evaluation"] or "").upper()
    if verdict not in VERDICTS:
        raise ValueError(f"<evaluation> is {found['evaluation']!r}; answer PASS, NEEDS_IMPROVEMENT or FAIL")
    return {**found, "evaluation": verdict}


def earlier_attempts(ctx: StepContext) -> str:
    """Nothing on the first generation; then the notebook's context: every earlier response
    and the latest feedback, followed by the newline that separates it from the task."""
    attempts = [attempt["response"] for attempt in ctx.history("generate")]
    if not attempts:
        return ""
    feedback = ctx.outputs["evaluate"]["feedback"]
    return "\n".join(["Previous attempts:", *[f"- {a}" for a in attempts], f"\nFeedback: {feedback}"]) + "\n"


@guard(FlowDecision.CONTINUE, IMPROVE, FlowDecision.TERMINATE)
def verdict(output: dict[str, str], ctx: StepContext) -> Verdict:
    feedback = output["feedback"]
    if output["evaluation"] == "PASS":
        return FlowDecision.CONTINUE.because(f"PASS on attempt {ctx.visit}")
    if output["evaluation"] == "FAIL":
        return FlowDecision.TERMINATE.because(f"FAIL on attempt {ctx.visit}: {feedback}")
    return IMPROVE.because(f"NEEDS_IMPROVEMENT on attempt {ctx.visit}: {feedback}")


def last_attempt(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """The run's result: the last response, with the evaluation and feedback it got."""
    return {"response": outputs["generate"]["response"], **outputs["evaluate"]}


machine = Machine(
    "optimize",
    description="Generate, evaluate, improve with the feedback (cookbook evaluator-optimizer).",
    input_model=Task,
    result=last_attempt,
    states=[
        LLMState("generate", prompt=GENERATOR + "\n{earlier_attempts}Task: {task}", max_tokens=MAX_TOKENS,
                 parse=xml_tags("thoughts", "response"), vars={"earlier_attempts": earlier_attempts},
                 needs_if_ran=["evaluate"], max_visits=ATTEMPTS),
        LLMState("evaluate", prompt=EVALUATOR + "\nOriginal task: {task}\nContent to evaluate: {content}",
                 max_tokens=MAX_TOKENS, parse=judged, needs=["generate"],
                 vars={"content": lambda ctx: ctx.outputs["generate"]["response"]},
                 guard=verdict, on={IMPROVE: "generate", FlowDecision.CONTINUE: END},
                 on_exhausted=FlowDecision.CONTINUE),
    ],
)
