"""The README's main job on one machine: every method on the same data, steps and seed, then a summary."""
from __future__ import annotations

import dataclasses
import json
import time

from .config import Config, Method
from .pipeline import RunFiles, stage_density, stage_features, stage_neighbours, stage_train

DEMO_METHODS = (Method.vanilla, Method.cbdm, Method.t2h, Method.pogdiff)


def run_demo(cfg: Config) -> int:
    t0 = time.perf_counter()
    feats = stage_features(cfg)
    stage_neighbours(cfg, feats)
    stage_density(cfg, feats)
    summary = {"run_dir": str(cfg.run_dir), "samples": len(feats), "identities": len(feats.id_counts()), "methods": {}}
    for method in DEMO_METHODS:
        mcfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name=method))
        result = stage_train(mcfg)
        history = json.loads(RunFiles(mcfg).history.read_text())
        summary["methods"][method.value] = {
            "first_loss": result.losses[0], "last_loss": result.losses[-1],
            "seconds": round(result.seconds, 1), "psi": history["psi"],
        }
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0
