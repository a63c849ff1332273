"""A branch is declared, but with no guard nothing can ever choose it."""
from statemachine_orch import FlowDecision, Machine, PythonState

machine = Machine("transitions_without_a_guard", states=[
    PythonState("fetch", run=lambda ctx: 1, on={FlowDecision.BRANCH_A: "store"}),
    PythonState("store", run=lambda ctx: 2),
])
