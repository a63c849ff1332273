"""A state given as a bare string instead of an LLMState or PythonState."""
from statemachine_orch import Machine, PythonState

machine = Machine("state_is_a_plain_string", states=[
    PythonState("fetch", run=lambda ctx: 1),
    "summarise",
])
