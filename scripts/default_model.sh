#!/usr/bin/env bash
# Reproduces model_store/default: the synthetic Speech Commands data, the FastAST keyword model, its
# r tables on the speaker-disjoint test split, and (where compute allows) the CMKD teacher and student.
#
#   scripts/default_model.sh            # data + plain student ("Inf") + Train+Inf student + evaluation
#   WITH_TEACHER=1 scripts/default_model.sh   # also the EfficientNet-B2 teacher and the CMKD student (GPU advised)
#
# Knobs (environment): FASTAST, DATA, WORK, OUT, DEVICE, WORKERS, THREADS, EPOCHS, MORE_EPOCHS, TEACHER_EPOCHS,
# R_TRAIN, R_SWEEP.
set -euo pipefail
cd "$(dirname "$0")/.."

FASTAST=${FASTAST:-.venv/bin/fastast}
DATA=${DATA:-data/sc-synth}
WORK=${WORK:-runs/default}          # intermediate models (not shipped)
OUT=${OUT:-model_store/default}
DEVICE=${DEVICE:-auto}
WORKERS=${WORKERS:-2}
EPOCHS=${EPOCHS:-14}                # stage 1 (from scratch)
MORE_EPOCHS=${MORE_EPOCHS:-20}      # stage 2 (continued from stage 1 with a fresh warm-up and cosine)
TEACHER_EPOCHS=${TEACHER_EPOCHS:-10}
R_TRAIN=${R_TRAIN:-6}
R_SWEEP=${R_SWEEP:-0,2,4,6,8,10,12,16}
THREADS=${THREADS:-1}               # one model thread is several times faster than two on busy shared cores

# The student: a 128-wide, 6-block AST with 16x16 patches at stride 16 (8 x 8 = 64 patches + 2 special
# tokens), 1 s of audio = 128 frames, Speech Commands normalisation. Sized for 2 shared CPU cores.
STUDENT=(--arch tiny --dim 128 --depth 6 --heads 2 --fstride 16 --tstride 16 --target-length 128
         --mean -6.845978 --std 5.5654526 --batch-size 32 --weight-decay 0.05
         --freqm 16 --timem 16 --shift 10 --device "$DEVICE" --workers "$WORKERS" --threads "$THREADS")
SPLITS=(--train "$DATA/train.json" --val "$DATA/val.json" --labels "$DATA/labels.csv")

# 1. Data: 35 keywords x 200 clips spoken by espeak-ng voices; val/test speakers never heard in training.
if [ ! -f "$DATA/test.json" ]; then
    "$FASTAST" synth-commands --out "$DATA" --per-word 200 --seed 0
fi

# 2. Plain student, trained at r=0 ("Inf": ToMe only at inference). From scratch an AST of this size sits at
#    chance for ~1000 steps at lr 1e-4 (higher rates stayed there longer), so: stage 1, then stage 2 continues
#    from stage 1's best epoch with a fresh warm-up and cosine.
"$FASTAST" train "${SPLITS[@]}" "${STUDENT[@]}" --lr 1e-4 --epochs "$EPOCHS" --seed 0 --name default \
    --out "$WORK/student_stage1"
"$FASTAST" train "${SPLITS[@]}" "${STUDENT[@]}" --lr 2e-4 --warmup-steps 100 --epochs "$MORE_EPOCHS" --seed 1 \
    --init "$WORK/student_stage1" --name default --out "$WORK/student"

# 3. "Train+Inf": the same two stages with ToMe active (r = R_TRAIN in every block).
"$FASTAST" train "${SPLITS[@]}" "${STUDENT[@]}" --lr 1e-4 --epochs "$EPOCHS" --seed 0 --r-train "$R_TRAIN" \
    --name default-train-inf --out "$WORK/student_tome_stage1"
"$FASTAST" train "${SPLITS[@]}" "${STUDENT[@]}" --lr 2e-4 --warmup-steps 100 --epochs "$MORE_EPOCHS" --seed 1 \
    --r-train "$R_TRAIN" --init "$WORK/student_tome_stage1" --name default-train-inf --out "$WORK/student_tome"

BEST="$WORK/student"
# 4. Optional CMKD: EfficientNet-B2 teacher, then a student distilled from it (lambda 0.1 on the labels, tau 1).
if [ "${WITH_TEACHER:-0}" = 1 ]; then
    "$FASTAST" train "${SPLITS[@]}" --arch efficientnet_b2 --target-length 128 --mean -6.845978 --std 5.5654526 \
        --batch-size 32 --lr 1e-3 --weight-decay 0.05 --freqm 16 --timem 16 --shift 10 --device "$DEVICE" \
        --workers "$WORKERS" --threads "$THREADS" --epochs "$TEACHER_EPOCHS" --seed 0 --name default-teacher \
        --out "$WORK/teacher"
    "$FASTAST" distill --teacher "$WORK/teacher" --lambda 0.1 --tau 1.0 "${SPLITS[@]}" "${STUDENT[@]}" \
        --lr 1e-4 --epochs $((EPOCHS + MORE_EPOCHS)) --seed 0 --name default --out "$WORK/student_cmkd"
    "$FASTAST" evaluate --model "$WORK/teacher" --data "$DATA/test.json" --r 0 --write-card --variant Inf
    "$FASTAST" evaluate --model "$WORK/student_cmkd" --data "$DATA/test.json" --r 0 --json > "$WORK/cmkd_r0.json"
    "$FASTAST" evaluate --model "$WORK/student" --data "$DATA/test.json" --r 0 --json > "$WORK/plain_r0.json"
    BEST=$(.venv/bin/python -c 'import json,sys; a,b=(json.load(open(p))["rows"][0]["value"] for p in sys.argv[1:3]); print(sys.argv[4] if b > a else sys.argv[3])' \
        "$WORK/plain_r0.json" "$WORK/cmkd_r0.json" "$WORK/student" "$WORK/student_cmkd")
fi

# 5. Ship the better student and store both r tables (on the test split) in its card.
rm -rf "$OUT"
mkdir -p "$OUT"
cp "$BEST/model.safetensors" "$BEST/card.json" "$OUT/"
"$FASTAST" evaluate --model "$OUT" --data "$DATA/test.json" --r "$R_SWEEP" --threads "$THREADS" --write-card --variant Inf \
    --plot docs/default_model_r.png
"$FASTAST" evaluate --model "$WORK/student_tome" --data "$DATA/test.json" --r "$R_SWEEP" --threads "$THREADS" \
    --write-card --card "$OUT" --variant Train+Inf
echo "model_store/default ready: $(du -h "$OUT/model.safetensors" | cut -f1)"
