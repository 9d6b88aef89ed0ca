"""``pogdiff <verb> CONFIG [key.path=value ...]``: the one command-line entry point.

Every verb takes every kind of ``data.source`` (synthetic, a JSONL/CSV manifest, an imagefolder, a
prepared directory): the data verbs resolve it to a prepared dataset first (pogdiff.data.dataset).
Paths in the config are made absolute against the current directory before anything runs.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from typing import Callable

from pogdiff.config import Config, ConfigError, to_yaml
from pogdiff.runs import load_run_config


def _config(cfg: Config) -> int:
    from pogdiff.dist.deepspeed_config import deepspeed_config

    deepspeed_config(cfg, cfg.dist.num_workers, cfg.dist.use_gpu)  # the DeepSpeed JSON, checked as preflight does
    print(to_yaml(cfg), end="")
    return 0


def _train(cfg: Config) -> int:
    from pogdiff.train.assembly import run_train

    result = run_train(cfg)
    print(json.dumps({"steps": result.steps, "first_loss": result.losses[0] if result.losses else None,
                      "last_loss": result.losses[-1] if result.losses else None, "seconds": round(result.seconds, 1)}))
    return 0


def _train_dist(cfg: Config) -> int:
    from pogdiff.dist.ray_driver import train_dist

    return train_dist(cfg)


def _index(cfg: Config) -> int:
    from pogdiff.data.dataset import build_neighbours, resolve_dataset

    stats = build_neighbours(cfg, resolve_dataset(cfg))
    if "recall_at_k" in stats:
        print(f"recall@{stats['k']} of {stats['index']} (nprobe {stats['nprobe']}) against exact search on "
              f"{stats['recall_sample']} queries: {stats['recall_at_k']:.4f}", file=sys.stderr)
    print(json.dumps(stats))
    return 0


def _density(cfg: Config) -> int:
    from pogdiff.data.dataset import psi_table_for, resolve_dataset, text_density

    ds = resolve_dataset(cfg)
    density, nll = text_density(cfg, ds)
    out = {"dataset": str(ds.root), "form": density.form, "anchor_nll": density.anchor_nll,
           "median_nll": density.median_nll}
    if density.form == "temperature":
        out["temperature"] = density.temperature
    if cfg.method.name.value == "pogdiff":
        out["psi"] = psi_table_for(cfg, ds)[1]
    print(json.dumps(out))
    return 0


def _prepare(cfg: Config) -> int:
    from pogdiff.data.prepare import PrepareError, output_location, prepare

    try:
        dataset = prepare(cfg)
    except PrepareError as e:
        print(f"pogdiff prepare: {e}", file=sys.stderr)
        return 2
    summary = dataset["summary"]
    print(f"pogdiff prepare: {summary['rows_in']} rows in = {summary['samples']} samples + {summary['heldout']} held out + "
          f"{summary['skipped_total']} skipped + {summary['not_selected']} not selected", file=sys.stderr)
    print(json.dumps({"output": output_location(cfg), "samples": dataset["num_samples"], "records": dataset["num_records"],
                      "heldout": summary["heldout"], "rows_in": summary["rows_in"], "shards": len(dataset["shards"]),
                      "skipped": summary["skipped"]}))
    return 0


def _sample(cfg: Config) -> int:
    from pogdiff.eval.sampling import sample_run
    from pogdiff.runs import RunFiles

    samples = sample_run(cfg)
    print(json.dumps({"samples": str(RunFiles(cfg).samples), "identities": len(samples),
                      "images": samples.num_images}))
    return 0


def _eval(cfg: Config) -> int:
    from pogdiff.eval import evaluate_run
    from pogdiff.runs import RunFiles

    result = evaluate_run(cfg)
    print(json.dumps({"metrics": str(RunFiles(cfg).metrics), **result["summary"]}))
    return 0


def _report(cfg: Config) -> int:
    from pogdiff.experiment.experiment import report_dir
    from pogdiff.experiment.report import write_report

    print(write_report(cfg, cfg.experiment.variants, cfg.experiment.seeds, report_dir(cfg)))
    return 0


def _experiment(cfg: Config) -> int:
    from pogdiff.experiment.experiment import run_experiment

    print(run_experiment(cfg))
    return 0


def _sweep(cfg: Config) -> int:
    from pogdiff.experiment.sweep import run_sweep

    print(run_sweep(cfg))
    return 0


def _pretrain(cfg: Config) -> int:
    from pogdiff.models.pretrain import pretrain

    summary = pretrain(cfg)
    print(json.dumps({k: summary[k] for k in ("images", "first_loss", "last_loss", "seconds", "go_no_go")}, indent=1))
    return 0


def _pretrain_encoder(cfg: Config) -> int:
    from pogdiff.models.ssl_encoder import pretrain_encoder

    stats = pretrain_encoder(cfg)
    print(json.dumps({k: stats[k] for k in ("images", "first_loss", "last_loss", "seconds", "go_no_go")}, indent=1))
    return 0


def _demo(cfg: Config) -> int:
    from pogdiff.experiment.demo import run_demo

    return run_demo(cfg)


# verb -> (handler, help). Each verb loads CONFIG with the overrides and hands it over.
VERBS: dict[str, tuple[Callable[[Config], int], str]] = {
    "config": (_config, "print the resolved config (file + overrides) as YAML"),
    "prepare": (_prepare, "data.source (synthetic, manifest, imagefolder) -> WebDataset shards + memory-mapped index"),
    "index": (_index, "kNN graph of the dataset's image embeddings with the FAISS neighbour service -> neighbour table"),
    "density": (_density, "the text-density VAE (Eq. 10-11) and psi (Eq. 12) beside the dataset"),
    "train": (_train, "one machine: stream the prepared dataset and train one method"),
    "train-dist": (_train_dist, "the cluster job: Ray Train workers with DeepSpeed ZeRO, checkpoints, resume, export"),
    "sample": (_sample, "DDIM images of every identity from the trained run of CONFIG's method and seed"),
    "eval": (_eval, "gRecall, DINO-style score and per-identity FID (All / Few) of the trained run"),
    "report": (_report, "tables, charts and sample grids over experiment.variants x experiment.seeds"),
    "experiment": (_experiment, "train every variant x seed on the same data, evaluate, report (configs/experiment.yaml)"),
    "pretrain": (_pretrain, "the tiny model's base: UNet + text encoder from scratch on disjoint balanced identities, with a go/no-go"),
    "sweep": (_sweep, "PoGDiff's settings one factor at a time against the baselines, cached; sweep.md and a Pareto figure"),
    "pretrain-encoder": (_pretrain_encoder, "the neighbours' learned image encoder (tiny-ssl): SimCLR on disjoint "
                         "unlabelled identities, with its go/no-go against the pixel encoder"),
    "demo": (_demo, "the end-to-end demo: prepare -> index -> density -> train-dist per method -> sample -> eval -> report"),
}

# Errors a user can act on: one line on stderr and exit 2, no traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from pogdiff.data.prepare import PrepareError
    from pogdiff.models.components import ModelLoadError

    from pogdiff.runs import LeaseHeld

    return ConfigError, PrepareError, ModelLoadError, LeaseHeld, FileNotFoundError


# The user's mistakes among OS errors (exit 2); any other (disk full, I/O) is a fault (exit 1).
USER_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EEXIST}


def os_error_line(e: OSError) -> tuple[int, str]:
    """(exit code, one line naming the path and what to do)."""
    from pogdiff.storage import StorageUnavailable

    if isinstance(e, StorageUnavailable):  # re-raised from a DataLoader worker, it carries the worker's traceback
        return 1, str(e).strip().splitlines()[-1].rsplit("StorageUnavailable: ", 1)[-1]
    where = e.filename if e.filename is not None else "?"
    what = f"{where}: {e.strerror or e}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return 1, f"{what}. Free space there and rerun: the run continues from its last checkpoint"
    if e.errno in USER_ERRNOS:
        return 2, f"{what}. Choose a writable output_dir (or fix the path's permissions) and rerun"
    return 1, f"{what}. Check the filesystem (or bucket) and rerun: the run continues from its last checkpoint"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pogdiff", description="PoGDiff fine-tuning on imbalanced image-text data")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (_, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text)
        p.add_argument("config", help="YAML file in configs/")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")  # `config`: errors only
    try:
        cfg = load_run_config(args.config, args.overrides)
        if args.verb != "config":  # object storage reachable (credentials, bucket, endpoint) before any work
            from pogdiff.storage import check_storage

            check_storage(cfg)
    except ConfigError as e:
        print(f"pogdiff: {e}", file=sys.stderr)
        return 2
    from pogdiff import console

    if args.verb != "config":
        from pogdiff.runs import RunFiles

        try:
            log_file = console.setup(RunFiles(cfg).root / "pogdiff.log")
        except OSError as e:
            code, line = os_error_line(e)
            print(f"pogdiff {args.verb}: cannot write the run's log: {line}", file=sys.stderr)
            return code
        logging.getLogger("pogdiff").info("pogdiff %s %s %s", args.verb, args.config, " ".join(args.overrides))
        print(f"pogdiff {args.verb}: log in {log_file}", file=sys.stderr)
    try:
        return VERBS[args.verb][0](cfg)
    except Exception as e:
        code = failure(args.verb, e)
        if code is None:
            raise
        return code


def failure(verb: str, e: BaseException) -> int | None:
    """The exit status for ``e`` after one line on stderr (its traceback to the log), or None for an
    error nobody expected (its traceback then is the report). An error raised inside a Ray task, actor
    or Ray Data stage is judged as itself, out of Ray's wrappers."""
    from pogdiff import console

    if "ray" in sys.modules:
        from pogdiff.dist.cluster import ray_actor_died, ray_cause

        if (died := ray_actor_died(e)) is not None:
            console.traceback_to_log(died)
            print(f"pogdiff {verb}: {died}; rerun to continue (finished parts are kept)", file=sys.stderr)
            return 1
        e = ray_cause(e)
    if isinstance(e, _user_errors()):
        line, code = str(e), 2
    elif isinstance(e, OSError):
        code, line = os_error_line(e)
    elif isinstance(e, FloatingPointError):  # the non-finite stop: its message says what to do
        line, code = str(e), 1
    else:
        return None
    console.traceback_to_log(f"pogdiff {verb}: {line}")
    print(f"pogdiff {verb}: {line}", file=sys.stderr)
    return code

if __name__ == "__main__":
    sys.exit(main())
