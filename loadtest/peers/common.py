"""What every peer harness shares with `fastast serve`: decode exactly as its workers do, and compute a batch
exactly as its engine does (padded PCM with lengths -> fbank -> model -> top-k), with the same limits."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from fastast.audio import load_audio, window_samples
from fastast.features import model_input, pad_rows
from fastast.model.card import ModelCard
from fastast.model.store import CARD, load_model

MAX_BATCH_SIZE = 32  # fastast serve's default --max-batch-size
MAX_WAIT_MS = 5  # and --max-wait-ms
TOP_K = 5
MODEL_ENV = "FASTAST_PEER_MODEL"


def arguments(description: str) -> argparse.Namespace:
    """The flags loadtest.frontend appends to every server command."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--workers", type=int, default=2, help="decode processes, as fastast serve's --workers")
    return parser.parse_known_args()[0]


class Decoder:
    def __init__(self, model_dir: str):
        self.spec = ModelCard.load(Path(model_dir) / CARD).input
        self.window = window_samples(self.spec.target_length, self.spec.sample_rate)

    def __call__(self, data: bytes) -> np.ndarray:
        return np.ascontiguousarray(load_audio(data, self.spec.sample_rate)[: self.window])


class BatchModel:
    def __init__(self, model_dir: str):
        torch.set_num_threads(1)  # as fastast's engine beside 2 workers on 2 cores
        self.model = load_model(model_dir)

    def __call__(self, pcms: list[np.ndarray]) -> list[list[dict]]:
        padded = np.empty((len(pcms), max(len(pcm) for pcm in pcms)), dtype=np.float32)
        lengths = pad_rows(pcms, padded)
        spec = self.model.card.input
        with torch.inference_mode():
            features = model_input(torch.from_numpy(padded), spec.sample_rate, spec, lengths=lengths)
            top = self.model.scores(self.model(features, 0)).topk(TOP_K, dim=-1)
        labels = self.model.card.labels
        return [
            [{"label": labels[i].display_name, "index": i, "score": s} for i, s in zip(index, value)]
            for index, value in zip(top.indices.tolist(), top.values.tolist())
        ]
