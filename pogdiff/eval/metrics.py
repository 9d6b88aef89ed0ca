"""The paper's metrics on per-identity embeddings (Sec. 4.1, App. C, F).

Every function takes ``identity -> (n, d)`` embeddings (numpy arrays or torch tensors) and returns
per-identity values; ``mean_over`` turns them into the All / Few numbers of the tables.

* gRecall: a generated image is *correct* when its cosine similarity to at least one training
  image of its identity is above the threshold; those training images are *covered*;
  gRecall = mean over identities of (#unique covered / #training images).
* DINO-style score: mean cosine similarity between generated and held-out real images of the identity.
* FID per identity, averaged over identities. With tens of images in d dimensions the sample
  covariance is singular, so each covariance is Ledoit-Wolf shrunk towards (tr S / d) I and
  ``eps * I`` is added; the Frechet distance itself is exact for the regularised Gaussians.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

Embeddings = Mapping[int, "np.ndarray"]


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (n, d), got shape {x.shape}")
    return x


def _unit(x) -> np.ndarray:
    x = _np(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def coverage(generated, training, threshold: float) -> float:
    """One identity's gRecall: the fraction of its training images some generated image covers."""
    train = _unit(training)
    if len(train) == 0:
        raise ValueError("an identity with no training images has no gRecall")
    gen = _unit(generated)
    if len(gen) == 0:
        return 0.0
    covered = (gen @ train.T > threshold).any(axis=0)
    return float(covered.mean())


def grecall_per_id(generated: Embeddings, training: Embeddings, threshold: float = 0.7) -> dict[int, float]:
    """gRecall of every identity in ``training``; one missing from ``generated`` counts 0."""
    return {i: coverage(generated[i], t, threshold) if i in generated else 0.0 for i, t in training.items()}


def grecall(generated: Embeddings, training: Embeddings, threshold: float = 0.7) -> float:
    """gRecall (Sec. 4.1): mean over identities of (#unique covered training images / #training images)."""
    if not training:
        raise ValueError("gRecall needs at least one training identity")
    return float(np.mean(list(grecall_per_id(generated, training, threshold).values())))


def dino_score_per_id(generated: Embeddings, heldout: Embeddings) -> dict[int, float]:
    """Mean cosine similarity between every generated and every held-out image of the identity."""
    out = {}
    for i, real in heldout.items():
        if i not in generated or len(generated[i]) == 0:
            raise ValueError(f"identity {i} has held-out images but no generated images")
        out[i] = float((_unit(generated[i]) @ _unit(real).T).mean())
    return out


def ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrinkage covariance of the rows of ``x`` (the estimator of scikit-learn's
    ``LedoitWolf``): (1 - a) S + a (tr S / d) I with a data-chosen a in [0, 1]."""
    n, d = x.shape
    xc = x - x.mean(0)
    s = xc.T @ xc / n
    mu = np.trace(s) / d
    delta = ((s - mu * np.eye(d)) ** 2).sum() / d
    if delta <= 0:  # already a multiple of the identity
        return s
    x2 = xc ** 2
    beta = min(((x2.T @ x2).sum() / n - (s ** 2).sum()) / (n * d), delta)
    shrink = beta / delta
    return (1 - shrink) * s + shrink * mu * np.eye(d)


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), through symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root1 @ s2 @ root1)
    value = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(max(value, 0.0))


def fid(generated, real, eps: float = 1e-6) -> float:
    """FID between two embedding sets with regularised (Ledoit-Wolf + eps I) covariances."""
    a, b = _np(generated), _np(real)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"FID needs at least 2 embeddings on each side, got {len(a)} and {len(b)}")
    eye = eps * np.eye(a.shape[1])
    return frechet_distance(a.mean(0), ledoit_wolf(a) + eye, b.mean(0), ledoit_wolf(b) + eye)


def fid_per_id(generated: Embeddings, real: Embeddings, eps: float = 1e-6) -> dict[int, float]:
    return {i: fid(generated[i], r, eps) for i, r in real.items()}


def mean_over(per_id: Mapping[int, float], ids: Iterable[int]) -> float:
    ids = list(ids)
    return float(np.mean([per_id[i] for i in ids])) if ids else float("nan")


# ------------------------------------------------------------ paired differences between two methods

def identity_bootstrap(diffs: Mapping[object, Iterable[float]], resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of paired differences grouped by identity (identity -> its differences, one
    per seed): the mean of every difference pooled, and a percentile bootstrap interval that draws
    identities with replacement, each identity's differences together (identities are the
    independent units; its seeds share the identity). Seeded: the same numbers on every call."""
    groups = [np.asarray(list(d), dtype=np.float64) for d in diffs.values()]
    groups = [g for g in groups if len(g)]
    if not groups:
        return float("nan"), float("nan"), float("nan")
    sums = np.array([g.sum() for g in groups])
    counts = np.array([len(g) for g in groups], dtype=np.float64)
    mean = float(sums.sum() / counts.sum())
    draws = np.random.default_rng(seed).integers(0, len(groups), size=(resamples, len(groups)))
    stats = sums[draws].sum(1) / counts[draws].sum(1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(stats, [tail, 100 - tail])
    return mean, float(low), float(high)


def wins_ties_losses(diffs: Iterable[float], lower_is_better: bool, tol: float = 1e-12) -> tuple[int, int, int]:
    """Counts of differences (ours - baseline) where ours is better, equal (within ``tol``: gRecall
    moves in steps, so equal values are common and are ties, not wins), worse."""
    d = np.asarray(list(diffs), dtype=np.float64)
    if lower_is_better:
        d = -d
    return int((d > tol).sum()), int((np.abs(d) <= tol).sum()), int((d < -tol).sum())


def paired_few(ours: Mapping[int, dict], base: Mapping[int, dict], metric: str, resamples: int = 2000,
               seed: int = 0, ids: "Iterable[int] | None" = None) -> "dict | None":
    """One method's runs against another's (seed -> metrics.json contents, with "per_id" and
    "few_ids"): ``metric``'s raw difference ours - base per Few identity and seed, on the seeds both
    have and the Few identities both scored (``ids``: these identities instead of the runs' few_ids).
    Every (identity, seed) pair is one difference; returns their mean, the 95% identity-bootstrap
    interval (``identity_bootstrap``) and the wins / ties / losses over the pairs (FID: lower is
    better), or None when no pair exists."""
    diffs: dict[int, list[float]] = {}
    ids = None if ids is None else list(ids)
    for s in sorted(set(ours) & set(base)):
        a, b = ours[s], base[s]
        theirs = set(b.get("few_ids") or [])
        for i in ids if ids is not None else [i for i in a.get("few_ids") or [] if i in theirs]:
            x, y = a["per_id"][metric].get(str(i)), b["per_id"][metric].get(str(i))
            if x is not None and y is not None and np.isfinite(x) and np.isfinite(y):
                diffs.setdefault(i, []).append(float(x) - float(y))
    if not diffs:
        return None
    mean, low, high = identity_bootstrap(diffs, resamples=resamples, seed=seed)
    wins, ties, losses = wins_ties_losses([d for ds in diffs.values() for d in ds], metric == "fid")
    return {"metric": f"{metric}_few", "n_identities": len(diffs), "n_pairs": sum(len(d) for d in diffs.values()),
            "mean_diff": mean, "ci_low": low, "ci_high": high, "wins": wins, "ties": ties, "losses": losses}
