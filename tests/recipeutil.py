"""Run a recipe script (scripts/*.sh) against a stand-in `fastast` that records its calls, in seconds instead of
hours: the recipe tests check what the script asks for, in which order, and what it ships."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The stand-in's common part: log the call, read the flags the recipes pass, and write the folder an --out names
# (its weights file holds the folder's name). A test appends how its stand-in answers `evaluate --json`.
FAKE_FASTAST = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$FAKE_LOG"
out=""; model=""; data=""; r=0; variant=""; json=0; prev=""
for arg in "$@"; do
    case "$prev" in --out) out=$arg ;; --model) model=$arg ;; --data) data=$arg ;; --r) r=$arg ;; --variant) variant=$arg ;; esac
    [ "$arg" = --json ] && json=1
    prev=$arg
done
if [ -n "$out" ]; then
    mkdir -p "$out"
    basename "$out" > "$out/model.safetensors"
    echo '{}' > "$out/card.json"
fi
"""


def run_recipe(
    script: str, tmp_path: Path, answer: str, accuracy: dict[str, float], env: dict[str, str]
) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run scripts/SCRIPT with FASTAST=FAKE_FASTAST + `answer` (bash that answers from $FAKE_ACCURACY, the JSON of
    `accuracy`) and `python` on PATH as this interpreter; the calls, one per line, and the finished process (a
    non-zero exit fails the test)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "fastast"
    fake.write_text(FAKE_FASTAST + answer)
    fake.chmod(0o755)
    python = bin_dir / "python"  # a wrapper, not a symlink: a symlinked venv python loses the venv's packages
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    log = tmp_path / "calls.log"
    full_env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO / "service"),
        "FASTAST": str(fake),
        "FAKE_LOG": str(log),
        "FAKE_ACCURACY": json.dumps(accuracy),
        **env,
    }
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / script)], env=full_env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines(), result


def args_of(call: str, flag: str) -> str:
    """The value after `flag` in a recorded call."""
    words = call.split()
    return words[words.index(flag) + 1]
