"""scripts/default_model.sh (`make default-model`) chains its stages, fine-tunes the right base on real voices and
measures the shipped tables on the real test speakers.

The real run takes hours, so here `fastast` is a stand-in that records each call, writes the folder it is
asked for (the weights file holds the folder's name) and answers `evaluate --json` with an accuracy set
per model by the test (or per model and data folder, e.g. {"real_stage2": {"sc": 0.7, "fsdd": 0.6}}), over 280
clips for the real Speech Commands validation speakers and 500 for any other manifest; with --per-speaker, the 280
are 20 speakers' 14 clips each and the 500 one speaker's.
"""

import os
import subprocess
from pathlib import Path

import pytest
from recipeutil import REPO, args_of, run_recipe

ANSWER = r"""[ "$1" = synth-commands ] && touch "$out/test.json"
if [ "$json" = 1 ]; then
    python - "$(basename "$model")" "$data" "$*" <<'PY'
import json, os, sys
from pathlib import Path
model, data, call = sys.argv[1:]
value = json.loads(os.environ["FAKE_ACCURACY"])[model]
folder = Path(data).parent.name
if isinstance(value, dict):
    value = value[folder]
speakers = 20 if folder == "sc" else 1
samples = 280 if folder == "sc" else 500
report = {"data": data, "samples": samples, "rows": [{"r": 0, "value": value}]}
if "--per-speaker" in call.split():
    right, clips = round(value * samples), samples // speakers
    report["per_speaker"] = {"0": {f"s{k}": [right // speakers + (k < right % speakers), clips]
                                   for k in range(speakers)}}
print(json.dumps(report))
PY
fi
"""


def run_script(tmp_path: Path, accuracy: dict[str, float], with_teacher: bool, **knobs: str) -> tuple[list[str], Path]:
    out = tmp_path / "out"
    env = {
        **knobs,
        "DATA": str(tmp_path / "data"),
        "TTS_DATA": str(tmp_path / "data-tts"),
        "MORE_TTS_DATA": str(tmp_path / "data-tts600"),
        "REAL": str(tmp_path / "shared"),
        "REAL_DATA": str(tmp_path / "real"),
        "WITH_TEACHER": "1" if with_teacher else "0",
        "WORK": str(tmp_path / "work"),
        "OUT": str(out),
    }
    calls, _ = run_recipe("default_model.sh", tmp_path, ANSWER, accuracy, env)
    return calls, out


def plain_stages(calls: list[str], work: Path) -> list[str]:
    """The synthetic student's stages, checked to chain: stage 1 from scratch, stage k from stage k-1."""
    stages = [c for c in calls if c.startswith("train") and args_of(c, "--out").startswith(f"{work}/student")]
    assert len(stages) == 5
    assert "--init" not in stages[0]
    # Stage 1 sets the patch strides; every later stage keeps its init model's.
    assert (args_of(stages[0], "--fstride"), args_of(stages[0], "--tstride")) == ("16", "16")
    assert not any("stride" in c for c in stages[1:])
    for k, call in enumerate(stages[1:], start=2):
        assert args_of(call, "--init") == f"{work}/student_stage{k - 1}"
        assert args_of(call, "--seed") == str(k - 1)
    assert args_of(stages[-1], "--out") == f"{work}/student"
    return stages


