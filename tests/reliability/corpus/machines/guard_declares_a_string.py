"""The guard declares the string "continue", which is not a decision."""
from statemachine_orch import FlowDecision, Machine, PythonState, guard


@guard("continue")
def loose(output, ctx):
    return FlowDecision.CONTINUE


machine = Machine("guard_declares_a_string", states=[
    PythonState("fetch", run=lambda ctx: 1, guard=loose),
])
