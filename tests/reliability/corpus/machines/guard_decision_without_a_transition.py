"""The guard declares BRANCH_B, which no transition handles: its answer could not be routed."""
from statemachine_orch import FlowDecision, Machine, PythonState, guard


@guard(FlowDecision.CONTINUE, FlowDecision.BRANCH_B)
def sentiment(output, ctx):
    return FlowDecision.BRANCH_B


machine = Machine("guard_decision_without_a_transition", states=[
    PythonState("classify", run=lambda ctx: "negative", guard=sentiment),
    PythonState("reply", run=lambda ctx: "thanks"),
])
