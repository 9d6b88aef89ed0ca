"""``pogdiff report``: the experiment's tables (shaped like the paper's Tables 1, 2, 5, 6) as
markdown and CSV, per-identity bar charts, side-by-side sample grids, psi histograms and loss
curves, on one markdown page. Reads what ``pogdiff eval`` / ``experiment`` wrote; runs that are
missing are listed, never invented. Values are mean ± std (ddof 1) over training seeds.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pogdiff.config import ABLATION, METHODS, Config, variant_config
from pogdiff.eval import METRICS, few_ids, metrics_path, resolution
from pogdiff.eval.metrics import paired_few, wins_ties_losses
from pogdiff.eval.sampling import evaluated_identities
from pogdiff.runs import RunFiles, atomic_write

LABELS = {"vanilla": "Vanilla", "cbdm": "CBDM", "t2h": "T2H", "pogdiff": "PoGDiff (ours)",
          "pogdiff-no_psi_img": "w/o ψ_img", "pogdiff-no_psi_inv": "w/o ψ_inv", "pogdiff-stop": "stop-gradient y'",
          "pogdiff-a3x16": "ψ / 16 (issue 22's sweep's best)", "pogdiff-a2x16": "a2 = 16 (identity preference)",
          "reference": "Real images (reference)", "reference_vae": "Real images through the VAE (ceiling)"}
METRIC_TITLES = {"fid": "FID ↓", "dino": "DINO-style ↑", "grecall": "gRecall ↑"}
LOWER_IS_BETTER = {"fid"}
# name -> (caption, rows, metrics, with the real-image reference row)
TABLES = {
    "table1_fid": ("Table 1. FID per identity (recogniser features), averaged over identities.", METHODS, ["fid"], True),
    "table2_dino": ("Table 2. DINO-style score: cosine similarity to held-out real images.", METHODS, ["dino"], True),
    "table5_grecall": ("Table 5. gRecall.", METHODS, ["grecall"], True),
    "table6_ablation": ("Table 6. Ablations of PoGDiff (w/o y' is Vanilla).", ABLATION, list(METRICS), False),
}


def collect(cfg: Config, variants: Sequence[str], seeds: Sequence[int]) -> dict[str, dict[int, dict]]:
    """variant -> seed -> metrics.json contents, for the runs that have been scored."""
    out: dict[str, dict[int, dict]] = {}
    for v in variants:
        for s in seeds:
            path = metrics_path(variant_config(cfg, v, s))
            if path.is_file():
                out.setdefault(v, {})[s] = json.loads(path.read_text())
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "—"
    m, s = mean_std(values)
    return f"{m:.3f}" if math.isnan(s) else f"{m:.3f} ± {s:.3f}"


def _values(results: dict, variant: str, key: str) -> list[float]:
    return [r["summary"][key] for _, r in sorted(results.get(variant, {}).items())]


def table(results: dict, reference: Optional[dict], rows: list[str], metrics: list[str]) -> tuple[str, list[list]]:
    """(markdown, csv rows) of one table; the best mean of each column is bold."""
    cols = [(m, split) for m in metrics for split in ("all", "few")]
    best = {}
    for m, split in cols:
        means = {v: mean_std(_values(results, v, f"{m}_{split}"))[0] for v in rows if _values(results, v, f"{m}_{split}")}
        if means:
            best[(m, split)] = (min if m in LOWER_IS_BETTER else max)(means, key=means.get)
    head = "| Method | " + " | ".join(f"{METRIC_TITLES[m]} {split.capitalize()}" for m, split in cols) + " | seeds |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    csv_rows = [["method"] + [f"{m}_{split}_{stat}" for m, split in cols for stat in ("mean", "std")] + ["seeds"]]
    for v in rows:
        cells, numbers = [], []
        for m, split in cols:
            vals = _values(results, v, f"{m}_{split}")
            cells.append(f"**{_cell(vals)}**" if best.get((m, split)) == v else _cell(vals))
            numbers += list(mean_std(vals)) if vals else ["", ""]
        n = len(results.get(v, {}))
        lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + f" | {n} |")
        csv_rows.append([v] + numbers + [n])
    for name, ref in (reference or {}).items():
        cells = [f"{ref['summary'][f'{m}_{split}']:.3f}" for m, split in cols]
        lines.append(f"| *{LABELS[name]}* | " + " | ".join(cells) + " | — |")
        csv_rows.append([name] + [x for m, split in cols for x in (ref["summary"][f"{m}_{split}"], "")] + [""])
    return "\n".join(lines), csv_rows


def _write_csv(path: Path, rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_per_identity(results: dict, names: dict[int, str], few: set[int], variants: list[str], path: Path) -> None:
    plt = _plt()
    ids = sorted(names)
    fig, axes = plt.subplots(len(METRICS), 1, figsize=(max(8, 0.9 * len(ids) * len(variants) / 3), 3.2 * len(METRICS)))
    width = 0.8 / max(1, len(variants))
    for ax, m in zip(axes, METRICS):
        for k, v in enumerate(variants):
            runs = results.get(v, {})
            if not runs:
                continue
            per = np.array([[r["per_id"][m][str(i)] for i in ids] for r in runs.values()])
            err = per.std(0, ddof=1) if len(per) > 1 else None
            ax.bar(np.arange(len(ids)) + (k - (len(variants) - 1) / 2) * width, per.mean(0), width, yerr=err,
                   label=LABELS[v], capsize=2)
        ax.set_xticks(np.arange(len(ids)), [f"{names[i]}\n({'few' if i in few else 'many'})" for i in ids],
                      fontsize=7, rotation=30)
        ax.set_ylabel(METRIC_TITLES[m])
        for j, i in enumerate(ids):
            if i in few:
                ax.axvspan(j - 0.45, j + 0.45, color="0.92", zorder=0)
    axes[0].legend(fontsize=7, ncol=min(6, len(variants)))
    axes[0].set_title("Per identity (mean ± std over seeds; shaded: minority identities)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(cfg: Config, ds, identity: int, name: str, variants: list[str], seed: int, path: Path, n: int = 8) -> None:
    """Training images of ``identity`` on top, then each method's first ``n`` samples (one seed)."""
    import io

    from PIL import Image

    from pogdiff.eval.sampling import load_samples

    plt = _plt()
    gt = []
    for _, ident, png in ds.index.images():
        if ident == identity and len(gt) < n:
            gt.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    rows = [("training images", gt)]
    for v in variants:
        samples = load_samples(variant_config(cfg, v, seed))
        if samples is not None and identity in samples:
            rows.append((f"{LABELS[v]} (seed {seed})", list(samples[identity][:n])))
    if not gt:
        return
    fig, axes = plt.subplots(len(rows), 1, figsize=(n * 0.9 + 1.5, 1.05 * len(rows)))
    axes = np.atleast_1d(axes)
    blank = np.full_like(gt[0], 255)
    for ax, (label, ims) in zip(axes, rows):
        ims = ims + [blank] * (n - len(ims))
        ax.imshow(np.concatenate([np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=255) for im in ims], 1),
                  interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    count = ds.index.identity_counts()[identity]
    axes[0].set_title(f"'{cfg.sample.prompt_template.format(p=name)}'  ({count} training images)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_psi(cfg: Config, ds, variants: list[str], path: Path) -> bool:
    """Histograms of psi over (sample, neighbour) pairs, head vs tail samples, per PoGDiff variant."""
    import torch

    from pogdiff.data.dataset import neighbour_table, psi_table_for

    variants = [v for v in variants if v.startswith("pogdiff") and v != "pogdiff-stop"]  # stop: pogdiff's psi
    if not variants:
        return False
    plt = _plt()
    tail = ds.index.is_minority(cfg.data.minority_images)[:]
    usable = neighbour_table(cfg, ds, progress=False).ids >= 0
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 3.2), squeeze=False)
    for ax, v in zip(axes[0], variants):
        psi = torch.from_numpy(np.array(psi_table_for(variant_config(cfg, v, 0), ds, progress=False)[0]))
        positive = usable & (psi > 0)
        if not positive.any():
            continue
        logs = torch.log10(psi[positive])
        bins = np.linspace(float(logs.min()) - 0.05, float(logs.max()) + 0.05, 41)
        for name, mask in (("head (majority)", ~tail), ("tail (minority)", tail)):
            values = psi[mask[:, None] & positive]
            if len(values):
                ax.hist(torch.log10(values).numpy(), bins=bins, alpha=0.6, density=True, label=f"{name}, n={len(values)}")
        ax.set_title(LABELS[v], fontsize=9)
        ax.set_xlabel("log10 ψ per (sample, neighbour)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_losses(cfg: Config, variants: list[str], seeds: Sequence[int], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for v in variants:
        curves = []
        for s in seeds:
            hist = RunFiles(variant_config(cfg, v, s)).history
            if hist.is_file():
                h = json.loads(hist.read_text())["history"]
                curves.append(([e["step"] for e in h], [e["loss"] for e in h]))
        if curves:
            n = min(len(c[1]) for c in curves)
            ax.plot(curves[0][0][:n], np.mean([c[1][:n] for c in curves], 0), label=f"{LABELS[v]} ({len(curves)} seeds)")
    ax.set_xlabel("step"), ax.set_ylabel("training loss (mean over seeds)"), ax.set_yscale("log")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_vae_roundtrip(cfg: Config, ds, path: Path, per_id: int = 2) -> bool:
    """Training images (top) and decode(encode(x)) through the dataset's frozen VAE (bottom)."""
    import io

    from PIL import Image

    from pogdiff.eval import vae_roundtrip

    taken: dict[int, int] = {}
    images = []
    for _, ident, png in ds.index.images():
        if taken.get(ident, 0) < per_id and len(images) < 48:
            taken[ident] = taken.get(ident, 0) + 1
            images.append(Image.open(io.BytesIO(png)).convert("RGB"))
    if not images:
        return False
    rows = [np.concatenate([np.asarray(im) for im in ims], 1) for ims in (images, vae_roundtrip(ds.model_dir, images))]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(0.55 * len(images) + 0.5, 1.6))
    ax.imshow(np.concatenate(rows, 0), interpolation="nearest")
    h = images[0].size[1]
    ax.set_xticks([]), ax.set_yticks([h // 2, h + h // 2], ["real", "VAE"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


BASELINES = ("vanilla", "cbdm", "t2h")


def paired(results: dict, baseline: str, metric: str, ids: Sequence[int]) -> Optional[dict]:
    """PoGDiff against ``baseline`` on the same seeds and identities, signed so that > 0 means
    PoGDiff is better: the per-seed differences of the split's mean, and the per-identity
    differences (averaged over the seeds; identities are the independent units) with a 95% interval."""
    ours, base = results.get("pogdiff", {}), results.get(baseline, {})
    seeds = sorted(set(ours) & set(base))
    # identities scored in every one of those runs (a run scored under other sample settings may lack some)
    ids = [i for i in ids if all(str(i) in r[sd]["per_id"][metric] for r in (ours, base) for sd in seeds)]
    if not seeds or not ids:
        return None
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    per_id = np.array([[sign * (ours[sd]["per_id"][metric][str(i)] - base[sd]["per_id"][metric][str(i)])
                        for sd in seeds] for i in ids])
    per_seed = per_id.mean(0)
    by_id = per_id.mean(1)
    half = 1.96 * by_id.std(ddof=1) / math.sqrt(len(by_id)) if len(by_id) > 1 else float("nan")
    seed_wins, seed_ties, seed_losses = wins_ties_losses(per_seed, lower_is_better=False)  # signed already
    return dict(seeds=len(seeds), seed_diffs=per_seed.tolist(), seed_wins=seed_wins, seed_ties=seed_ties,
                seed_losses=seed_losses, id_mean=float(by_id.mean()), id_half=half, ids=len(by_id),
                id_wins=int((by_id > 0).sum()), id_losses=int((by_id < 0).sum()))


def seeds_wtl(p: dict) -> str:
    """The seeds where PoGDiff is better / equal / worse, as W/T/L."""
    return f"{p['seed_wins']}/{p['seed_ties']}/{p['seed_losses']}"


def outcome(p: dict) -> str:
    """wins / ties / loses: whether the per-identity 95% interval excludes 0."""
    if math.isnan(p["id_half"]):
        return "ties (no spread to judge by)"
    if p["id_mean"] - p["id_half"] > 0:
        return "wins"
    if p["id_mean"] + p["id_half"] < 0:
        return "loses"
    return "ties"


def paired_table(results: dict, splits: dict[str, list[int]]) -> tuple[str, list[list]]:
    lines = ["| Split | Metric | Baseline | PoGDiff − baseline per seed (> 0: PoGDiff better) | seeds W/T/L "
             "| per identity: mean [95% interval] | identities better / worse | outcome |", "|" + "---|" * 8]
    rows = [["split", "metric", "baseline", "seed_diffs", "seed_wins", "seed_ties", "seed_losses", "id_mean",
             "id_half95", "id_wins", "id_losses", "ids", "outcome"]]
    for split, ids in splits.items():
        for m in METRICS:
            for b in BASELINES:
                p = paired(results, b, m, ids)
                if p is None:
                    continue
                diffs = ", ".join(f"{d:+.3f}" for d in p["seed_diffs"])
                lines.append(f"| {split.capitalize()} | {METRIC_TITLES[m]} | {LABELS[b]} | {diffs} | "
                             f"{seeds_wtl(p)} | {p['id_mean']:+.3f} [{p['id_mean'] - p['id_half']:+.3f}, "
                             f"{p['id_mean'] + p['id_half']:+.3f}] | {p['id_wins']} / {p['id_losses']} of {p['ids']} | {outcome(p)} |")
                rows.append([split, m, b, " ".join(f"{d:.5f}" for d in p["seed_diffs"]), p["seed_wins"], p["seed_ties"],
                             p["seed_losses"], p["id_mean"], p["id_half"], p["id_wins"], p["id_losses"], p["ids"],
                             outcome(p)])
    return "\n".join(lines), rows


def verdict(results: dict, splits: dict[str, list[int]]) -> list[str]:
    """Plain statements: for each metric and split, PoGDiff against each baseline (paired)."""
    lines = []
    for split, ids in splits.items():
        for m in METRICS:
            key = f"{m}_{split}"
            said = []
            for b in BASELINES:
                p = paired(results, b, m, ids)
                if p is not None:
                    said.append(f"{outcome(p)} against {LABELS[b]} ({_cell(_values(results, b, key))}; "
                                f"seeds W/T/L {seeds_wtl(p)})")
            if said:
                lines.append(f"- {METRIC_TITLES[m]} {split.capitalize()}: PoGDiff {_cell(_values(results, 'pogdiff', key))} "
                             + "; ".join(said) + ".")
    return lines


PAIRED_FEW_COLUMNS = ["method", "baseline", "metric", "n_identities", "n_pairs", "mean_diff", "ci_low", "ci_high",
                      "wins", "ties", "losses"]
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 2000, 0


def comparisons(variants: Sequence[str]) -> list[tuple[str, str]]:
    """(method, baseline) pairs of the identity-level table: every method against Vanilla, and
    PoGDiff against the other baselines."""
    out = [(v, "vanilla") for v in variants if v != "vanilla" and "vanilla" in variants]
    return out + [("pogdiff", b) for b in BASELINES if b != "vanilla" and b in variants and "pogdiff" in variants]


def paired_few_table(results: dict, variants: Sequence[str], few: Sequence[int]) -> tuple[list[str], list[list]]:
    """Each method minus its baseline per Few identity and seed (raw: for FID lower is better), the
    (identity, seed) pairs pooled: mean, 95% identity-bootstrap interval, W/T/L over the pairs."""
    lines = ["| Method | Baseline | Metric | identities | pairs | method − baseline (mean) | 95% interval | W/T/L |",
             "|" + "---|" * 8]
    rows = [PAIRED_FEW_COLUMNS]
    for v, b in comparisons(variants):
        for m in METRICS:
            p = paired_few(results.get(v, {}), results.get(b, {}), m, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, few)
            if p is None:
                continue
            lines.append(f"| {LABELS[v]} | {LABELS[b]} | {METRIC_TITLES[m]} Few | {p['n_identities']} | {p['n_pairs']} | "
                         f"{p['mean_diff']:+.4f} | [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}] | "
                         f"{p['wins']}/{p['ties']}/{p['losses']} |")
            rows.append([v, b] + [p[k] for k in PAIRED_FEW_COLUMNS[2:]])
    return lines, rows


def guidance_table(results: dict, variants: Sequence[str]) -> tuple[list[str], list[list]]:
    """Few scores of every variant at each guidance scale it was scored at (metrics.json
    "by_guidance", sample.guidance_scales): mean ± std over seeds. Empty when no run has them."""
    scales = sorted({float(g) for v in variants for r in results.get(v, {}).values() for g in r.get("by_guidance", {})})
    if not scales:
        return [], []
    keys = [f"{m}_few" for m in ("dino", "grecall", "fid")]
    lines = ["| Method | guidance | " + " | ".join(f"{METRIC_TITLES[k[:-4]]} Few" for k in keys) + " | seeds |",
             "|" + "---|" * (len(keys) + 3)]
    rows = [["method", "guidance"] + [f"{k}_{stat}" for k in keys for stat in ("mean", "std")] + ["seeds"]]
    for v in variants:
        for g in scales:
            at = [r["by_guidance"][key]["summary"] for r in results.get(v, {}).values()
                  for key in r.get("by_guidance", {}) if float(key) == g]
            if not at:
                continue
            lines.append(f"| {LABELS[v]} | {g:g} | " + " | ".join(_cell([a[k] for a in at]) for k in keys)
                         + f" | {len(at)} |")
            rows.append([v, g] + [x for k in keys for x in mean_std([a[k] for a in at])] + [len(at)])
    return lines, rows


def resolution_note(res: list[str], metrics: Sequence[str]) -> list[str]:
    """The resolution bullets (pogdiff.eval.resolution) that concern ``metrics``."""
    wanted = {"- gRecall": "grecall" in metrics, "- DINO-style and FID": bool({"dino", "fid"} & set(metrics)),
              "- FID per identity": True}
    return [line for line in res if any(line.startswith(k) and on for k, on in wanted.items())]


def model_description(cfg: Config, ds) -> str:
    """What the runs fine-tuned: the committed pretrained base, the random-init tiny model, or a directory."""
    pretrain = Path(ds.model_dir) / "pretrain.json"
    if pretrain.is_file():
        info = json.loads(pretrain.read_text())
        st, go = info["settings"], info.get("go_no_go", {})
        return (f"`{Path(ds.model_dir).name}`, a base made by `pogdiff pretrain` (UNet and text encoder trained "
                f"from scratch for {st['steps']} steps on {st['ids']} balanced synthetic identities disjoint from this "
                f"dataset's; go/no-go gRecall {go.get('base', {}).get('grecall', float('nan')):.2f} vs "
                f"{go.get('random_init', {}).get('grecall', float('nan')):.2f} at random init). Fine-tuning trains "
                "the UNet; the text encoder and VAE stay frozen.")
    if cfg.model.name == "tiny":
        return (f"`tiny`: random-init UNet and text encoder; VAE pretrained as an autoencoder for "
                f"{cfg.model.tiny_vae_steps} steps on disjoint identities.")
    return f"`{cfg.model.name}` (`{ds.model_dir}`)."


DIAGNOSTICS = {  # pogdiff.train.diagnostics' logged keys -> the report's column names
    "text/null/head": "text vs none, head", "text/null/tail": "text vs none, tail",
    "text/swap/head": "text vs other id, head", "text/swap/tail": "text vs other id, tail",
    "text/name_swap/head": "text vs other name, head", "text/name_swap/tail": "text vs other name, tail",
    "partner/same_identity/head": "y' same id, head", "partner/same_identity/tail": "y' same id, tail",
    "pair_share": "pair term share"}


def diagnostics(cfg: Config, variants: Sequence[str], seeds: Sequence[int]) -> dict[str, dict[str, float]]:
    """Per variant and diagnostic: the mean over seeds of each run's mean over its last half of
    logged steps (the training's end, not one noisy step)."""
    out: dict[str, dict[str, float]] = {}
    for v in variants:
        per_key: dict[str, list[float]] = {}
        for sd in seeds:
            hist = RunFiles(variant_config(cfg, v, sd)).history
            if not hist.is_file():
                continue
            h = json.loads(hist.read_text())["history"]
            for key in DIAGNOSTICS:
                values = [e[key] for e in h[len(h) // 2:] if e.get(key) is not None]
                if values:
                    per_key.setdefault(key, []).append(float(np.mean(values)))
        if per_key:
            out[v] = {k: float(np.mean(vals)) for k, vals in per_key.items()}
    return out


def diagnostics_section(diag: dict[str, dict[str, float]]) -> tuple[list[str], list[list]]:
    """The table, and the hypothesis (the pair term rewards a UNet that ignores its caption) read
    off PoGDiff's text sensitivity against Vanilla's."""
    rows = [["variant"] + list(DIAGNOSTICS)]
    md = ["| variant | " + " | ".join(DIAGNOSTICS.values()) + " |", "|---" * (len(DIAGNOSTICS) + 1) + "|"]
    for v, d in diag.items():
        rows.append([v] + [d.get(k) for k in DIAGNOSTICS])
        md.append(f"| {LABELS.get(v, v)} | " + " | ".join("" if d.get(k) is None else f"{d[k]:.4g}" for k in DIAGNOSTICS)
                  + " |")
    md.append("")
    if "pogdiff" in diag and "vanilla" in diag:
        for part in ("head", "tail"):
            for probe, what, uses in (("swap", "another identity's caption", "its caption"),
                                      ("name_swap", "another identity's name alone (the rest of the caption kept)",
                                       "the name in its caption")):
                key = f"text/{probe}/{part}"
                p, b = diag["pogdiff"].get(key), diag["vanilla"].get(key)
                if p is None or not b:
                    continue
                r = p / b
                reading = (f"lower: consistent with the hypothesis that the pair term teaches the UNet to use {uses} "
                           "less" if r < 0.9 else "higher: against the hypothesis" if r > 1.1 else
                           f"about the same (within 10%): no sign that the pair term makes the UNet ignore {uses}")
                md.append(f"- {part.capitalize()} identities: PoGDiff's sensitivity to {what} is "
                          f"{r:.2f}x Vanilla's, {reading}.")
    return md, rows


def write_report(cfg: Config, variants: Sequence[str], seeds: Sequence[int], out: Path) -> Path:
    variants = list(variants)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from pogdiff.data.dataset import resolve_dataset

    ds = resolve_dataset(cfg, progress=False)
    run_dir = RunFiles(cfg).root
    results = collect(cfg, variants, seeds)
    ref_path = run_dir / "reference_metrics.json"
    reference = json.loads(ref_path.read_text()) if ref_path.is_file() else {}
    reference = {k: reference[k] for k in ("reference", "reference_vae") if k in reference}
    any_run = next((r for runs in results.values() for r in runs.values()), None)
    id_counts = {i: c for i, c in ds.index.identity_counts().items() if i >= 0}
    counts = list(id_counts.values()) or [0]
    few = {i for i, c in id_counts.items() if c <= cfg.data.minority_images}
    evaluated = evaluated_identities(cfg, ds.index)
    splits = {"all": evaluated, "few": few_ids(cfg, ds.index)}
    heldout_counts = ds.heldout.identity_counts() if ds.heldout is not None else {}
    res = resolution({"few_ids": splits["few"], "images_per_id": cfg.sample.images_per_id,
                      "real_images": {"training": {str(i): c for i, c in id_counts.items()},
                                      "heldout": {str(i): c for i, c in heldout_counts.items() if i >= 0}}})
    names = {i: n for i, n in ds.index.identity_names().items() if i in set(evaluated)}
    d, t, s = cfg.data, cfg.train, cfg.sample
    held = ds.meta.get("heldout") or {}
    source = f"synthetic identities, profile `{d.profile}`" if ds.meta.get("synthetic") else f"`{ds.meta.get('source')}`"
    md = [f"# PoGDiff vs. baselines on imbalanced identities ({cfg.run_name})", "",
          "Generated by `pogdiff report` from the runs under `" + str(run_dir) + "`.", "", "## Setup", "",
          f"- Data: {source}, prepared at `{ds.root}`: {len(id_counts) - len(few)} majority identities "
          f"(up to {max(counts)} images), {len(few)} minority identities (at most {d.minority_images} images) "
          f"({sum(counts)} images, {ds.meta['image_size']}x{ds.meta['image_size']}); "
          f"{held.get('samples', 0)} held-out real images ({held.get('per_identity', 0)} per identity where it had enough).",
          f"- Model: {model_description(cfg, ds)}",
          f"- Training: {t.steps} steps, batch {t.batch_size}, lr {t.lr}, grad_mode `{cfg.method.grad_mode.value}`, "
          f"k={cfg.method.k}, a1={cfg.method.a1}, a2={cfg.method.a2}, a3={cfg.method.a3}; seeds {list(seeds)}.",
          f"- Sampling: DDIM {s.steps} steps, guidance {s.guidance_scale}, prompt \"{s.prompt_template}\", "
          f"{s.images_per_id} images per identity"
          + (f" of every majority identity and of {len(splits['few'])} of the {len(few)} minority identities, drawn "
             f"with sample.seed={s.seed} (the same in every run; `sample.few_ids`)." if len(evaluated) < len(id_counts)
             else ".")
          + " The initial noise is seeded per training seed (derive_seed(sample.seed, seed)), the same for every "
          "method of a seed" + (f"; also scored at guidance {', '.join(f'{g:g}' for g in s.guidance_scales)}."
                                if s.guidance_scales else "."),
          f"- Metrics: gRecall threshold {cfg.eval.grecall_threshold}; FID per identity (real set = training + "
          "held-out images; Ledoit-Wolf-shrunk covariances + "
          f"{cfg.eval.fid_eps:g} I) averaged over identities; DINO-style = mean cosine to held-out real images. "
          "All = every evaluated identity, Few = the evaluated minority identities.",
          ]
    if any_run is not None:
        enc = any_run["encoder"]
        acc = enc.get("heldback_accuracy")
        acc = "n/a" if acc is None else f"{acc:.3f}"
        if enc.get("encoder") == "recognizer" and enc.get("source") == "disjoint-synthetic":
            md.append(f"- Feature extractor: identity-recognition CNN trained on {enc['ids']} disjoint synthetic "
                      f"identities x {enc['per_id']} images for {enc['steps']} steps (accuracy on held-back images "
                      f"of those identities: {acc}); penultimate {enc['dim']}-d embedding.")
        elif enc.get("encoder") == "recognizer":
            md.append(f"- Feature extractor: identity-recognition CNN trained on this dataset's own training split "
                      f"({enc['classes']} identities, {enc['steps']} steps; accuracy on {enc['heldback_images']} "
                      f"held-back images: {acc}); penultimate {enc['dim']}-d embedding.")
        else:
            md.append(f"- Feature extractor: `{enc['encoder']}`.")
        invalid = sorted({r["invalid_reason"] for runs in results.values() for r in runs.values()
                          if not r.get("valid", True)})
        if invalid:
            md += ["", f"**The metrics below are INVALID: {'; '.join(invalid)}. Use a stronger eval.encoder "
                   "(a local vision model directory) or more recogniser training before reading them.**"]
    missing = [f"{v} seed {sd}" for v in variants for sd in seeds if sd not in results.get(v, {})]
    if missing:
        md += ["", f"**Missing runs (not in the tables):** {', '.join(missing)}."]
    md += ["", "## Results", ""]
    for name, (caption, rows, metrics, with_ref) in TABLES.items():
        rows = [r for r in rows if r in variants]
        if not rows:
            continue
        text, csv_rows = table(results, reference if with_ref else None, rows, metrics)
        _write_csv(out / f"{name}.csv", csv_rows)
        md += [f"**{caption}**", "", text, "", *resolution_note(res, metrics), ""]
    per_seed = [["variant", "seed"] + [f"{m}_{sp}" for m in METRICS for sp in ("all", "few")]]
    for v, runs in results.items():
        for sd, r in sorted(runs.items()):
            per_seed.append([v, sd] + [r["summary"][f"{m}_{sp}"] for m in METRICS for sp in ("all", "few")])
    _write_csv(out / "per_seed.csv", per_seed)
    text, csv_rows = paired_table(results, splits)
    if len(csv_rows) > 1:
        _write_csv(out / "paired.csv", csv_rows)
        md += ["**Paired comparison: PoGDiff against each baseline, same seeds and identities.** Each seed's "
               "difference of the split's mean; per identity, the difference averaged over seeds, with a 95% "
               "interval over identities (1.96 standard errors). Outcome: wins or loses when that interval "
               "excludes 0, else ties. Seeds W/T/L: the seeds where PoGDiff is better / equal / worse.", "", text,
               "", *res, ""]
    text, csv_rows = paired_few_table(results, variants, splits["few"])
    if len(csv_rows) > 1:
        _write_csv(out / "paired_few.csv", csv_rows)
        md += ["**Paired differences per Few identity.** Each method minus its baseline on the same Few identity "
               "and seed (the raw difference: higher is better for DINO-style and gRecall, **lower is better for "
               "FID**); every (identity, seed) pair is one difference, pooled over seeds. The mean, and a 95% "
               f"percentile bootstrap interval ({BOOTSTRAP_RESAMPLES:,} resamples of the identities with replacement, "
               f"each identity's seeds together, seed {BOOTSTRAP_SEED}). W/T/L: the pairs where the method is better "
               "/ equal / worse. Also `paired_few.csv`.", "", *text, "", *res, ""]
    text, csv_rows = guidance_table(results, variants)
    if text:
        _write_csv(out / "guidance.csv", csv_rows)
        md += ["**Few scores per guidance scale** (`sample.guidance_scales`: the same trained weights sampled at each "
               "scale; mean ± std over seeds). Also `guidance.csv`.", "", *text, "", *res, ""]
    diag = diagnostics(cfg, variants, seeds)
    if diag:
        text, csv_rows = diagnostics_section(diag)
        _write_csv(out / "diagnostics.csv", csv_rows)
        md += ["**Conditioning diagnostics** (`pogdiff.train.diagnostics`; the mean over the last half of each run's "
               "logged steps, then over seeds). Text vs none / other id: the mean squared change of the UNet's "
               "prediction when the caption is replaced by the empty one / by another identity's (t = T/2). "
               "Text vs other name: the same when only the identity's name in the caption is replaced by another "
               "identity's (captions without their name are not counted), so the name's effect apart from the "
               "wording's. "
               "y' same id: the share of drawn partner captions of the sample's own identity. Pair term share: "
               "its part of the two-term loss.", ""] + text + [""]
    md += ["Per-seed values: `per_seed.csv`; each table as CSV next to this file.", "", "## What it shows", ""]
    md += verdict(results, splits) or ["- No PoGDiff and baseline runs to compare yet."]
    if results:
        shown = sorted(set(names) - few)[:8] + sorted(set(names) & few)[:8]  # a chart stays readable
        plot_per_identity(results, {i: names[i] for i in shown}, few, variants, out / "per_identity.png")
        md += ["", "## Figures", "", f"Per identity ({len(shown)} of the {len(names)} evaluated):", "",
               "![per identity](per_identity.png)", ""]
        seed0 = min(next(iter(results.values())))
        for label, group in (("minority", sorted(set(names) & few)), ("majority", sorted(set(names) - few))):
            if group:
                plot_samples(cfg, ds, group[0], names[group[0]], variants, seed0, out / f"samples_{label}.png")
                md += [f"Samples of a {label} identity, every method side by side:", "",
                       f"![{label} samples](samples_{label}.png)", ""]
        plot_losses(cfg, variants, seeds, out / "loss_curves.png")
        md += ["Training loss:", "", "![loss curves](loss_curves.png)", ""]
    if plot_vae_roundtrip(cfg, ds, out / "vae_roundtrip.png"):
        md += ["The frozen tiny VAE (pretrained on disjoint identities): training images and their "
               "reconstructions. Generated images can be no sharper than this.", "",
               "![vae](vae_roundtrip.png)", ""]
    if plot_psi(cfg, ds, variants, out / "psi_hist.png"):
        md += ["ψ = ψ_img · ψ_inv per (sample, neighbour), head vs tail samples:", "", "![psi](psi_hist.png)", ""]
    notes = out / "discussion.md"  # hand-written; kept when the report is regenerated
    if notes.is_file():
        md += ["## Discussion", "", notes.read_text().strip(), ""]
    path = out / "report.md"
    atomic_write(path, "\n".join(md) + "\n")
    return path
