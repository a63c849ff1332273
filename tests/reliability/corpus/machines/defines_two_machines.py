"""Two machines in one module and no :NAME to pick one."""
from statemachine_orch import Machine, PythonState

first = Machine("first", states=[PythonState("fetch", run=lambda ctx: 1)])
second = Machine("second", states=[PythonState("fetch", run=lambda ctx: 2)])