def check_real_fine_tune(calls: list[str], tmp_path: Path, base: str, out: Path, shipped: str,
                         continued: str = "real_stage10_seed10") -> None:
    """Real data prepared first; the base fine-tuned on mixed data in stages (espeak-ng speech in stages 1-2, the
    three engines' after, three times as much of it in stages 9-11), stages 10 and 11 once per seed, stage 11 from
    stage 10's run best on validation (`continued`); the run that ships and that Train+Inf continues from is the
    best of all on the real and FSDD validation speakers, each weighted as a speaker; tables on the real test
    speakers."""
    work, real = tmp_path / "work", tmp_path / "real"
    prepares = [c for c in calls if c.startswith("prepare-data")]
    assert [c.split()[1] for c in prepares] == ["speechcommands-real", "fsdd"]
    trains = {args_of(c, "--out"): c for c in calls if c.startswith("train")}
    stages = [trains[f"{work}/{name}"] for name in REAL_RUNS]
    tome = trains[f"{work}/real_tome"]
    assert calls.index(prepares[-1]) < calls.index(stages[0]) < calls.index(stages[-1]) < calls.index(tome)
    starts = [f"{work}/{base}", *(f"{work}/real_stage{k}" for k in range(1, 9))]
    starts += [f"{work}/real_stage9"] * 4 + [f"{work}/{continued}"] * 4
    assert [args_of(c, "--init") for c in stages] == starts
    assert [args_of(c, "--seed") for c in stages] == [s for seeds in REAL_SEEDS for s in seeds.split(",")]
    settings = [setting for setting, seeds in zip(zip(REAL_EPOCHS, REAL_LRS, REAL_FSTRIDES), REAL_SEEDS)
                for _ in seeds.split(",")]
    assert [(args_of(c, "--epochs"), args_of(c, "--lr"), args_of(c, "--fstride")) for c in stages] == settings
    assert not any("--tstride" in c for c in stages)
    assert not any("--r-train" in c for c in stages)
    assert args_of(tome, "--init") == f"{work}/{shipped}" and args_of(tome, "--r-train") == "6"
    assert "stride" not in tome  # Train+Inf keeps the patch grid of the model it continues from
    synthetic = ["data", "data", *["data-tts"] * 6, *["data-tts600"] * 10]  # stages 9-11, then Train+Inf
    for call, folder in zip((*stages, tome), synthetic, strict=True):
        manifests = call.split("--train ")[1].split(" --")[0].split()
        assert manifests == [f"{tmp_path}/{folder}/train.json", f"{real}/sc/train.json", f"{real}/fsdd/train.json"]
        assert args_of(call, "--val") == f"{real}/sc/val.json"  # real validation speakers pick the epoch
        assert "--balance" in call and args_of(call, "--noise-clips") == f"{real}/sc/noise.txt"
    choices = [c for c in calls if c.startswith("evaluate") and "--json" in c]
    assert all(args_of(c, "--data").endswith("val.json") for c in choices)  # never picks on test
    for val in ("sc", "fsdd"):
        assert {args_of(c, "--model") for c in choices if args_of(c, "--data") == f"{real}/{val}/val.json"} == {
            f"{work}/{name}" for name in REAL_RUNS}
    assert all("--per-speaker" in c.split() for c in choices if "/real/" in args_of(c, "--data"))
    assert (out / "model.safetensors").read_text().strip() == shipped
    sweeps = [c for c in calls if c.startswith("evaluate") and "--write-card" in c and "--r 0,2" in c]
    assert [args_of(c, "--variant") for c in sweeps] == ["Inf", "Train+Inf"]
    assert all(args_of(c, "--data") == f"{real}/sc/test.json" for c in sweeps)
    assert args_of(sweeps[1], "--model") == f"{work}/real_tome" and args_of(sweeps[1], "--card") == str(out)


# The shipped model's real stages: epochs, peak learning rates, patch strides along frequency and seeds (stages 10
# and 11 run once per seed); the runs' folders.
REAL_EPOCHS = ["10", "10", "6", "10", "10", "16", "10", "10", "5", "5", "5"]
REAL_LRS = ["3e-4"] * 6 + ["1e-4"] * 5
REAL_FSTRIDES = ["16"] * 11
REAL_SEEDS = [*(str(k) for k in range(9)), "10,11,12,13", "14,15,16,17"]
REAL_RUNS = [*(f"real_stage{k}" for k in range(1, 10)), *(f"real_stage10_seed{seed}" for seed in (10, 11, 12, 13)),
             *(f"real_stage11_seed{seed}" for seed in (14, 15, 16, 17))]
REAL_STAGES = dict.fromkeys(REAL_RUNS, 0.60) | {"real_stage2": 0.70, "real_stage3": 0.66}


@pytest.mark.parametrize("shipped", ["real_stage2", "real_stage10_seed12", "real_stage11_seed15"])
def test_script_fine_tunes_the_synthetic_student_on_real_voices(tmp_path, shipped):
    calls, out = run_script(tmp_path, REAL_STAGES | {shipped: 0.75}, with_teacher=False)
    assert calls[0].startswith("synth-commands") and "--engines" not in calls[0]
    assert calls[1].startswith("synth-commands") and args_of(calls[1], "--engines") == "espeak-ng,flite,festival"
    assert args_of(calls[2], "--out") == f"{tmp_path}/data-tts600" and args_of(calls[2], "--per-word") == "600"
    assert args_of(calls[2], "--engines") == "espeak-ng,flite,festival"
    plain_stages(calls, tmp_path / "work")
    assert not any("efficientnet_b2" in c or c.startswith("distill") for c in calls)
    # Stage 11 continues from stage 10's best run (the first of equals when none leads).
    continued = shipped if shipped.startswith("real_stage10") else "real_stage10_seed10"
    check_real_fine_tune(calls, tmp_path, "student", out, shipped=shipped, continued=continued)


