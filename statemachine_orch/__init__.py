"""statemachine_orch: durable, auditable, replayable LLM workflows as explicit state machines.

Names are imported on first use (PEP 562), so `orch runs` and other read-only commands do not
pay for the engine, pydantic or structlog at startup.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .definition import LLMState, Machine, PythonState, State, guard
    from .engine import Engine, Run
    from .errors import (
        BudgetExceededError,
        CorruptRunError,
        DefinitionError,
        GuardError,
        InputError,
        LLMError,
        OrchError,
        OwnershipLostError,
        RetryLimitError,
        RunBusyError,
        RunError,
        RunNotFoundError,
        SchemaVersionError,
        StepError,
        StoreError,
        UsageError,
        VisitLimitError,
    )
    from .llm import AnthropicModel
    from .prices import Price, PriceTable
    from .retry import RetryPolicy
    from .snapshot import RunResult
    from .sqlite_store import SQLiteStore
    from .store import NullStore, Store
    from .trace import Tracer
    from .types import (
        END,
        Attempt,
        Branch,
        Budget,
        Decision,
        FlowDecision,
        InvalidOutput,
        RunStatus,
        StepContext,
        TransitionRecord,
        Usage,
        Verdict,
    )

__version__ = "0.1.0"

__all__ = [
    "END",
    "AnthropicModel",
    "Attempt",
    "Branch",
    "Budget",
    "BudgetExceededError",
    "CorruptRunError",
    "Decision",
    "DefinitionError",
    "Engine",
    "FlowDecision",
    "GuardError",
    "InputError",
    "InvalidOutput",
    "LLMError",
    "LLMState",
    "Machine",
    "NullStore",
    "OrchError",
    "OwnershipLostError",
    "Price",
    "PriceTable",
    "PythonState",
    "RetryLimitError",
    "RetryPolicy",
    "Run",
    "RunBusyError",
    "RunError",
    "RunNotFoundError",
    "RunResult",
    "RunStatus",
    "SQLiteStore",
    "SchemaVersionError",
    "State",
    "StepContext",
    "StepError",
    "Store",
    "StoreError",
    "Tracer",
    "TransitionRecord",
    "Usage",
    "UsageError",
    "Verdict",
    "VisitLimitError",
    "__version__",
    "guard",
]

_WHERE = {
    "LLMState": "definition",
    "Machine": "definition",
    "PythonState": "definition",
    "State": "definition",
    "guard": "definition",
    "Engine": "engine",
    "Run": "engine",
    "BudgetExceededError": "errors",
    "CorruptRunError": "errors",
    "DefinitionError": "errors",
    "GuardError": "errors",
    "InputError": "errors",
    "LLMError": "errors",
    "OrchError": "errors",
    "OwnershipLostError": "errors",
    "RetryLimitError": "errors",
    "RunBusyError": "errors",
    "RunError": "errors",
    "RunNotFoundError": "errors",
    "SchemaVersionError": "errors",
    "StepError": "errors",
    "StoreError": "errors",
    "UsageError": "errors",
    "VisitLimitError": "errors",
    "AnthropicModel": "llm",
    "Price": "prices",
    "PriceTable": "prices",
    "RetryPolicy": "retry",
    "RunResult": "snapshot",
    "SQLiteStore": "sqlite_store",
    "NullStore": "store",
    "Store": "store",
    "Tracer": "trace",
    "END": "types",
    "Attempt": "types",
    "Branch": "types",
    "Budget": "types",
    "Decision": "types",
    "FlowDecision": "types",
    "InvalidOutput": "types",
    "RunStatus": "types",
    "StepContext": "types",
    "TransitionRecord": "types",
    "Usage": "types",
    "Verdict": "types",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'statemachine_orch' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
