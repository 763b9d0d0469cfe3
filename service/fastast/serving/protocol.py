"""The messages between API workers and the engine: ZeroMQ multipart frames, JSON headers, raw PCM.

A worker's DEALER socket talks to the engine's ROUTER socket. Every message starts with a one-byte kind; headers
are small JSON objects; a request's audio travels as one frame of float32 PCM at the model's rate, sent from the
worker's numpy buffer without a copy into Python objects and read by the engine as a view of the received frame,
so it is never pickled.

    worker -> engine   HELLO                       the engine answers HELLO with EngineInfo and its EngineState
                       CLASSIFY  header  pcm       header: ClassifyHeader; pcm: the whole clip (the engine cuts
                                                   it into the model's windows)
                       CANCEL    header            {"id": n}: the client went away
    engine -> worker   RESULT    header            Result
                       STATE     header            EngineState, pushed to every worker on each change
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

HELLO = b"H"
CLASSIFY = b"C"
CANCEL = b"X"
RESULT = b"R"
STATE = b"S"


def encode(message: Any) -> bytes:
    """JSON of a flat message dataclass (its __dict__: dataclasses.asdict deep-copies, a cost on the hot path) or dict."""
    return json.dumps(message if isinstance(message, dict) else message.__dict__, separators=(",", ":")).encode()


def decode(frame: bytes | memoryview) -> dict:
    return json.loads(bytes(frame))


@dataclass(frozen=True)
class EngineInfo:
    """What a worker needs to know of the loaded model to validate requests and describe it at /models."""

    backend: str
    device: str
    dtype: str
    max_r: int  # the largest r that still merges something
    r_values: list[int] | None  # the only r the backend can run (ONNX graphs), or None for any r up to max_r
    auto_r: list[int]  # the r values r=auto chooses from; empty when r=auto is not available


@dataclass(frozen=True)
class EngineState:
    ready: bool = False  # loaded and warmed up for every batch size
    warmup_error: str | None = None
    samples_per_s: dict[str, float] = field(default_factory=dict)  # per auto r, full batches, measured at warm-up


@dataclass(frozen=True)
class ClassifyHeader:
    id: int
    r: int | None  # None: r=auto
    top_k: int
    arrived: float  # when the worker began reading the request, time.monotonic()
    deadline: float  # time.monotonic(); CLOCK_MONOTONIC is shared by every process of the host
    hop: int  # samples between window starts (fastast.windows)
    aggregate: str  # how the windows' scores make the clip's ("mean" or "max"), resolved for the model's task
    timeline: bool  # also answer each window's top-k


@dataclass(frozen=True)
class Result:
    """A request's outcome: status 200 with its top-k labels, or an error status with its code and detail."""

    id: int
    status: int
    labels: list[tuple[int, float]] = field(default_factory=list)  # (class index, score), best first
    r: int | None = None  # the r the request ran at
    windows: int = 0
    timeline: list[dict] | None = None  # per window: fastast.windows.Windowing.timeline's entries
    batch_size: int = 0
    queue_s: float = 0.0
    inference_s: float = 0.0
    code: str = ""
    detail: str = ""
