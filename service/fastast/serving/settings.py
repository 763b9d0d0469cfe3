"""Every knob of `fastast serve` in one object: set by CLI flag, by environment (FASTAST_<NAME>), or left at its default.

The CLI flags are generated from these fields (fastast.commands.serve), so the two can never drift apart;
values given as flags override the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


DEFAULT_MAX_WINDOWS = 1024  # 10 minutes of audio for the default model at half-window hops (927 windows)


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FASTAST_", extra="forbid", validate_default=True)

    model: Path = Field(Path("model_store/default"), description="model_store folder (model.safetensors + card.json)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    default_r: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(0, description="ToMe r for requests that give none, or auto")
    max_r: int | None = Field(None, ge=0, description="largest r a request may ask for (default: half the model's patch tokens)")
    slo_ms: float = Field(
        200.0, gt=0, description="r=auto: the p99 latency target; auto requests take the smallest r that meets it"
    )
    auto_max_drop: float = Field(
        1.0, ge=0, description="r=auto: the largest accuracy drop (points, from the card's r table) auto may accept"
    )
    auto_max_r: int | None = Field(None, ge=0, description="r=auto: the highest r auto may use (overrides --auto-max-drop)")
    max_batch_size: int = Field(32, ge=1, le=4096, description="requests per batch at most")
    max_wait_ms: float = Field(5.0, ge=0, description="how long the oldest queued request waits for its batch to fill")
    max_queue: int = Field(
        1024, ge=1, description="windows admitted but not yet in a batch (all r together); beyond: 429"
    )
    timeout_s: float = Field(30.0, gt=0, description="deadline of a request; one still queued then answers 504")
    max_audio_s: float = Field(600.0, gt=0, description="longest audio accepted, in seconds (413 beyond)")
    window_hop_s: float | None = Field(
        None, gt=0, description="seconds between the starts of a long clip's windows (default: half the model's window)"
    )
    request_share: float = Field(
        0.25, gt=0, le=1, description="largest share of a batch one request's windows may take (long audio)"
    )
    max_windows: int | None = Field(
        None, ge=1, description="most windows one request may have (default: 1024, or max_queue if lower); 413 beyond"
    )
    max_upload_mb: float = Field(20.0, gt=0, description="largest upload accepted, in MB (413 beyond)")
    max_channels: int = Field(8, ge=1, description="most audio channels accepted, read from the header (413 beyond)")
    max_sample_rate: int = Field(
        192_000, ge=8_000, description="highest native sample rate accepted, read from the header (413 beyond)"
    )
    backend: Literal["torch", "onnxruntime"] = Field(
        "torch", description="torch, or onnxruntime on the r{N}.onnx graphs `fastast export-onnx` wrote into --model"
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="weights and activations: auto = fp32 on CPU, bf16 (or fp16) on CUDA"
    )
    torch_compile: bool = Field(
        False,
        description="torch backend: torch.compile graphs for the r values the warm-up runs (the default r and r=auto's), "
        "built before ready (minutes more start-up); any other r runs eagerly",
    )
    workers: int | None = Field(
        None, ge=1, le=64, description="API worker processes sharing the port (default: usable CPUs, at most 8)"
    )
    engine_threads: int | None = Field(
        None, ge=1, le=256, description="torch CPU threads in the engine (default: usable CPUs minus workers, at least 1)"
    )
    decode_threads: int = Field(2, ge=1, le=64, description="threads per API worker that decode audio")
    max_uploads: int = Field(
        64, ge=1, description="requests per API worker still uploading or decoding; beyond: 429 (a queue place is taken only after)"
    )
    body_timeout_s: float = Field(20.0, gt=0, description="time a request has to deliver its whole body; beyond: 408")
    header_timeout_s: float = Field(10.0, gt=0, description="time a connection has to deliver a request's headers; beyond: closed")
    drain_timeout_s: float = Field(
        10.0, ge=0, description="on SIGTERM: how long uploads still in progress may finish (then 503); queued requests are always answered"
    )
    allow_unverified: bool = Field(
        False, description="load weights whose card has no weights_sha256 (logs a warning); refused otherwise"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="server log level")

    @model_validator(mode="after")
    def _windows_fit_the_queue(self) -> ServeSettings:
        if self.max_windows is not None and self.max_windows > self.max_queue:
            raise ValueError(
                f"max_windows {self.max_windows} exceeds max_queue {self.max_queue}: such a request could never be queued"
            )
        return self

    @property
    def window_limit(self) -> int:
        """--max-windows, or its default: a request's windows must fit in the queue at once."""
        return self.max_windows or min(DEFAULT_MAX_WINDOWS, self.max_queue)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    @property
    def worker_count(self) -> int:
        return self.workers or min(8, usable_cpus())

    @property
    def engine_thread_count(self) -> int:
        """More torch threads than free cores make every small op wait on descheduled threads: 100x slower, seen."""
        return self.engine_threads or max(1, usable_cpus() - self.worker_count)

    @property
    def audio_limits(self) -> dict[str, float | int]:
        """fastast.audio.load_audio's limits for one upload, checked on its header before anything is decoded."""
        return {
            "max_seconds": self.max_audio_s,
            "max_channels": self.max_channels,
            "max_sample_rate": self.max_sample_rate,
        }


def usable_cpus() -> int:
    """CPUs this process may run on (a container's cpuset, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
