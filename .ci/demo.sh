#!/usr/bin/env bash
# The README's main job: install nnsynth into .venv, build the demo dataset, verify it, plan and
# preprocess it, train a Seq2Seq model for a few minutes and report its validation quality.
# Data goes to ./nnsynth_data unless nnSynth_raw / nnSynth_preprocessed / nnSynth_results are set.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/venv.sh
MINUTES="${NNSYNTH_DEMO_MINUTES:-5}"
export nnSynth_raw="${nnSynth_raw:-$PWD/nnsynth_data/raw}"
export nnSynth_preprocessed="${nnSynth_preprocessed:-$PWD/nnsynth_data/preprocessed}"
export nnSynth_results="${nnSynth_results:-$PWD/nnsynth_data/results}"

if [ ! -f "$nnSynth_raw/Dataset501_BrainDemo/dataset.json" ]; then
  nnsynth_make_demo_dataset -d 501 --name BrainDemo
fi
nnsynth_verify_dataset -d 501
nnsynth_plan_and_preprocess -d 501 -c 2d
nnsynth_train 501 seq2seq 0 -c 2d --max-minutes "$MINUTES"
echo
echo "Demo dataset : $nnSynth_raw/Dataset501_BrainDemo (montage.png shows a few cases)"
echo "Model folder : $nnSynth_results/Dataset501_BrainDemo/seq2seq__nnsynthPlans__2d/fold_0"
echo "Validation   :"
cat "$nnSynth_results/Dataset501_BrainDemo/seq2seq__nnsynthPlans__2d/fold_0/validation/summary.json" | head -40
