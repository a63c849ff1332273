"""max_visits=0: a state that may never be visited."""
from statemachine_orch import Machine, PythonState

machine = Machine("max_visits_zero", states=[PythonState("fetch", run=lambda ctx: 1, max_visits=0)])
