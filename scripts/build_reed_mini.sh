#!/usr/bin/env bash
# Train the three reed-mini variants, install them as built-in models, and measure them.
# Each `python -m reed train` resumes from its last checkpoint, so rerunning after an interruption is safe.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

# 1. The base model, trained from scratch with the single-pass loss, then installed as reed-mini:standard,
#    stored in float16 to halve its size (loading converts it back to float32).
$PYTHON -m reed train configs/reed-mini-standard.yaml
$PYTHON -m reed export runs/reed-mini-standard/model reed/assets/reed-mini/standard --dtype float16

# 2. Two decoder fine-tunes of the installed reed-mini:standard with the same steps, crops, augmentation
#    and learning-rate schedules: the REED loss and the single-pass control, each in three stages (the
#    second and third at a lower learning rate). Each config sets threads: 1, so the two run side by
#    side on a two-core machine.
mkdir -p runs
( $PYTHON -m reed train configs/reed-mini-reed.yaml \
    && $PYTHON -m reed train configs/reed-mini-reed-polish.yaml \
    && $PYTHON -m reed train configs/reed-mini-reed-stage3.yaml ) > runs/reed-mini-reed.out 2>&1 &
reed_pid=$!
( $PYTHON -m reed train configs/reed-mini-control.yaml \
    && $PYTHON -m reed train configs/reed-mini-control-polish.yaml \
    && $PYTHON -m reed train configs/reed-mini-control-stage3.yaml ) > runs/reed-mini-control.out 2>&1 &
control_pid=$!
wait "$reed_pid"
wait "$control_pid"

# 3. Install the fine-tuned decoders as built-in models, also in float16 (the figures below are measured
#    on the stored weights).
for variant in reed control; do
    $PYTHON -m reed export runs/reed-mini-$variant/model reed/assets/reed-mini/$variant --dtype float16
done

# 4. Measure on the held-out photos (the figures in reed/assets/reed-mini/README.md).
$PYTHON -m reed photos runs/held-out
$PYTHON -m reed ladder runs/held-out --models reed-mini:standard,reed-mini:reed,reed-mini:control \
    --cycles 25 --size 256 --out runs/model-card-ladder