@pytest.mark.parametrize("cmkd_wins", [False, True])
def test_with_the_teacher_the_better_student_on_validation_is_the_base(tmp_path, cmkd_wins):
    plain, cmkd = (0.80, 0.85) if cmkd_wins else (0.85, 0.80)
    calls, out = run_script(tmp_path, {"student_cmkd": cmkd, "student": plain, **REAL_STAGES, "real_stage3": 0.75},
                            with_teacher=True)
    work = tmp_path / "work"
    stages = plain_stages(calls, work)
    teacher = next(c for c in calls if "--arch efficientnet_b2" in c)
    distill = next(c for c in calls if c.startswith("distill"))
    assert calls.index(teacher) < calls.index(distill)
    # CMKD replaces stage 4: same start, rate, epochs and seed as the plain stage 4.
    assert args_of(distill, "--init") == f"{work}/student_stage3"
    for flag in ("--lr", "--epochs", "--seed", "--warmup-steps"):
        assert args_of(distill, flag) == args_of(stages[3], flag), flag
    check_real_fine_tune(calls, tmp_path, "student_cmkd" if cmkd_wins else "student", out, shipped="real_stage3")


@pytest.mark.parametrize("stage3, shipped", [({"sc": 0.68, "fsdd": 0.72}, "real_stage2"),
                                             ({"sc": 0.69, "fsdd": 0.80}, "real_stage3")])
def test_fsdds_one_validation_speaker_weighs_as_much_as_an_average_speaker(tmp_path, stage3, shipped):
    # Every validation speaker counts with its clips, capped at the mean (780 / 21 = 37.1): stage 2 gets
    # 196 + 0.60 x 37.1 = 218.3 of 317.1. Stage 3 with 190 real right answers loses (190 + 26.7 = 216.7), though
    # all 780 clips pooled would ship it (550 vs 496); with 193 (193 + 29.7 = 222.7) its FSDD lead is enough.
    accuracy = {**REAL_STAGES, "real_stage2": {"sc": 0.70, "fsdd": 0.60}, "real_stage3": stage3}
    calls, out = run_script(tmp_path, accuracy, with_teacher=False)
    check_real_fine_tune(calls, tmp_path, "student", out, shipped=shipped)


def test_a_real_stage_can_move_to_overlapping_patches_and_train_inf_keeps_them(tmp_path):
    knobs = {"REAL_EPOCHS": "10 10", "REAL_LRS": "3e-4 1e-4", "REAL_FSTRIDES": "16 8", "REAL_SYNTH": "espeak tts",
             "REAL_SEEDS": "0 1"}
    calls, out = run_script(tmp_path, {"real_stage1": 0.6, "real_stage2": 0.7}, with_teacher=False, **knobs)
    # No stage uses the 600-per-word set, so it is not made.
    assert [args_of(c, "--out") for c in calls if c.startswith("synth-commands")] == [
        f"{tmp_path}/data", f"{tmp_path}/data-tts"]
    trains = {args_of(c, "--out"): c for c in calls if c.startswith("train")}
    work = tmp_path / "work"
    assert [args_of(trains[f"{work}/{run}"], "--fstride") for run in ("real_stage1", "real_stage2")] == ["16", "8"]
    assert args_of(trains[f"{work}/real_tome"], "--init") == f"{work}/real_stage2"
    assert "stride" not in trains[f"{work}/real_tome"]
    assert (out / "model.safetensors").read_text().strip() == "real_stage2"


