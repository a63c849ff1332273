"""The fallback function takes no context argument."""
from statemachine_orch import LLMState, Machine

machine = Machine("fallback_with_the_wrong_signature", states=[
    LLMState("summarise", prompt="Summarise.", max_tokens=50, fallback=lambda: "no summary"),
])
