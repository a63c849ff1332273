"""A machine with no states at all."""
from statemachine_orch import Machine

machine = Machine("no_states", states=[])
