"""The rate limiter (issue 13.4): `AnthropicModel(rate_limits=...)` through the real SDK against the
fake Messages API enforcing the API's limits (`FakeMessagesAPI(rate_limits=...)`).

Both sides run on one `VirtualTime`: the fake's buckets refill on its clock and the limiter's
one timer moves it, so a minute of rate limiting takes no time and every wait is exact.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import anthropic
import pytest
from anthropic._base_client import get_platform

from statemachine_orch import AnthropicModel, Completion, LLMRequest, RateLimiter, RateLimits, RetryPolicy, UsageError
from statemachine_orch.llm._client import estimate_input_tokens
from statemachine_orch.llm._limiter import model_class
from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI, Reply, ScriptEntry, error

from .helpers import MODEL, VirtualTime


def request(number: int = 0, *, max_tokens: int = 100) -> LLMRequest:
    return LLMRequest(run_id=f"run-{number}", state="ask", body={
        "model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": f"question {number}"}]})


def call_all(model: AnthropicModel, requests: list[LLMRequest]) -> list[Completion]:
    async def go() -> list[Completion]:
        return list(await asyncio.gather(*(model.complete(r) for r in requests)))
    return asyncio.run(go())


def limited(time: VirtualTime, server: RateLimits, ours: RateLimits | None = None,
            **fake_options: Any) -> tuple[FakeMessagesAPI, AnthropicModel, RateLimiter]:
    """A fake enforcing `server`, and a model limited by `ours` (None set: read from the headers)."""
    fake = FakeMessagesAPI(rate_limits=server, clock=time.clock, **fake_options)
    model = fake.model(rate_limits=ours or RateLimits(), sleep=time.sleep, clock=time.clock)
    assert model.limiter is not None
    # The SDK looks up its platform in a worker thread at a client's first request. On a clock
    # that only moves when someone sleeps, that thread's real time would decide the order of the
    # first calls (a flaky test under load), so it is looked up here, before any call.
    model.client._platform = get_platform()
    return fake, model, model.limiter


@pytest.mark.parametrize(("model", "expected"), [
    ("claude-opus-4-1", "opus"), ("claude-sonnet-4-5-20250929", "sonnet"), ("Claude-3-5-Haiku-latest", "haiku"),
    ("my-proxy-model", "my-proxy-model")])
def test_each_model_class_has_its_own_limits(model: str, expected: str) -> None:
    assert model_class(model) == expected


@pytest.mark.parametrize("value", [0, -5, 1.5, True])
def test_a_limit_that_is_not_a_whole_number_above_0_is_refused(value: Any) -> None:
    with pytest.raises(UsageError, match="requests_per_minute is"):
        RateLimits(requests_per_minute=value)


def test_429s_with_retry_after_pause_every_waiter_once_until_the_deadline() -> None:
    """Ten calls at once against 3 requests a minute, before the limiter knows it: the 3 the
    bucket holds are answered; each other call sent before the first answer gets one 429
    (retry-after 20 s: one request refills in 20 s) and waits in line, which the pause holds
    until its deadline, then serves one call per refill."""
    time, arrivals = VirtualTime(), list[tuple[str | None, float]]()
    fake, model, limiter = limited(time, RateLimits(requests_per_minute=3))
    first_sent = threading.Event()  # every call's first request has arrived: the first answers may go

    def answer(captured: CapturedRequest) -> ScriptEntry:
        arrivals.append((captured.run_id, time.now))
        if fake.calls() + fake.rejected >= 10:
            first_sent.set()
        return Reply(text="fine", gate=first_sent)

    fake.default = answer
    requests = [request(i) for i in range(10)]
    call_all(model, requests)

    assert 1 <= fake.rejected <= 7 and fake.calls() == 10
    refused = {r.run_id for r in requests if r.attempts}
    assert len(refused) == fake.rejected  # no call was refused twice
    assert {(a.status_code, a.delay_s) for r in requests for a in r.attempts} == {(429, 20.0)}
    assert all(at >= 20.0 for run_id, at in arrivals if run_id in refused)  # retried after the deadline
    assert time.slept[0] >= 20.0 and time.slept[1:] == [20.0] * (len(time.slept) - 1)  # one pause, then a call a refill
    assert len(time.slept) <= 7  # the limiter's one timer: no call slept its own retry-after
    assert limiter.limits(MODEL) == RateLimits(requests_per_minute=3)


def test_limits_read_from_the_headers_hold_calls_to_the_server_limit_with_no_429() -> None:
    time = VirtualTime()
    fake, model, limiter = limited(time, RateLimits(requests_per_minute=6, output_tokens_per_minute=60_000))
    call_all(model, [request()])  # its answer's headers: limits 6 and 60,000, 5 requests remaining
    assert limiter.limits(MODEL) == RateLimits(requests_per_minute=6, output_tokens_per_minute=60_000)
    assert limiter.available(MODEL)["requests"] == 5

    call_all(model, [request(i) for i in range(1, 13)])
    assert fake.rejected == 0 and fake.calls() == 13
    assert time.slept == [10.0] * 7  # 5 at once, then one each time a request refills


@pytest.mark.parametrize("max_tokens", [1_000, 10_000], ids=["created", "streamed"])
def test_a_call_gives_back_what_it_did_not_use_and_the_next_is_not_delayed(max_tokens: int) -> None:
    time, seen = VirtualTime(), list[float | None]()
    fake, model, limiter = limited(time, RateLimits(), RateLimits(output_tokens_per_minute=20_000))

    def answer(captured: CapturedRequest) -> ScriptEntry:
        seen.append(limiter.available(MODEL)["output_tokens"])
        return Reply(text="short", output_tokens=10)

    fake.default = answer
    call_all(model, [request(max_tokens=max_tokens)])
    assert seen == [20_000 - max_tokens]  # in flight it holds all of max_tokens
    assert limiter.available(MODEL)["output_tokens"] == 20_000 - 10  # then gives back all but the 10 used

    call_all(model, [request(1, max_tokens=20_000 - 10)])
    assert time.slept == [] and time.now == 0.0


def test_an_underestimated_input_is_taken_in_full_once_the_usage_says() -> None:
    time = VirtualTime()
    first = request()
    estimate = estimate_input_tokens(first.body)
    fake, model, limiter = limited(time, RateLimits(), RateLimits(input_tokens_per_minute=100_000))
    fake.on("ask", Reply(text="long prompt", input_tokens=estimate + 500, cache_write_tokens=100,
                         cache_read_tokens=9_000))
    call_all(model, [first])
    assert limiter.available(MODEL)["input_tokens"] == 100_000 - estimate - 600  # cache reads do not count


def test_the_options_limits_win_over_the_headers() -> None:
    time = VirtualTime()
    fake, model, limiter = limited(time, RateLimits(requests_per_minute=600, input_tokens_per_minute=50_000),
                                   RateLimits(requests_per_minute=6))
    call_all(model, [request(i) for i in range(7)])
    assert limiter.limits(MODEL) == RateLimits(requests_per_minute=6, input_tokens_per_minute=50_000)
    assert time.slept == [10.0] and fake.rejected == 0  # the 7th waited for our 6 a minute, not the server's 600


def test_remaining_lowers_our_count_and_never_raises_it() -> None:
    """Another client draws on the same limits: the next answer's `remaining` lowers our count."""
    time = VirtualTime()
    fake, model, limiter = limited(time, RateLimits(requests_per_minute=10))
    call_all(model, [request()])
    assert limiter.available(MODEL)["requests"] == 9
    call_all(fake.model(), [request(i) for i in range(1, 6)])  # no limiter: we do not see these
    call_all(model, [request(6)])
    assert limiter.available(MODEL)["requests"] == 3
    limiter.observe(MODEL, {"anthropic-ratelimit-requests-remaining": "9"})
    assert limiter.available(MODEL)["requests"] == 3


