"""output=dict: structured output needs a pydantic model class."""
from statemachine_orch import LLMState, Machine

machine = Machine("output_not_a_pydantic_model", states=[
    LLMState("extract", prompt="Extract the invoice.", max_tokens=200, output=dict),
])
