"""`pogdiff sweep`, run as a user runs it (another directory, relative paths), at a tiny size: the
points that change only PoGDiff's settings share their baseline runs, a point that changes the
data gets its own, a rerun trains nothing again, and the summary pairs each point with its
baselines by seed."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
POGDIFF = str(Path(sys.executable).parent / "pogdiff")
TINY = ["data.profile=custom", "data.majority_ids=2", "data.majority_images=6", "data.minority_ids=3",
        "data.minority_images=2", "data.heldout_images=2", "density.epochs=3", "train.steps=3", "train.batch_size=4",
        "train.log_every=1", "sample.steps=2", "sample.images_per_id=2", "sample.batch_size=8", "eval.recognizer_ids=6",
        "eval.recognizer_images_per_id=3", "eval.recognizer_steps=5", "experiment.seeds=[0]", "output_dir=runs",
        "sweep.baselines=[vanilla]", "sweep.report_dir=out", "sample.guidance_scales=[3.0]"]
POINTS = """
  points:
    paper: []
    a3x4: [method.a3=4]
    ssl: [data.image_encoder=tiny-ssl]
    crop: [data.center_crop=false]
"""


def sweep(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """The shipped sweep config with the user's own points (a YAML of theirs: overrides merge into
    the file's points, they do not replace them)."""
    text = (ROOT / "configs/sweep.yaml").read_text()
    (cwd / "my-sweep.yaml").write_text(text[:text.index("  points:")] + POINTS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([POGDIFF, "sweep", "my-sweep.yaml", *TINY, *extra], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_sweep_shares_baselines_and_continues(tmp_path):
    proc = sweep(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip().splitlines()[-1]) == tmp_path / "out" / "sweep.md"
    runs = tmp_path / "runs"
    bases = sorted(p.name for p in runs.iterdir() if p.name.startswith("sweep-base"))
    # paper, a3x4 and ssl (PoGDiff's neighbours only) share one; crop (other training images) has its own
    assert len(bases) == 2
    assert sorted(p.name for p in runs.iterdir() if p.name.startswith("sweep-") and "base" not in p.name) == \
        ["sweep-a3x4", "sweep-crop", "sweep-paper", "sweep-ssl"]
    rows = [r for r in csv.DictReader((tmp_path / "out" / "sweep.csv").open()) if float(r["guidance"]) == 5.0]
    assert {(r["point"], r["variant"]) for r in rows} == \
        {(p, v) for p in ("paper", "a3x4", "ssl", "crop") for v in ("pogdiff", "vanilla")}
    by = {(r["point"], r["variant"]): r for r in rows}
    assert by[("paper", "vanilla")] == {**by[("a3x4", "vanilla")], "point": "paper"}  # the very same runs
    assert by[("ssl", "vanilla")] == {**by[("a3x4", "vanilla")], "point": "ssl"}
    assert json.loads((runs / "sweep-a3x4" / "pogdiff-full-a3x4-lora-seed0" / "run_config.json").read_text())["method.a3"] == 4
    md = (tmp_path / "out" / "sweep.md").read_text()
    assert "| a3x4 | method.a3=4 |" in md and "| vanilla (beside paper, a3x4, ssl) |" in md
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 0

    trained = {p: p.stat().st_mtime_ns for p in runs.glob("sweep-*/*/history.json")}
    assert len(trained) == 6
    again = sweep(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in runs.glob("sweep-*/*/history.json")} == trained  # nothing retrained


def test_a_bad_point_override_exits_2_before_anything_runs(tmp_path):
    proc = sweep(tmp_path, "sweep.points.typo=[method.a4=2]")
    assert proc.returncode == 2 and "method.a4" in proc.stderr, proc.stderr[-2000:]
    assert not list((tmp_path / "runs").glob("*/*-seed*")) and not (tmp_path / "runs" / "datasets").exists()


def test_the_points_are_the_files_own(tmp_path):
    """A file's points are all the points (nothing merged in from a default); none: the config as it is."""
    from pogdiff.experiment.sweep import point_configs
    from pogdiff.runs import load_run_config

    text = (ROOT / "configs/sweep.yaml").read_text()
    (tmp_path / "mine.yaml").write_text(text[:text.index("  points:")] + "  points:\n    weak: [method.a3=8]\n")
    (tmp_path / "none.yaml").write_text(text[:text.index("  points:")] + "  points: {}\n")
    points = point_configs(load_run_config(tmp_path / "mine.yaml", [f"output_dir={tmp_path}"]))
    assert list(points) == ["weak"]
    point, base = points["weak"]
    assert point.method.a3 == 8 and base.method.a3 == 1 and point.run_name == "sweep-weak" and base.run_name == "sweep-base"
    assert list(point_configs(load_run_config(tmp_path / "none.yaml", [f"output_dir={tmp_path}"]))) == ["config"]


def test_only_overrides_a_baseline_reads_give_the_baselines_runs_of_their_own():
    from pogdiff.experiment.sweep import changes_baselines

    for own in ("method.a2=16", "method.k=5", "data.image_encoder=tiny-ssl", "density.form=temperature"):
        assert not changes_baselines(own, ["vanilla", "cbdm"]), own
    for shared in ("train.steps=1200", "data.profile=agedb-l", "data.names=grid", "sample.guidance_scale=3"):
        assert changes_baselines(shared, ["vanilla", "cbdm"]), shared
    assert changes_baselines("density.form=temperature", ["vanilla", "t2h"])  # T2H reads the text density


# ------------------------------------------------- statistics at the identity level (issue 31)

def test_identity_bootstrap_keeps_each_identitys_seeds_together():
    """Hand-made: identity A's differences [1, 3] (sum 4 over 2), B's [10]. Resampling two identities
    gives AA -> 8/4 = 2, AB -> 14/3, BB -> 20/2 = 10, so the 95% interval is [2, 10] and the pooled mean
    14/3; resampling pairs on their own would reach 1. Equal differences collapse the interval."""
    from pogdiff.eval.metrics import identity_bootstrap

    mean, low, high = identity_bootstrap({"A": [1.0, 3.0], "B": [10.0]})
    assert mean == pytest.approx(14 / 3) and (low, high) == (pytest.approx(2.0), pytest.approx(10.0))
    assert identity_bootstrap({"A": [1.0, 3.0], "B": [10.0]}) == (mean, low, high)  # seeded
    assert identity_bootstrap({i: [-0.25] * (1 + i % 3) for i in range(7)}) == \
        (pytest.approx(-0.25), pytest.approx(-0.25), pytest.approx(-0.25))
    # a spread that the identities carry: the interval is inside the range of identity means, around the mean
    rng = np.random.default_rng(1)
    diffs = {i: list(rng.normal(i / 10, 0.01, size=3)) for i in range(10)}
    mean, low, high = identity_bootstrap(diffs)
    assert 0 < low < mean < high < 0.9 and mean == pytest.approx(np.mean([d for v in diffs.values() for d in v]))


def test_wins_ties_losses_count_ties_apart():
    from pogdiff.eval.metrics import wins_ties_losses

    diffs = [0.5, 0.0, -0.25, 0.0, 1.0, 1 / 3 - (1 - 2 / 3)]  # the last: 0 up to float rounding
    assert wins_ties_losses(diffs, lower_is_better=False) == (2, 3, 1)
    assert wins_ties_losses(diffs, lower_is_better=True) == (1, 3, 2)  # FID: a negative difference wins


def test_the_sampling_noise_is_per_training_seed_and_the_few_ids_are_not():
    from pogdiff.config import load_config, variant_config
    from pogdiff.eval.sampling import _settings, evaluated_identities, noise_seed
    from pogdiff.seeds import derive_seed

    class Index:  # 3 majority identities, 10 minority ones
        def identity_counts(self):
            return {**{i: 30 for i in range(3)}, **{i: 2 for i in range(3, 13)}}

    cfg = load_config(None, ["sample.few_ids=4", "output_dir=/nonexistent"])
    assert noise_seed(cfg) == cfg.sample.seed == 1234 and "noise_seed" not in _settings(cfg)  # a plain config: as before
    seeds = {s: {v: variant_config(cfg, v, s) for v in ("vanilla", "cbdm", "pogdiff")} for s in (0, 1, 2)}
    for s, runs in seeds.items():
        assert {noise_seed(r) for r in runs.values()} == {derive_seed(1234, s)}  # every variant of a seed: the same
        assert all(evaluated_identities(r, Index()) == evaluated_identities(cfg, Index()) for r in runs.values())
    assert len({noise_seed(seeds[s]["pogdiff"]) for s in seeds}) == 3  # the seeds: independent noise
    assert noise_seed(variant_config(seeds[1]["cbdm"], "pogdiff", 1)) == noise_seed(seeds[1]["pogdiff"])  # idempotent


def _metrics(per_few: dict, main: float = 5.0, by_guidance: dict | None = None) -> dict:
    """A metrics.json of a run scored on majority identity 0 and Few identities 3, 4 (2 training
    images each, 16 generated): metric -> {identity: value} for the Few ones; All = Few + identity 0 at 0."""
    def scored(few: dict) -> dict:
        per_id = {m: {"0": 0.0, **{str(i): v for i, v in few[m].items()}} for m in ("dino", "grecall", "fid")}
        summary = {}
        for m in ("dino", "grecall", "fid"):
            summary[f"{m}_few"] = float(np.mean(list(few[m].values())))
            summary[f"{m}_all"] = float(np.mean(list(per_id[m].values())))
        return {"summary": summary, "per_id": per_id}

    out = {**scored(per_few), "few_ids": [3, 4], "images_per_id": 16, "guidance_scale": main,
           "real_images": {"training": {"0": 30, "3": 2, "4": 2}, "heldout": {"0": 3}}}
    if by_guidance is not None:
        out["by_guidance"] = {repr(main): {k: out[k] for k in ("summary", "per_id")},
                              **{repr(g): scored(few) for g, few in by_guidance.items()}}
    return out


def test_sweep_summary_pairs_per_identity_with_ties_and_guidance(tmp_path):
    """write_summary on hand-made metrics.json files: seed means with W/T/L by seed, the paired
    differences per (Few identity, seed) with the identity bootstrap, the resolution, and the Few
    scores per guidance scale (sweep.csv's guidance column)."""
    from pogdiff.config import variant_config
    from pogdiff.experiment.sweep import point_configs, write_summary
    from pogdiff.runs import RunFiles, load_run_config

    text = (ROOT / "configs/sweep.yaml").read_text()
    (tmp_path / "s.yaml").write_text(text[:text.index("  points:")] + "  points:\n    paper: []\n    a3x4: [method.a3=4]\n")
    cfg = load_run_config(tmp_path / "s.yaml", [f"output_dir={tmp_path}", "experiment.seeds=[0,1]"])
    points = point_configs(cfg)
    point, base = points["paper"]
    dino = {3: 0.5, 4: 0.5}
    runs = {  # (variant, seed) -> Few per-identity grecall, fid
        ("pogdiff", 0): ({3: 0.5, 4: 1.0}, {3: 10.0, 4: 20.0}), ("pogdiff", 1): ({3: 0.5, 4: 0.5}, {3: 10.0, 4: 20.0}),
        ("vanilla", 0): ({3: 0.5, 4: 0.5}, {3: 12.0, 4: 20.0}), ("vanilla", 1): ({3: 0.0, 4: 0.5}, {3: 12.0, 4: 20.0}),
        ("cbdm", 0): ({3: 0.5, 4: 1.0}, {3: 10.0, 4: 20.0}), ("cbdm", 1): ({3: 1.0, 4: 1.0}, {3: 10.0, 4: 20.0})}
    for (variant, seed), (grecall, fid) in runs.items():
        few = {"dino": dino, "grecall": grecall, "fid": fid}
        extra = {1.0: {"dino": dino, "grecall": {3: 0.0, 4: 0.0}, "fid": fid}} if variant != "cbdm" else None
        path = RunFiles(variant_config(point if variant == "pogdiff" else base, variant, seed)).metrics
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(_metrics(few, by_guidance=extra)))
        if variant != "cbdm":  # the name probe and the caption swap in the runs' histories (mean over the last half)
            scale = 0.5 if variant == "pogdiff" else 1.0
            steps = [{"step": i, "text/swap/head": 0.02 * scale, "text/swap/tail": 0.04 * scale,
                      "text/name_swap/head": 0.01 * scale * (1 + seed), "text/name_swap/tail": (0.0 if i < 2 else 0.03),
                      "pair_share": 0.01} for i in range(4)]
            path.with_name("history.json").write_text(json.dumps({"history": steps}))

    md = write_summary(cfg, points, tmp_path / "out").read_text()
    assert "| point | caption swap, head | caption swap, tail | name swap, head | name swap, tail |" in md
    # name swap head: PoGDiff 0.005, 0.010 (seeds), Vanilla 0.010, 0.020: 0.5x; tail: the last half only, equal
    assert "| paper | 0.50x | 0.50x | 0.50x | 1.00x |  | 0.01 |" in md
    # seed means: grecall_few per seed 0.75, 0.5 against vanilla 0.5, 0.25 (2 wins) and cbdm 0.75, 1.0 (a tie, a loss)
    assert "| paper | (the config) | 0.500 [vanilla 0/2/0; cbdm 0/2/0] | 0.625 [vanilla 2/0/0; cbdm 0/1/1] | " \
           "15.000 [vanilla 2/0/0; cbdm 0/2/0] |" in md
    assert "| a3x4 | method.a3=4 |  |  |  |  |  |  |" in md  # not run yet: empty, not invented
    assert "- gRecall Few: steps of 1/2 per identity (the 2 Few identities have 2 training images each), " \
           "1/(2·2) = 1/4 for the mean over them." in md
    assert "- FID per identity: 16 generated images of the identity against its real images (2 training + 0 held-out)" in md
    assert "**lower is better for FID**" in md
    assert "| point | baseline | metric | identities | pairs | mean diff | 95% interval | W/T/L |" in md
    # grecall vs vanilla: identity 3 [0, +0.5], identity 4 [+0.5, 0]: every resample 0.25
    assert "| paper | vanilla | gRecall Few (↑) | 2 | 4 | +0.2500 | [+0.2500, +0.2500] | 2/2/0 |" in md
    # fid vs vanilla: identity 3 [-2, -2], identity 4 [0, 0]: resamples -2, -1, 0 -> [-2, 0]; lower is better
    assert "| paper | vanilla | FID Few (↓) | 2 | 4 | -1.0000 | [-2.0000, +0.0000] | 2/2/0 |" in md
    # against cbdm: equal on seed 0 (ties, not wins), -0.5 on both identities on seed 1
    assert "| paper | cbdm | gRecall Few (↑) | 2 | 4 | -0.2500 | [-0.2500, -0.2500] | 0/2/2 |" in md
    paired = list(csv.DictReader((tmp_path / "out" / "sweep_paired.csv").open()))
    assert list(paired[0]) == ["point", "baseline", "metric", "n_identities", "n_pairs", "mean_diff", "ci_low", "ci_high",
                               "wins", "ties", "losses"]
    assert [(r["point"], r["baseline"], r["metric"]) for r in paired] == \
        [("paper", b, f"{m}_few") for b in ("vanilla", "cbdm") for m in ("dino", "grecall", "fid")]
    fid = paired[2]
    assert (float(fid["mean_diff"]), float(fid["ci_low"]), float(fid["ci_high"])) == (-1.0, -2.0, 0.0)
    assert (fid["n_identities"], fid["n_pairs"], fid["wins"], fid["ties"], fid["losses"]) == ("2", "4", "2", "2", "0")
    # the same weights at guidance 1: a row per (point, variant, seed, scale); the main table is at 5
    rows = list(csv.DictReader((tmp_path / "out" / "sweep.csv").open()))
    assert list(rows[0])[:4] == ["point", "variant", "seed", "guidance"]
    assert sorted((r["variant"], r["seed"], float(r["guidance"])) for r in rows if r["point"] == "paper") == sorted(
        [(v, str(s), g) for v in ("pogdiff", "vanilla") for s in (0, 1) for g in (1.0, 5.0)]
        + [("cbdm", str(s), 5.0) for s in (0, 1)])
    assert "## Few scores per guidance scale" in md
    assert "| paper | pogdiff | 1 | 0.500 | 0.000 | 15.000 | 2 |" in md and "| paper | pogdiff | 5 | 0.500 | 0.625 | 15.000 | 2 |" in md
    assert "| paper, a3x4 | cbdm | 5 | 0.500 | 0.875 | 15.000 | 2 |" in md and "| cbdm | 1 |" not in md
    assert "| paper, a3x4 | vanilla | 1 | 0.500 | 0.000 | 16.000 | 2 |" in md  # the shared baseline runs, once
