"""``pogdiff experiment``: Vanilla, CBDM, T2H, PoGDiff and the Table 6 ablations on the same data,
steps and seeds, each sampled and scored, then one report.

Every stage is cached on disk (features, neighbours, density, each run's pipeline, samples and
metrics), so an interrupted experiment picks up where it stopped. Runs are ordered seed-major: if
time runs short, every variant has the same seeds done, and the report covers what exists.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Sequence

from pogdiff.config import Config, variant_config
from pogdiff.runs import RunFiles

log = logging.getLogger("pogdiff.experiment")


def is_trained(cfg: Config) -> bool:
    """The run finished ``train.steps`` steps and exported its pipeline."""
    import json

    files = RunFiles(cfg)
    if not files.history.is_file() or files.export_marker() is None:
        return False
    history = json.loads(files.history.read_text())["history"]
    return bool(history) and history[-1]["step"] == cfg.train.steps


def report_dir(cfg: Config) -> Path:
    return Path(cfg.experiment.report_dir) if cfg.experiment.report_dir else RunFiles(cfg).root / "report"


def evaluate_runs(cfg: Config, variants: Sequence[str], seeds: Sequence[int], out: Optional[Path] = None,
                  progress: bool = True) -> Path:
    """Sample, score and report every trained (variant, seed) run of ``cfg``'s run; runs not trained
    yet are left out of the report. Returns the report's markdown file."""
    from pogdiff.data.dataset import resolve_dataset
    from pogdiff.eval import evaluate_reference, evaluate_run, real_embeddings
    from pogdiff.eval.recognizer import eval_encoder
    from pogdiff.experiment.report import write_report

    ds = resolve_dataset(cfg, progress)
    encoder = eval_encoder(cfg, ds, progress)
    real = real_embeddings(cfg, ds, encoder, cfg.sample.images_per_id)
    evaluate_reference(cfg, ds, encoder, real)
    for seed in seeds:
        for variant in variants:
            vcfg = variant_config(cfg, variant, seed)
            if is_trained(vcfg):
                evaluate_run(vcfg, progress, encoder=encoder, real=real, ds=ds)
    return write_report(cfg, variants, seeds, out or report_dir(cfg))


def run_experiment(cfg: Config, progress: bool = True) -> Path:
    """Every variant x seed on one machine (``pogdiff train``'s path), each scored, then the report."""
    from pogdiff.data.dataset import prepare_artifacts, resolve_dataset
    from pogdiff.eval import evaluate_reference, evaluate_run, real_embeddings
    from pogdiff.eval.recognizer import eval_encoder
    from pogdiff.experiment.report import write_report
    from pogdiff.train.assembly import run_train

    t0 = time.perf_counter()
    variants, seeds = list(cfg.experiment.variants), list(cfg.experiment.seeds)
    ds = resolve_dataset(cfg, progress)
    encoder = eval_encoder(cfg, ds, progress)
    real = real_embeddings(cfg, ds, encoder, cfg.sample.images_per_id)
    evaluate_reference(cfg, ds, encoder, real)
    out = report_dir(cfg)
    for seed in seeds:
        for variant in variants:
            vcfg = variant_config(cfg, variant, seed)
            prepare_artifacts(vcfg, ds, progress)
            if not is_trained(vcfg):
                log.info("training %s seed %d (%.0f s into the experiment)", variant, seed, time.perf_counter() - t0)
                run_train(vcfg, progress=progress)
            summary = evaluate_run(vcfg, progress, encoder=encoder, real=real, ds=ds)["summary"]
            log.info("%s seed %d: %s", variant, seed, {k: round(v, 4) for k, v in summary.items()})
        write_report(cfg, variants, seeds, out)  # after every seed: a partial report is always there
    log.info("experiment done in %.0f s; report at %s", time.perf_counter() - t0, out / "report.md")
    return out / "report.md"
