"""Neighbours and psi: Eq. 8 (weights, per-step draw of y'), Eq. 9 (psi_img) and Eq. 12 (psi).

The table is built once (exactly here; by the FAISS service at scale) and read every step.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file


@dataclass
class NeighbourTable:
    """Per sample: its top-k neighbours in the training set, self excluded.

    ids (N, k) int64, -1 where fewer than k other samples exist; sims (N, k) cosine similarity;
    different_identity (N, k) bool, the indicator of Eq. 9 (all False without identity labels).
    """

    ids: torch.Tensor
    sims: torch.Tensor
    different_identity: torch.Tensor

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def save(self, path: str | Path) -> None:
        save_file(
            {"ids": self.ids.contiguous(), "sims": self.sims.contiguous(),
             "different_identity": self.different_identity.to(torch.uint8).contiguous()},
            str(path),
        )

    @classmethod
    def load(cls, path: str | Path) -> "NeighbourTable":
        t = load_file(str(path))
        return cls(t["ids"], t["sims"], t["different_identity"].bool())


def check_finite(x: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    if bad.any():
        rows = bad.nonzero().flatten()[:10].tolist()
        raise ValueError(f"{what} has NaN/inf values in rows {rows} (of {int(bad.sum())}): fix or drop those records")


def exact_knn(
    embeddings: torch.Tensor, k: int, identities: Optional[torch.Tensor] = None, chunk: int = 4096
) -> NeighbourTable:
    """Brute-force cosine top-k, self excluded. O(N^2 d): for small N and as the test reference."""
    check_finite(embeddings, "image embeddings")
    z = torch.nn.functional.normalize(embeddings.float(), dim=1)
    n = z.shape[0]
    kk = min(k, n - 1)
    ids = torch.full((n, k), -1, dtype=torch.int64)
    sims = torch.zeros((n, k), dtype=torch.float32)
    for start in range(0, n, chunk):
        s = z[start:start + chunk] @ z.T
        rows = torch.arange(start, min(start + chunk, n))
        s[rows - start, rows] = -float("inf")
        if kk > 0:
            top = s.topk(kk, dim=1)
            ids[rows, :kk] = top.indices
            sims[rows, :kk] = top.values
    different = torch.zeros((n, k), dtype=torch.bool)
    if identities is not None:
        valid = ids >= 0
        different = valid & (identities[ids.clamp(min=0)] != identities[:, None])
    return NeighbourTable(ids, sims, different)


def neighbour_weights(sims: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Eq. 8: w_j = s_j / sum_j s_j, negative sims clamped to 0; rows with no mass are all zero."""
    s = torch.where(ids >= 0, sims.clamp(min=0), torch.zeros_like(sims))
    total = s.sum(1, keepdim=True)
    return torch.where(total > 0, s / total.clamp(min=torch.finfo(s.dtype).tiny), torch.zeros_like(s))


def psi_img(sims: torch.Tensor, different_identity: torch.Tensor, a1: float, a2: float) -> torch.Tensor:
    """Eq. 9: max(0, s)^(a1 + a2 * 1[id(x) != id(x')]). Clamped before the power: never NaN."""
    exponent = a1 + a2 * different_identity.to(sims.dtype)
    return sims.clamp(min=0).pow(exponent)


def psi_table(
    table: NeighbourTable,
    log_psi_inv: Optional[torch.Tensor],
    a1: float,
    a2: float,
    use_psi_img: bool = True,
) -> torch.Tensor:
    """Eq. 12 per (sample, neighbour): psi_img * psi_inv, shape (N, k); 0 for missing neighbours.

    ``log_psi_inv`` (N,) is log psi_inv of each sample's own caption (density.py, a3 included);
    None means the "w/o psi_inv" ablation (psi_inv = 1). ``use_psi_img=False`` is "w/o psi_img".
    """
    img = psi_img(table.sims, table.different_identity, a1, a2) if use_psi_img else torch.ones_like(table.sims)
    inv = torch.ones(table.ids.shape[0]) if log_psi_inv is None else log_psi_inv.float().exp()
    psi = img * inv[:, None]
    has_mass = neighbour_weights(table.sims, table.ids).sum(1, keepdim=True) > 0
    return torch.where((table.ids >= 0) & has_mass, psi, torch.zeros_like(psi))


