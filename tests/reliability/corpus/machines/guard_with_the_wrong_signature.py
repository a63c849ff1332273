"""The guard takes only the output, not (output, context)."""
from statemachine_orch import FlowDecision, Machine, PythonState


def one_argument(output):
    return FlowDecision.CONTINUE


machine = Machine("guard_with_the_wrong_signature", states=[
    PythonState("fetch", run=lambda ctx: 1, guard=one_argument),
])
