"""params= sets the model, which the state itself controls."""
from statemachine_orch import LLMState, Machine

machine = Machine("params_override_the_model", states=[
    LLMState("summarise", prompt="Summarise.", max_tokens=50, params={"model": "claude-opus-4-1"}),
])
