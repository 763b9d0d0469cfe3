"""Locust traffic for `fastast serve`: real speech posted at a weighted mix of r values.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 32 -r 8 -t 1m --csv out

Each r gets its own stats row ("/classify r=20"). Settings come from the environment:
LOADTEST_R_MIX ("0:1,10:1,20:2,40:1", r:weight pairs) and LOADTEST_AUDIO (a file; default espeak-ng speech).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

from locust import HttpUser, constant, task

# Locust imports this file by path; make the repository root importable so `loadtest.audio` resolves.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loadtest.audio import speech_bytes  # noqa: E402


def parse_mix(text: str) -> tuple[list[int], list[float]]:
    pairs = [item.split(":") for item in text.split(",") if item.strip()]
    return [int(r) for r, _ in pairs], [float(w) for _, w in pairs]


R_VALUES, WEIGHTS = parse_mix(os.environ.get("LOADTEST_R_MIX", "0:1,10:1,20:1,40:1"))
AUDIO = speech_bytes(os.environ.get("LOADTEST_AUDIO"))


class ClassifyUser(HttpUser):
    wait_time = constant(0)

    @task
    def classify(self) -> None:
        r = random.choices(R_VALUES, WEIGHTS)[0]
        with self.client.post(
            f"/classify?r={r}",
            data=AUDIO,
            headers={"Content-Type": "audio/wav"},
            name=f"/classify r={r}",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
            elif response.json().get("r") != r:
                response.failure("served at another r")
