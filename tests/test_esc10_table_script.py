"""scripts/esc10_table.sh (`make esc10-table`) trains the rows of the ESC-10 table in order, measures them on each test
fold (fold 5 by default; FOLDS="1 2 3 4 5" cross-validates), lets the validation folds alone choose the student and
ships it only when its mean over the test folds clears the bar.

The real run takes over an hour, so here `fastast` is a stand-in that records each call, writes the folder it is
asked for (the weights file holds the folder's name) and answers `evaluate --json` with one row per r, at an
accuracy set per model and manifest by the test ("inf/test.json"), or per test fold ("test_fold3/inf/test.json").
"""

import subprocess
from pathlib import Path

from recipeutil import args_of, run_recipe

ANSWER = r"""if [ "$json" = 1 ]; then
    python - "$(basename "$(dirname "$model")")" "$(basename "$model")/$(basename "$data")" "$r" "$variant" <<'PY'
import json, os, sys
run, key, r_values, variant = sys.argv[1:]
accuracy = json.loads(os.environ["FAKE_ACCURACY"])
value = accuracy.get(f"{run}/{key}", accuracy.get(key, 0.5))
rows = [{"r": int(r), "metric": "accuracy", "value": value, "samples_per_s": 100.0 + int(r), "variant": variant}
        for r in r_values.split(",")]
print(json.dumps({"rows": rows}))
PY
fi
"""


def run_script(tmp_path: Path, accuracy: dict[str, float], **knobs: str) -> tuple[list[str], subprocess.CompletedProcess]:
    env = knobs | {
        "ESC10": str(tmp_path / "shared"),
        "DATA": str(tmp_path / "data"),
        "WORK": str(tmp_path / "work"),
        "OUT": str(tmp_path / "out"),
        "PLOT": str(tmp_path / "esc10_r.png"),
    }
    return run_recipe("esc10_table.sh", tmp_path, ANSWER, accuracy, env)


def by_out(calls: list[str]) -> dict[str, str]:
    return {args_of(c, "--out"): c for c in calls if c.startswith(("train", "distill"))}


def test_rows_chain_and_the_student_fold_4_prefers_ships(tmp_path):
    calls, _ = run_script(tmp_path, {"inf/val.json": 0.70, "cmkd/val.json": 0.75, "inf/test.json": 0.90,
                                     "cmkd/test.json": 0.80, "teacher/test.json": 0.85})
    work, data, out = tmp_path / "work" / "test_fold5", tmp_path / "data" / "test_fold5", tmp_path / "out"
    assert calls[0].startswith("prepare-data esc10") and args_of(calls[0], "--test-fold") == "5"
    assert args_of(calls[0], "--out") == str(data)
    runs = by_out(calls)
    teacher, inf, cmkd = runs[f"{work}/teacher"], runs[f"{work}/inf"], runs[f"{work}/cmkd"]
    train_inf, cmkd_train_inf = runs[f"{work}/train_inf"], runs[f"{work}/cmkd_train_inf"]
    assert "--arch efficientnet_b2" in teacher and calls.index(teacher) < calls.index(cmkd)
    assert args_of(cmkd, "--teacher") == args_of(cmkd_train_inf, "--teacher") == f"{work}/teacher"
    for flag in ("--dim", "--depth", "--lr", "--epochs", "--seed", "--mixup"):  # CMKD changes only the loss
        assert args_of(cmkd, flag) == args_of(inf, flag), flag
    assert "--r-train" not in inf and "--r-train" not in cmkd
    assert args_of(train_inf, "--init") == f"{work}/inf" and args_of(cmkd_train_inf, "--init") == f"{work}/cmkd"
    assert args_of(train_inf, "--r-train") == args_of(cmkd_train_inf, "--r-train") == "16"
    assert all(args_of(c, "--val") == f"{data}/val.json" for c in runs.values())  # fold 4 picks the epoch
    tests = {args_of(c, "--model"): c for c in calls if c.startswith("evaluate") and "test.json --r" in c
             and "--json" in c}
    assert args_of(tests[f"{work}/teacher"], "--r") == "0"
    assert args_of(tests[f"{work}/inf"], "--r") == "0,4,8,16,24,32,40,48"
    table = (tmp_path / "work" / "table.md").read_text().splitlines()
    assert table[0].startswith("top-1 accuracy on test fold 5") and [line.split(" | ")[0] for line in table[4:]] == [
        "| Inf", "| Train+Inf", "| EfficientNet-B2 teacher", "| CMKD Inf", "| CMKD Train+Inf"]
    assert "| 85.0 % / 100 |" in table[6] and (tmp_path / "esc10_r.png").stat().st_size > 0
    # Fold 4 prefers the CMKD student although the plain one is better on fold 5: the test fold never chooses.
    assert (out / "model.safetensors").read_text().strip() == "cmkd"
    cards = [c for c in calls if "--write-card" in c]
    assert [args_of(c, "--variant") for c in cards] == ["Inf", "Train+Inf"]
    assert args_of(cards[1], "--model") == f"{work}/cmkd_train_inf" and args_of(cards[1], "--card") == str(out)


def test_nothing_ships_below_the_bar_and_reruns_resume(tmp_path):
    ckpt = tmp_path / "work" / "test_fold5" / "inf" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    calls, result = run_script(tmp_path, {"inf/val.json": 0.80, "inf/test.json": 0.70})
    assert "not shipping" in result.stdout and not (tmp_path / "out").exists()
    runs = by_out(calls)
    work = tmp_path / "work" / "test_fold5"
    assert "--resume" in runs[f"{work}/inf"] and "--resume" not in runs[f"{work}/cmkd"]
    assert not any("--write-card" in c for c in calls)


def test_cross_validation_rotates_the_folds_and_the_mean_decides(tmp_path):
    # Fold 5 alone (0.78) would clear the bar; the mean over the five test folds (0.74) does not.
    accuracy = {f"test_fold{k}/inf/test.json": 0.68 + 0.02 * k for k in range(1, 6)}
    calls, result = run_script(tmp_path, accuracy, FOLDS="1 2 3 4 5", TEACHER="0")
    prepares = [c for c in calls if c.startswith("prepare-data")]
    assert [args_of(c, "--test-fold") for c in prepares] == ["1", "2", "3", "4", "5"]
    runs = by_out(calls)
    assert sorted(runs) == sorted(f"{tmp_path}/work/test_fold{k}/{name}" for k in range(1, 6)
                                  for name in ("inf", "train_inf"))  # TEACHER=0: no teacher, no CMKD
    for k in range(1, 6):
        inf = runs[f"{tmp_path}/work/test_fold{k}/inf"]
        assert args_of(inf, "--train") == f"{tmp_path}/data/test_fold{k}/train.json"
        assert args_of(inf, "--val") == f"{tmp_path}/data/test_fold{k}/val.json"
    table = (tmp_path / "work" / "table.md").read_text()
    assert "test fold 1 /" in table and "| Inf | 70.0 % / 100 |" in table
    mean = table.split("mean over test folds 1, 2, 3, 4, 5")[1]
    assert "| Inf | 74.0 % / 100 | 74.0 % / 104 |" in mean and "| Train+Inf | 50.0 % / 100 |" in mean
    assert "not shipping" in result.stdout and "0.74" in result.stdout and not (tmp_path / "out").exists()