class NeighbourSampler:
    """Draws, each step and afresh, one neighbour j ~ Cat(w) per sample (Eq. 8) and its psi.

    The tables may be tensors or row readers (pogdiff.npyrows.NpyRows over the (N, k) files): only
    the batch's rows are read, and the weights are computed for those rows alone, so no
    per-process table grows with N."""

    def __init__(self, table: NeighbourTable, psi: torch.Tensor):
        self.table, self.psi = table, psi

    def sample(self, index: torch.Tensor, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(neighbour dataset indices (B,), psi (B,)); a sample with no usable neighbour gets itself and psi 0."""
        index = index.cpu()
        ids, sims, psi = (torch.as_tensor(column[index.numpy()]) for column in (self.table.ids, self.table.sims, self.psi))
        w = neighbour_weights(sims, ids)
        has_mass = w.sum(1) > 0
        # Rows with no mass draw any slot (psi is 0 there) so multinomial always has support.
        w = torch.where(has_mass[:, None], w, torch.ones_like(w))
        slot = torch.multinomial(w, 1, generator=generator).squeeze(1)
        nid = ids.gather(1, slot[:, None]).squeeze(1)
        p = psi.gather(1, slot[:, None]).squeeze(1).float()
        usable = has_mass & (nid >= 0)
        return torch.where(usable, nid, index), torch.where(usable, p, torch.zeros_like(p))


def summarize_psi(psi: torch.Tensor | np.ndarray, is_minority: np.ndarray | torch.Tensor,
                  table: Optional[NeighbourTable] = None, rows: int = 1 << 16) -> dict:
    """psi's head (majority) and tail (minority) summary, read ``rows`` rows at a time, so ``psi``
    (N, k) and the table's columns may be memory-mapped or row readers:

    * ``psi_mean_head`` / ``psi_mean_tail``: mean psi over a sample's neighbour slots, and
      ``tail_over_head``, their ratio;
    * ``head_mass_share``: the head's share of all psi mass;
    * with ``table``: ``pair_weight_head`` / ``_tail``, the expected psi of the partner a step draws
      (E_{j ~ w}[psi_j], Eq. 8's draw); ``own_identity_share_head`` / ``_tail``, the share of a
      sample's expected pair weight that comes from neighbours of its own identity (what Eq. 9's a2
      is for), averaged over the samples that have any; and ``own_identity_mass_head`` / ``_tail``,
      the same share of the part's pooled pair weight (samples with a large psi_inv count more).
      Without identity labels every neighbour counts as the same identity (the caller sets None)."""
    # [psi mean, count, psi mass, E_w psi, own E_w psi, own share per sample, samples with pair weight] x [head, tail]
    sums = torch.zeros(7, 2, dtype=torch.float64)
    for start in range(0, len(psi), rows):
        block = torch.as_tensor(np.array(psi[start:start + rows])).double()
        tail = torch.as_tensor(np.array(is_minority[start:start + len(block)]), dtype=torch.long)
        per_row = [block.mean(1), torch.ones(len(block), dtype=torch.float64), block.sum(1)]
        if table is not None:
            ids, sims, different = (torch.as_tensor(np.array(c[start:start + len(block)]))
                                    for c in (table.ids, table.sims, table.different_identity))
            drawn = neighbour_weights(sims.float(), ids).double() * block
            total, own = drawn.sum(1), (drawn * ~different.bool()).sum(1)
            acts = total > 0
            per_row += [total, own, torch.where(acts, own / total.clamp(min=1e-300), 0.0), acts.double()]
        for r, values in enumerate(per_row):
            sums[r] += torch.bincount(tail, weights=values, minlength=2)
    out = {}
    for name, i in (("head", 0), ("tail", 1)):
        n = sums[1, i]
        out[f"psi_mean_{name}"] = float(sums[0, i] / n) if n else float("nan")
        if table is not None:
            out[f"pair_weight_{name}"] = float(sums[3, i] / n) if n else float("nan")
            out[f"own_identity_share_{name}"] = float(sums[5, i] / sums[6, i]) if sums[6, i] > 0 else None
            out[f"own_identity_mass_{name}"] = float(sums[4, i] / sums[3, i]) if sums[3, i] > 0 else None
    head, tail = out["psi_mean_head"], out["psi_mean_tail"]
    out["tail_over_head"] = tail / head if head > 0 and tail == tail else None
    total = float(sums[2].sum())
    out["head_mass_share"] = float(sums[2, 0]) / total if total > 0 else None
    return out
