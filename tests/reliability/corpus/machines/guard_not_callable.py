"""The guard is a string, not a function."""
from statemachine_orch import Machine, PythonState

machine = Machine("guard_not_callable", states=[
    PythonState("fetch", run=lambda ctx: 1, guard="positive"),
])
