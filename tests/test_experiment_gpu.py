"""scripts/experiment_gpu.sh, the experiment's one-GPU script, run the way a user runs it (from
another directory, relative paths) at its --smoke size on CPU: once stopped by its time budget,
then again to the end, continuing from what the first call left.

The first call's budget is 2 s, which no machine finishes a run in: a budget that stops the
experiment part-way on this machine (25 s once) let a faster CI machine finish all 14 runs first."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(cwd: Path, budget_s: int) -> tuple[dict, str]:
    env = {**os.environ, "POGDIFF": str(Path(sys.executable).parent / "pogdiff"), "POGDIFF_BUDGET_S": str(budget_s),
           "POGDIFF_REPORT_RESERVE_S": "0"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "experiment_gpu.sh"), "--smoke", "output_dir=runs",
                           "experiment.report_dir=report"], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), (cwd / "report" / "report.md").read_text()


@pytest.mark.slow
def test_gpu_experiment_script_stops_at_its_budget_and_resumes_to_a_full_report(tmp_path):
    first, report = run_script(tmp_path, budget_s=2)
    assert first["stopped_at_budget"] is True and first["runs_scored"] == 0
    assert "**Missing runs (not in the tables):**" in report  # what did not finish is said, not invented

    second, report = run_script(tmp_path, budget_s=1200)
    assert second["stopped_at_budget"] is False and second["runs_scored"] == 16  # 8 variants x 2 seeds
    assert second["machine"].startswith("CPU") and Path(second["report"]) == tmp_path / "report" / "report.md"
    assert "Missing runs" not in report
    assert "| stop-gradient y' |" in report and "**Paired comparison" in report
    paired = (tmp_path / "report" / "paired.csv").read_text().splitlines()
    assert len(paired) == 1 + 2 * 3 * 3  # (All, Few) x 3 metrics x 3 baselines
    assert (tmp_path / "runs" / "experiment-gpu" / "pogdiff-stop-seed1" / "metrics.json").is_file()
    assert (tmp_path / "runs" / "experiment-gpu" / "pogdiff-full-a2x16-seed1" / "metrics.json").is_file()
    assert "| a2 = 16 (identity preference) |" in report  # beside the paper's setting
