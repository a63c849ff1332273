"""A state needs the output of a state that does not exist."""
from statemachine_orch import Machine, PythonState

machine = Machine("needs_an_unknown_state", states=[
    PythonState("fetch", run=lambda ctx: 1),
    PythonState("store", run=lambda ctx: 2, needs=["validate"]),
])
