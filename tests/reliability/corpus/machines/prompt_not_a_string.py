"""The prompt is a list of strings rather than one template string."""
from statemachine_orch import LLMState, Machine

machine = Machine("prompt_not_a_string", states=[
    LLMState("summarise", prompt=["Summarise", "the data"], max_tokens=50),
])
