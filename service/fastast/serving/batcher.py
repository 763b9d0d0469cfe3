"""Dynamic batching by r: one queue per r, one scheduler task, one inference thread.

A batch holds requests of a single r (r changes the token count and so the model's cost and shapes), at most
`max_batch_size` of them. A queue is ready when it is full or when its oldest request has waited `max_wait_s`;
among ready queues the one whose head is oldest goes first, so no r starves. Batches run one at a time on a
single inference thread: the model is on one device, and torch releases the GIL while it computes, so the event
loop keeps accepting and decoding requests meanwhile.

A request whose deadline passes while it is queued, or whose client goes away, leaves its queue and is never
computed. Admission is bounded: `max_queue` counts requests admitted and not yet in a batch (still decoding or
queued), across all r.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor

from fastast.serving.backend import Backend
from fastast.serving.metrics import ServingMetrics

log = logging.getLogger("fastast.serving")
T = TypeVar("T")


class QueueFullError(Exception):
    """max_queue requests are already admitted and waiting."""


class DeadlineExceededError(Exception):
    """The request's deadline passed before its batch started."""


class ClientGoneError(Exception):
    """The client disconnected while its request was queued."""


class BatchFailedError(Exception):
    """The batch this request ran in raised; the message is safe to show a client."""


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


class Ticket:
    """One admitted request's place in the bounded queue; released once, when its batch starts or it gives up."""

    def __init__(self, batcher: Batcher):
        self._batcher = batcher
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._batcher._admitted -= 1


@dataclass(frozen=True)
class BatchResult:
    scores: Tensor  # [classes], this request's row
    batch_size: int
    queue_s: float
    inference_s: float


@dataclass(eq=False)
class Job:
    features: Tensor  # [T, F]
    r: int
    deadline: float  # time.monotonic()
    ticket: Ticket
    future: asyncio.Future[BatchResult]
    enqueued: float = field(default_factory=time.monotonic)
    state: JobState = JobState.QUEUED


class Batcher:
    def __init__(
        self,
        backend: Backend,
        metrics: ServingMetrics,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
    ):
        self.backend = backend
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._queues: dict[int, deque[Job]] = {}
        self._admitted = 0
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
        while self.queued and self._task is not None and not self._task.done():
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

    # ---- admission and waiting ---------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def admit(self) -> Ticket:
        """A place in the bounded queue, or QueueFullError at once."""
        if self._admitted >= self.max_queue:
            raise QueueFullError(f"{self._admitted} requests are already waiting (max_queue {self.max_queue})")
        self._admitted += 1
        return Ticket(self)

    def submit(self, ticket: Ticket, features: Tensor, r: int, deadline: float) -> Job:
        job = Job(features, r, deadline, ticket, asyncio.get_running_loop().create_future())
        if time.monotonic() >= deadline:
            self._finish_unrun(job, DeadlineExceededError())
            return job
        queue = self._queues.setdefault(r, deque())
        queue.append(job)
        self._set_depth(r)
        self._wake.set()
        return job

    async def wait(self, job: Job, disconnected: asyncio.Future | None = None) -> BatchResult:
        """The job's result; DeadlineExceededError or ClientGoneError if it left its queue uncomputed.

        Once its batch has started, a job runs to the end even past its deadline: the compute is spent anyway.
        """
        watched: set[asyncio.Future] = {job.future} | ({disconnected} if disconnected is not None else set())
        try:
            done, _ = await asyncio.wait(
                watched, timeout=max(0.0, job.deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            if self.cancel(job, ClientGoneError()):
                job.future.exception()  # mark it retrieved: nobody is left to await it
            raise
        if not job.future.done():
            gone = disconnected is not None and disconnected in done
            self.cancel(job, ClientGoneError() if gone else DeadlineExceededError())
        return await job.future

    def cancel(self, job: Job, reason: Exception) -> bool:
        """Take a still-queued job out of its queue, failing it with `reason`; False if its batch already started."""
        if job.state is not JobState.QUEUED:
            return False
        queue = self._queues[job.r]
        queue.remove(job)
        self._set_depth(job.r)
        self._finish_unrun(job, reason)
        return True

    # ---- scheduling ------------------------------------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            now = time.monotonic()
            r = self._ready_queue(now)
            if r is None:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self._time_to_flush(now))
                except asyncio.TimeoutError:
                    pass
                continue
            batch = self._take(r, now)
            if batch:
                self._idle.clear()
                try:
                    await self._run(r, batch)
                finally:
                    self._idle.set()

    def _ready_queue(self, now: float) -> int | None:
        """The r to batch next: among full or timed-out queues, the one whose head is oldest."""
        ready = [
            (queue[0].enqueued, r)
            for r, queue in self._queues.items()
            if queue and (len(queue) >= self.max_batch_size or now - queue[0].enqueued >= self.max_wait_s)
        ]
        return min(ready)[1] if ready else None

    def _time_to_flush(self, now: float) -> float | None:
        heads = [queue[0].enqueued for queue in self._queues.values() if queue]
        return max(0.0, min(heads) + self.max_wait_s - now) if heads else None

    def _take(self, r: int, now: float) -> list[Job]:
        queue = self._queues[r]
        batch: list[Job] = []
        while queue and len(batch) < self.max_batch_size:
            job = queue.popleft()
            if now >= job.deadline:
                self._finish_unrun(job, DeadlineExceededError())
                continue
            job.state = JobState.RUNNING
            job.ticket.release()
            batch.append(job)
        self._set_depth(r)
        return batch

    async def _run(self, r: int, batch: list[Job]) -> None:
        started = time.monotonic()
        for job in batch:
            self.metrics.queue_wait.labels(r=str(r)).observe(started - job.enqueued)
        features = [job.features for job in batch]
        loop = asyncio.get_running_loop()
        try:
            scores = await loop.run_in_executor(self._executor, self._infer, features, r)
        except Exception as exc:
            log.exception("batch of %d at r=%d failed", len(batch), r)
            error = BatchFailedError(f"inference failed for this batch ({type(exc).__name__})")
            for job in batch:
                self._settle(job, error)
            return
        elapsed = time.monotonic() - started
        self.metrics.record_batch(r, len(batch), elapsed)
        for row, job in zip(scores, batch):
            self._settle(job, BatchResult(row, len(batch), started - job.enqueued, elapsed))

    def _infer(self, features: list[Tensor], r: int) -> Tensor:
        scores = self.backend.run(torch.stack(features), r)
        if scores.shape[0] != len(features):
            raise RuntimeError(f"backend returned {scores.shape[0]} rows for a batch of {len(features)}")
        return scores

    # ---- helpers ------------------------------------------------------------------------------------------------------

    def _finish_unrun(self, job: Job, reason: Exception) -> None:
        job.ticket.release()
        self._settle(job, reason)

    @staticmethod
    def _settle(job: Job, outcome: BatchResult | Exception) -> None:
        job.state = JobState.DONE
        if job.future.done():  # its waiter was cancelled
            return
        if isinstance(outcome, Exception):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    def _set_depth(self, r: int) -> None:
        self.metrics.queue_depth.labels(r=str(r)).set(len(self._queues[r]))


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the batch scheduler stopped", exc_info=task.exception())
