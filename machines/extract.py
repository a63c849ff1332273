"""JSON extraction into a pydantic model, then a Python check of what was extracted.

extract_invoice asks the model for an `Invoice` (structured output through tool use, so
the answer is validated JSON, not scraped text). check_totals recomputes the total; a
mismatch branches to review_note, which drafts a note for a human.
Input: {"text": "<the document>"}.
"""

from pydantic import BaseModel, Field

from statemachine_orch import END, FlowDecision, LLMState, Machine, PythonState, StepContext, Verdict, guard


class Document(BaseModel):
    text: str


class LineItem(BaseModel):
    description: str
    quantity: float
    unit_price: float


class Invoice(BaseModel):
    vendor: str
    invoice_number: str
    date: str = Field(description="ISO 8601 date, YYYY-MM-DD")
    currency: str = Field(description="ISO 4217 code, e.g. EUR")
    line_items: list[LineItem]
    total: float


def check_totals(ctx: StepContext) -> dict[str, float | bool]:
    invoice: Invoice = ctx.outputs["extract_invoice"]
    computed = round(sum(i.quantity * i.unit_price for i in invoice.line_items), 2)
    return {"computed_total": computed, "stated_total": invoice.total,
            "consistent": abs(computed - invoice.total) < 0.01}


@guard(FlowDecision.CONTINUE, FlowDecision.BRANCH_A)
def totals_guard(output: dict[str, float | bool], ctx: StepContext) -> Verdict:
    if output["consistent"]:
        return FlowDecision.CONTINUE.because(f"line items sum to the stated total {output['stated_total']}")
    return FlowDecision.BRANCH_A.because(
        f"line items sum to {output['computed_total']}, invoice states {output['stated_total']}")


machine = Machine(
    "extract",
    description="Extract an invoice into a typed model and check its arithmetic.",
    input_model=Document,
    states=[
        LLMState(
            "extract_invoice",
            prompt="Extract the invoice in this document. Use the numbers exactly as written.\n\n{text}",
            output=Invoice,
            max_tokens=1000,
        ),
        PythonState(
            "check_totals",
            run=check_totals,
            needs=["extract_invoice"],
            guard=totals_guard,
            on={FlowDecision.CONTINUE: END, FlowDecision.BRANCH_A: "review_note"},
        ),
        LLMState(
            "review_note",
            prompt=(
                "An extracted invoice does not add up. Invoice: {extract_invoice}\n"
                "Check: {check_totals}\nWrite a two-sentence note for the accounts team."
            ),
            needs=["extract_invoice", "check_totals"],
            max_tokens=200,
        ),
    ],
)
