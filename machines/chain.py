"""Prompt chaining: four LLM calls in a row, each transforming the previous one's answer.

The cookbook's structured-data example: extract the figures of a quarterly report, convert
them to percentages, sort them, format them as a markdown table. Each step's user message is
the step's prompt, then `Input:` and what the step before it answered (the report, for the
first step), as the notebook's `chain()` builds it.

Input: {"report": "<the text>"}.
Run it offline:  orch run machines/chain.py --input machines/chain_input.json --offline

Prompts from anthropics/anthropic-cookbook (MIT License, Copyright (c) 2023 Anthropic),
patterns/agents/basic_workflows.ipynb at commit 5c6da07ca69ad36a2f5cecc0561a609f140c6a4d
(`data_processing_steps`, verbatim with their indentation).
"""

from pydantic import BaseModel

from statemachine_orch import LLMState, Machine


class Report(BaseModel):
    report: str


MAX_TOKENS = 4096  # as the cookbook's util.llm_call

EXTRACT = """Extract only the numerical values and their associated metrics from the text.
    Format each as 'value: metric' on a new line.
    Example format:
    92: customer satisfaction
    45%: revenue growth"""

TO_PERCENTAGES = """Convert all numerical values to percentages where possible.
    If not a percentage or points, convert to decimal (e.g., 92 points -> 92%).
    Keep one number per line.
    Example format:
    92%: customer satisfaction
    45%: revenue growth"""

SORT = """Sort all lines in descending order by numerical value.
    Keep the format 'value: metric' on each line.
    Example:
    92%: customer satisfaction
    87%: employee satisfaction"""

TABLE = """Format the sorted data as a markdown table with columns:
    | Metric | Value |
    |:--|--:|
    | Customer Satisfaction | 92% |"""


machine = Machine(
    "chain",
    description="Extract, convert, sort and tabulate the figures of a report (cookbook prompt chaining).",
    input_model=Report,
    result="format_table",
    states=[
        LLMState("extract", prompt=EXTRACT + "\nInput: {report}", max_tokens=MAX_TOKENS),
        LLMState("to_percentages", prompt=TO_PERCENTAGES + "\nInput: {extract}", needs=["extract"],
                 max_tokens=MAX_TOKENS),
        LLMState("sort", prompt=SORT + "\nInput: {to_percentages}", needs=["to_percentages"],
                 max_tokens=MAX_TOKENS),
        LLMState("format_table", prompt=TABLE + "\nInput: {sort}", needs=["sort"], max_tokens=MAX_TOKENS),
    ],
)
