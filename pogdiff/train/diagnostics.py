"""Why a method helps or costs identity, measured in every run (issue 22), beside the loss.

At every logged step, for the samples of that step, head and tail apart (``data.minority_images``):

- ``text/null``: the mean over pixels of (eps(x_t, y) - eps(x_t, empty caption))^2, and
  ``text/swap``: the same against the caption of another identity from the batch. This is the
  UNet's text sensitivity. Both are taken on the step's last micro-batch, re-noised at
  t = T/2 with a noise seeded by the step, so a resumed run measures what an uninterrupted one
  does. If the pair term rewards a UNet that ignores its caption (the discussion's hypothesis),
  these fall under PoGDiff against Vanilla.
- ``partner/same_identity``: the share of drawn partners y' (PoGDiff's neighbours, CBDM's random
  captions) that have the sample's own identity.
- ``pair_share``: the pair term's share of the two-term loss (both before Min-SNR weighting).

Every rank computes its sums, and fit all-reduces them with the rest.
"""
from __future__ import annotations

import numpy as np
import torch

from pogdiff.method.objectives import Batch, LossOutput, Objective
from pogdiff.runs import derive_seed

PROBE_STREAM = 0xD1A6  # derive_seed(train.seed, PROBE_STREAM, step) draws the probe's noise
# [pair term, same head, same tail,
#  null head, swap head, n head, n swap head, null tail, swap tail, n tail, n swap tail];
# the target term and the head/tail counts of pair draws are pogdiff.train.metrics.term_stats' sums
SUMS = 11


def identities_of(identities, rows: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.asarray(identities[rows.cpu().numpy()], dtype=np.int64))


def pair_sums(outs: list[tuple[Batch, LossOutput]], is_minority: torch.Tensor, identities) -> torch.Tensor:
    """[pair term, partners of the sample's own identity among head draws, among tail draws]."""
    s = torch.zeros(3, dtype=torch.float64)
    for batch, out in outs:
        if out.pair_mse is None or out.partner is None:
            continue
        s[0] += (out.weights.pair.detach().double().cpu() * out.pair_mse.double().cpu()).sum()
        own = identities_of(identities, batch.index)
        same = ((identities_of(identities, out.partner) == own) & (own >= 0)).double()
        tail = is_minority[batch.index]
        s[1:3] += torch.stack([same[~tail].sum(), same[tail].sum()])
    return s


@torch.no_grad()
def text_sensitivity(engine, objective: Objective, batch: Batch, is_minority: torch.Tensor, identities,
                     seed: int, step: int) -> torch.Tensor:
    """[null, swap, n, n swap] sums for head then tail: one UNet call on [y; empty; y_other]."""
    x0 = batch.latents
    device, dtype = x0.device, x0.dtype
    g = torch.Generator().manual_seed(derive_seed(seed, PROBE_STREAM, step))
    noise = torch.randn(x0.shape, generator=g).to(device, dtype)
    t = torch.full((len(x0),), objective.num_timesteps // 2, dtype=torch.long)
    abar = objective.alphas_cumprod[t].to(device).view(-1, *([1] * (x0.dim() - 1)))
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    y = objective.text(batch.tokens, device, dtype)
    null = objective.text.null(device, dtype).expand_as(y) if objective.text.null_tokens is not None else y
    own = identities_of(identities, batch.index)
    order = torch.arange(len(x0)).roll(1)  # another sample of the batch; counted where its identity differs
    differs = (own[order] != own) & (own >= 0) & (own[order] >= 0)
    t3 = t.to(device).repeat(3)
    cond = objective.text.attach(torch.cat([y, null, y[order.to(device)]]), batch.time_ids, repeat=3)
    eps = engine(x_t.repeat(3, *([1] * (x0.dim() - 1))), t3, cond).float()
    e, e_null, e_swap = eps.chunk(3)
    d_null = (e - e_null).pow(2).flatten(1).mean(1).double().cpu()
    d_swap = (e - e_swap).pow(2).flatten(1).mean(1).double().cpu()
    tail = is_minority[batch.index]
    has_null = float(objective.text.null_tokens is not None)
    out = []
    for part in (~tail, tail):
        swap = part & differs
        out += [d_null[part].sum(), (d_swap * swap).sum(), part.sum().double() * has_null, swap.sum().double()]
    return torch.stack(out)


def entries(term: torch.Tensor, sums: torch.Tensor, has_pair: bool) -> dict:
    """The logged values from the all-reduced sums: ``term`` is term_stats' (the target term is its
    target_mse sum, every method's target weight being 1; its head/tail counts are the pair draws'),
    ``sums`` this module's. None where nothing was counted."""
    ratio = lambda a, b: float(a / b) if b else None  # noqa: E731
    out = {}
    for i, part in ((3, "head"), (7, "tail")):
        out[f"text/null/{part}"] = ratio(sums[i], sums[i + 2])  # n is 0 without an empty caption
        out[f"text/swap/{part}"] = ratio(sums[i + 1], sums[i + 3])
    if has_pair:
        out["pair_share"] = ratio(sums[0], sums[0] + term[1])
        out["partner/same_identity/head"] = ratio(sums[1], term[4])
        out["partner/same_identity/tail"] = ratio(sums[2], term[6])
    return out
