"""Response bodies of the HTTP API (they also document it at /docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from fastast.model.card import InputSpec, Label, RTableRow


class LabelScore(BaseModel):
    label: str = Field(description="display name of the class")
    index: int = Field(description="class index in the model's output")
    score: float = Field(description="sigmoid (multi-label models) or softmax (single-label models) of the logit")


class Timing(BaseModel):
    queue: float = Field(description="ms waiting in the queue of this r for a first batch")
    inference: float = Field(description="ms the batches it ran in took in the model, together")
    total: float = Field(description="ms from the start of the upload to the response")


class TimelineEntry(BaseModel):
    start_s: float = Field(description="where the window starts in the audio")
    end_s: float = Field(description="where it ends (the audio's end for a last, shorter window)")
    labels: list[LabelScore] = Field(description="the window's top_k classes")


class ClassifyResponse(BaseModel):
    model: str
    r: int = Field(
        description="the ToMe r this request ran at (for r=auto: the r the controller chose; the highest, if its "
        "windows ran in batches at different r)"
    )
    labels: list[LabelScore] = Field(
        description="the top_k classes, highest score first; for audio of several windows, of the windows' scores "
        "aggregated (aggregate=mean|max)"
    )
    windows: int = Field(description="the model windows the audio was cut into (1 for audio up to one window)")
    timeline: list[TimelineEntry] | None = Field(None, description="per window, with timeline=true")
    batch_size: int = Field(description="windows in the largest batch this request ran in (all at the same r)")
    timing_ms: Timing


class RRange(BaseModel):
    min: int = 0
    max: int
    default: int | Literal["auto"]


class AutoSettings(BaseModel):
    """How r=auto chooses: the smallest r of `ladder` at which the auto backlog meets the latency target."""

    slo_ms: float = Field(description="p99 latency target of r=auto requests")
    max_drop: float = Field(description="largest accuracy drop (points, from the card's r table) auto may accept")
    max_r: int = Field(description="the highest r auto uses")
    ladder: list[int] = Field(description="the r values auto chooses from (Pareto-optimal ones up to max_r)")


class ParetoPoint(BaseModel):
    r: int
    metric: str = Field(description="accuracy or mAP, from the card's r table")
    value: float
    drop: float | None = Field(description="value at r=0 minus value at this r")
    samples_per_s: float | None = Field(description="from the card's r table")
    live_samples_per_s: float | None = Field(description="measured by this server at warm-up, in full batches (auto r only)")
    pareto_optimal: bool = Field(description="no other r is at least as accurate and as fast, and better in one")
    auto: bool = Field(description="r=auto may choose this r")


class BackendInfo(BaseModel):
    name: str
    device: str
    dtype: str


class Limits(BaseModel):
    max_batch_size: int
    max_wait_ms: float
    max_queue: int
    timeout_s: float
    max_audio_s: float
    window_s: float
    window_hop_s: float
    max_windows: int
    max_upload_mb: float
    max_channels: int
    max_sample_rate: int


class ModelInfo(BaseModel):
    name: str
    task: str = Field(description="multi-label (sigmoid scores) or single-label (softmax scores)")
    arch: dict[str, Any]
    input: InputSpec
    labels: list[Label]
    r_table: list[RTableRow] = Field(description="measured accuracy and speed per r, when known")
    r: RRange = Field(description="the r values a request may ask for, and the one used when it gives none")
    auto: AutoSettings | None = Field(description="r=auto's settings; null when r=auto is not available")
    pareto: list[ParetoPoint] = Field(description="the accuracy/speed trade-off of these weights, per r of the card")
    backend: BackendInfo
    limits: Limits
    weights_sha256: str


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class Status(BaseModel):
    status: str
