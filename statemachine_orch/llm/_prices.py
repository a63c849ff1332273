"""Token prices per model, turning recorded usage into cost.

The built-in table is a dated snapshot of Anthropic's list prices in USD per million
tokens; check https://www.anthropic.com/pricing and override it (`PriceTable.load(path)`,
`orch --prices FILE`, env `ORCH_PRICES`) when it differs. Models are matched exactly
first, then by family ("opus", "sonnet", "haiku") inside the model id. A model with no
price gets no cost (None), never a guessed one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from ..types import Usage, check_amount

PRICES_AS_OF = "2026-11"
CACHE_WRITE_FACTOR = 1.25  # 5-minute cache writes cost 1.25x the input price
CACHE_READ_FACTOR = 0.10  # cache reads cost 0.1x the input price


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float
    cache_write: float | None = None
    cache_read: float | None = None

    def cost(self, usage: Usage) -> float:
        write = self.cache_write if self.cache_write is not None else self.input * CACHE_WRITE_FACTOR
        read = self.cache_read if self.cache_read is not None else self.input * CACHE_READ_FACTOR
        return (usage.input_tokens * self.input + usage.output_tokens * self.output
                + usage.cache_write_tokens * write + usage.cache_read_tokens * read) / 1_000_000


DEFAULT_PRICES: dict[str, Price] = {
    # older generations, priced differently from their family's current models
    "claude-opus-4-1": Price(15.0, 75.0),
    "claude-opus-4-0": Price(15.0, 75.0),
    "claude-opus-4-2025": Price(15.0, 75.0),  # dated ids: claude-opus-4-20250514
    "claude-3-opus": Price(15.0, 75.0),
    "claude-3-haiku": Price(0.25, 1.25),
    "claude-3-5-haiku": Price(0.80, 4.0),
    # current families (claude-opus-4-5 and later, claude-sonnet-*, claude-haiku-4-5 and later)
    "opus": Price(5.0, 25.0),
    "sonnet": Price(3.0, 15.0),
    "haiku": Price(1.0, 5.0),
}


class PriceTable:
    """Model id -> Price, with exact ids taking precedence over family names. A price that is
    NaN, infinite or negative is refused (UsageError) when the table is built."""

    def __init__(self, prices: Mapping[str, Price] | None = None) -> None:
        self.prices: Mapping[str, Price] = dict(DEFAULT_PRICES if prices is None else prices)
        for model, price in self.prices.items():
            for part in fields(Price):
                check_amount(f"the price of {model!r} ({part.name})", getattr(price, part.name))
        self._found: dict[str, Price | None] = {}  # model id -> its price, looked up once

    def price_for(self, model: str) -> Price | None:
        found = self._found
        if model not in found:
            found[model] = self.prices.get(model) or next(
                (self.prices[key] for key in sorted(self.prices, key=len, reverse=True) if key in model), None)
        return found[model]

    def cost(self, model: str, usage: Usage) -> float | None:
        price = self.price_for(model)
        return None if price is None else price.cost(usage)

    def merged(self, overrides: Mapping[str, Price]) -> PriceTable:
        return PriceTable({**self.prices, **overrides})

    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        """Defaults overridden by a JSON file: {"model-or-family": {"input": 3, "output": 15}}."""
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a price file is a JSON object of model -> prices")
        overrides = {}
        for model, entry in raw.items():
            if not isinstance(entry, dict) or not {"input", "output"} <= set(entry):
                raise ValueError(f"{path}: {model!r} needs at least \"input\" and \"output\" (USD per MTok)")
            overrides[model] = Price(float(entry["input"]), float(entry["output"]),
                                     _opt(entry.get("cache_write")), _opt(entry.get("cache_read")))
        return cls().merged(overrides)


def _opt(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]
