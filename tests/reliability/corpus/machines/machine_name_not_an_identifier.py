"""The machine's name has a space in it."""
from statemachine_orch import Machine, PythonState

machine = Machine("support router", states=[PythonState("fetch", run=lambda ctx: 1)])
