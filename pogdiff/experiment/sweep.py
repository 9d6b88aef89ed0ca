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
can change them (``changes_baselines``), so the points that only change PoGDiff's settings share
one set of baseline runs. An interrupted sweep continues where it stopped; the summary is
rewritten after every point. Writes ``sweep.md``, ``sweep.csv`` (point, variant, seed, guidance,
metrics: a row per guidance scale scored, see ``sample.guidance_scales``), ``sweep_paired.csv`` (each
point's PoGDiff minus each baseline per Few identity and seed: mean, identity-bootstrap 95% interval,
wins / ties / losses) and ``pareto.png`` under ``sweep.report_dir``.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pogdiff.config import Config, variant_config, with_overrides
from pogdiff.runs import RunFiles, absolute_paths, fingerprint

log = logging.getLogger("pogdiff.sweep")

KEYS = ("dino_few", "grecall_few", "fid_few", "dino_all", "grecall_all", "fid_all")
LOWER_IS_BETTER = {"fid_few", "fid_all"}
GUIDANCE_KEYS = ("dino_few", "grecall_few", "fid_few")
PAIRED_COLUMNS = ["point", "baseline", "metric", "n_identities", "n_pairs", "mean_diff", "ci_low", "ci_high",
                  "wins", "ties", "losses"]
PAIRED_TITLES = {"dino_few": "DINO-style Few (↑)", "grecall_few": "gRecall Few (↑)", "fid_few": "FID Few (↓)"}
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def changes_baselines(override: str, baselines: Sequence[str]) -> bool:
    """Whether a point's override can change its baselines' runs: not PoGDiff's own settings
    (``method.*``), its neighbours' encoder (``data.image_encoder``: Vanilla and CBDM read no
    neighbour), nor the text density's map (``density.*``, unless T2H, which reads the density, is a
    baseline)."""
    key = override.split("=", 1)[0].strip()
    own = key.startswith("method.") or key == "data.image_encoder" or (key.startswith("density.") and "t2h" not in baselines)
    return not own


def point_configs(cfg: Config) -> dict[str, tuple[Config, Config]]:
    """point -> (its PoGDiff experiment's config, its baselines' config); every override checked
    before anything runs (a bad one is a ConfigError, exit 2)."""
    out = {}
    for name, overrides in (cfg.sweep.points or {"config": []}).items():
        point = absolute_paths(with_overrides(cfg, [*overrides, f"run_name={cfg.run_name}-{name}",
                                                    "experiment.variants=[pogdiff]"]))
        shared = sorted(o for o in overrides if changes_baselines(o, cfg.sweep.baselines))
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
    """One row per (point, variant, seed, guidance scale) whose metrics exist: the main scale
    (sample.guidance_scale; "main": True) and each of metrics.json's ``by_guidance`` scales; each
    row keeps its per-identity values ("per_id") and its run's "metrics" (for the paired table and
    the resolution)."""
    rows = []
    for name, (point, base) in points.items():
        for variant, source in [("pogdiff", point), *((b, base) for b in base.experiment.variants)]:
            for seed in seeds:
                path = RunFiles(variant_config(source, variant, seed)).metrics
                if not path.is_file():
                    continue
                metrics = json.loads(path.read_text())
                main = float(metrics.get("guidance_scale", source.sample.guidance_scale))
                scored = {main: metrics}
                for key, at in metrics.get("by_guidance", {}).items():
                    scored.setdefault(float(key), at)
                for g, at in sorted(scored.items()):
                    rows.append({"point": name, "variant": variant, "seed": seed, "guidance": g, "main": g == main,
                                 **{k: at["summary"][k] for k in KEYS}, "per_id": at["per_id"], "metrics": metrics})
    return rows


