"""Response bodies of the HTTP API (they also document it at /docs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from fastast.model.card import InputSpec, Label, RTableRow


class LabelScore(BaseModel):
    label: str = Field(description="display name of the class")
    index: int = Field(description="class index in the model's output")
    score: float = Field(description="sigmoid (multi-label models) or softmax (single-label models) of the logit")


class Timing(BaseModel):
    queue: float = Field(description="ms waiting in the queue of this r for a batch")
    inference: float = Field(description="ms the batch took in the model")
    total: float = Field(description="ms from the start of the upload to the response")


class ClassifyResponse(BaseModel):
    model: str
    r: int = Field(description="the ToMe r this request ran at")
    labels: list[LabelScore] = Field(description="the top_k classes, highest score first")
    batch_size: int = Field(description="requests in the batch this one ran in (all at the same r)")
    timing_ms: Timing


class RRange(BaseModel):
    min: int = 0
    max: int
    default: int


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
    backend: BackendInfo
    limits: Limits
    weights_sha256: str


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class Status(BaseModel):
    status: str
