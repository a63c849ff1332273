"""A prompt template asks for a !r conversion."""
from statemachine_orch import LLMState, Machine

machine = Machine("template_conversion", input_vars={"text": lambda data: data["text"]}, states=[
    LLMState("summarise", prompt="Summarise {text!r}", max_tokens=50),
])
