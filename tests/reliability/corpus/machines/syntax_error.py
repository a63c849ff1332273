"""A syntax error in the module: the guard's parameter list is never closed."""
from statemachine_orch import FlowDecision, Machine, PythonState


def route(output, ctx:
    return FlowDecision.CONTINUE


machine = Machine("syntax_error", states=[PythonState("fetch", run=lambda ctx: 1, guard=route)])
