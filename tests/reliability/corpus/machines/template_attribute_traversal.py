"""A prompt template walks attributes towards the interpreter's globals."""
from statemachine_orch import LLMState, Machine

machine = Machine("template_attribute_traversal", input_vars={"text": lambda data: data["text"]}, states=[
    LLMState("summarise", prompt="Summarise {text.__class__.__init__.__globals__}", max_tokens=50),
])
