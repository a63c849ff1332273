"""The first state always ends the run, so "archive" can never run."""
from statemachine_orch import END, FlowDecision, Machine, PythonState

machine = Machine("unreachable_state", states=[
    PythonState("fetch", run=lambda ctx: 1, on={FlowDecision.CONTINUE: END}),
    PythonState("archive", run=lambda ctx: 2),
])
