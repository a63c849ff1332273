"""A Python state's run= is the name of a function, not the function."""
from statemachine_orch import Machine, PythonState

machine = Machine("run_not_callable", states=[PythonState("fetch", run="fetch_ledger")])
