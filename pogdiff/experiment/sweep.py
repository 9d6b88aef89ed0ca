"""``pogdiff sweep CONFIG``: PoGDiff's settings one factor at a time, each against the baselines on
the same data and seeds, and where they land on identity (DINO-style, gRecall) against fidelity
(FID), on the Few identities.

    sweep:
      points:                          # name -> dotted overrides of the config
        paper: []
        a3x4: [method.a3=4]            # the pair term at a quarter of its weight
        stop: [method.grad_mode=stop]
        ssl: [data.image_encoder=tiny-ssl]
      baselines: [vanilla, cbdm]

Each point is an experiment of its own (``run_experiment``: every stage cached on disk), PoGDiff
under ``<run_name>-<point>``. The baselines run under a name made of the point's overrides that
can change them (those outside ``method.``), so the points that only change PoGDiff's settings
share one set of baseline runs. An interrupted sweep continues where it stopped; the summary is
rewritten after every point. Writes ``sweep.md``, ``sweep.csv`` (point, variant, seed, metrics) and
``pareto.png`` under ``sweep.report_dir``.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from pogdiff.config import Config, variant_config, with_overrides
from pogdiff.runs import RunFiles, absolute_paths, fingerprint

log = logging.getLogger("pogdiff.sweep")

KEYS = ("dino_few", "grecall_few", "fid_few", "dino_all", "grecall_all", "fid_all")
LOWER_IS_BETTER = {"fid_few", "fid_all"}


def point_configs(cfg: Config) -> dict[str, tuple[Config, Config]]:
    """point -> (its PoGDiff experiment's config, its baselines' config); every override checked
    before anything runs (a bad one is a ConfigError, exit 2)."""
    out = {}
    for name, overrides in (cfg.sweep.points or {"config": []}).items():
        point = absolute_paths(with_overrides(cfg, [*overrides, f"run_name={cfg.run_name}-{name}",
                                                    "experiment.variants=[pogdiff]"]))
        shared = sorted(o for o in overrides if not o.startswith("method."))
        suffix = f"-{fingerprint(shared, 8)}" if shared else ""
        base = absolute_paths(with_overrides(cfg, [*shared, f"run_name={cfg.run_name}-base{suffix}",
                                                   f"experiment.variants=[{','.join(cfg.sweep.baselines)}]"]))
        out[name] = (point, base)
    return out


def report_dir(cfg: Config) -> Path:
    return Path(cfg.sweep.report_dir) if cfg.sweep.report_dir else RunFiles(cfg).root / "sweep"


def run_sweep(cfg: Config, progress: bool = True) -> Path:
    from pogdiff.experiment.experiment import run_experiment

    points = point_configs(cfg)
    for name, (point, base) in points.items():
        log.info("sweep point %s: %s", name, cfg.sweep.points.get(name) or "the config as it is")
        run_experiment(base, progress)
        run_experiment(point, progress)
        write_summary(cfg, points, report_dir(cfg))
    return report_dir(cfg) / "sweep.md"


def collect(points: dict[str, tuple[Config, Config]], seeds: Sequence[int]) -> list[dict]:
    """One row per (point, variant, seed) whose metrics exist."""
    rows = []
    for name, (point, base) in points.items():
        for variant, source in [("pogdiff", point), *((b, base) for b in base.experiment.variants)]:
            for seed in seeds:
                metrics = RunFiles(variant_config(source, variant, seed)).metrics
                if metrics.is_file():
                    summary = json.loads(metrics.read_text())["summary"]
                    rows.append({"point": name, "variant": variant, "seed": seed, **{k: summary[k] for k in KEYS}})
    return rows


def write_summary(cfg: Config, points: dict[str, tuple[Config, Config]], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    seeds, baselines = list(cfg.experiment.seeds), list(cfg.sweep.baselines)
    rows = collect(points, seeds)
    with (out / "sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["point", "variant", "seed", *KEYS])
        writer.writeheader()
        writer.writerows(rows)
    value = {(r["point"], r["variant"], r["seed"]): r for r in rows}
    md = [f"# PoGDiff sweep ({cfg.run_name})", "",
          f"Each point's PoGDiff against {', '.join(baselines)} on the same data and seeds {seeds}; "
          "the mean over seeds, and in brackets the seeds where PoGDiff is at least as good as each baseline "
          "(paired by seed). Per seed: `sweep.csv`.", "",
          "| point | overrides | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    for name in points:
        cells = []
        for key in KEYS:
            mine = [value[(name, "pogdiff", s)][key] for s in seeds if (name, "pogdiff", s) in value]
            if not mine:
                cells.append("")
                continue
            wins = []
            for b in baselines:
                pairs = [(value[(name, "pogdiff", s)][key], value[(name, b, s)][key]) for s in seeds
                         if (name, "pogdiff", s) in value and (name, b, s) in value]
                better = sum((p <= q) if key in LOWER_IS_BETTER else (p >= q) for p, q in pairs)
                wins.append(f"{better}/{len(pairs)}")
            cells.append(f"{np.mean(mine):.3f} [{' '.join(wins)}]")
        md.append(f"| {name} | {' '.join(cfg.sweep.points.get(name, [])) or '(the config)'} | " + " | ".join(cells) + " |")
    shared = {}  # baseline runs -> the points they stand beside
    for name, (_, base) in points.items():
        shared.setdefault(base.run_name, []).append(name)
    for b in baselines:
        for names in shared.values():
            vals = {k: [value[(names[0], b, s)][k] for s in seeds if (names[0], b, s) in value] for k in KEYS}
            if any(vals.values()):
                md.append(f"| {b} (beside {', '.join(names)}) | | "
                          + " | ".join(f"{np.mean(v):.3f}" if v else "" for v in vals.values()) + " |")
    md += ["", "![Pareto](pareto.png)", ""]
    pareto(rows, points, baselines, out / "pareto.png")
    (out / "sweep.md").write_text("\n".join(md) + "\n")
    return out / "sweep.md"


def pareto(rows: list[dict], points, baselines: Sequence[str], path: Path) -> None:
    """DINO-style Few and gRecall Few against FID Few, seed means: PoGDiff per point, the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean(point: str, variant: str, key: str):
        vals = [r[key] for r in rows if r["point"] == point and r["variant"] == variant]
        return float(np.mean(vals)) if vals else None

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "dino_few", "DINO-style Few ↑"), (axes[1], "grecall_few", "gRecall Few ↑")):
        for name in points:
            x, y = mean(name, "pogdiff", "fid_few"), mean(name, "pogdiff", key)
            if x is not None:
                ax.scatter(x, y, color="tab:red")
                ax.annotate(name, (x, y), fontsize=8)
        firsts = list({base.run_name: n for n, (_, base) in reversed(list(points.items()))}.values())
        for b, marker in zip(baselines, "sPD^"):
            xs = [mean(n, b, "fid_few") for n in firsts]
            ys = [mean(n, b, key) for n in firsts]
            pts = [(x, y) for x, y in zip(xs, ys) if x is not None]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color="tab:gray", label=b)
        ax.set_xlabel("FID Few ↓")
        ax.set_ylabel(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
