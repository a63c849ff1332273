"""The module defines states but never builds a Machine from them."""
from statemachine_orch import PythonState

fetch = PythonState("fetch", run=lambda ctx: 1)
