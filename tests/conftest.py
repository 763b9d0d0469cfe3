"""Shared fixtures: a small random FastAST model in the model store and real audio made on the spot."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from fastast.model import ASTConfig, ModelCard, save_model
from fastast.model.ast import AST
from fastast.model.card import InputSpec, bundled_labels
from fastast.model.store import card_arch

SC_MEAN, SC_STD = -6.845978, 5.5654526


def make_model_dir(directory: Path, *, seed: int = 0, task: str = "single-label", **arch) -> Path:
    """A random AST in model-store layout, Speech Commands labels, 1 s input (128 frames)."""
    torch.manual_seed(seed)
    config = ASTConfig(num_classes=35, **{"dim": 64, "depth": 4, "heads": 2, "target_length": 128, **arch})
    card = ModelCard(
        name=directory.name,
        arch=card_arch(config),
        input=InputSpec(target_length=config.target_length, mean=SC_MEAN, std=SC_STD),
        labels=bundled_labels("speechcommands"),
        task=task,
        provenance={"source": "random weights for tests"},
    )
    save_model(directory, AST(config).eval(), card)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("store") / "tiny")


def espeak(text: str, path: Path, voice: str = "en", speed: int = 160, pitch: int = 50) -> Path:
    """Speech from espeak-ng (22.05 kHz mono WAV)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed; `make test` installs it")
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text],
        check=True,
        capture_output=True,
    )
    return path


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory) -> Path:
    """About two seconds of English speech at espeak-ng's native 22.05 kHz."""
    return espeak("the quick brown fox jumps over the lazy dog", tmp_path_factory.mktemp("audio") / "speech.wav")


@pytest.fixture(scope="session")
def speech(speech_wav) -> bytes:
    """The speech cut to 1.2 s, as WAV bytes: one window of the 128-frame test models (1.295 s), so that one
    request is one batch row in the serving tests (longer audio has tests of its own)."""
    wave, rate = sf.read(speech_wav, dtype="float32")
    buffer = io.BytesIO()
    sf.write(buffer, wave[: int(1.2 * rate)], rate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def tone(seconds: float = 1.0, sample_rate: int = 16000, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    """A sine tone [samples] or [samples, channels] in float32."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return wave if channels == 1 else np.stack([wave] * channels, axis=1)


def write_wav(path: Path, wave: np.ndarray, sample_rate: int = 16000, subtype: str = "PCM_16") -> Path:
    sf.write(str(path), wave, sample_rate, subtype=subtype)
    return path
