"""Dynamic batching by r: one queue per r, one scheduler task, one inference thread. It runs in the engine.

A batch holds requests of a single r (r changes the token count and so the model's cost and shapes), at most
`max_batch_size` of them. A queue is ready when it is full or when its oldest request has waited `max_wait_s`;
among ready queues the one whose head is oldest goes first, so no r starves. Batches run one at a time on a
single inference thread: the model is on one device, and torch releases the GIL while it computes, so the event
loop keeps taking requests (and refusing them when full) meanwhile.

Requests with r=auto wait in a queue of their own; when it is their turn, the r=auto controller
(fastast.serving.auto_r) picks the r the batch runs at, and every batch's time feeds the controller's cost model.

A request whose deadline passes while it is queued, or that is cancelled, leaves its queue and is never computed;
once its batch has started it runs to the end. Admission is bounded: at most `max_queue` requests wait, across
all r. The batcher knows nothing of audio or models: `run_batch(r, items)` turns a batch's items into one output
per item.
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
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


@dataclass(frozen=True)
class BatchResult:
    output: Any  # run_batch's output for this request
    r: int  # the r the batch ran at
    batch_size: int
    queue_s: float
    inference_s: float


@dataclass(eq=False)
class Job:
    item: Any
    queue: QueueKey
    deadline: float  # time.monotonic()
    future: asyncio.Future[BatchResult]
    enqueued: float = field(default_factory=time.monotonic)
    arrived: float | None = None  # when the request reached the service, if before it was queued
    state: JobState = JobState.QUEUED
    expiry: asyncio.TimerHandle | None = None


class Batcher:
    def __init__(
        self,
        run_batch: RunBatch,
        metrics: ServingMetrics,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        auto: AutoR | None = None,
    ):
        self.run_batch = run_batch
        self.auto = auto
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.busy_s = 0.0  # wall time spent computing batches, in total
        self._queues: dict[QueueKey, deque[Job]] = {}
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
        return self._queued

    def submit(self, item: Any, r: int | None, deadline: float, arrived: float | None = None) -> Job:
        """Queue one request (r None: r=auto); QueueFullError at once when max_queue requests already wait.

        `arrived`: when the request reached the service (before its upload and decode), so that r=auto plans
        for the latency its client sees. Await job.future.
        """
        if r is None and self.auto is None:
            raise ValueError("r=auto needs a controller")
        if self._queued >= self.max_queue:
            raise QueueFullError(f"{self._queued} requests are already waiting (max_queue {self.max_queue})")
        loop = asyncio.get_running_loop()
        key: QueueKey = AUTO_R if r is None else r
        job = Job(item, key, deadline, loop.create_future(), arrived=arrived)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self._settle(job, DeadlineExceededError())
            return job
        job.expiry = loop.call_later(remaining, self.cancel, job, DeadlineExceededError())
        if r is None:
            self.auto.arrived(job.enqueued)
        self._queues.setdefault(key, deque()).append(job)
        self._queued += 1
        self._set_depth(key)
        self._wake.set()
        return job

    def cancel(self, job: Job, reason: Exception) -> bool:
        """Take a still-queued job out of its queue, failing it with `reason`; False if its batch already started."""
        if job.state is not JobState.QUEUED:
            return False
        self._queues[job.queue].remove(job)
        self._queued -= 1
        self._set_depth(job.queue)
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
            if queue and (len(queue) >= self.max_batch_size or now - queue[0].enqueued >= self.max_wait_s)
        ]
        return min(ready, key=lambda head: head[0])[1] if ready else None

    def _time_to_flush(self, now: float) -> float | None:
        heads = [queue[0].enqueued for queue in self._queues.values() if queue]
        return max(0.0, min(heads) + self.max_wait_s - now) if heads else None

    def _take(self, key: QueueKey, now: float) -> tuple[int, list[Job]]:
        """The batch's r and up to max_batch_size jobs off the head of a queue (expired ones already left).

        For the auto queue the controller picks the r, seeing the whole auto backlog.
        """
        queue = self._queues[key]
        if key == AUTO_R:
            assert self.auto is not None
            r = self.auto.choose([job.enqueued if job.arrived is None else job.arrived for job in queue], now)
        else:
            r = int(key)
        batch = [queue.popleft() for _ in range(min(self.max_batch_size, len(queue)))]
        for job in batch:
            job.state = JobState.RUNNING
            if job.expiry is not None:
                job.expiry.cancel()
        self._queued -= len(batch)
        self._set_depth(key)
        if key == AUTO_R:
            self.metrics.record_auto_r(r, len(batch))
        return r, batch

    async def _run(self, r: int, batch: list[Job]) -> None:
        started = time.monotonic()
        for job in batch:
            self.metrics.queue_wait.labels(r=str(r)).observe(started - job.enqueued)
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self._executor, self._compute, r, [job.item for job in batch])
        except Exception as exc:
            log.exception("batch of %d at r=%d failed", len(batch), r)
            self.busy_s += time.monotonic() - started
            error = BatchFailedError(f"inference failed for this batch ({type(exc).__name__})")
            for job in batch:
                self._settle(job, error)
            return
        elapsed = time.monotonic() - started
        self.busy_s += elapsed
        self.metrics.record_batch(r, len(batch), elapsed)
        if self.auto is not None:
            self.auto.costs.observe(r, len(batch), elapsed)
        for output, job in zip(outputs, batch):
            self._settle(job, BatchResult(output, r, len(batch), started - job.enqueued, elapsed))

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

    def _set_depth(self, key: QueueKey) -> None:
        self.metrics.queue_depth.labels(r=str(key)).set(len(self._queues[key]))


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the batch scheduler stopped", exc_info=task.exception())
