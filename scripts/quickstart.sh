#!/usr/bin/env bash
# Install into .venv (if needed), then the main job on the embedded default:
#   1. SFT the tiny model from scratch on the arithmetic task,
#   2. GRPO from that SFT checkpoint (outcome reward: the answer rule),
#   3. evaluate both on the held-out split (greedy pass@1) and print before / after,
#   4. write each run's report.html (curves, evals, completions, config; open it in any browser).
# Usage: ./scripts/quickstart.sh [OUT_DIR] [extra overrides for both trainings, e.g. trainer.seed=1]
source "$(dirname "$0")/_env.sh"
out=${1:-runs/quickstart}
shift || true
start=$(date +%s)
grpo train recipe=sft_arithmetic output_dir="$out/sft" "$@"
grpo train recipe=grpo_arithmetic model.name_or_path="$out/sft" output_dir="$out/grpo" "$@"
grpo eval run="$out/sft"
grpo eval run="$out/grpo"
grpo report run="$out/sft" >/dev/null
grpo report run="$out/grpo" >/dev/null
python - "$out" "$start" <<'PY'
import json, sys, time
out, start = sys.argv[1], int(sys.argv[2])
before = json.load(open(f"{out}/sft/eval/latest/eval.json"))["accuracy"]
after = json.load(open(f"{out}/grpo/eval/latest/eval.json"))["accuracy"]
print(f"held-out greedy accuracy: SFT {before:.3f} -> GRPO {after:.3f} ({100 * (after - before):+.1f} points)")
print(f"report: {out}/grpo/report.html {out}/sft/report.html   total {time.time() - start:.0f}s")
PY
