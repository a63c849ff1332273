"""A prompt template pads a value to a hundred million characters with a format spec."""
from statemachine_orch import LLMState, Machine

machine = Machine("template_format_spec", input_vars={"text": lambda data: data["text"]}, states=[
    LLMState("summarise", prompt="Summarise {text:>100000000}", max_tokens=50),
])
