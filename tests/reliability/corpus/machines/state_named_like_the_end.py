"""A state takes the reserved name of the END pseudo-state."""
from statemachine_orch import END, Machine, PythonState

machine = Machine("state_named_like_the_end", states=[
    PythonState("fetch", run=lambda ctx: 1),
    PythonState(END, run=lambda ctx: 2),
])
