"""How alike the text encoder finds two identities' prompts, by name scheme (issue 31, item 3).

    .venv/bin/python benchmarks/caption_similarity.py                  # agedb-m, agedb-l; seed 0
    .venv/bin/python benchmarks/caption_similarity.py --profiles agedb-l digiface-l --seed 3 --out /tmp/sim.json

For each profile and data.names scheme (grid: first x last name grid, names shared; distinct: no
name part shared), it embeds every identity's prompt "An image of {name}." (sample.prompt_template)
with the committed tiny base's text encoder (model.name=tiny-base, pogdiff/models/tiny_base), takes
the pooled embedding (pogdiff.models.components.encode_tokens: CLIP's pooler output) and reports
over all identity pairs: the cosine similarity's mean, 95th percentile and max; the share of pairs
that share a name part (a first, middle or last name), and the mean cosine of those pairs and of the
others; and per name, its tokens and the share of them that are whole words of vocabulary() (the
only tokens the base's pretraining captions contain: a distinct name's pieces are not, so their
embeddings are the encoder's initial ones). Prints JSON with the machine it ran on.
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

from pogdiff.config import ModelConfig, SampleConfig
from pogdiff.data.synthetic import NAME_SCHEMES, identity_name, profile_counts, vocabulary
from pogdiff.models.components import encode_tokens, load_components, tokenize
from pogdiff.runs import model_dir_of


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"date": datetime.date.today().isoformat(), "platform": platform.platform(), "cpu": cpu,
            "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__}


@torch.no_grad()
def pooled_embeddings(components, prompts: list[str]) -> np.ndarray:
    pooled = encode_tokens(components, tokenize(components, prompts), torch.device("cpu"))[1].float()
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def token_stats(components, names: list[str]) -> dict:
    tok = components.tokenizer
    words = {i for w in vocabulary() for i in tok(w).input_ids[1:-1] if len(tok(w).input_ids) == 3}
    ids = [tok(n).input_ids[1:-1] for n in names]
    return {"name_tokens_mean": round(float(np.mean([len(x) for x in ids])), 2),
            "share_of_name_tokens_that_are_vocabulary_words": round(
                float(np.mean([t in words for x in ids for t in x])), 4)}


def pair_stats(names: list[str], emb: np.ndarray) -> dict:
    cos = emb @ emb.T
    i, j = np.triu_indices(len(names), k=1)
    values = cos[i, j]
    parts = [set(n.split()) for n in names]
    shared = np.array([bool(parts[a] & parts[b]) for a, b in zip(i, j)])
    return {"identities": len(names), "pairs": int(len(values)),
            "cosine_mean": round(float(values.mean()), 4), "cosine_p95": round(float(np.percentile(values, 95)), 4),
            "cosine_max": round(float(values.max()), 4),
            "share_of_pairs_sharing_a_name_part": round(float(shared.mean()), 4),
            "cosine_mean_sharing_a_part": round(float(values[shared].mean()), 4) if shared.any() else None,
            "cosine_mean_sharing_no_part": round(float(values[~shared].mean()), 4) if (~shared).any() else None,
            "examples": names[:3]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", nargs="+", default=["agedb-m", "agedb-l"])
    ap.add_argument("--seed", type=int, default=0, help="data.seed")
    ap.add_argument("--model", default="tiny-base", help="model.name whose text encoder embeds the prompts")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    components = load_components(ModelConfig(name=model_dir_of(args.model)), with_unet=False, with_vae=False)
    components.text_encoder.eval()
    template = SampleConfig().prompt_template
    result = {"benchmark": "caption_similarity", "machine": machine(), "model": args.model, "seed": args.seed,
              "prompt_template": template, "profiles": {}}
    for profile in args.profiles:
        n = len(profile_counts(profile))
        result["profiles"][profile] = {}
        for scheme in sorted(NAME_SCHEMES, reverse=True):  # grid, then distinct
            names = [identity_name(i, args.seed, scheme) for i in range(n)]
            emb = pooled_embeddings(components, [template.format(p=name) for name in names])
            result["profiles"][profile][scheme] = {**pair_stats(names, emb), **token_stats(components, names)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
