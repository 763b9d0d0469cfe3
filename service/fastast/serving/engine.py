"""The engine: the one place that holds the model. API workers send it PCM; it answers with top-k scores.

It owns everything after decoding: the per-r queues and their scheduling (fastast.serving.batcher), the batched
Kaldi fbank on the model's device, normalisation, the model at the batch's r, scores and top-k. One engine runs
per model and device, in its own process (`engine_main`, started by the supervisor) or, for tests and tools, on
a thread of the current process (`EngineThread`); either way workers reach it through the same ZeroMQ messages
(fastast.serving.protocol).

A batch's PCM is copied once, into a staging buffer (pinned on CUDA, so the copy to the device is asynchronous),
zero-padded to the longest clip; the fbank then runs for the whole batch on the device, with each clip's length,
so every clip gets the features it would get alone.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np
import torch
import uvloop
import zmq

from fastast.audio import frame_length, window_samples
from fastast.errors import FastASTError
from fastast.features import model_input, pad_rows
from fastast.serving import protocol
from fastast.serving.auto_r import AutoR, CostModel, auto_ladder
from fastast.serving.backend import Backend, load_backend
from fastast.serving.batcher import (
    BatchFailedError,
    BatchResult,
    Batcher,
    CancelledJobError,
    DeadlineExceededError,
    Job,
    QueueFullError,
)
from fastast.serving.channel import Channel
from fastast.serving.metrics import BUSY_WINDOW_S, ServingMetrics
from fastast.serving.settings import ServeSettings
from fastast.windows import Windowing, aggregate, top_k

log = logging.getLogger("fastast.engine")
WARMUP_TIMED_RUNS = 4  # per r=auto r and batch size: one to allocate, three timed


@dataclass(frozen=True)
class Clip:
    """One row of a batch: a window of a request's audio."""

    pcm: np.ndarray  # float32 at the model's rate, at most one window long
    top_k: int
    all_scores: bool = False  # answer every class's score (the request has several windows, or wants a timeline)


def warmup_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to max_batch_size, which is included even when it is no power of two."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return [*sizes, max_batch_size]


def served_max_r(settings: ServeSettings, backend: Backend) -> int:
    """The largest r requests may ask for; refuses settings the model cannot honour (a one-line startup error)."""
    max_r = backend.max_r if settings.max_r is None else settings.max_r
    if max_r > backend.max_r:
        raise FastASTError(f"--max-r {max_r} exceeds the model's limit of {backend.max_r} (half its patch tokens)")
    for name, r in (("--default-r", settings.default_r), ("--auto-max-r", settings.auto_max_r)):
        if isinstance(r, int) and r > max_r:
            raise FastASTError(f"{name} {r} exceeds --max-r {max_r}")
    if isinstance(settings.default_r, int):
        backend.check_r(settings.default_r)
    return max_r


def served_auto_r(settings: ServeSettings, backend: Backend, max_r: int) -> list[int]:
    """The ladder r=auto chooses from (fastast.serving.auto_r.auto_ladder), within what the backend can run."""
    ladder = auto_ladder(backend.card, max_r, settings.auto_max_drop, settings.auto_max_r)
    if backend.r_values is not None:
        ladder = [r for r in ladder if r in backend.r_values]
    if settings.default_r == "auto" and len(ladder) < 2:
        raise FastASTError(
            "--default-r auto needs at least two r values to choose from: the card's r table (fastast evaluate "
            "--write-card) or --auto-max-r, and for ONNX an exported graph for each"
        )
    return ladder if len(ladder) >= 2 else []


