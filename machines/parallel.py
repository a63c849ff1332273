"""Parallelization: one prompt over each of several independent inputs, three calls at a time.

The cookbook's stakeholder impact analysis: the same analysis prompt for each stakeholder
group, as a map state (`MapState`) with `concurrency=3` (the notebook's `ThreadPoolExecutor`
with `n_workers=3`). Each item is a child run of its own, committed when its answer arrives;
the state's output, and the run's result, is the list of analyses in stakeholder order.

Input: {"stakeholders": ["<group and its concerns>", ...]}.
Run it offline:  orch run machines/parallel.py --input machines/parallel_input.json --offline

Prompts from anthropics/anthropic-cookbook (MIT License, Copyright (c) 2023 Anthropic),
patterns/agents/basic_workflows.ipynb at commit 5c6da07ca69ad36a2f5cecc0561a609f140c6a4d
(the prompt of Example 2, verbatim with its indentation; the stakeholders are the input).
"""

from pydantic import BaseModel

from statemachine_orch import LLMState, Machine, MapState


class Stakeholders(BaseModel):
    stakeholders: list[str]


MAX_TOKENS = 4096  # as the cookbook's util.llm_call

IMPACT = """Analyze how market changes will impact this stakeholder group.
    Provide specific impacts and recommended actions.
    Format with clear sections and priorities."""


machine = Machine(
    "parallel",
    description="The same impact analysis for each stakeholder group, 3 at a time (cookbook parallelization).",
    input_model=Stakeholders,
    result="impact",
    states=[
        MapState(
            "impact",
            items=lambda ctx: ctx.input.stakeholders,
            concurrency=3,
            each=LLMState("analyze_stakeholder", prompt=IMPACT + "\nInput: {item}", max_tokens=MAX_TOKENS),
        ),
    ],
)
