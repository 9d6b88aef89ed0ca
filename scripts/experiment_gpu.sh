#!/usr/bin/env bash
# The experiment on one GPU, in a fixed wall-clock budget (default 8 minutes):
#
#   scripts/experiment_gpu.sh [--smoke] [dotted overrides ...]
#
# Runs `pogdiff experiment configs/experiment_gpu.yaml` (seed-major: every variant of seed 0, then
# seed 1, ...; every stage cached on disk) until POGDIFF_BUDGET_S minus a reserve for the report,
# stops it there, and writes the report of the runs that finished (a rerun continues where it
# stopped). Prints one JSON line: the machine, the seconds, the runs done and the report's path.
# --smoke: the same path at a tiny size on CPU (what CI runs; minutes, not a result).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
config="$here/configs/experiment_gpu.yaml"
pogdiff=${POGDIFF:-}
if [[ -z $pogdiff ]]; then
  if [[ -x $here/.venv/bin/pogdiff ]]; then pogdiff=$here/.venv/bin/pogdiff; else pogdiff=pogdiff; fi
fi
budget=${POGDIFF_BUDGET_S:-480}
reserve=${POGDIFF_REPORT_RESERVE_S:-45}  # the report reads every run's metrics and draws the figures

args=()
if [[ ${1:-} == --smoke ]]; then
  shift
  args=(train.device=cpu data.profile=custom data.majority_ids=2 data.majority_images=6 data.minority_ids=3
        data.minority_images=2 data.heldout_images=2 density.epochs=3 train.steps=3 train.batch_size=4
        train.log_every=1 sample.steps=2 sample.images_per_id=2 sample.batch_size=8 eval.recognizer_ids=6
        eval.recognizer_images_per_id=3 eval.recognizer_steps=5 "experiment.seeds=[0,1]" "sample.guidance_scales=[]")
fi
args+=("$@")

"$pogdiff" config "$config" "${args[@]}" > /dev/null  # a config error stops here, before anything runs
start=$(date +%s)
status=0
timeout --signal=TERM --kill-after=20 $((budget - reserve)) "$pogdiff" experiment "$config" "${args[@]}" || status=$?
if [[ $status -ne 0 && $status -ne 124 ]]; then
  echo "experiment_gpu: pogdiff experiment failed (exit $status)" >&2
  exit "$status"
fi
report=$("$pogdiff" report "$config" "${args[@]}" | tail -n 1)
seconds=$(( $(date +%s) - start ))
python=$(dirname "$(command -v "$pogdiff")")/python  # the interpreter pogdiff is installed in
[[ -x $python ]] || python=python3
machine=$("$python" -c 'import os, platform, torch
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU {platform.machine()}, {os.cpu_count()} cores")')
done_runs=$(grep -c '' "$(dirname "$report")/per_seed.csv" 2>/dev/null || echo 1)
printf '{"script": "experiment_gpu", "machine": "%s", "seconds": %d, "budget_s": %d, "stopped_at_budget": %s, "runs_scored": %d, "report": "%s"}\n' \
  "$machine" "$seconds" "$budget" "$([[ $status -eq 124 ]] && echo true || echo false)" "$((done_runs - 1))" "$report"
