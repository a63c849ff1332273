"""A batch's progress on stderr: a live bar on a terminal (tqdm: done/total, rate, ETA, and
completed/failed/running, tokens and cost beside it), a plain line every few seconds when
stderr is a file or a pipe, so logs stay readable."""

from __future__ import annotations

import time
from typing import IO, TYPE_CHECKING, Any

from ..engine._batch import BatchProgress
from ._render import usd

if TYPE_CHECKING:
    from tqdm import tqdm

PLAIN_EVERY_S = 10.0


class Progress:
    """`update(progress)` on every change of the batch; `close()` once it ends."""

    def __init__(self, stream: IO[str], batch_id: str, *, every_s: float = PLAIN_EVERY_S, noun: str = "batch") -> None:
        self.stream = stream
        self.batch_id = batch_id
        self.noun = noun  # what runs: a batch, an experiment
        self.live = stream.isatty()
        self.every_s = every_s
        self._bar: tqdm[Any] | None = None
        self._last: BatchProgress | None = None
        self._printed = 0.0

    def update(self, progress: BatchProgress) -> None:
        self._last = progress
        if self.live:
            bar = self._bar_for(progress)
            bar.set_postfix_str(_counts(progress), refresh=False)
            bar.update(progress.finished - bar.n)  # redraws at most every tqdm mininterval
        elif time.monotonic() - self._printed >= self.every_s:
            self._line(progress)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._last is not None:
            self._line(self._last)

    def _bar_for(self, progress: BatchProgress) -> tqdm[Any]:
        if self._bar is None:
            from tqdm import tqdm  # here: only a terminal shows a bar

            self._bar = tqdm(total=progress.total, desc=f"{self.noun} {self.batch_id}", unit="run", file=self.stream,
                             dynamic_ncols=True, smoothing=0.1)
        return self._bar

    def _line(self, p: BatchProgress) -> None:
        self._printed = time.monotonic()
        elapsed = max(self._printed - p.started, 1e-9)
        fresh = p.finished - p.already_done
        rate = fresh / elapsed
        left = p.total - p.finished
        eta = f", ETA {left / rate:.0f}s" if rate > 0 and left else ""
        print(f"{self.noun} {self.batch_id}: {p.finished}/{p.total} done, {_counts(p)}, {rate:.1f} runs/s{eta}",
              file=self.stream, flush=True)


def _counts(p: BatchProgress) -> str:
    return (f"{p.completed} ok, {p.failed} failed, {p.running} running, "
            f"{p.usage.input_tokens + p.usage.output_tokens} tokens, {usd(p.cost_usd)}")
