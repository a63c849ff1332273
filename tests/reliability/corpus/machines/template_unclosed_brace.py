"""A prompt template opens a placeholder and never closes it."""
from statemachine_orch import LLMState, Machine

machine = Machine("template_unclosed_brace", input_vars={"text": lambda data: data["text"]}, states=[
    LLMState("summarise", prompt="Summarise {text", max_tokens=50),
])
