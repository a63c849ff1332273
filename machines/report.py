"""The seed's five-step report: each step one focused LLM call building on earlier ones.

Input: any JSON object of data to analyse; it reaches the prompts as `{raw_data}`.
Run it offline:  orch run machines/report.py --input machines/report_input.json --offline
"""

import json
from typing import Any

from statemachine_orch import LLMState, Machine


def as_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True)


machine = Machine(
    "report",
    description="Validate data, analyse trends and risks, recommend, summarise.",
    input_vars={"raw_data": as_json},
    states=[
        LLMState(
            "data_validation",
            prompt="Validate this data for completeness and flag anomalies: {raw_data}",
            max_tokens=500,
        ),
        LLMState(
            "trend_analysis",
            prompt="Analyze trends in validated data: {raw_data}\nValidation notes: {data_validation}",
            needs=["data_validation"],
            max_tokens=1000,
        ),
        LLMState(
            "risk_assessment",
            prompt="Assess risks based on: {trend_analysis}",
            needs=["trend_analysis"],
            max_tokens=800,
        ),
        LLMState(
            "recommendations",
            prompt=(
                "Generate recommendations considering trends: {trend_analysis}\n"
                "And risks: {risk_assessment}"
            ),
            needs=["trend_analysis", "risk_assessment"],
            max_tokens=1000,
        ),
        LLMState(
            "executive_summary",
            prompt=(
                "Create executive summary from: {trend_analysis}, {risk_assessment}, "
                "{recommendations}"
            ),
            needs=["trend_analysis", "risk_assessment", "recommendations"],
            max_tokens=600,
        ),
    ],
)
