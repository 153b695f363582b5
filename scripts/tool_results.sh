#!/usr/bin/env bash
# The tool-integrated reasoning experiment of docs/results.md ("Tool-integrated reasoning"): on the
# arithmetic task where the tool matters (recipes/task/arithmetic_tool.yaml), SFT from scratch then
# GRPO, with the python tool (80% of SFT solutions call it; rollouts run it) and without (every SFT
# solution works the steps; no tool in the rollouts), same budgets, seeds 0 1 2, two chains at a time
# on one thread each; every run evaluated greedily on the 500 held-out problems, then summarised.
# Usage: ./scripts/tool_results.sh [OUT_DIR]   (SEEDS="0 1 2" by default; finished steps are kept)
source "$(dirname "$0")/_env.sh"
out=${1:-runs/tool_results}
mkdir -p "$out"

chain() {  # variant seed: SFT, its eval, GRPO from it, its eval (each skipped when already done)
    local variant=$1 seed=$2 dir="$out/$1-seed$2" sft=() grpo=() tools=()
    if [ "$variant" = notool ]; then
        sft=(data.arithmetic.tool_fraction=0)
        grpo=(data.arithmetic.tool_fraction=0 "rollout.tools=[]")
    else
        tools=("rollout.tools=[python]" rollout.max_turns=2)  # the SFT run's own config has no tools
    fi
    local common=(trainer.threads=1 logging.progress=false)
    [ -f "$dir/sft/checkpoints/final/config.json" ] || grpo train recipe=sft_tool_arithmetic \
        trainer.seed="$seed" model.tiny.seed="$seed" output_dir="$dir/sft" "${common[@]}" "${sft[@]}" > "$dir.sft.log" 2>&1
    [ -f "$dir/sft/eval/latest/eval.json" ] || grpo eval run="$dir/sft" trainer.threads=1 rollout.max_new_tokens=96 \
        "${tools[@]}" > "$dir.sft-eval.log" 2>&1
    [ -f "$dir/grpo/checkpoints/final/config.json" ] || grpo train recipe=grpo_tool_arithmetic \
        model.name_or_path="$dir/sft" trainer.seed="$seed" output_dir="$dir/grpo" "${common[@]}" "${grpo[@]}" > "$dir.grpo.log" 2>&1
    [ -f "$dir/grpo/eval/latest/eval.json" ] || grpo eval run="$dir/grpo" trainer.threads=1 rollout.max_new_tokens=96 \
        > "$dir.grpo-eval.log" 2>&1
    echo "done $variant seed $seed"
}
export -f chain
export out
for seed in ${SEEDS:-0 1 2}; do printf '%s %s\n' tool "$seed" notool "$seed"; done | xargs -P 2 -n 2 bash -c 'set -e; chain "$@"' _
python "$(dirname "$0")/tool_report.py" "$out"