def run_refused(tmp_path: Path, **knobs: str) -> str:
    """Run the recipe with knobs it must refuse before calling fastast; its one-line error."""
    env = {**os.environ, **knobs, "FASTAST": str(tmp_path / "never-called")}
    result = subprocess.run(["bash", str(REPO / "scripts" / "default_model.sh")], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    return result.stderr.strip()


@pytest.mark.parametrize("lrs, fstrides, synth, seeds", [("3e-4", "16 8", "tts tts", "0 1"),
                                                         ("3e-4 1e-4", "8", "tts tts", "0 1"),
                                                         ("3e-4 1e-4", "16 8", "tts600", "0 1"),
                                                         ("3e-4 1e-4", "16 8", "tts tts", "0,1")])
def test_one_setting_of_each_kind_per_real_stage_or_a_one_line_error(tmp_path, lrs, fstrides, synth, seeds):
    error = run_refused(tmp_path, REAL_EPOCHS="10 10", REAL_LRS=lrs, REAL_FSTRIDES=fstrides, REAL_SYNTH=synth,
                        REAL_SEEDS=seeds)
    assert error == ("default_model.sh: REAL_EPOCHS, REAL_LRS, REAL_FSTRIDES, REAL_SYNTH and REAL_SEEDS need one entry "
                     f"per real stage (got '10 10', '{lrs}', '{fstrides}', '{synth}' and '{seeds}')")


def test_an_unknown_synthetic_set_is_a_one_line_error(tmp_path):
    error = run_refused(tmp_path, REAL_EPOCHS="10 10", REAL_LRS="3e-4 1e-4", REAL_FSTRIDES="16 16",
                        REAL_SYNTH="tts festival", REAL_SEEDS="0 1")
    assert error == "default_model.sh: REAL_SYNTH entries are espeak, tts or tts600 (got 'festival')"


@pytest.mark.parametrize("entry", ["1,,2", "a", "3,", "1,2+3", "+4"])
def test_a_seed_entry_is_a_seed_or_seeds_joined_by_comma_or_plus_or_a_one_line_error(tmp_path, entry):
    error = run_refused(tmp_path, REAL_EPOCHS="10 10", REAL_LRS="3e-4 1e-4", REAL_FSTRIDES="16 16",
                        REAL_SYNTH="tts tts", REAL_SEEDS=f"0 {entry}")
    assert error == f"default_model.sh: REAL_SEEDS entries are a seed, or seeds joined by ',' or by '+' (got '{entry}')"


@pytest.mark.parametrize("stage2, shipped", [(0.7, "real_stage2_average"), (0.5, "real_stage1")])
def test_a_stage_with_seeds_joined_by_plus_goes_on_as_the_average_of_its_runs(tmp_path, stage2, shipped):
    knobs = {"REAL_EPOCHS": "10 5 5", "REAL_LRS": "3e-4 1e-4 1e-4", "REAL_FSTRIDES": "16 16 16",
             "REAL_SYNTH": "tts tts600 tts600", "REAL_SEEDS": "0 1+2+3 4,5"}
    # The runs of stage 2 would win on validation; only their average is a candidate.
    accuracy = {"real_stage1": 0.6, "real_stage2_average": stage2, "real_stage3_seed4": 0.55, "real_stage3_seed5": 0.4,
                **dict.fromkeys(("real_stage2_seed1", "real_stage2_seed2", "real_stage2_seed3"), 0.9)}
    calls, out = run_script(tmp_path, accuracy, with_teacher=False, **knobs)
    work = tmp_path / "work"
    runs = [f"{work}/real_stage2_seed{seed}" for seed in (1, 2, 3)]
    trains = {args_of(c, "--out"): c for c in calls if c.startswith("train")}
    assert [args_of(trains[run], "--init") for run in runs] == [f"{work}/real_stage1"] * 3
    assert [args_of(trains[run], "--seed") for run in runs] == ["1", "2", "3"]
    average = next(c for c in calls if c.startswith("average"))
    assert average.split() == ["average", *runs, "--out", f"{work}/real_stage2_average", "--force"]
    assert calls.index(trains[runs[-1]]) < calls.index(average) < calls.index(trains[f"{work}/real_stage3_seed4"])
    assert {args_of(trains[f"{work}/real_stage3_seed{seed}"], "--init") for seed in (4, 5)} == {
        f"{work}/real_stage2_average"}
    evaluated = {args_of(c, "--model") for c in calls if c.startswith("evaluate") and "--json" in c}
    assert evaluated == {f"{work}/{name}" for name in
                         ("real_stage1", "real_stage2_average", "real_stage3_seed4", "real_stage3_seed5")}
    assert args_of(trains[f"{work}/real_tome"], "--init") == f"{work}/{shipped}"
    assert (out / "model.safetensors").read_text().strip() == shipped
