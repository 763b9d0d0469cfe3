"""scripts/esc10_table.sh (`make esc10-table`) trains the rows of the ESC-10 table in order, measures them on fold 5,
lets fold 4 alone choose the student and ships it only above the bar.

The real run takes over an hour, so here `fastast` is a stand-in that records each call, writes the folder it is
asked for (the weights file holds the folder's name) and answers `evaluate --json` with one row per r, at an
accuracy set per model and manifest by the test.
"""

import subprocess
from pathlib import Path

from recipeutil import args_of, run_recipe

ANSWER = r"""if [ "$json" = 1 ]; then
    python - "$(basename "$model")/$(basename "$data")" "$r" "$variant" <<'PY'
import json, os, sys
key, r_values, variant = sys.argv[1:]
value = json.loads(os.environ["FAKE_ACCURACY"]).get(key, 0.5)
rows = [{"r": int(r), "metric": "accuracy", "value": value, "samples_per_s": 100.0 + int(r), "variant": variant}
        for r in r_values.split(",")]
print(json.dumps({"rows": rows}))
PY
fi
"""


def run_script(tmp_path: Path, accuracy: dict[str, float]) -> tuple[list[str], subprocess.CompletedProcess]:
    env = {
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
    work, data, out = tmp_path / "work", tmp_path / "data", tmp_path / "out"
    assert calls[0].startswith("prepare-data esc10")
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
    table = (work / "table.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == [
        "| Inf", "| Train+Inf", "| EfficientNet-B2 teacher", "| CMKD Inf", "| CMKD Train+Inf"]
    assert "| 85.0 % / 100 |" in table[4] and (tmp_path / "esc10_r.png").stat().st_size > 0
    # Fold 4 prefers the CMKD student although the plain one is better on fold 5: the test fold never chooses.
    assert (out / "model.safetensors").read_text().strip() == "cmkd"
    cards = [c for c in calls if "--write-card" in c]
    assert [args_of(c, "--variant") for c in cards] == ["Inf", "Train+Inf"]
    assert args_of(cards[1], "--model") == f"{work}/cmkd_train_inf" and args_of(cards[1], "--card") == str(out)


def test_nothing_ships_below_the_bar_and_reruns_resume(tmp_path):
    ckpt = tmp_path / "work" / "inf" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    calls, result = run_script(tmp_path, {"inf/val.json": 0.80, "inf/test.json": 0.70})
    assert "not shipping" in result.stdout and not (tmp_path / "out").exists()
    runs = by_out(calls)
    assert "--resume" in runs[f"{tmp_path}/work/inf"] and "--resume" not in runs[f"{tmp_path}/work/cmkd"]
    assert not any("--write-card" in c for c in calls)
