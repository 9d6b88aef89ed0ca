"""``pogdiff <verb> CONFIG [key.path=value ...]``: the one command-line entry point."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from .config import Config, ConfigError, load_config, to_yaml


def _config(cfg: Config) -> int:
    print(to_yaml(cfg), end="")
    return 0


def _train(cfg: Config) -> int:
    from .pipeline import stage_train

    result = stage_train(cfg)
    print(json.dumps({"steps": result.steps, "first_loss": result.losses[0] if result.losses else None,
                      "last_loss": result.losses[-1] if result.losses else None, "seconds": round(result.seconds, 1)}))
    return 0


def _train_dist(cfg: Config) -> int:
    from .dist.ray_driver import train_dist

    return train_dist(cfg)


def _index(cfg: Config) -> int:
    from .dist.knn_graph import run_index

    stats = run_index(cfg)
    if "recall_at_k" in stats:
        print(f"recall@{stats['k']} of {stats['index']} (nprobe {stats['nprobe']}) against exact search on "
              f"{stats['recall_sample']} queries: {stats['recall_at_k']:.4f}", file=sys.stderr)
    print(json.dumps(stats))
    return 0


def _prepare(cfg: Config) -> int:
    from .prepare import PrepareError, output_dir, prepare

    try:
        dataset = prepare(cfg)
    except PrepareError as e:
        print(f"pogdiff prepare: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"output": str(output_dir(cfg)), "samples": dataset["num_samples"], "records": dataset["num_records"],
                      "shards": len(dataset["shards"]), "skipped": dataset["summary"]["skipped"]}))
    return 0


def _sample(cfg: Config) -> int:
    from .sampling import sample_run, samples_dir

    try:
        images = sample_run(cfg)
    except FileNotFoundError as e:
        print(f"pogdiff sample: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"samples": str(samples_dir(cfg)), "identities": len(images),
                      "images": sum(len(v) for v in images.values())}))
    return 0


def _eval(cfg: Config) -> int:
    from .eval import evaluate_run, metrics_path

    try:
        result = evaluate_run(cfg)
    except FileNotFoundError as e:
        print(f"pogdiff eval: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"metrics": str(metrics_path(cfg)), **result["summary"]}))
    return 0


def _report(cfg: Config) -> int:
    from .experiment import report_dir
    from .report import write_report

    print(write_report(cfg, cfg.experiment.variants, cfg.experiment.seeds, report_dir(cfg)))
    return 0


def _experiment(cfg: Config) -> int:
    from .experiment import run_experiment

    print(run_experiment(cfg))
    return 0


def _demo(cfg: Config) -> int:
    from .demo import run_demo

    return run_demo(cfg)


# verb -> (handler, help). Each verb loads CONFIG with the overrides and hands it over.
VERBS: dict[str, tuple[Callable[[Config], int], str]] = {
    "config": (_config, "print the resolved config (file + overrides) as YAML"),
    "prepare": (_prepare, "image folder + manifest (or synthetic) -> WebDataset shards with precomputed latents + index"),
    "train": (_train, "encode the data, build neighbours and density, train on one machine"),
    "train-dist": (_train_dist, "the cluster job: Ray Train workers with DeepSpeed ZeRO, checkpoints, resume, export"),
    "index": (_index, "kNN graph of the dataset's image embeddings with the FAISS neighbour service -> neighbour table"),
    "sample": (_sample, "DDIM images of every identity from the trained run of CONFIG's method and seed"),
    "eval": (_eval, "gRecall, DINO-style score and per-identity FID (All / Few) of the trained run"),
    "report": (_report, "tables, charts and sample grids over experiment.variants x experiment.seeds"),
    "experiment": (_experiment, "train every variant x seed on the same data, evaluate, report (configs/experiment.yaml)"),
    "demo": (_demo, "the end-to-end demo: data -> neighbours -> density -> train every method -> summary"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pogdiff", description="PoGDiff fine-tuning on imbalanced image-text data")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (_, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text)
        p.add_argument("config", help="YAML file in configs/")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"pogdiff: {e}", file=sys.stderr)
        return 2
    return VERBS[args.verb][0](cfg)


if __name__ == "__main__":
    sys.exit(main())
