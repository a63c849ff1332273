"""A shared, token-aware rate limiter for the Messages API, one per model client.

The API limits each model class (Opus, Sonnet, Haiku) three ways: requests, input tokens and
output tokens per minute, each a token bucket that holds a minute's worth and refills
continuously. The limiter keeps the same three buckets on our side, so calls wait here instead
of being refused there:

- `acquire` waits in one FIFO line per model class until all three buckets can afford the call
  (one request, its estimated input tokens, its `max_tokens`), then takes that from them.
  One timer per class wakes the head of the line when it can be served: no thundering herd.
- the permit's `settle(usage)` gives back what the call did not use (its `max_tokens` less the
  output tokens, the input estimate less the input counted), or takes the rest of an
  underestimate. `release()` ends a call that failed without usage: the request and its input
  estimate stay spent (the server may have counted them), the output reservation comes back;
  a refused call (429) gives everything back.
- `observe` reads the `anthropic-ratelimit-*` headers of each answer: a `-limit` sets a
  bucket's size unless `RateLimits` gave it (options win); a `-remaining` only ever lowers our
  count, never raises it (calls in flight are ours to count, the server's view is older).
- `pause` (a 429's `retry-after`) holds the whole line until then, once: concurrent 429s
  extend the pause to the latest deadline, they do not add up.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, fields

from ..errors import UsageError
from ..types import Usage

Sleep = Callable[[float], Awaitable[None]]
MODEL_CLASSES = ("opus", "sonnet", "haiku")
RESOURCES = ("requests", "input_tokens", "output_tokens")  # the order of every 3-tuple below
HEADER_NAMES = ("requests", "input-tokens", "output-tokens")  # as in anthropic-ratelimit-{name}-limit
EPSILON = 1e-6  # a bucket this close to a cost can afford it (refills are float arithmetic)

Amounts = tuple[float, float, float]


def model_class(model: str) -> str:
    """Which limits a model id counts against: "opus", "sonnet" or "haiku", else the id itself."""
    lower = model.lower()
    return next((name for name in MODEL_CLASSES if name in lower), model)


@dataclass(frozen=True, kw_only=True)
class RateLimits:
    """Per-minute limits of one model class (None: read from the API's headers, or no limit)."""

    requests_per_minute: int | None = None
    input_tokens_per_minute: int | None = None
    output_tokens_per_minute: int | None = None

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None and (type(value) is not int or value < 1):
                raise UsageError(f"{field.name} is {value!r}", fix="use a whole number above 0, or None")

    def as_tuple(self) -> tuple[int | None, int | None, int | None]:
        return self.requests_per_minute, self.input_tokens_per_minute, self.output_tokens_per_minute


class TokenBucket:
    """`capacity` per minute, refilled continuously, full at the start (None: not limited).

    `level` may go below 0: a call larger than the whole bucket waits for a full one, then
    leaves it in debt."""

    __slots__ = ("capacity", "level", "updated")

    def __init__(self, capacity: float | None, now: float) -> None:
        self.capacity = capacity
        self.level = capacity or 0.0
        self.updated = now

    def refill(self, now: float) -> None:
        if self.capacity is not None:
            self.level = min(self.capacity, self.level + self.capacity / 60 * (now - self.updated))
        self.updated = now

    def wait(self, cost: float) -> float:
        """Seconds until the bucket can afford `cost` (0: now)."""
        if self.capacity is None:
            return 0.0
        short = min(cost, self.capacity) - self.level
        return 0.0 if short <= EPSILON else short / (self.capacity / 60)

    def add(self, amount: float) -> None:
        """Give back (or, negative, take) tokens; never above capacity."""
        if self.capacity is not None:
            self.level = min(self.capacity, self.level + amount)


def refill_all(buckets: tuple[TokenBucket, ...], now: float) -> None:
    for bucket in buckets:
        bucket.refill(now)


class Permit:
    """What one granted call took from its model class's buckets; end it once, with `settle` or
    `release`."""

    def __init__(self, limiter: RateLimiter, lane: _Lane, cost: Amounts, granted_at: float) -> None:
        self._limiter = limiter
        self._lane = lane
        self.cost = cost
        self.granted_at = granted_at  # on the limiter's clock

    def settle(self, usage: Usage) -> None:
        """The call answered: keep what it used (cache writes count as input, cache reads do not,
        as the API counts them), give back the rest."""
        self._end((1.0, float(usage.input_tokens + usage.cache_write_tokens), float(usage.output_tokens)))

    def release(self, *, refused: bool = False) -> None:
        """The call failed without usage: keep the request and the input estimate (the server may
        have counted them), give back the output reservation. `refused` (a 429): the server
        counted nothing, everything comes back."""
        self._end((0.0, 0.0, 0.0) if refused else (1.0, self.cost[1], 0.0))

    def _end(self, used: Amounts) -> None:
        self._limiter._finish(self, used)


@dataclass(eq=False, slots=True)
class _Waiter:
    cost: Amounts
    future: asyncio.Future[Permit]


class _Lane:
    """One model class: its buckets, its line of waiters, its pause and its one timer."""

    def __init__(self, limits: RateLimits, now: float) -> None:
        self.fixed = tuple(value is not None for value in limits.as_tuple())  # sizes the options set
        self.buckets = tuple(TokenBucket(value, now) for value in limits.as_tuple())
        self.open: set[Permit] = set()  # granted, not yet ended
        self.waiters: deque[_Waiter] = deque()
        self.paused_until = now
        self.timer: asyncio.Task[None] | None = None
        self.wake_at = 0.0

    def wait(self, cost: Amounts, now: float) -> float:
        return max(self.paused_until - now, *(b.wait(c) for b, c in zip(self.buckets, cost, strict=True)))


class RateLimiter:
    """The Messages API's rate limits, kept on our side (see the module docstring).

    `limits` apply to every model class; a limit left None is read from the headers of the
    class's answers, and until one arrives that resource is not limited. `clock` and `sleep`
    are injectable for tests; they must agree (sleeping `s` moves the clock `s` on).
    """

    def __init__(self, limits: RateLimits | None = None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Sleep = asyncio.sleep) -> None:
        self.options = limits or RateLimits()
        self.clock = clock
        self._sleep = sleep
        self._lanes: dict[str, _Lane] = {}

    async def acquire(self, model: str, input_tokens: int, max_tokens: int) -> Permit:
        """Wait in line until the call can be afforded, then take it from the buckets."""
        lane = self._lane(model)
        cost = (1.0, float(input_tokens), float(max_tokens))
        now = self.clock()
        refill_all(lane.buckets, now)
        if not lane.waiters and lane.wait(cost, now) == 0:
            return self._grant(lane, cost, now)
        future: asyncio.Future[Permit] = asyncio.get_running_loop().create_future()
        lane.waiters.append(_Waiter(cost, future))
        self._serve(lane)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted as it was stopped: nothing was sent
                self._finish(future.result(), (0.0, 0.0, 0.0))
            self._serve(lane)
            raise

    def observe(self, model: str, headers: Mapping[str, str], *, sent_at: float | None = None) -> None:
        """Read an answer's `anthropic-ratelimit-*` headers. `sent_at` is when its call was sent (its
        permit's `granted_at`): the server's `remaining` was counted after that, so the bucket may
        have refilled since by up to that long. Settle or release the call's permit first."""
        lane = self._lane(model)
        lower = {key.lower(): value for key, value in headers.items()}
        now = self.clock()
        refill_all(lane.buckets, now)
        for index, name in enumerate(HEADER_NAMES):
            bucket = lane.buckets[index]
            limit = _whole(lower.get(f"anthropic-ratelimit-{name}-limit"))
            remaining = _whole(lower.get(f"anthropic-ratelimit-{name}-remaining"))
            if limit is not None and limit > 0 and not lane.fixed[index] and limit != bucket.capacity:
                if bucket.capacity is None:  # first seen: the server's count, less every call it may not have seen
                    bucket.level = float(limit if remaining is None else min(limit, remaining))
                    bucket.level -= sum(permit.cost[index] for permit in lane.open)
                bucket.capacity = float(limit)
                bucket.level = min(bucket.level, bucket.capacity)
            if remaining is not None and bucket.capacity is not None:
                refilled = bucket.capacity / 60 * (now - sent_at) if sent_at is not None else 0.0
                bucket.level = min(bucket.level, remaining + refilled)
        self._serve(lane)

    def pause(self, model: str, seconds: float) -> None:
        """Hold every call of `model`'s class for `seconds` (a 429's retry-after); a pause that
        ends later extends the current one, an earlier one changes nothing."""
        lane = self._lane(model)
        lane.paused_until = max(lane.paused_until, self.clock() + seconds)
        self._serve(lane)

    def limits(self, model: str) -> RateLimits:
        """The limits in force for `model`'s class: the options', else the headers' (None: not yet known)."""
        sizes = [None if b.capacity is None else int(b.capacity) for b in self._lane(model).buckets]
        return RateLimits(requests_per_minute=sizes[0], input_tokens_per_minute=sizes[1],
                          output_tokens_per_minute=sizes[2])

    def available(self, model: str) -> dict[str, float | None]:
        """What each bucket of `model`'s class holds now (None: not limited)."""
        lane = self._lane(model)
        refill_all(lane.buckets, self.clock())
        return {name: None if bucket.capacity is None else bucket.level
                for name, bucket in zip(RESOURCES, lane.buckets, strict=True)}

    def paused_until(self, model: str) -> float | None:
        """When the pause of `model`'s class ends on `clock` (None: not paused)."""
        until = self._lane(model).paused_until
        return until if until > self.clock() else None

    # ------------------------------------------------------------------ the line

    def _lane(self, model: str) -> _Lane:
        key = model_class(model)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(self.options, self.clock())
        return lane

    def _grant(self, lane: _Lane, cost: Amounts, now: float) -> Permit:
        for bucket, amount in zip(lane.buckets, cost, strict=True):
            bucket.add(-amount)
        permit = Permit(self, lane, cost, now)
        lane.open.add(permit)
        return permit

    def _finish(self, permit: Permit, used: Amounts) -> None:
        lane = permit._lane
        if permit not in lane.open:
            return  # ended already
        lane.open.remove(permit)
        refill_all(lane.buckets, self.clock())
        for bucket, amount, spent in zip(lane.buckets, permit.cost, used, strict=True):
            bucket.add(amount - spent)
        self._serve(lane)

    def _serve(self, lane: _Lane) -> None:
        """Grant the head of the line while it can be afforded; else set the timer for when it can."""
        now = self.clock()
        refill_all(lane.buckets, now)
        while lane.waiters:
            head = lane.waiters[0]
            if head.future.done():  # its caller stopped waiting
                lane.waiters.popleft()
                continue
            wait = lane.wait(head.cost, now)
            if wait > 0:
                self._wake(lane, now + wait, wait)
                return
            lane.waiters.popleft()
            head.future.set_result(self._grant(lane, head.cost, now))

    def _wake(self, lane: _Lane, at: float, delay: float) -> None:
        if lane.timer is not None and not lane.timer.done():
            if lane.wake_at <= at:
                return  # it wakes in time; serving then sets the next timer
            lane.timer.cancel()
        lane.wake_at = at
        lane.timer = asyncio.get_running_loop().create_task(self._tick(lane, delay))

    async def _tick(self, lane: _Lane, delay: float) -> None:
        await self._sleep(delay)
        lane.timer = None
        self._serve(lane)


def _whole(value: str | None) -> int | None:
    """A header's whole number (None: absent or not a number)."""
    try:
        return None if value is None else int(value)
    except ValueError:
        return None
