"""Two states share the name "fetch"."""
from statemachine_orch import Machine, PythonState

machine = Machine("duplicate_state_names", states=[
    PythonState("fetch", run=lambda ctx: 1),
    PythonState("fetch", run=lambda ctx: 2),
])
