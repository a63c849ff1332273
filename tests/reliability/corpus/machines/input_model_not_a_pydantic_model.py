"""input_model=dict: the run input is validated by a pydantic model class."""
from statemachine_orch import Machine, PythonState

machine = Machine("input_model_not_a_pydantic_model", input_model=dict,
                  states=[PythonState("fetch", run=lambda ctx: 1)])
