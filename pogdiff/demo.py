"""The README's main job: every method on the same data, steps and seed, then sampling, metrics
and the report (``<run>/report/report.md``).

Training is the cluster job itself (pogdiff.dist.ray_driver) on an embedded local Ray cluster:
``dist.num_workers`` workers, DeepSpeed ZeRO (``dist.zero_stage``), gloo and fp32 on CPU.
"""
from __future__ import annotations

import dataclasses
import json
import time

from .config import Config, Method
from .pipeline import RunFiles, stage_density, stage_features, stage_neighbours

DEMO_METHODS = (Method.vanilla, Method.cbdm, Method.t2h, Method.pogdiff)


def run_demo(cfg: Config) -> int:
    import ray

    from .dist.ray_driver import connect, run

    t0 = time.perf_counter()
    feats = stage_features(cfg)
    stage_neighbours(cfg, feats)
    stage_density(cfg, feats)
    summary = {"run_dir": str(cfg.run_dir), "samples": len(feats), "identities": len(feats.id_counts()),
               "workers": cfg.dist.num_workers, "zero_stage": cfg.dist.zero_stage, "methods": {}}
    started = connect(cfg)
    try:
        for method in DEMO_METHODS:
            mcfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name=method))
            result = run(mcfg)
            history = json.loads(RunFiles(mcfg).history.read_text())
            summary["methods"][method.value] = {
                "steps": result.steps, "first_loss": result.losses[0], "last_loss": result.losses[-1],
                "seconds": round(result.seconds, 1), "psi": history["psi"],
            }
    finally:
        if started:
            ray.shutdown()
    from .experiment import evaluate_runs

    report = evaluate_runs(cfg, [m.value for m in DEMO_METHODS], [cfg.train.seed], out=cfg.run_dir / "report")
    summary["report"] = str(report)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0
