"""Does Eq. 9's same-identity preference act? psi's head/tail summary over a2 x k x neighbour encoder
(issue 31, items 1-2), on prepared synthetic profiles, without training anything.

    .venv/bin/python benchmarks/identity_preference.py configs/sweep.yaml --profiles agedb-m agedb-l

For each profile and image encoder (data.image_encoder: tiny pixels, tiny-ssl), the dataset is
prepared (cached under the config's output_dir), its top-10 neighbours built once and the text
density fitted once; then for every k (a prefix of the top-10: the table is sorted by similarity)
and every a2, psi (Eq. 12) is computed in memory with the density's map (``--forms``: eq11, the
paper's, and temperature, this project's earlier one) and summarised by
pogdiff.method.neighbours.summarize_psi: the tail/head ratio of mean psi, the head's share of psi
mass, the expected psi of a drawn partner, and the share of that expected weight that comes from
neighbours of the sample's own identity (``own_identity_share_tail``: what a2 is for). Prints JSON
with the machine; ``--out`` also writes it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import numpy as np
import torch

from pogdiff.config import with_overrides
from pogdiff.data.dataset import neighbour_table, resolve_dataset, text_density
from pogdiff.method.density import psi_inv_stats
from pogdiff.method.neighbours import NeighbourTable, psi_table, summarize_psi
from pogdiff.runs import load_run_config

KEYS = ("tail_over_head", "head_mass_share", "pair_weight_head", "pair_weight_tail", "own_identity_share_tail",
        "own_identity_mass_tail")


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}


def measure(cfg, ks, a2s, forms) -> list[dict]:
    ds = resolve_dataset(cfg, progress=False)
    top = neighbour_table(with_overrides(cfg, [f"method.k={max(ks)}"]), ds, progress=False)
    is_minority = ds.index.is_minority(cfg.data.minority_images)
    tail = np.asarray(is_minority[:len(top.ids)], dtype=bool)
    same = ~top.different_identity & (top.ids >= 0)
    rows = []
    for form in forms:
        fcfg = with_overrides(cfg, [f"density.form={form}"])
        density, nll = text_density(fcfg, ds, progress=False)
        log_inv = density.log_psi_inv_from_nll(torch.from_numpy(np.asarray(nll)), cfg.method.a3)
        inv = psi_inv_stats(density, nll, is_minority, cfg.method.a3)
        for k in ks:
            table = NeighbourTable(top.ids[:, :k], top.sims[:, :k], top.different_identity[:, :k])
            for a2 in a2s:
                psi = psi_table(table, log_inv, cfg.method.a1, a2)
                stats = summarize_psi(psi, is_minority, table)
                rows.append({"profile": cfg.data.profile, "encoder": cfg.data.image_encoder, "form": form, "k": k,
                             "a2": a2, **{key: stats[key] for key in KEYS},
                             "psi_inv_tail_over_head": inv["psi_inv_tail_over_head"],
                             "psi_inv_max": inv["psi_inv_max"], "psi_inv_clipped_share": inv["psi_inv_clipped_share"],
                             # the chance alone: a tail sample's neighbours of its own identity (Eq. 8's draw)
                             "own_identity_draw_tail": float((same[:, :k][tail].float() * table.sims[tail].clamp(min=0)).sum()
                                                             / table.sims[tail].clamp(min=0).sum()),
                             "mean_sim_tail": float(table.sims[tail].mean())})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--profiles", nargs="+", default=["agedb-m", "agedb-l"])
    p.add_argument("--encoders", nargs="+", default=["tiny", "tiny-ssl"])
    p.add_argument("--ks", nargs="+", type=int, default=[2, 5, 10])
    p.add_argument("--a2", nargs="+", type=float, default=[1, 4, 16, 64])
    p.add_argument("--forms", nargs="+", default=["eq11", "temperature"])
    p.add_argument("--set", nargs="*", default=[], help="more dotted overrides of the config")
    p.add_argument("--out")
    args = p.parse_args(argv)
    rows = []
    for profile in args.profiles:
        for encoder in args.encoders:
            cfg = load_run_config(args.config, [f"data.profile={profile}", f"data.image_encoder={encoder}", *args.set])
            rows += measure(cfg, sorted(args.ks), args.a2, args.forms)
            print(f"{profile} {encoder}: done", file=sys.stderr)
    report = {"machine": machine(), "config": args.config, "overrides": args.set, "rows": rows}
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