def test_529s_back_off_each_call_with_its_own_jitter_and_pause_nobody() -> None:
    time, overloaded = VirtualTime(), set[str | None]()

    def answer(captured: CapturedRequest) -> ScriptEntry:
        first = captured.run_id not in overloaded
        overloaded.add(captured.run_id)
        return error(529) if first else "fine"

    _, model, limiter = limited(time, RateLimits(), default=answer)
    model.retry = RetryPolicy(max_attempts=3)  # 1 s, less up to 25 % jitter
    requests = [request(i) for i in range(5)]
    call_all(model, requests)
    delays = [attempt.delay_s or 0.0 for r in requests for attempt in r.attempts]
    assert len(delays) == 5 and len(set(delays)) == 5
    assert all(0.75 <= delay <= 1.0 for delay in delays)
    assert sorted(time.slept) == sorted(delays)  # each call slept its own backoff; the limiter never waited
    assert limiter.paused_until(MODEL) is None


def test_waiters_are_served_in_order_by_one_timer() -> None:
    """Nobody overtakes: a small call waits behind a large one that waits for its tokens."""
    time = VirtualTime()
    limiter = RateLimiter(RateLimits(requests_per_minute=60, output_tokens_per_minute=600),
                          clock=time.clock, sleep=time.sleep)
    served: list[int] = []

    async def ask(number: int, max_tokens: int) -> None:
        await limiter.acquire(MODEL, 0, max_tokens)
        served.append(number)

    async def go() -> None:
        await asyncio.gather(*(ask(-1, 10) for _ in range(60)))  # both buckets empty: 1 request, 10 tokens a second
        await asyncio.gather(ask(0, 1), ask(1, 100), ask(2, 1), ask(3, 1))

    asyncio.run(go())
    assert served == [-1] * 60 + [0, 1, 2, 3]
    # one timer wakes the line: 0 at 1 s, 1 when it has 100 tokens (9.1 s on), then 2 and 3 as tokens refill
    assert time.slept == [pytest.approx(1.0), pytest.approx(9.1), pytest.approx(0.1), pytest.approx(0.1)]


