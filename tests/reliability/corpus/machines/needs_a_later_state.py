"""A state needs the output of a state that only runs after it."""
from statemachine_orch import Machine, PythonState

machine = Machine("needs_a_later_state", states=[
    PythonState("fetch", run=lambda ctx: 1),
    PythonState("summarise", run=lambda ctx: 2, needs=["store"]),
    PythonState("store", run=lambda ctx: 3),
])
