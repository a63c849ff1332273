"""draft -> review -> draft can loop for ever: no state in the loop has max_visits."""
from statemachine_orch import FlowDecision, Machine, PythonState, guard


@guard(FlowDecision.CONTINUE, FlowDecision.BRANCH_A)
def review_guard(output, ctx):
    return FlowDecision.BRANCH_A


machine = Machine("unbounded_cycle", states=[
    PythonState("draft", run=lambda ctx: "text"),
    PythonState("review", run=lambda ctx: "ok", guard=review_guard,
                on={FlowDecision.BRANCH_A: "draft"}),
])