def test_a_waiter_that_stops_waiting_leaves_the_line_and_takes_nothing() -> None:
    time = VirtualTime()
    limiter = RateLimiter(RateLimits(requests_per_minute=60), clock=time.clock, sleep=time.sleep)

    async def go() -> None:
        for _ in range(60):
            await limiter.acquire(MODEL, 0, 0)
        stopped = asyncio.create_task(limiter.acquire(MODEL, 0, 0))
        await asyncio.sleep(0)
        stopped.cancel()
        permit = await limiter.acquire(MODEL, 0, 0)
        assert permit.granted_at == 1.0
        permit.release(refused=True)

    asyncio.run(go())
    assert limiter.available(MODEL)["requests"] == pytest.approx(1.0)


def test_the_served_fake_enforces_its_limits_and_sends_their_headers() -> None:
    fake = FakeMessagesAPI(rate_limits=RateLimits(requests_per_minute=2), clock=lambda: 0.0)  # time stands still
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}

    async def go(url: str) -> None:
        client = anthropic.AsyncAnthropic(base_url=url, api_key="test-key-not-secret", max_retries=0)
        raw = await client.messages.with_raw_response.create(**body)
        assert raw.headers["anthropic-ratelimit-requests-limit"] == "2"
        assert raw.headers["anthropic-ratelimit-requests-remaining"] == "1"
        assert raw.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
        await client.messages.create(**body)
        with pytest.raises(anthropic.RateLimitError) as refused:
            await client.messages.create(**body)
        assert refused.value.response.headers["retry-after"] == "30"  # one request refills in 30 s
        assert refused.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"

    with fake.serve() as url:
        asyncio.run(go(url))
    assert fake.rejected == 1 and fake.calls() == 2
