"""The module imports a dependency that is not installed."""
import orch_corpus_dependency_that_is_not_installed  # noqa: F401

from statemachine_orch import Machine, PythonState

machine = Machine("imports_a_missing_module", states=[PythonState("fetch", run=lambda ctx: 1)])
