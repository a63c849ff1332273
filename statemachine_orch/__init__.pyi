# The public names of statemachine_orch: the one list. Type checkers read it as the package's
# interface; __init__.py reads it to import each name on first use. One name per line, as
#     from .module import Name as Name

from .definition._loader import Loaded as Loaded
from .definition._loader import load_machine as load_machine
from .definition._machine import Machine as Machine
from .definition._parsing import xml_tags as xml_tags
from .definition._states import LLMState as LLMState
from .definition._states import PythonState as PythonState
from .definition._states import State as State
from .definition._states import guard as guard
from .engine._engine import Engine as Engine
from .engine._replay import Divergence as Divergence
from .engine._replay import ReplayReport as ReplayReport
from .engine._replay import replay_run as replay_run
from .engine._run import Run as Run
from .errors import AuditKeyError as AuditKeyError
from .errors import BudgetExceededError as BudgetExceededError
from .errors import CorruptRunError as CorruptRunError
from .errors import DatabaseNotFoundError as DatabaseNotFoundError
from .errors import DefinitionError as DefinitionError
from .errors import ForeignDatabaseError as ForeignDatabaseError
from .errors import GuardError as GuardError
from .errors import InputError as InputError
from .errors import LLMError as LLMError
from .errors import MachineChangedError as MachineChangedError
from .errors import MachineNotFoundError as MachineNotFoundError
from .errors import NoCredentialsError as NoCredentialsError
from .errors import OrchError as OrchError
from .errors import OwnershipLostError as OwnershipLostError
from .errors import RetryLimitError as RetryLimitError
from .errors import RunBusyError as RunBusyError
from .errors import RunError as RunError
from .errors import RunExistsError as RunExistsError
from .errors import RunFinishedError as RunFinishedError
from .errors import RunNotFoundError as RunNotFoundError
from .errors import SchemaVersionError as SchemaVersionError
from .errors import StepError as StepError
from .errors import StoreError as StoreError
from .errors import TamperedRunError as TamperedRunError
from .errors import UsageError as UsageError
from .errors import VisitLimitError as VisitLimitError
from .hooks import Hook as Hook
from .llm._anthropic import AnthropicModel as AnthropicModel
from .llm._client import Completion as Completion
from .llm._client import LLMRequest as LLMRequest
from .llm._client import ModelClient as ModelClient
from .llm._prices import Price as Price
from .llm._prices import PriceTable as PriceTable
from .store._contract import MachineTotals as MachineTotals
from .store._contract import NullStore as NullStore
from .store._contract import RunSummary as RunSummary
from .store._contract import Store as Store
from .store._open import open_store as open_store
from .store._owner import Owner as Owner
from .store.sqlite._store import SQLiteStore as SQLiteStore
from .trace._tracer import Tracer as Tracer
from .types import END as END
from .types import Attempt as Attempt
from .types import Branch as Branch
from .types import Budget as Budget
from .types import Decision as Decision
from .types import FlowDecision as FlowDecision
from .types import InvalidOutput as InvalidOutput
from .types import RetryPolicy as RetryPolicy
from .types import RunRecord as RunRecord
from .types import RunResult as RunResult
from .types import RunStatus as RunStatus
from .types import StepContext as StepContext
from .types import TransitionRecord as TransitionRecord
from .types import Usage as Usage
from .types import Verdict as Verdict

__version__: str
__all__: list[str]
