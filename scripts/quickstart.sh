#!/usr/bin/env bash
# Install into .venv (if needed), then the main job on the embedded default: SFT the tiny model from
# scratch on the arithmetic task and evaluate it on the held-out split.
source "$(dirname "$0")/_env.sh"
out=${1:-runs/quickstart}
grpo train recipe=sft_arithmetic output_dir="$out/sft" logging.progress=true
grpo eval run="$out/sft"
echo "curves: $out/sft/curves.png   metrics: $out/sft/metrics.jsonl"
