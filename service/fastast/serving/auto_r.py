"""r=auto: pick, for each batch of auto requests, the smallest ToMe r that still answers them within the SLO.

ToMe's r trades accuracy for speed with one set of weights, so under load the engine can answer every request a
little less accurately instead of refusing some. The controller runs in the engine's batch scheduler:

- The ladder: the r values auto may use, from 0 up to the highest r whose accuracy drop in the card's r table is
  within --auto-max-drop points (or --auto-max-r), keeping only Pareto-optimal r in between (an r that is slower
  and less accurate than another is never worth choosing).
- The cost model: seconds per batch for each (r, batch size) on the ladder, measured at warm-up and then updated
  from every batch the engine runs (an exponential moving average), so it follows the host's real load.
- The choice: at each batch, the smallest r at which the whole auto backlog, drained in full batches from the
  oldest request on, would finish within the planning budget (counted from when each request reached the
  service, so time spent uploading and decoding counts too), and whose throughput in full batches keeps up with
  the auto arrival rate. If none does, the highest r (the bounded queue then sheds with 429s, as without
  auto). Hysteresis: r rises at once, but falls one ladder step at a time, at most once per DOWN_DWELL_S, and
  only when the lower r meets half the budget with a quarter of spare capacity, so r does not flap.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Sequence

import numpy as np

from fastast.model.card import ModelCard, pareto_optimal

# The share of the SLO the engine plans to use for queueing and compute; the rest is for the upload, the decode,
# the hops between processes and the cost model's error.
PLAN_SHARE = 0.75
# Falling back to a lower r needs this share of the budget and this much spare capacity (the hysteresis).
DOWN_BUDGET_SHARE = 0.5
DOWN_SPARE_CAPACITY = 1.25
DOWN_DWELL_S = 0.5  # r stays at least this long at a level before it steps down
RATE_WINDOW_S = 1.0  # arrivals counted over this window estimate the auto request rate
COST_SMOOTHING = 0.2  # weight of a new batch time in the cost model's moving average
MAX_LADDER = 8  # r values auto may use, at most (each one is warmed up for every batch size)

log = logging.getLogger("fastast.engine")


def auto_ladder(card: ModelCard, max_r: int, max_drop_points: float, auto_max_r: int | None) -> list[int]:
    """The r values r=auto may choose, ascending, starting at 0; [] when the card gives nothing to go on.

    The highest is --auto-max-r when given (capped at max_r), else the highest r of the card's own r table whose
    drop is within max_drop_points. Between 0 and it: the card's Pareto-optimal r, or, for a card without an
    r table, up to MAX_LADDER evenly spaced values.
    """
    rows = [row for row in card.own_rows() if row.r <= max_r]
    if auto_max_r is not None:
        top = min(auto_max_r, max_r)
    else:
        allowed = [row.r for row in rows if row.drop is not None and 100 * row.drop <= max_drop_points]
        if not allowed:
            return []
        top = max(allowed)
    timed = [row for row in rows if row.r <= top and row.samples_per_s is not None]
    if timed:
        flags = pareto_optimal([(row.value, row.samples_per_s) for row in timed])
        middle = [row.r for row, optimal in zip(timed, flags) if optimal]
    else:
        middle = [round(x) for x in np.linspace(0, top, min(top + 1, MAX_LADDER))]
    ladder = sorted({0, top, *middle})
    if len(ladder) > MAX_LADDER:  # keep the ends and spread the rest evenly
        picks = np.linspace(0, len(ladder) - 1, MAX_LADDER).round().astype(int)
        ladder = sorted({ladder[i] for i in picks})
    return ladder


class CostModel:
    """Seconds per batch, per ladder r and batch size 1..max_batch_size."""

    def __init__(self, ladder: Sequence[int], max_batch_size: int):
        self.max_batch_size = max_batch_size
        self._seconds = {r: np.zeros(max_batch_size + 1) for r in ladder}

    def fit(self, r: int, sizes: Sequence[int], seconds: Sequence[float]) -> None:
        """Warm-up timings at a few batch sizes, interpolated linearly to every size."""
        self._seconds[r][1:] = np.interp(np.arange(1, self.max_batch_size + 1), sizes, seconds)

    def observe(self, r: int, size: int, seconds: float) -> None:
        if r in self._seconds:
            table = self._seconds[r]
            table[size] += COST_SMOOTHING * (seconds - table[size])

    def seconds(self, r: int, size: int) -> float:
        return float(self._seconds[r][size])

    def samples_per_s(self, r: int) -> float:
        """Throughput in full batches."""
        batch = self.seconds(r, self.max_batch_size)
        return self.max_batch_size / batch if batch > 0 else math.inf


class AutoR:
    """The controller: one per engine; `choose` is called with the auto queue each time an auto batch is formed."""

    def __init__(self, ladder: Sequence[int], costs: CostModel, slo_s: float):
        self.ladder = list(ladder)
        self.costs = costs
        self.budget_s = PLAN_SHARE * slo_s
        self.r = self.ladder[0]
        self._changed = -math.inf  # when r last changed
        self._arrivals: deque[float] = deque()

    def arrived(self, now: float) -> None:
        self._arrivals.append(now)

    def rate(self, now: float) -> float:
        """Auto requests per second over the last RATE_WINDOW_S."""
        while self._arrivals and now - self._arrivals[0] > RATE_WINDOW_S:
            self._arrivals.popleft()
        return len(self._arrivals) / RATE_WINDOW_S

    def choose(self, enqueued: Sequence[float], now: float | None = None, beside: int = 0) -> int:
        """The r for the next auto batch, given when the queued auto requests arrived, oldest first.

        `beside`: rows of longer requests also waiting; they fill the batches the planned requests run in.
        """
        now = time.monotonic() if now is None else now
        rate = self.rate(now)
        needed = self._smallest(enqueued, now, self.budget_s, rate, beside)
        previous = self.r
        if needed > self.r:
            self.r = needed
        elif needed < self.r and now - self._changed >= DOWN_DWELL_S:
            relaxed = self._smallest(enqueued, now, DOWN_BUDGET_SHARE * self.budget_s, DOWN_SPARE_CAPACITY * rate, beside)
            if relaxed < self.r:
                self.r = self.ladder[self.ladder.index(self.r) - 1]
        if self.r == previous:
            return self.r
        self._changed = now
        if log.isEnabledFor(logging.DEBUG):
            costs = ", ".join(
                f"r={r}: {1e3 * self.worst_latency(r, enqueued, now, beside):.0f} ms / {self.costs.samples_per_s(r):.0f} S/s"
                for r in self.ladder
            )
            log.debug("r=auto %d -> %d: %d queued, %.0f/s arriving; drain time and capacity %s", previous, self.r, len(enqueued), rate, costs)
        return self.r

    def _smallest(self, enqueued: Sequence[float], now: float, budget_s: float, rate: float, beside: int) -> int:
        for r in self.ladder:
            if self.costs.samples_per_s(r) >= rate and self.worst_latency(r, enqueued, now, beside) <= budget_s:
                return r
        return self.ladder[-1]

    def worst_latency(self, r: int, enqueued: Sequence[float], now: float, beside: int = 0) -> float:
        """The longest latency in the backlog if it were drained at r from now, oldest first, in batches filled
        up with the `beside` rows of longer requests while they last."""
        size, finished, worst = self.costs.max_batch_size, now, 0.0
        for start in range(0, len(enqueued), size):
            planned = min(size, len(enqueued) - start)
            fill = min(size - planned, beside)
            beside -= fill
            finished += self.costs.seconds(r, planned + fill)
            worst = max(worst, finished - enqueued[start])
        return worst
