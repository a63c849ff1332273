"""The module raises while it is imported (after defining a valid machine)."""
from statemachine_orch import Machine, PythonState

machine = Machine("raises_while_importing", states=[PythonState("fetch", run=lambda ctx: 1)])

raise RuntimeError("settings.toml is missing")
