"""A prompt template indexes into a value."""
from statemachine_orch import LLMState, Machine

machine = Machine("template_indexing", input_vars={"text": lambda data: data["text"]}, states=[
    LLMState("summarise", prompt="Summarise {text[0]}", max_tokens=50),
])
