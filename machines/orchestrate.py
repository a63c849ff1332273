"""Orchestrator-workers: an orchestrator splits a task into approaches, a worker call writes
each, and a synthesis step compares the drafts and writes the final version.

`orchestrator` answers with `<analysis>` and `<tasks>`; `plan` parses each `<task>` into
`{"type", "description"}` (a task without a type is "default", as in the notebook; one
without a description, or no task at all, is re-asked). `workers` is a map state: one worker
call per task, up to 3 at a time, each item a durable child run, the drafts joined in task
order. `synthesize` is not in the notebook (its introduction says the orchestrator
"synthesizes their results", its code returns the drafts): it is ours. The result is the
notebook's return value, `analysis` and `worker_results`, plus the final version.

Input: {"task": "...", "target_audience": "...", "key_features": ["...", ...]}.
Run it offline:  orch run machines/orchestrate.py --input machines/orchestrate_input.json --offline

Prompts from anthropics/anthropic-cookbook (MIT License, Copyright (c) 2023 Anthropic),
patterns/agents/orchestrator_workers.ipynb at commit 170dee9bcc4dd86f298fdbcc777b3748b86d9d53
(`ORCHESTRATOR_PROMPT` and `WORKER_PROMPT` verbatim, the version with the target audience and
key features; the code is the same at 94e11f90f82e6467bbce8ff43e27f3810db4b222). Its
`parse_tasks` cuts `line[12:-13]` for the 13-character `<description>` tag, which leaves a
`>` and a `<` around every description; `plan` reads the tags instead.
"""

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from statemachine_orch import LLMState, Machine, MapState, StepContext, xml_tags


class Brief(BaseModel):
    task: str
    target_audience: str
    key_features: list[str]


class Assignment(BaseModel):
    """One worker's item: the notebook's `worker_input` variables."""

    original_task: str
    task_type: str
    task_description: str
    target_audience: str
    key_features: list[str]


MAX_TOKENS = 4096  # as the cookbook's util.llm_call

ORCHESTRATOR = """
Analyze this task and break it down into 2-3 distinct approaches:

Target audience: {target_audience}
Key features: {key_features}
Task: {task}

Return your response in this format:

<analysis>
Explain your understanding of the task and which variations would be valuable.
Focus on how each approach serves different aspects of the task.
</analysis>

<tasks>
    <task>
    <type>formal</type>
    <description>Write a precise, technical version that emphasizes specifications</description>
    </task>
    <task>
    <type>conversational</type>
    <description>Write an engaging, friendly version that connects with readers</description>
    </task>
</tasks>
"""

WORKER = """
Generate content based on:
Task: {original_task}
Style: {task_type}
Guidelines: {task_description}
Target audience: {target_audience}
Key features: {key_features}

Return your response in this format:

<response>
Your content here, maintaining the specified style and fully addressing requirements.
</response>
"""

SYNTHESIS = """
You broke this task down into approaches and had a writer draft each one:

Target audience: {target_audience}
Key features: {key_features}
Task: {task}

Your analysis:
{analysis}

The drafts:
{drafts}

Compare the drafts against the task, then write the final version, keeping the strongest
parts of each.

Return your response in this format:

<comparison>
What each draft does well and where it falls short.
</comparison>

<response>
The final content.
</response>
"""

_sections = xml_tags("analysis", "tasks")
_task_fields = xml_tags("type", "description", required=["description"])
_task = re.compile(r"<task(?:\s[^>]*)?>(.*?)</task\s*>", re.DOTALL)
_response = xml_tags("response")


def plan(text: str) -> dict[str, Any]:
    """`<analysis>` and the `<task>`s of `<tasks>`, each `{"type", "description"}`."""
    found = _sections(text)
    tasks = []
    for block in _task.findall(found["tasks"] or ""):
        fields = _task_fields(block)
        tasks.append({"type": fields["type"] or "default", "description": fields["description"]})
    if not tasks:
        raise ValueError("<tasks> holds no <task>; write each approach as "
                         "<task><type>...</type><description>...</description></task>")
    return {"analysis": found["analysis"], "tasks": tasks}


def assignments(ctx: StepContext) -> list[dict[str, Any]]:
    brief = ctx.input
    return [{"original_task": brief.task, "task_type": task["type"], "task_description": task["description"],
             "target_audience": brief.target_audience, "key_features": brief.key_features}
            for task in ctx.outputs["orchestrator"]["tasks"]]


def response(text: str) -> str:
    """A worker's `<response>`."""
    return str(_response(text)["response"])


def drafts(ctx: StepContext) -> str:
    tasks, results = ctx.outputs["orchestrator"]["tasks"], ctx.outputs["workers"]
    return "\n\n".join(f"<draft style=\"{task['type']}\">\nGuidelines: {task['description']}\n{result}\n</draft>"
                       for task, result in zip(tasks, results, strict=True))


def results(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """The run's result: the notebook's `process()` return value, and the final version."""
    tasks = outputs["orchestrator"]["tasks"]
    return {"analysis": outputs["orchestrator"]["analysis"],
            "worker_results": [{**task, "result": result} for task, result in zip(tasks, outputs["workers"],
                                                                                 strict=True)],
            "final": outputs["synthesize"]["response"]}


machine = Machine(
    "orchestrate",
    description="Plan approaches, draft each in a worker, synthesize (cookbook orchestrator-workers).",
    input_model=Brief,
    result=results,
    states=[
        LLMState("orchestrator", prompt=ORCHESTRATOR, max_tokens=MAX_TOKENS, parse=plan),
        MapState("workers", needs=["orchestrator"], items=assignments, item_model=Assignment, concurrency=3,
                 each=LLMState("worker", prompt=WORKER, max_tokens=MAX_TOKENS, parse=response)),
        LLMState("synthesize", prompt=SYNTHESIS, max_tokens=MAX_TOKENS, parse=xml_tags("comparison", "response"),
                 needs=["orchestrator", "workers"],
                 vars={"analysis": lambda ctx: ctx.outputs["orchestrator"]["analysis"], "drafts": drafts}),
    ],
)
