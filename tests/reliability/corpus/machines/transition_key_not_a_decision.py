"""An on= key is the string "retry" rather than FlowDecision.RETRY."""
from statemachine_orch import FlowDecision, Machine, PythonState


def route(output, ctx):
    return FlowDecision.CONTINUE


machine = Machine("transition_key_not_a_decision", states=[
    PythonState("fetch", run=lambda ctx: 1, guard=route, on={"retry": "fetch"}),
])
