"""scripts/default_model.sh (`make default-model`) chains its stages and picks the shipped student correctly.

The real run takes hours, so here `fastast` is a stand-in that records each call, writes the folder it is
asked for (the weights file holds the folder's name) and answers `evaluate --json` with an accuracy set
per model by the test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FAKE_FASTAST = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$FAKE_LOG"
out=""; model=""; json=0; prev=""
for arg in "$@"; do
    case "$prev" in --out) out=$arg ;; --model) model=$arg ;; esac
    [ "$arg" = --json ] && json=1
    prev=$arg
done
if [ -n "$out" ]; then
    mkdir -p "$out"
    basename "$out" > "$out/model.safetensors"
    echo '{}' > "$out/card.json"
    [ "$1" = synth-commands ] && touch "$out/test.json"
fi
if [ "$json" = 1 ]; then
    value=$(python -c 'import json, os, sys; print(json.loads(os.environ["FAKE_ACCURACY"])[sys.argv[1]])' "$(basename "$model")")
    echo "{\"rows\": [{\"r\": 0, \"value\": $value}]}"
fi
"""


def run_script(tmp_path: Path, accuracy: dict[str, float]) -> tuple[list[str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "fastast"
    fake.write_text(FAKE_FASTAST)
    fake.chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    log, out = tmp_path / "calls.log", tmp_path / "out"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FASTAST": str(fake),
        "DATA": str(tmp_path / "data"),
        "WORK": str(tmp_path / "work"),
        "OUT": str(out),
        "FAKE_LOG": str(log),
        "FAKE_ACCURACY": json.dumps(accuracy),
    }
    result = subprocess.run(["bash", str(REPO / "scripts" / "default_model.sh")], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines(), out


def args_of(call: str, flag: str) -> str:
    words = call.split()
    return words[words.index(flag) + 1]


@pytest.mark.parametrize("cmkd_wins", [False, True])
def test_script_chains_stages_and_ships_the_better_student_on_validation(tmp_path, cmkd_wins):
    plain, cmkd = (0.80, 0.85) if cmkd_wins else (0.85, 0.80)
    calls, out = run_script(tmp_path, {"student_stage4": 0.83, "student_cmkd": cmkd, "student": plain})
    work = tmp_path / "work"

    assert calls[0].startswith("synth-commands")
    trains = [c for c in calls if c.startswith("train") and "efficientnet_b2" not in c]
    plain_stages = [c for c in trains if "--r-train" not in c]
    tome_stages = [c for c in trains if "--r-train 6" in c]
    assert len(plain_stages) == len(tome_stages) == 5
    for stages, name in ((plain_stages, "student"), (tome_stages, "student_tome")):
        assert "--init" not in stages[0]  # stage 1 starts from scratch
        for k, call in enumerate(stages[1:], start=2):
            assert args_of(call, "--init") == f"{work}/{name}_stage{k - 1}"
            assert args_of(call, "--seed") == str(k - 1)
        assert args_of(stages[-1], "--out") == f"{work}/{name}"

    teacher = next(c for c in calls if "--arch efficientnet_b2" in c)
    distill = next(c for c in calls if c.startswith("distill"))
    assert calls.index(teacher) < calls.index(distill)
    # CMKD replaces stage 4: same start, rate, epochs and seed as the plain stage 4.
    stage4 = plain_stages[3]
    assert args_of(distill, "--init") == f"{work}/student_stage3"
    for flag in ("--lr", "--epochs", "--seed", "--warmup-steps"):
        assert args_of(distill, flag) == args_of(stage4, flag), flag

    choices = [c for c in calls if c.startswith("evaluate") and "--json" in c]
    assert choices and all(args_of(c, "--data").endswith("val.json") for c in choices)  # never picks on test
    shipped = (out / "model.safetensors").read_text().strip()
    assert shipped == ("student_cmkd" if cmkd_wins else "student")
    sweeps = [c for c in calls if c.startswith("evaluate") and "--write-card" in c and "--r 0,2" in c]
    assert [args_of(c, "--variant") for c in sweeps] == ["Inf", "Train+Inf"]
    assert all(args_of(c, "--data").endswith("test.json") for c in sweeps)
