"""The guard may RETRY but retry_limit=None leaves the retries unbounded."""
from statemachine_orch import FlowDecision, Machine, PythonState, guard


@guard(FlowDecision.CONTINUE, FlowDecision.RETRY)
def again(output, ctx):
    return FlowDecision.RETRY


machine = Machine("retry_without_a_retry_limit", states=[
    PythonState("fetch", run=lambda ctx: 1, guard=again, retry_limit=None),
])
