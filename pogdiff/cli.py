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


def _demo(cfg: Config) -> int:
    from .demo import run_demo

    return run_demo(cfg)


# verb -> (handler, help). Each verb loads CONFIG with the overrides and hands it over.
VERBS: dict[str, tuple[Callable[[Config], int], str]] = {
    "config": (_config, "print the resolved config (file + overrides) as YAML"),
    "train": (_train, "encode the data, build neighbours and density, train on one machine"),
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
