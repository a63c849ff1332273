"""Routing: classify a support ticket, then answer it with the prompt of the team it needs.

The classifier answers with `<reasoning>` and `<selection>` (parsed by `pick_team`, built on
`xml_tags`); its guard takes the named branch of the selected team, whose specialist prompt
answers the ticket. The reasoning is the branch's reason in `orch log`. A selection that is no
team is re-asked once with the list of teams; if the model still names none, the run ends
`terminated` with the reason (the cookbook's `routes[route_key]` raises KeyError instead).

Input: {"ticket": "<subject and message>"}.
Run it offline:  orch run machines/route.py --input machines/route_input.json --offline

Prompts from anthropics/anthropic-cookbook (MIT License, Copyright (c) 2023 Anthropic),
patterns/agents/basic_workflows.ipynb at commit 5c6da07ca69ad36a2f5cecc0561a609f140c6a4d
(the selector prompt of `route()` and `support_routes`, verbatim, indentation kept;
the route prompts end before their own trailing "Input: ", which `route()` followed with a
second one: here the ticket follows once, as "Input: {ticket}").
"""

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from statemachine_orch import (
    END,
    Branch,
    FlowDecision,
    InvalidOutput,
    LLMState,
    Machine,
    StepContext,
    Verdict,
    guard,
    xml_tags,
)


class Ticket(BaseModel):
    ticket: str


MAX_TOKENS = 4096  # as the cookbook's util.llm_call

TEAMS = ("billing", "technical", "account", "product")

SELECTOR = f"""Analyze the input and select the most appropriate support team from these options: {list(TEAMS)}
    First explain your reasoning, then provide your selection in this XML format:

    <reasoning>
    Brief explanation of why this ticket should be routed to a specific team.
    Consider key terms, user intent, and urgency level.
    </reasoning>

    <selection>
    The chosen team name
    </selection>

    Input: {{ticket}}"""

ROUTES = {
    "billing": """You are a billing support specialist. Follow these guidelines:
    1. Always start with "Billing Support Response:"
    2. First acknowledge the specific billing issue
    3. Explain any charges or discrepancies clearly
    4. List concrete next steps with timeline
    5. End with payment options if relevant

    Keep responses professional but friendly.""",
    "technical": """You are a technical support engineer. Follow these guidelines:
    1. Always start with "Technical Support Response:"
    2. List exact steps to resolve the issue
    3. Include system requirements if relevant
    4. Provide workarounds for common problems
    5. End with escalation path if needed

    Use clear, numbered steps and technical details.""",
    "account": """You are an account security specialist. Follow these guidelines:
    1. Always start with "Account Support Response:"
    2. Prioritize account security and verification
    3. Provide clear steps for account recovery/changes
    4. Include security tips and warnings
    5. Set clear expectations for resolution time

    Maintain a serious, security-focused tone.""",
    "product": """You are a product specialist. Follow these guidelines:
    1. Always start with "Product Support Response:"
    2. Focus on feature education and best practices
    3. Include specific examples of usage
    4. Link to relevant documentation sections
    5. Suggest related features that might help

    Be educational and encouraging in tone.""",
}

_sections = xml_tags("reasoning", "selection")


def pick_team(text: str) -> dict[str, str | None]:
    """`<reasoning>` and `<selection>`, the selection lower-cased; a selection that names no
    team raises, so the model is asked again with the list of teams."""
    found = _sections(text)
    team = (found["selection"] or "").lower()
    if team not in TEAMS:
        raise ValueError(f"<selection> is {found['selection']!r}, not a team; select one of {', '.join(TEAMS)}")
    return {**found, "selection": team}


@guard(*(Branch(team) for team in TEAMS), FlowDecision.TERMINATE)
def to_team(output: dict[str, str] | InvalidOutput, ctx: StepContext) -> Verdict:
    if isinstance(output, InvalidOutput):  # still no team after the re-ask
        return FlowDecision.TERMINATE.because(f"no team selected: {output.error}")
    return Branch(output["selection"]).because(output["reasoning"])


def answer(outputs: Mapping[str, Any]) -> Any:
    """The run's result: the answer of the team the ticket went to (None if it went to none)."""
    return next((outputs[team] for team in TEAMS if team in outputs), None)


machine = Machine(
    "route",
    description="Classify a support ticket and answer it with its team's prompt (cookbook routing).",
    input_model=Ticket,
    result=answer,
    states=[
        LLMState("classify", prompt=SELECTOR, max_tokens=MAX_TOKENS, parse=pick_team, on_invalid="guard",
                 guard=to_team, on={Branch(team): team for team in TEAMS}),
        *(LLMState(team, prompt=ROUTES[team] + "\n\nInput: {ticket}", max_tokens=MAX_TOKENS,
                   on={FlowDecision.CONTINUE: END}) for team in TEAMS),
    ],
)
