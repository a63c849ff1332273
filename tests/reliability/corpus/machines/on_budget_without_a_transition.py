"""on_budget names a branch that has no transition."""
from statemachine_orch import Branch, LLMState, Machine

machine = Machine("on_budget_without_a_transition", states=[
    LLMState("summarise", prompt="Summarise.", max_tokens=50, on_budget=Branch("cheap")),
])
