"""A transition points at a state that does not exist."""
from statemachine_orch import FlowDecision, Machine, PythonState


def route(output, ctx):
    return FlowDecision.BRANCH_A


machine = Machine("dangling_transition", states=[
    PythonState("fetch", run=lambda ctx: 1, guard=route, on={FlowDecision.BRANCH_A: "nowhere"}),
    PythonState("store", run=lambda ctx: 2),
])
