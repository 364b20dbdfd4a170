#!/usr/bin/env bash
# The README's main job, on the built-in demo dataset, on CPU:
#   install nnsynth into .venv -> generate the demo dataset -> verify it -> plan and preprocess ->
#   train vq_seq2seq (fold 0, NNSYNTH_DEMO_MINUTES of training, default 6) -> predict Flair for the
#   held-out test cases from their other sequences -> evaluate against the truth -> Markdown report.
# Data goes to ./nnsynth_data unless nnSynth_raw / nnSynth_preprocessed / nnSynth_results are set.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/venv.sh
MINUTES="${NNSYNTH_DEMO_MINUTES:-6}"
TRAINER="${NNSYNTH_DEMO_TRAINER:-vq_seq2seq}"
export nnSynth_raw="${nnSynth_raw:-$PWD/nnsynth_data/raw}"
export nnSynth_preprocessed="${nnSynth_preprocessed:-$PWD/nnsynth_data/preprocessed}"
export nnSynth_results="${nnSynth_results:-$PWD/nnsynth_data/results}"
RAW="$nnSynth_raw/Dataset501_BrainDemo"
WORK="$PWD/nnsynth_data/demo_run"

[ -f "$RAW/dataset.json" ] || nnsynth_make_demo_dataset -d 501 --name BrainDemo
nnsynth_verify_dataset -d 501
nnsynth_plan_and_preprocess -d 501 -c 2d
nnsynth_train 501 "$TRAINER" 0 -c 2d --max-minutes "$MINUTES"

# the test cases are complete: hold their Flair (channel 0003) back and let the model synthesise it
rm -rf "$WORK" && mkdir -p "$WORK/inputs"
for f in "$RAW"/imagesTs/*; do
  case "$f" in *_0003.nii.gz) ;; *) ln -s "$f" "$WORK/inputs/$(basename "$f")" ;; esac
done
nnsynth_predict -i "$WORK/inputs" -o "$WORK/predictions" -t Flair -d 501 -tr "$TRAINER" -c 2d -f 0
nnsynth_evaluate -r "$RAW/imagesTs_truth" -p "$WORK/predictions" -d 501 -o "$WORK/evaluation/metrics.csv" \
  --sources-from "$WORK/inputs" --report

echo
echo "Demo dataset : $RAW (montage.png shows a few cases)"
echo "Model        : $nnSynth_results/Dataset501_BrainDemo/${TRAINER}__nnsynthPlans__2d/fold_0 (progress.png)"
echo "Predictions  : $WORK/predictions"
echo "Report       : $WORK/evaluation/report.md"
