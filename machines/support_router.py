"""The seed's sentiment routing: classify a customer message, then answer on one of three paths.

positive -> upsell (BRANCH_A), negative -> support (BRANCH_B), neutral -> standard_reply.
Input: {"text": "..."}.
"""

from pydantic import BaseModel

from statemachine_orch import END, FlowDecision, LLMState, Machine, StepContext, Verdict, guard


class Ticket(BaseModel):
    text: str


LABELS = ("positive", "negative", "neutral")


@guard(FlowDecision.BRANCH_A, FlowDecision.BRANCH_B, FlowDecision.CONTINUE)
def sentiment_router(output: str, ctx: StepContext) -> Verdict:
    """Route on the first sentiment label the model names; anything else is neutral."""
    text = output.lower()
    found = sorted((text.find(label), label) for label in LABELS if label in text)
    label = found[0][1] if found else "neutral"
    if label == "positive":
        return FlowDecision.BRANCH_A.because("sentiment positive: upsell flow")
    if label == "negative":
        return FlowDecision.BRANCH_B.because("sentiment negative: support flow")
    return FlowDecision.CONTINUE.because(f"sentiment {label}: standard flow")


machine = Machine(
    "support_router",
    description="Sentiment routing for customer messages.",
    input_model=Ticket,
    states=[
        LLMState(
            "sentiment_analysis",
            prompt="Classify sentiment as positive/negative/neutral: {text}",
            max_tokens=100,
            guard=sentiment_router,
            on={FlowDecision.BRANCH_A: "upsell", FlowDecision.BRANCH_B: "support"},
        ),
        LLMState(
            "standard_reply",
            prompt="Write a brief, friendly reply to this customer message: {text}",
            max_tokens=300,
            on={FlowDecision.CONTINUE: END},
        ),
        LLMState(
            "upsell",
            prompt=(
                "The customer is happy. Thank them and suggest one relevant upgrade, "
                "in at most three sentences: {text}"
            ),
            max_tokens=300,
            on={FlowDecision.CONTINUE: END},
        ),
        LLMState(
            "support",
            prompt=(
                "The customer is unhappy. Apologise, restate the problem and give concrete "
                "next steps: {text}"
            ),
            max_tokens=400,
        ),
    ],
)
