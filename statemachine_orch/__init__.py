"""statemachine_orch: durable, auditable, replayable LLM workflows as explicit state machines."""

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
