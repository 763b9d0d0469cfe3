"""Dynamic batching by r: one queue per r, one scheduler task, one inference thread. It runs in the engine.

A request is one or more rows (windows of audio); a row is the unit of batching and of queue accounting. A
batch holds rows of a single r (r changes the token count and so the model's cost and shapes), at most
`max_batch_size` of them, taken round-robin by request so that a long request's rows spread over many batches
while short requests still go into the next one. A queue is ready when it holds a full batch of rows or when its
oldest request has waited `max_wait_s`; among ready queues the one whose head is oldest goes first, so no r
starves. Batches run one at a time on a single inference thread: the model is on one device, and torch releases
the GIL while it computes, so the event loop keeps taking requests (and refusing them when full) meanwhile.

Requests with r=auto wait in a queue of their own; when it is their turn, the r=auto controller
(fastast.serving.auto_r) picks the r the batch runs at, and every batch's time feeds the controller's cost model.

A request whose deadline passes while rows of it still wait, or that is cancelled, leaves its queue; its waiting
rows are never computed (rows already in a batch run to the end). Admission is bounded: at most `max_queue` rows
wait, across all r. The batcher knows nothing of audio or models: `run_batch(r, items)` turns a batch's rows into
one output per row.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastast.serving.auto_r import AutoR
from fastast.serving.metrics import AUTO_R, ServingMetrics

log = logging.getLogger("fastast.serving")
T = TypeVar("T")

RunBatch = Callable[[int, list[Any]], Sequence[Any]]
QueueKey = int | str  # an r, or AUTO_R for the requests that leave r to the controller


class QueueFullError(Exception):
    """max_queue requests are already waiting."""


class DeadlineExceededError(Exception):
    """The request's deadline passed before its batch started."""


class CancelledJobError(Exception):
    """The request was cancelled (its client went away) while it was queued."""


class BatchFailedError(Exception):
    """The batch this request ran in raised; the message is safe to show a client."""


class JobState(enum.Enum):
    QUEUED = "queued"  # rows still wait in its queue (some may already be in batches)
    RUNNING = "running"  # every row is in a batch
    DONE = "done"


@dataclass(frozen=True)
class BatchResult:
    outputs: list[Any]  # run_batch's output for each of the request's rows, in order
    r: int  # the r its rows ran at (the highest, if an r=auto request's rows ran in batches at different r)
    batch_size: int  # rows in the largest batch it ran in
    queue_s: float  # from being queued to its first batch
    inference_s: float  # the batches it ran in, together


@dataclass(eq=False)
class Job:
    """One request: its rows (windows of audio) go into batches, interleaved with other requests' rows."""

    rows: Sequence[Any]
    queue: QueueKey
    deadline: float  # time.monotonic()
    future: asyncio.Future[BatchResult]
    enqueued: float = field(default_factory=time.monotonic)
    arrived: float | None = None  # when the request reached the service, if before it was queued
    state: JobState = JobState.QUEUED
    expiry: asyncio.TimerHandle | None = None
    taken: int = 0  # rows handed to batches
    computed: int = 0  # rows whose batch has finished
    outputs: list[Any] = field(init=False)  # one per row, filled as its batches finish
    r: int = 0
    batch_size: int = 0
    started: float | None = None
    inference_s: float = 0.0

    def __post_init__(self) -> None:
        self.outputs = [None] * len(self.rows)

    @property
    def pending(self) -> int:
        return len(self.rows) - self.taken

    @property
    def since(self) -> float:
        """When the request's latency started: its arrival at the service, or its queueing."""
        return self.enqueued if self.arrived is None else self.arrived


