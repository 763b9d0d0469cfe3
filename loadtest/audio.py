"""Real audio for load tests: a given file, or one second of espeak-ng speech made on the spot."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

DEFAULT_TEXT = "turn it down"  # about 1.06 s: one window of a 1 s model (1.295 s), so one request is one batch row


def speech_bytes(path: str | None = None, text: str = DEFAULT_TEXT) -> bytes:
    """The bytes of `path`, or of espeak-ng speaking `text` when no path is given."""
    if path:
        return Path(path).read_bytes()
    if shutil.which("espeak-ng") is None:
        raise SystemExit("loadtest: no --audio file given and espeak-ng is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
        return wav.read_bytes()
