"""The README's main job, through exactly the path a user's data takes:

    data.source -> prepare (once) -> index -> density -> train-dist for each method -> sample -> eval -> report

Training is the cluster job itself (pogdiff.dist.ray_driver) on an embedded local Ray cluster:
``dist.num_workers`` workers, DeepSpeed ZeRO (``dist.zero_stage``), gloo and fp32 on CPU. The
summary is ``<output_dir>/<run_name>/summary.json``, the report ``<output_dir>/<run_name>/report/report.md``.
"""
from __future__ import annotations

import json
import time
from pogdiff.config import METHODS, Config, variant_config
from pogdiff.runs import RunFiles, write_json


def run_demo(cfg: Config) -> int:
    from pogdiff.data.dataset import build_neighbours, neighbours_dir, prepare_artifacts, resolve_dataset, text_density
    from pogdiff.dist.cluster import job_session
    from pogdiff.dist.ray_driver import check_cluster, run
    from pogdiff.experiment.experiment import evaluate_runs

    t0 = time.perf_counter()
    # one embedded cluster for prepare's pipeline, the FAISS actors and every method's training;
    # this machine's CPUs (more only with dist.allow_oversubscribe), checked before any work
    with job_session(cfg):
        check_cluster(cfg)
        ds = resolve_dataset(cfg)
        if not (neighbours_dir(cfg, ds) / "stats.json").is_file():
            build_neighbours(cfg, ds)
        text_density(cfg, ds)
        counts = ds.index.identity_counts()
        run_dir = RunFiles(cfg).root
        summary = {"run_dir": str(run_dir), "dataset": str(ds.root), "samples": len(ds), "identities": len(counts),
                   "workers": cfg.dist.num_workers, "zero_stage": cfg.dist.zero_stage, "methods": {}}
        for method in METHODS:
            mcfg = variant_config(cfg, method, cfg.train.seed)
            psi = prepare_artifacts(mcfg, ds)
            result = run(mcfg)
            summary["methods"][method] = {"steps": result.steps, "first_loss": result.losses[0],
                                          "last_loss": result.losses[-1], "seconds": round(result.seconds, 1),
                                          "psi": psi}
    report = evaluate_runs(cfg, METHODS, [cfg.train.seed], out=run_dir / "report")
    summary["report"] = str(report)
    for method in METHODS:
        metrics = RunFiles(variant_config(cfg, method, cfg.train.seed)).metrics
        if metrics.is_file():
            scored = json.loads(metrics.read_text())
            summary["methods"][method].update(metrics=scored["summary"], metrics_valid=scored["valid"])
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(run_dir / "summary.json", summary)
    print(json.dumps(summary, indent=1))
    return 0
