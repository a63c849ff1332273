"""Model usage and the limits put on it: token counts, a run's budget, the retry policy for
transient API failures. Plain data, no I/O (re-exported by `types`, the shared vocabulary)."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

INITIAL_DELAY_S = 1.0
MULTIPLIER = 2.0
MAX_DELAY_S = 60.0
JITTER = 0.25  # each delay is scaled by a random factor in [1 - JITTER, 1]
MAX_ATTEMPTS = 4
MAX_TOTAL_S = 300.0


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How a state retries transient API failures (per state, per machine or per engine)."""

    max_attempts: int = MAX_ATTEMPTS
    initial_delay_s: float = INITIAL_DELAY_S
    multiplier: float = MULTIPLIER
    max_delay_s: float = MAX_DELAY_S
    max_total_s: float = MAX_TOTAL_S
    jitter: float = JITTER

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if min(self.initial_delay_s, self.max_delay_s, self.max_total_s) < 0 or self.multiplier < 1:
            raise ValueError("delays must be >= 0 and multiplier >= 1")

    def backoff(self, attempt: int, rand: float | None = None) -> float:
        """Delay after failed attempt number `attempt` (1-based) when the server gave no hint."""
        base = min(self.initial_delay_s * self.multiplier ** (attempt - 1), self.max_delay_s)
        factor = 1 - self.jitter * (random.random() if rand is None else rand)
        return base * factor




@dataclass(slots=True, kw_only=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_read_tokens += other.cache_read_tokens
        self.cache_write_tokens += other.cache_write_tokens

    def subtract(self, other: Usage) -> None:
        self.input_tokens -= other.input_tokens
        self.output_tokens -= other.output_tokens
        self.cache_read_tokens -= other.cache_read_tokens
        self.cache_write_tokens -= other.cache_write_tokens

    @property
    def paid_tokens(self) -> int:
        """Every token a call is billed for: input, output, cache writes and cache reads."""
        return self.input_tokens + self.output_tokens + self.cache_read_tokens + self.cache_write_tokens


def check_amount(name: str, value: float | None) -> None:
    """Refuse a limit or price that is NaN, infinite or negative (None: no limit), naming it.

    NaN would pass every comparison unnoticed and poison every sum it enters: the run's
    totals, then the audit chain, leaving the run unresumable."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise UsageError(f"{name} is {value!r}", fix="use a finite number, 0 or more")


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """Limits of one run: money, paid tokens and active wall-clock time (None: no limit).

    Money and tokens are checked before every model call against what was spent plus the
    call's worst case (estimated input plus its max_tokens).
    """

    max_cost_usd: float | None = None
    max_tokens: int | None = None
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_cost_usd", "max_tokens", "max_seconds"):
            check_amount(name, getattr(self, name))

    def to_json(self) -> dict[str, float | int]:
        return {k: v for k, v in (("max_cost_usd", self.max_cost_usd), ("max_tokens", self.max_tokens),
                                  ("max_seconds", self.max_seconds)) if v is not None}

    @classmethod
    def of_run(cls, options: Mapping[str, Any]) -> Budget:
        """The budget stored in a run's options (none: no limits)."""
        return cls(**options.get("budget", {}))

    def merged(self, other: Budget | None) -> Budget:
        """This budget with `other`'s limits taking precedence where set."""
        if other is None:
            return self
        return Budget(
            max_cost_usd=other.max_cost_usd if other.max_cost_usd is not None else self.max_cost_usd,
            max_tokens=other.max_tokens if other.max_tokens is not None else self.max_tokens,
            max_seconds=other.max_seconds if other.max_seconds is not None else self.max_seconds,
        )
