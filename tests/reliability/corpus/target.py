"""The valid machine every input in inputs/ is fed to (it is not part of the corpus).

Its one state is an LLM call, so an input that got past the checks would reach the fake
Messages API, where the test would see the request.
"""

from pydantic import BaseModel

from statemachine_orch import LLMState, Machine


class Order(BaseModel):
    text: str
    count: int = 1
    tags: list[str] = []
    scores: list[float] = []


machine = Machine("corpus_target", input_model=Order, states=[
    LLMState("summarise", prompt="Summarise {text} ({count} items, tags {tags}, scores {scores})",
             max_tokens=50),
])