class Batcher:
    def __init__(
        self,
        run_batch: RunBatch,
        metrics: ServingMetrics,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        request_share: float = 1.0,
        auto: AutoR | None = None,
    ):
        self.run_batch = run_batch
        self.auto = auto
        self.rows_per_request = max(1, int(max_batch_size * request_share))
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.busy_s = 0.0  # wall time spent computing batches, in total
        self._queues: dict[QueueKey, deque[Job]] = {}  # requests with rows still waiting, oldest first
        self._rows: dict[QueueKey, int] = {}  # rows waiting per queue
        self._queued = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastast-inference")
        self._task: asyncio.Task | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._schedule(), name="fastast-batcher")
        self._task.add_done_callback(_log_crash)

    async def close(self) -> None:
        """Finish every queued request, then stop the scheduler and the inference thread."""
        while self._queued and self._task is not None and not self._task.done():
            await asyncio.sleep(0.01)
        await self._idle.wait()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run fn on the inference thread (warm-up uses it, so it never races a batch)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # ---- admission ---------------------------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Rows waiting for a batch, across all queues."""
        return self._queued

    def submit(self, rows: Sequence[Any], r: int | None, deadline: float, arrived: float | None = None) -> Job:
        """Queue one request of one or more rows (r None: r=auto). Await job.future.

        QueueFullError at once when its rows do not fit beside the rows already waiting (max_queue counts rows).
        `arrived`: when the request reached the service (before its upload and decode), so that r=auto plans
        for the latency its client sees.
        """
        if not rows:
            raise ValueError("a request needs at least one row")
        if r is None and self.auto is None:
            raise ValueError("r=auto needs a controller")
        if self._queued + len(rows) > self.max_queue:
            raise QueueFullError(
                f"{self._queued} rows are already waiting and this request has {len(rows)} (max_queue {self.max_queue})"
            )
        loop = asyncio.get_running_loop()
        key: QueueKey = AUTO_R if r is None else r
        job = Job(rows, key, deadline, loop.create_future(), arrived=arrived)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self._settle(job, DeadlineExceededError())
            return job
        job.expiry = loop.call_later(remaining, self.cancel, job, DeadlineExceededError())
        if r is None:
            self.auto.arrived(job.enqueued)
        self._queues.setdefault(key, deque()).append(job)
        self._add_rows(key, len(rows))
        self._wake.set()
        return job

    def cancel(self, job: Job, reason: Exception) -> bool:
        """Fail a request whose rows are not all in batches yet with `reason`, dropping the rows still waiting
        (rows already in a batch finish, unused); False if every row was already in a batch."""
        if job.state is not JobState.QUEUED:
            return False
        self._queues[job.queue].remove(job)
        self._add_rows(job.queue, -job.pending)
        job.taken = len(job.rows)
        self._settle(job, reason)
        return True

    # ---- scheduling ------------------------------------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            now = time.monotonic()
            key = self._ready_queue(now)
            if key is None:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self._time_to_flush(now))
                except asyncio.TimeoutError:
                    pass
                continue
            r, batch = self._take(key, now)
            self._idle.clear()
            try:
                await self._run(r, batch)
            finally:
                self._idle.set()

    def _ready_queue(self, now: float) -> QueueKey | None:
        """The queue to batch next: among full or timed-out queues, the one whose head is oldest."""
        ready = [
            (queue[0].enqueued, key)
            for key, queue in self._queues.items()
            if queue and (self._rows[key] >= self.max_batch_size or now - queue[0].enqueued >= self.max_wait_s)
        ]
        return min(ready, key=lambda head: head[0])[1] if ready else None

    def _time_to_flush(self, now: float) -> float | None:
        heads = [queue[0].enqueued for queue in self._queues.values() if queue]
        return max(0.0, min(heads) + self.max_wait_s - now) if heads else None

    def _take(self, key: QueueKey, now: float) -> tuple[int, list[tuple[Job, int]]]:
        """The batch's r and up to max_batch_size (request, row) pairs off a queue (expired requests already left).

        Rows are taken round-robin by request, oldest request first: one row from each waiting request per round,
        and at most rows_per_request of one request, so a long request's rows spread over many batches while a
        short request's row goes into the next one, and that batch stays short. For the auto queue the
        controller picks the r, seeing the whole auto backlog.
        """
        queue = self._queues[key]
        r = self._auto_r(queue, now) if key == AUTO_R else int(key)
        batch: list[tuple[Job, int]] = []
        taken: dict[Job, int] = {}
        while queue and len(batch) < self.max_batch_size:
            open_jobs = [job for job in queue if taken.get(job, 0) < self.rows_per_request]
            if not open_jobs:
                break
            for job in open_jobs:
                if len(batch) == self.max_batch_size:
                    break
                batch.append((job, job.taken))
                job.taken += 1
                taken[job] = taken.get(job, 0) + 1
                if job.pending == 0:
                    queue.remove(job)
                    job.state = JobState.RUNNING
                    if job.expiry is not None:
                        job.expiry.cancel()
        self._add_rows(key, -len(batch))
        if key == AUTO_R:
            self.metrics.record_auto_r(r, len(batch))
        return r, batch

    def _auto_r(self, queue: deque[Job], now: float) -> int:
        """The controller's r for the auto queue; it plans for the requests of one row (longer requests cannot
        meet a per-request latency target; their rows fill the batches beside)."""
        assert self.auto is not None
        short = [job.since for job in queue if len(job.rows) == 1]
        beside = sum(job.pending for job in queue if len(job.rows) > 1)
        return self.auto.choose(short, now, beside)

    async def _run(self, r: int, batch: list[tuple[Job, int]]) -> None:
        started = time.monotonic()
        for job, _ in batch:
            self.metrics.queue_wait.labels(r=str(r)).observe(started - job.enqueued)
            if job.started is None:
                job.started = started
        loop = asyncio.get_running_loop()
        items = [job.rows[row] for job, row in batch]
        try:
            outputs = await loop.run_in_executor(self._executor, self._compute, r, items)
        except Exception as exc:
            log.exception("batch of %d at r=%d failed", len(batch), r)
            self.busy_s += time.monotonic() - started
            error = BatchFailedError(f"inference failed for this batch ({type(exc).__name__})")
            for job in {job: None for job, _ in batch}:
                if not self.cancel(job, error):
                    self._settle(job, error)
            return
        elapsed = time.monotonic() - started
        self.busy_s += elapsed
        self.metrics.record_batch(r, len(batch), elapsed)
        if self.auto is not None:
            self.auto.costs.observe(r, len(batch), elapsed)
        for job in {job: None for job, _ in batch}:  # each request once, in batch order
            job.r, job.batch_size = max(job.r, r), max(job.batch_size, len(batch))
            job.inference_s += elapsed
        for output, (job, row) in zip(outputs, batch):
            job.outputs[row] = output
            job.computed += 1
            if job.computed == len(job.rows):
                assert job.started is not None
                self._settle(job, BatchResult(job.outputs, job.r, job.batch_size, job.started - job.enqueued, job.inference_s))

    def _compute(self, r: int, items: list[Any]) -> Sequence[Any]:
        outputs = self.run_batch(r, items)
        if len(outputs) != len(items):
            raise RuntimeError(f"run_batch returned {len(outputs)} outputs for a batch of {len(items)}")
        return outputs

    # ---- helpers ------------------------------------------------------------------------------------------------------

    @staticmethod
    def _settle(job: Job, outcome: BatchResult | Exception) -> None:
        job.state = JobState.DONE
        if job.future.done():
            return
        if isinstance(outcome, Exception):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    def _add_rows(self, key: QueueKey, rows: int) -> None:
        self._rows[key] = self._rows.get(key, 0) + rows
        self._queued += rows
        self.metrics.queue_depth.labels(r=str(key)).set(self._rows[key])


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the batch scheduler stopped", exc_info=task.exception())