class Engine:
    def __init__(self, settings: ServeSettings, backend: Backend, metrics: ServingMetrics):
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self.max_r = served_max_r(settings, backend)
        self.auto_r = served_auto_r(settings, backend, self.max_r)
        spec = backend.card.input
        self.window = window_samples(spec.target_length, spec.sample_rate)
        Windowing.for_input(spec.target_length, spec.sample_rate, settings.window_hop_s)  # a bad --window-hop-s stops here
        self.min_samples = frame_length(spec.sample_rate)
        self.state = protocol.EngineState()
        self.batcher: Batcher | None = None
        self._channel: Channel | None = None
        self._workers: set[bytes] = set()
        self._jobs: dict[tuple[bytes, int], Job] = {}
        self._staging = self._staging_buffer()
        card = backend.card
        metrics.set_model(model=card.name, arch=arch_label(card.arch), device=backend.device, dtype=backend.dtype, backend=backend.name)

    def info(self) -> protocol.EngineInfo:
        backend = self.backend
        return protocol.EngineInfo(backend.name, backend.device, backend.dtype, self.max_r, backend.r_values, self.auto_r)

    # ---- life cycle ----------------------------------------------------------------------------------------------

    async def serve(self, address: str, stop: asyncio.Event) -> None:
        """Answer workers on `address` until `stop` is set, then finish every queued request and return."""
        settings = self.settings
        context = zmq.Context()
        socket = context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(address)
        auto = None
        if self.auto_r:
            auto = AutoR(self.auto_r, CostModel(self.auto_r, settings.max_batch_size), settings.slo_ms / 1000)
        self.batcher = Batcher(
            self._run_batch,
            self.metrics,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.max_queue,
            request_share=settings.request_share,
            auto=auto,
        )
        self.batcher.start()
        self._channel = Channel(socket, self._receive)
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(coroutine) for coroutine in (self._warm_up(), self._track_busy())]
        try:
            await stop.wait()
            await self.batcher.close()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._channel.close()
            context.term()

    async def _warm_up(self) -> None:
        """Run every batch size at the default r and at each r=auto r, timing the latter for the cost model."""
        assert self.batcher is not None
        started = time.monotonic()
        auto = self.batcher.auto
        sizes = warmup_batch_sizes(self.settings.max_batch_size)
        default = [self.settings.default_r] if isinstance(self.settings.default_r, int) else []
        warmed = sorted({*default, *self.auto_r})
        try:
            self.backend.prepare(warmed)
            for r in warmed:
                seconds = [await self._timed_batch(r, size, runs=WARMUP_TIMED_RUNS if r in self.auto_r else 1) for size in sizes]
                if auto is not None and r in self.auto_r:
                    auto.costs.fit(r, sizes, seconds)
        except Exception as exc:
            log.exception("warm-up failed")
            self._set_state(protocol.EngineState(warmup_error=f"warm-up failed: {type(exc).__name__}: {exc}"))
            return
        log.info(
            "ready: %s on %s (%s), warmed up for batch sizes up to %d%s in %.1f s",
            self.backend.card.name,
            self.backend.device,
            self.backend.dtype,
            self.settings.max_batch_size,
            f" and r=auto over r {self.auto_r}" if self.auto_r else "",
            time.monotonic() - started,
        )
        throughput = {str(r): round(auto.costs.samples_per_s(r), 2) for r in self.auto_r} if auto is not None else {}
        self._set_state(protocol.EngineState(ready=True, samples_per_s=throughput))

    async def _timed_batch(self, r: int, size: int, runs: int) -> float:
        """The fastest of `runs` batches of `size` silent windows at r, in seconds, on the inference thread.

        The first run of a shape pays for allocation; the fastest of the rest is the least disturbed by other work.
        """
        assert self.batcher is not None
        clips = [Clip(np.zeros(self.window, dtype=np.float32), 1)] * size
        seconds = []
        for _ in range(runs):
            started = time.perf_counter()
            await self.batcher.call(lambda: self._run_batch(r, clips))
            seconds.append(time.perf_counter() - started)
        return min(seconds[1:] or seconds)

    async def _track_busy(self) -> None:
        """fastast_engine_busy_ratio: the share of the last BUSY_WINDOW_S seconds spent computing batches."""
        assert self.batcher is not None
        samples: deque[tuple[float, float]] = deque()
        while True:
            now, busy = time.monotonic(), self.batcher.busy_s
            samples.append((now, busy))
            while now - samples[0][0] > BUSY_WINDOW_S:
                samples.popleft()
            then, busy_then = samples[0]
            self.metrics.engine_busy.set((busy - busy_then) / (now - then) if now > then else 0.0)
            await asyncio.sleep(1.0)

    # ---- messages ------------------------------------------------------------------------------------------------------

    def _receive(self, frames: list[zmq.Frame]) -> None:
        try:
            self._handle(frames[0].bytes, frames[1].bytes, frames[2:])
        except Exception:  # a malformed message must not stop the engine
            log.exception("dropped a malformed message")

    def _handle(self, worker: bytes, kind: bytes, body: list[zmq.Frame]) -> None:
        if kind == protocol.CLASSIFY:
            self._classify(worker, protocol.ClassifyHeader(**protocol.decode(body[0].buffer)), body[1])
        elif kind == protocol.CANCEL:
            job = self._jobs.get((worker, protocol.decode(body[0].buffer)["id"]))
            if job is not None and self.batcher is not None:
                self.batcher.cancel(job, CancelledJobError())
        elif kind == protocol.HELLO:
            self._workers.add(worker)
            self._send(worker, protocol.HELLO, protocol.encode(self.info()), protocol.encode(self.state))
        else:
            raise ValueError(f"unknown message kind {kind!r}")

    def _classify(self, worker: bytes, header: protocol.ClassifyHeader, pcm_frame: zmq.Frame) -> None:
        assert self.batcher is not None
        refusal = self._refusal(header.id)
        if refusal is not None:
            self._reply(worker, refusal)
            return
        pcm = np.frombuffer(pcm_frame.buffer, dtype=np.float32)  # a view of the received frame: no copy
        windowing = Windowing(self.window, header.hop, self.backend.card.input.sample_rate)
        problem = self._invalid(header, windowing, len(pcm))
        if problem is not None:
            self._reply(worker, problem)
            return
        windows = windowing.split(pcm)  # views again: the PCM is never copied before its batch is staged
        all_scores = len(windows) > 1 or header.timeline
        try:
            job = self.batcher.submit(
                [Clip(window, header.top_k, all_scores) for window in windows], header.r, header.deadline, header.arrived
            )
        except QueueFullError as exc:
            detail = f"server overloaded: {exc}; retry later"
            self._reply(worker, protocol.Result(header.id, 429, code="queue_full", detail=detail))
            return
        key = (worker, header.id)
        self._jobs[key] = job
        job.future.add_done_callback(lambda future: self._answer(key, future, header, windowing, len(pcm)))

    def _invalid(self, header: protocol.ClassifyHeader, windowing: Windowing, samples: int) -> protocol.Result | None:
        """The error for a request the workers should have refused already (they check the same limits)."""
        detail = None
        if samples < self.min_samples:
            detail = f"PCM of {samples} samples; the engine takes at least {self.min_samples}"
        elif not 1 <= header.hop <= self.window:
            detail = f"hop of {header.hop} samples; the engine takes 1 to {self.window}"
        elif (windows := windowing.count(samples)) > self.settings.window_limit:
            detail = f"{windows} windows; the engine takes at most {self.settings.window_limit}"
        elif header.r is None and not self.auto_r:
            detail = "r=auto is not available"
        return None if detail is None else protocol.Result(header.id, 400, code="invalid_request", detail=detail)

    def _refusal(self, request_id: int) -> protocol.Result | None:
        """The 503 for a request that arrives before the model is warm, or after its warm-up failed."""
        if self.state.warmup_error is not None:
            return protocol.Result(request_id, 503, code="warmup_failed", detail=self.state.warmup_error)
        if not self.state.ready:
            return protocol.Result(request_id, 503, code="not_ready", detail="the model is warming up")
        return None

    def _answer(
        self,
        key: tuple[bytes, int],
        future: asyncio.Future[BatchResult],
        header: protocol.ClassifyHeader,
        windowing: Windowing,
        samples: int,
    ) -> None:
        del self._jobs[key]
        worker, request_id = key
        error = future.exception()
        if error is None:
            result = future.result()
            answer = protocol.Result(
                request_id,
                200,
                r=result.r,
                batch_size=result.batch_size,
                queue_s=result.queue_s,
                inference_s=result.inference_s,
                windows=len(result.outputs),
                **self._clip_answer(result.outputs, header, windowing, samples),
            )
        elif isinstance(error, DeadlineExceededError):
            answer = protocol.Result(request_id, 504, code="timeout", detail="the request's deadline passed before it could run")
        elif isinstance(error, CancelledJobError):
            answer = protocol.Result(request_id, 499, code="client_closed_request", detail="the client disconnected")
        elif isinstance(error, BatchFailedError):
            answer = protocol.Result(request_id, 500, code="inference_failed", detail=str(error))
        else:
            answer = protocol.Result(request_id, 500, code="internal_error", detail=type(error).__name__)
        self._reply(worker, answer)

    def _clip_answer(self, outputs: list, header: protocol.ClassifyHeader, windowing: Windowing, samples: int) -> dict:
        """The clip's top-k labels and, when asked, its timeline, from its windows' outputs (see _run_batch)."""
        if len(outputs) == 1 and not header.timeline:
            return {"labels": outputs[0]}
        card = self.backend.card
        scores = np.stack(outputs)
        clip = aggregate(scores, card.task, header.aggregate)
        answer: dict = {"labels": [(label["index"], label["score"]) for label in top_k(clip, card.labels, header.top_k)]}
        if header.timeline:
            answer["timeline"] = windowing.timeline(scores, samples, card.labels, header.top_k)
        return answer

    def _reply(self, worker: bytes, result: protocol.Result) -> None:
        self._send(worker, protocol.RESULT, protocol.encode(result))

    def _set_state(self, state: protocol.EngineState) -> None:
        self.state = state
        for worker in self._workers:
            self._send(worker, protocol.STATE, protocol.encode(state))

    def _send(self, worker: bytes, *frames: bytes) -> None:
        assert self._channel is not None
        self._channel.send([worker, *frames])  # a ROUTER never blocks: a message to a gone worker is dropped

    # ---- compute (the inference thread) -----------------------------------------------------------------------

    def _run_batch(self, r: int, clips: list[Clip]) -> list:
        """PCM -> features on the device -> scores -> per row its top-k (index, score) pairs, or, for a row whose
        request needs every score (Clip.all_scores), its scores as a float32 array."""
        started = time.perf_counter()
        features = self._features([clip.pcm for clip in clips])
        self._synchronize()  # so the fbank's time is its own in fastast_stage_duration_seconds
        featured = time.perf_counter()
        scores = self.backend.run(features, r).float()
        top = scores.topk(max(clip.top_k for clip in clips), dim=-1)
        values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        rows = scores.cpu().numpy() if any(clip.all_scores for clip in clips) else None
        self.metrics.record_stage("fbank", featured - started)
        self.metrics.record_stage("model", time.perf_counter() - featured)
        return [
            rows[i] if clip.all_scores else list(zip(indices[i][: clip.top_k], values[i][: clip.top_k]))
            for i, clip in enumerate(clips)
        ]

    def _features(self, pcms: list[np.ndarray]) -> torch.Tensor:
        width = max(len(pcm) for pcm in pcms)
        staged = self._staging[: len(pcms) * width].view(len(pcms), width)
        lengths = pad_rows(pcms, staged.numpy())
        device = self.backend.feature_device
        waves = staged.to(device, non_blocking=True)
        spec = self.backend.card.input
        return model_input(waves, spec.sample_rate, spec, lengths=lengths)

    def _staging_buffer(self) -> torch.Tensor:
        """One flat host buffer for the largest batch; pinned when the features are computed on CUDA."""
        pinned = self.backend.feature_device.type == "cuda"
        return torch.empty(self.settings.max_batch_size * self.window, dtype=torch.float32, pin_memory=pinned)

    def _synchronize(self) -> None:
        if self.backend.feature_device.type == "cuda":
            torch.cuda.synchronize(self.backend.feature_device)