def paired(rows: list[dict], point: str, baseline: str, metric: str) -> Optional[dict]:
    """PoGDiff at ``point`` minus ``baseline`` per Few identity and seed (the main guidance scale),
    raw (FID: negative is PoGDiff better): pogdiff.eval.metrics.paired_few."""
    from pogdiff.eval.metrics import paired_few

    def runs(variant: str) -> dict[int, dict]:
        return {r["seed"]: {"per_id": r["per_id"], "few_ids": r["metrics"].get("few_ids")} for r in rows
                if r["main"] and r["point"] == point and r["variant"] == variant}

    p = paired_few(runs("pogdiff"), runs(baseline), metric, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
    return None if p is None else {"point": point, "baseline": baseline, **p}


def _wtl(w: int, t: int, l: int) -> str:
    return f"{w}/{t}/{l}"


def write_summary(cfg: Config, points: dict[str, tuple[Config, Config]], out: Path) -> Path:
    from pogdiff.eval import resolution
    from pogdiff.eval.metrics import wins_ties_losses

    out.mkdir(parents=True, exist_ok=True)
    seeds, baselines = list(cfg.experiment.seeds), list(cfg.sweep.baselines)
    rows = collect(points, seeds)
    with (out / "sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["point", "variant", "seed", "guidance", *KEYS], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    main = [r for r in rows if r["main"]]
    value = {(r["point"], r["variant"], r["seed"]): r for r in main}
    md = [f"# PoGDiff sweep ({cfg.run_name})", "",
          f"Each point's PoGDiff against {', '.join(baselines)} on the same data and seeds {seeds}, sampled at "
          f"guidance {cfg.sample.guidance_scale}, {cfg.sample.images_per_id} images per identity. Per seed (and per "
          "guidance scale): `sweep.csv`.", "",
          "## Seed means", "",
          "The mean over seeds; in brackets, per baseline, the seeds where PoGDiff's mean is better / equal / "
          "worse (W/T/L, paired by seed; higher is better for DINO-style and gRecall, lower for FID).", "",
          "| point | overrides | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    for name in points:
        cells = []
        for key in KEYS:
            mine = [value[(name, "pogdiff", s)][key] for s in seeds if (name, "pogdiff", s) in value]
            if not mine:
                cells.append("")
                continue
            counts = []
            for b in baselines:
                diffs = [value[(name, "pogdiff", s)][key] - value[(name, b, s)][key] for s in seeds
                         if (name, "pogdiff", s) in value and (name, b, s) in value]
                if diffs:
                    counts.append(f"{b} {_wtl(*wins_ties_losses(diffs, key in LOWER_IS_BETTER))}")
            cells.append(f"{np.mean(mine):.3f}" + (f" [{'; '.join(counts)}]" if counts else ""))
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

    resolutions = {}  # the resolution's text -> the points it holds for
    for name in points:
        first = next((r["metrics"] for r in main if r["point"] == name), None)
        if first is not None:
            resolutions.setdefault("\n".join(resolution(first)), []).append(name)
    res_md = []
    for text, names in resolutions.items():
        if len(resolutions) > 1:
            res_md.append(f"Points {', '.join(names)}:")
        res_md += text.split("\n")
    md += ["", "Resolution:", "", *res_md]

    table = [p for name in points for b in baselines for m in ("dino", "grecall", "fid")
             if (p := paired(rows, name, b, m)) is not None]
    with (out / "sweep_paired.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, PAIRED_COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    md += ["", "## Paired differences per Few identity", "",
           "PoGDiff − baseline on the same Few identity and seed (the raw difference: higher is better for "
           "DINO-style and gRecall, **lower is better for FID**, so a negative FID difference favours PoGDiff). "
           "Every (identity, seed) pair is one difference; the mean over them, and a 95% percentile bootstrap "
           f"interval ({BOOTSTRAP_RESAMPLES:,} resamples of the identities with replacement, each identity's seeds "
           f"together, seed {BOOTSTRAP_SEED}). W/T/L: the pairs where PoGDiff is better / equal / worse. "
           "Also in `sweep_paired.csv`.", "",
           "| point | baseline | metric | identities | pairs | mean diff | 95% interval | W/T/L |",
           "|---|---|---|---|---|---|---|---|"]
    for p in table:
        md.append(f"| {p['point']} | {p['baseline']} | {PAIRED_TITLES[p['metric']]} | {p['n_identities']} | "
                  f"{p['n_pairs']} | {p['mean_diff']:+.4f} | [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}] | "
                  f"{_wtl(p['wins'], p['ties'], p['losses'])} |")
    if not table:
        md.append("| (no PoGDiff and baseline runs scored on the same seeds yet) | | | | | | | |")
    md += ["", *res_md]

    if any("by_guidance" in r["metrics"] for r in rows):
        scales = sorted({r["guidance"] for r in rows})
        md += ["", "## Few scores per guidance scale", "",
               "The same trained weights sampled at each guidance scale (sample.guidance_scales); the mean over "
               "seeds (higher is better for DINO-style and gRecall, lower for FID).", "",
               "| point | variant | guidance | dino_few | grecall_few | fid_few | seeds |", "|---|---|---|---|---|---|---|"]
        groups = [([name], "pogdiff") for name in points]  # (the points the runs stand for, variant)
        groups += [(names, b) for b in baselines for names in shared.values()]  # shared baseline runs: once
        for names, variant in groups:
            for g in scales:
                at = [r for r in rows if r["point"] == names[0] and r["variant"] == variant and r["guidance"] == g]
                if at:
                    md.append(f"| {', '.join(names)} | {variant} | {g:g} | "
                              + " | ".join(f"{np.mean([r[k] for r in at]):.3f}" for k in GUIDANCE_KEYS)
                              + f" | {len(at)} |")
        md += ["", *res_md]
    md += diagnostics_table(points, seeds, baselines)
    md += ["", "![Pareto](pareto.png)", ""]
    pareto(main, points, baselines, out / "pareto.png")
    (out / "sweep.md").write_text("\n".join(md) + "\n")
    return out / "sweep.md"


PROBES = ("text/swap/head", "text/swap/tail", "text/name_swap/head", "text/name_swap/tail")


def diagnostics_table(points: dict[str, tuple[Config, Config]], seeds: Sequence[int], baselines: Sequence[str]) -> list[str]:
    """Each point's conditioning diagnostics (pogdiff.train.diagnostics, the report's reading of each
    run's history): the UNet's sensitivity to another identity's whole caption and to its name alone,
    head and tail, as a ratio to the Vanilla runs beside the point (when Vanilla is a baseline)."""
    from pogdiff.experiment.report import diagnostics

    rows = []
    for name, (point, base) in points.items():
        mine = diagnostics(point, ["pogdiff"], seeds).get("pogdiff")
        ref = diagnostics(base, ["vanilla"], seeds).get("vanilla") if "vanilla" in baselines else None
        if mine:
            ratio = [f"{mine[k] / ref[k]:.2f}x" if ref and mine.get(k) is not None and ref.get(k) else ""
                     for k in PROBES]
            rows.append(f"| {name} | " + " | ".join(ratio) + " | " + " | ".join(
                "" if mine.get(k) is None else f"{mine[k]:.3g}"
                for k in ("partner/same_identity/tail", "pair_share")) + " |")
    if not rows:
        return []
    return ["", "## Conditioning diagnostics", "",
            "How much PoGDiff's UNet changes its prediction when the caption is swapped for another identity's "
            "(whole caption) or when only the name is swapped (the rest of the caption kept), as a ratio to "
            "Vanilla's on the same data and seeds (below 1: PoGDiff uses its caption, or the name, less); then "
            "the share of tail samples' drawn y' of their own identity and the pair term's share of the loss. "
            "Each run's mean over its last half of logged steps, then the mean over seeds.", "",
            "| point | caption swap, head | caption swap, tail | name swap, head | name swap, tail | "
            "y' same id, tail | pair share |", "|---|---|---|---|---|---|---|", *rows]


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