def arch_label(arch: dict) -> str:
    """A short architecture name for the model_info metric, e.g. 'ast-768x12'."""
    kind = str(arch.get("type", "unknown"))
    return f"{kind}-{arch['dim']}x{arch['depth']}" if "dim" in arch and "depth" in arch else kind


class EngineThread:
    """An engine on a thread of this process, reached through the same sockets: the in-process tests use it."""

    def __init__(self, engine: Engine, address: str):
        self.engine = engine
        self.address = address
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastast-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._started.wait()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()

    def _run(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            self._started.set()
            await self.engine.serve(self.address, self._stop)

        asyncio.run(main())


def engine_main(settings: ServeSettings, address: str, parent: Connection) -> None:
    """The engine process: load the model, report its card (or a one-line error) to the supervisor, serve.

    SIGTERM (sent by the supervisor once every worker has exited) finishes the queued requests and exits 0.
    """
    from fastast.serving.supervisor import child_setup

    child_setup("engine", settings.log_level)
    torch.set_num_threads(settings.engine_thread_count)
    try:
        backend = load_backend(settings)
        engine = Engine(settings, backend, ServingMetrics(settings.max_batch_size))
    except FastASTError as exc:
        parent.send(("error", str(exc)))
        raise SystemExit(2) from None
    parent.send(("loaded", backend.card))

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await engine.serve(address, stop)

    uvloop.run(main())  # as the workers: its messages and the batcher's hops cost less CPU than on asyncio's loop
