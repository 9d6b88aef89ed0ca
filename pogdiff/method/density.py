"""Inverse text density (Eq. 10-11): a small VAE on pooled text embeddings, psi_inv in log space.

Eq. 11 is psi_inv(y) = exp(-ELBO(y)) / a3. For 768-d embeddings -ELBO is hundreds of nats, so
exp overflows. With nll = -ELBO, the default (``density.form: eq11``) computes Eq. 11 in log space:

    log psi_inv(y) = min(nll(y) - anchor, MAX_LOG_PSI_INV) - log method.a3

* ``anchor`` is the ``density.anchor_quantile`` quantile of the training NLL: exp(anchor) * a3 is
  Eq. 11's a3, the only scale. The rule needs no identity labels: a caption as rare as that
  quantile gets psi_inv = 1 / method.a3, rarer ones more, typical ones exponentially less (no
  exponent: the ratio between two captions is exp(nll difference), as printed);
* the min is there only against float overflow (exp(88.7) is float32's largest); the share of rows
  it clips is reported (``clipped_share``).

``density.form: temperature`` is this project's earlier map, not the paper's:
log psi_inv = clip((nll - median) / T, +-log_clip) - log a3 with T = sd(NLL) (or density.temperature),
i.e. exp(-ELBO)^(1/T): it flattens the tail/head ratio (~317 -> 2.85 on agedb-l) and gives head
captions psi_inv ~ 1.

Memory is flat in N: the VAE trains on minibatches read from the memory-mapped (N, D) column, the
standardisation, quantiles and spread come from chunked passes, and scoring (-ELBO per row, then psi
per (row, neighbour)) is a map over row ranges (``map_row_ranges``) into memory-mapped outputs,
run as Ray tasks on a cluster (``uses_cluster``) and in this process otherwise.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pogdiff.config import DensityConfig, DensityForm
from pogdiff import npyrows
from pogdiff.method.neighbours import NeighbourTable, check_finite, psi_table
from pogdiff.runs import atomic_path
from pogdiff.seeds import derive_seed

# The scoring noise: one Monte-Carlo seed per block of this many rows, so a row's -ELBO is the same
# whichever range or task scores it (every range starts on a block). A single noise stream over all
# rows, as before, cannot be split into ranges without replaying it. Block 0 keeps the density's
# seed, so a column of at most one block scores as it did with that stream.
SCORE_BLOCK_ROWS = 4096
ROWS_PER_TASK = 64 * SCORE_BLOCK_ROWS  # one range of the scoring map
# Training shuffles blocks of contiguous rows (one sequential read each) and, within a window of
# blocks drawn from anywhere in the column, the rows: a minibatch mixes 64 distant places even when
# the rows are sorted by identity, the host holds one window (16 MiB per 64 dims) and the
# per-epoch order is one integer per block. A full permutation per epoch would be O(N) integers and
# a random read per row. A column of at most one window is one window: a full shuffle.
SHUFFLE_BLOCK_ROWS = 1024
SHUFFLE_WINDOW_ROWS = 64 * SHUFFLE_BLOCK_ROWS
STATS_CHUNK_ROWS = 1 << 16  # rows per read of the chunked passes (standardisation, median, spread)
# Eq. 11's log psi_inv is clipped here, against overflow only: psi = psi_img * psi_inv (psi_img <= 1)
# multiplies a per-sample MSE in float32, whose largest value is exp(88.7).
MAX_LOG_PSI_INV = 80.0


class TextVAE(nn.Module):
    """Gaussian encoder q(z|y), standard normal prior, Gaussian decoder with a learned variance."""

    def __init__(self, dim: int, latent_dim: int = 16, hidden_dim: int = 128):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim), nn.SiLU())
        self.to_mu = nn.Linear(hidden_dim, latent_dim)
        self.to_logvar = nn.Linear(hidden_dim, latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim), nn.SiLU(),
            nn.Linear(hidden_dim, dim),
        )
        self.out_logvar = nn.Parameter(torch.zeros(dim))

    def elbo(self, y: torch.Tensor, samples: int = 1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """ELBO per row (N,), averaged over ``samples`` reparameterised draws of z (drawn on the
        generator's device, so a CPU generator gives the same noise to a model on a GPU)."""
        h = self.encoder(y)
        mu, logvar = self.to_mu(h), self.to_logvar(h).clamp(-12, 12)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        std = (0.5 * logvar).exp()
        eps = torch.randn((samples, *mu.shape), generator=generator, dtype=y.dtype,
                          device=y.device if generator is None else generator.device).to(y.device)
        var = self.out_logvar.exp()
        log_lik = torch.zeros_like(kl)
        for e in eps:  # one draw at a time: no (samples, N, D) reconstruction
            recon = self.decoder(mu + std * e)
            log_lik = log_lik - 0.5 * ((y - recon).pow(2) / var + self.out_logvar + math.log(2 * math.pi)).sum(-1)
        return log_lik / samples - kl


class TextDensity:
    """A fitted VAE plus the standardisation and normalisation that turn it into psi_inv."""

    def __init__(self, vae: TextVAE, mean: torch.Tensor, std: torch.Tensor, median_nll: float,
                 temperature: float, log_clip: float, elbo_samples: int, seed: int,
                 form: str = "eq11", anchor_nll: Optional[float] = None):
        self.vae, self.mean, self.std = vae.eval(), mean, std
        self.median_nll, self.temperature, self.log_clip = median_nll, temperature, log_clip
        self.elbo_samples, self.seed = elbo_samples, seed
        # form "eq11": log psi_inv = nll - anchor_nll (Eq. 11); "temperature": this project's map
        self.form = form
        self.anchor_nll = median_nll if anchor_nll is None else anchor_nll

    def to(self, device: torch.device | str) -> "TextDensity":
        self.vae.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @torch.no_grad()
    def nll(self, y: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        """-ELBO per row on the CPU, deterministic: ``y`` is rows ``first_row...`` of the scored column
        (a multiple of SCORE_BLOCK_ROWS), and each block of rows has its own Monte-Carlo seed."""
        if first_row % SCORE_BLOCK_ROWS:
            raise ValueError(f"first_row={first_row} is not a multiple of SCORE_BLOCK_ROWS={SCORE_BLOCK_ROWS}")
        check_finite(y, "text embeddings")
        out = []
        for block, rows in enumerate(y.split(SCORE_BLOCK_ROWS), start=first_row // SCORE_BLOCK_ROWS):
            g = torch.Generator().manual_seed(derive_seed(self.seed, block) if block else self.seed)
            ys = (rows.to(self.mean.device).float() - self.mean) / self.std
            out.append(-self.vae.elbo(ys, self.elbo_samples, g).cpu())
        return torch.cat(out)

    def log_psi_inv(self, y: torch.Tensor, a3: float = 1.0) -> torch.Tensor:
        return self.log_psi_inv_from_nll(self.nll(y), a3)

    def log_psi_inv_from_nll(self, nll: torch.Tensor, a3: float = 1.0) -> torch.Tensor:
        if self.form == "temperature":
            z = (nll.float() - self.median_nll) / self.temperature
            return z.clamp(-self.log_clip, self.log_clip) - math.log(a3)
        return (nll.float() - self.anchor_nll - math.log(a3)).clamp(max=MAX_LOG_PSI_INV)

    def normalised(self, cfg: DensityConfig, nll: "Column") -> "TextDensity":
        """This density with ``cfg``'s map (density.form, .temperature, .log_clip) and Eq. 11's anchor:
        the density.anchor_quantile quantile of the training NLL ``nll`` (N,), in chunked passes."""
        self.form, self.log_clip = DensityForm(cfg.form).value, cfg.log_clip
        if cfg.temperature is not None:
            self.temperature = float(cfg.temperature)
        n = len(_open(nll))
        self.anchor_nll = kth_smallest(nll, min(n - 1, round(cfg.anchor_quantile * (n - 1))))
        return self

    def is_clipped(self, nll: torch.Tensor, a3: float = 1.0) -> torch.Tensor:
        """Rows whose log psi_inv the map clips (Eq. 11: only against overflow)."""
        if self.form == "temperature":
            return ((nll.float() - self.median_nll) / self.temperature).abs() > self.log_clip
        return nll.float() - self.anchor_nll - math.log(a3) > MAX_LOG_PSI_INV

    def log_density(self, y: torch.Tensor) -> torch.Tensor:
        """ELBO, the log-density estimate T2H uses in place of class frequency."""
        return -self.nll(y)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tensors = {f"vae.{k}": v.detach().cpu().contiguous() for k, v in self.vae.state_dict().items()}
        tensors.update(mean=self.mean.cpu().contiguous(), std=self.std.cpu().contiguous())
        meta = dict(median_nll=self.median_nll, temperature=self.temperature, log_clip=self.log_clip,
                    elbo_samples=self.elbo_samples, seed=self.seed, dim=int(self.mean.shape[0]),
                    form=self.form, anchor_nll=self.anchor_nll,
                    latent_dim=self.vae.to_mu.out_features, hidden_dim=self.vae.to_mu.in_features)
        save_file(tensors, str(path), metadata={"density": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> "TextDensity":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["density"])
        t = load_file(str(path))
        vae = TextVAE(meta["dim"], meta["latent_dim"], meta["hidden_dim"])
        vae.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("vae.")})
        return cls(vae, t["mean"], t["std"], meta["median_nll"], meta["temperature"], meta["log_clip"],
                   meta["elbo_samples"], meta["seed"], meta.get("form", "temperature"), meta.get("anchor_nll"))


# ----------------------------------------------------------------------------- chunked column passes

Column = str | np.ndarray  # a column as the path of its .npy, or an array


def column_source(column: np.ndarray | torch.Tensor | object) -> Column | object:
    """How a column is read: a whole memory-mapped .npy by its path, a tensor as its array; any
    other value as it is. A path travels to a Ray task as it is (a pickled memmap is a copy of
    its data), and ``read_rows`` reads its rows from the file (pogdiff.npyrows), never through a
    map whose pages would stay in this process's resident set until it grew to the whole column."""
    if isinstance(column, torch.Tensor):
        return column.detach().cpu().numpy()
    whole_file = isinstance(column, np.memmap) and column.filename is not None \
        and np.load(column.filename, mmap_mode="r").shape == column.shape
    return str(column.filename) if whole_file else column


def _open(column: Column) -> np.ndarray:
    return np.load(column, mmap_mode="r") if isinstance(column, str) else column


def read_rows(column: Column, start: int, stop: int, dtype=np.float32) -> np.ndarray:
    """Rows [start, stop) of a column as a new array (``dtype`` None: the column's)."""
    if isinstance(column, str):
        rows = npyrows.read_rows(column, start, stop)
        return rows if dtype is None else rows.astype(dtype, copy=False)
    return np.array(column[start:stop], dtype=dtype)


def column_stats(column: Column, what: str, chunk_rows: int = STATS_CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (N - 1) per column of an (N, D) or (N,) array, one chunk in
    memory at a time (Chan et al.'s pairwise update, float64); NaN/inf rows are an error naming them."""
    shape = _open(column).shape
    n, dim = shape[0], int(np.prod(shape[1:]))
    count, mean, m2 = 0, np.zeros(dim), np.zeros(dim)
    bad_rows, bad = [], 0
    for start in range(0, n, chunk_rows):
        chunk = read_rows(column, start, start + chunk_rows, np.float64).reshape(-1, dim)
        finite = np.isfinite(chunk).all(1)
        if not finite.all():
            bad_rows += (start + np.flatnonzero(~finite))[:10 - len(bad_rows)].tolist()
            bad += int((~finite).sum())
        if bad:
            continue
        n_chunk, mean_chunk = len(chunk), chunk.mean(0)
        delta, total = mean_chunk - mean, count + n_chunk
        m2 += ((chunk - mean_chunk) ** 2).sum(0) + delta ** 2 * count * n_chunk / total
        mean += delta * n_chunk / total
        count = total
    if bad:
        raise ValueError(f"{what} has NaN/inf values in rows {bad_rows} (of {bad}): fix or drop those records")
    return mean, np.sqrt(m2 / max(count - 1, 1))


def kth_smallest(values: Column, k: int, chunk_rows: int = STATS_CHUNK_ROWS) -> float:
    """The exact k-th smallest (0-based) of a 1-d, possibly memory-mapped, array in chunked passes.
    numpy's median and partition need the whole array in memory; here each pass counts the values
    per bin of a range [lo, hi) known to hold the k-th, the range shrinks to the bin that holds it,
    and once that bin's values fit in one chunk they are partitioned in memory."""
    n = len(_open(values))

    def chunks() -> Iterator[np.ndarray]:
        for start in range(0, n, chunk_rows):
            yield read_rows(values, start, start + chunk_rows, np.float64)

    lo, hi = math.inf, -math.inf
    for chunk in chunks():
        lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
    hi = float(np.nextafter(hi, math.inf))
    below, inside, bins = 0, n, 4096  # values < lo; values in [lo, hi)
    while inside > chunk_rows and np.nextafter(lo, math.inf) < hi:
        edges = np.linspace(lo, hi, bins + 1)  # edges[-1] == hi exactly
        counts = np.zeros(bins, dtype=np.int64)
        for chunk in chunks():
            chunk = chunk[(chunk >= lo) & (chunk < hi)]
            counts += np.bincount(np.searchsorted(edges, chunk, side="right") - 1, minlength=bins)
        j = int(np.searchsorted(np.cumsum(counts), k - below, side="right"))  # edges[j] <= k-th < edges[j + 1]
        below, inside = below + int(counts[:j].sum()), int(counts[j])
        lo, hi = float(edges[j]), float(edges[j + 1])
    if np.nextafter(lo, math.inf) >= hi:  # one value left
        return lo
    kept = np.concatenate([chunk[(chunk >= lo) & (chunk < hi)] for chunk in chunks()])
    return float(np.partition(kept, k - below)[k - below])


# ------------------------------------------------------------------------------------------ fitting

def _shuffle_windows(n: int, generator: torch.Generator, window_rows: int) -> Iterator[list[tuple[int, int]]]:
    """One epoch: the row ranges (blocks, in row order) of each shuffle window."""
    blocks = math.ceil(n / SHUFFLE_BLOCK_ROWS)
    per_window = max(1, window_rows // SHUFFLE_BLOCK_ROWS)
    if blocks <= per_window:
        yield [(0, n)]
        return
    for window in torch.randperm(blocks, generator=generator).split(per_window):
        yield [(b * SHUFFLE_BLOCK_ROWS, min((b + 1) * SHUFFLE_BLOCK_ROWS, n)) for b in sorted(window.tolist())]


def train_text_vae(embeddings: np.ndarray | torch.Tensor, cfg: DensityConfig, progress: bool = False,
                   window_rows: int = SHUFFLE_WINDOW_ROWS) -> TextDensity:
    """The VAE trained on minibatches streamed from ``embeddings`` (N, D), a memory-mapped column or
    an array, on ``density.device``; returned unnormalised (median 0, temperature 1), on the CPU."""
    column = column_source(embeddings)
    n, dim = _open(column).shape
    if n < 2:
        raise ValueError(f"the text density needs at least 2 captions, got {n}")
    from pogdiff.models.components import resolve_device

    device = resolve_device(cfg.device)
    mean, std = column_stats(column, "text embeddings")
    mean, std = torch.from_numpy(mean).float(), torch.from_numpy(std).float().clamp(min=1e-6)
    torch.manual_seed(cfg.seed)
    vae = TextVAE(dim, cfg.latent_dim, cfg.hidden_dim).to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)  # the order of rows (and the noise, on the CPU)
    noise = g if device.type == "cpu" else torch.Generator(device).manual_seed(cfg.seed)
    mean_d, std_d = mean.to(device), std.to(device)
    epochs = range(cfg.epochs)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="density VAE", unit="epoch")
    for _ in epochs:
        for ranges in _shuffle_windows(n, g, window_rows):
            window = np.concatenate([read_rows(column, a, b) for a, b in ranges])
            ys = (torch.from_numpy(window).to(device) - mean_d) / std_d
            for idx in torch.randperm(len(ys), generator=g).split(cfg.batch_size):
                loss = -vae.elbo(ys[idx.to(device)], 1, noise).mean() / dim
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return TextDensity(vae.cpu(), mean, std, 0.0, 1.0, cfg.log_clip, cfg.elbo_samples, cfg.seed)


def fit_text_density(embeddings: np.ndarray | torch.Tensor, cfg: DensityConfig, progress: bool = False,
                     nll_path: Optional[Path] = None, ray_address: Optional[str] = None,
                     window_rows: int = SHUFFLE_WINDOW_ROWS) -> TextDensity:
    """Fit the VAE on the training set's pooled text embeddings (N, D) and normalise it by the
    median and spread of the training NLL; -ELBO per row (N,) is written to ``nll_path`` when given."""
    column = column_source(embeddings)
    density = train_text_vae(column, cfg, progress, window_rows)
    n = len(_open(column))
    with rows_output(nll_path, (n,), np.float32) as out:
        map_row_ranges(nll_rows, n, out, (density, column), distributed=uses_cluster(n, cfg, ray_address),
                       ray_address=ray_address, device=cfg.device, progress=progress)
    nll = out if nll_path is None else str(nll_path)
    _, spread = column_stats(nll, "the training NLL")
    density.median_nll = kth_smallest(nll, (n - 1) // 2)  # the lower median, as torch.median
    # the spread of the training NLL: the NLL gap between rare and common captions grows with the
    # embedding dimension, and dividing by D (a per-dimension ratio) shrank it below psi_img's
    density.temperature = max(float(spread[0]), 1e-6)
    return density.normalised(cfg, nll).to("cpu")


def psi_inv_stats(density: TextDensity, nll: Column, is_minority, a3: float = 1.0,
                  chunk_rows: int = STATS_CHUNK_ROWS) -> dict:
    """psi_inv's own summary over the training rows, in chunked passes: the map and its anchor, the
    tail/head ratio of mean psi_inv, the head's share of psi_inv mass, the largest psi_inv and the
    share of rows the map clips."""
    column = column_source(nll)
    n = len(_open(column))
    sums = np.zeros((2, 2))  # [psi_inv, count] x [head, tail]
    clipped, largest = 0, -math.inf
    for start in range(0, n, chunk_rows):
        rows = torch.from_numpy(read_rows(column, start, start + chunk_rows))
        log_inv = density.log_psi_inv_from_nll(rows, a3).double()
        tail = np.asarray(is_minority[start:start + len(rows)], dtype=np.int64)
        sums[0] += np.bincount(tail, weights=log_inv.exp().numpy(), minlength=2)
        sums[1] += np.bincount(tail, minlength=2)
        clipped += int(density.is_clipped(rows, a3).sum())
        largest = max(largest, float(log_inv.max()))
    mean = [sums[0, i] / sums[1, i] if sums[1, i] else float("nan") for i in (0, 1)]
    return {"psi_inv_form": density.form, "psi_inv_anchor_nll": density.anchor_nll,
            "psi_inv_tail_over_head": mean[1] / mean[0] if mean[0] > 0 and mean[1] == mean[1] else None,
            "psi_inv_head_mass_share": float(sums[0, 0] / sums[0].sum()) if sums[0].sum() > 0 else None,
            "psi_inv_max": math.exp(largest) if n else None, "psi_inv_clipped_share": clipped / n if n else 0.0}


# ------------------------------------------------------------------------------ the map over rows

def nll_rows(start: int, stop: int, density: TextDensity, embeddings: Column, device: str = "cpu") -> np.ndarray:
    """-ELBO of rows [start, stop) of the embedding column, read one scoring block at a time."""
    density = density.to(device)
    return np.concatenate([
        density.nll(torch.from_numpy(read_rows(embeddings, a, min(a + SCORE_BLOCK_ROWS, stop))), first_row=a).numpy()
        for a in range(start, stop, SCORE_BLOCK_ROWS)])


def psi_rows(start: int, stop: int, neighbours: str, a1: float, a2: float, use_psi_img: bool,
             density: Optional[TextDensity] = None, nll: Optional[Column] = None, a3: float = 1.0) -> np.ndarray:
    """Eq. 12 for rows [start, stop): psi per (row, neighbour) from the neighbour table in the folder
    ``neighbours`` (ids/sims/different_identity.npy) and the rows' -ELBO (None: w/o psi_inv), one
    scoring block at a time (the temporaries of a whole range would be several times its table)."""

    def block(a: int, b: int) -> np.ndarray:
        table = NeighbourTable(*(torch.from_numpy(read_rows(str(Path(neighbours) / f"{name}.npy"), a, b, dtype=None))
                                 for name in ("ids", "sims", "different_identity")))
        log_inv = None if density is None else density.log_psi_inv_from_nll(torch.from_numpy(read_rows(nll, a, b)), a3)
        return psi_table(table, log_inv, a1, a2, use_psi_img=use_psi_img).numpy()

    return np.concatenate([block(a, min(a + SCORE_BLOCK_ROWS, stop)) for a in range(start, stop, SCORE_BLOCK_ROWS)])


def uses_cluster(n: int, cfg: DensityConfig, ray_address: Optional[str]) -> bool:
    """Whether the scoring map runs as Ray tasks: on the user's cluster, or from density.distributed_min_rows."""
    return bool(ray_address or os.environ.get("RAY_ADDRESS")) or n >= cfg.distributed_min_rows


@contextlib.contextmanager
def rows_output(path: Optional[Path], shape: tuple[int, ...], dtype) -> Iterator[np.ndarray | npyrows.NpyWriter]:
    """An array for ``map_row_ranges`` to fill: in memory, or (``path``) a .npy written by rows
    (pogdiff.npyrows) at a temporary name, moved onto ``path`` once every range is written."""
    if path is None:
        yield np.empty(shape, dtype)
        return
    with atomic_path(path) as tmp, npyrows.NpyWriter(tmp, dtype, shape) as out:
        yield out


def _in_parts(fn: Callable[..., np.ndarray], start: int, stop: int, *args, **kwargs) -> Iterator[np.ndarray]:
    """A scoring task's rows in small parts (a Ray streaming generator's items: they come back in
    the reply, not through the object store, whose pages stay in the RSS of the process that reads
    them; pogdiff.dist.neighbour_service.result_parts)."""
    from pogdiff.dist.neighbour_service import result_parts

    for (part,) in result_parts(fn(start, stop, *args, **kwargs)):
        yield part


def map_row_ranges(fn: Callable[..., np.ndarray], n: int, out: np.ndarray, args: tuple, distributed: bool = False,
                   ray_address: Optional[str] = None, device: Optional[str] = None,
                   rows_per_task: int = ROWS_PER_TASK, progress: bool = False) -> None:
    """``out[a:b] = fn(a, b, *args[, device=...])`` for consecutive ranges covering rows [0, n): Ray
    tasks (through pogdiff.dist.cluster.connect) when ``distributed``, else here, one range at a time.

    ``device`` (auto|cpu|cuda) is where ``fn`` computes: resolved here; a task takes a GPU when it is
    cuda, or auto on a cluster with GPUs. Results come back to this process in small parts
    (``_in_parts``), which it writes (the workers need read access to the inputs only); at most
    twice the cluster's CPUs of tasks are pending at once (``ray.wait``), so nothing holds O(N). A
    memory-mapped column in ``args`` reaches ``fn`` as its path (``column_source``)."""
    if rows_per_task % SCORE_BLOCK_ROWS:
        raise ValueError(f"rows_per_task={rows_per_task} must be a multiple of SCORE_BLOCK_ROWS={SCORE_BLOCK_ROWS}")
    ranges = [(a, min(a + rows_per_task, n)) for a in range(0, n, rows_per_task)]
    args = tuple(column_source(a) for a in args)
    from tqdm import tqdm

    bar = tqdm(total=n, desc=fn.__name__, unit="row", disable=not progress)
    if not distributed:
        from pogdiff.models.components import resolve_device

        kwargs = {} if device is None else {"device": str(resolve_device(device))}
        for a, b in ranges:
            out[a:b] = fn(a, b, *args, **kwargs)
            bar.update(b - a)
        bar.close()
        return
    import ray

    from pogdiff.dist.cluster import session

    with session(ray_address):
        gpu = device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        kwargs = {} if device is None else {"device": "cuda" if gpu else "cpu"}
        task = ray.remote(_in_parts).options(name=fn.__name__, num_cpus=1, num_gpus=1 if gpu else 0,
                                             num_returns="streaming")
        shared = [ray.put(a) for a in args]
        limit = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        todo, pending = iter(ranges), {}
        for a, b in todo:
            pending[task.remote(fn, a, b, *shared, **kwargs)] = (a, b)
            if len(pending) >= limit:
                break
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            a, b = pending.pop(done)
            row = a
            for ref in done:
                part = ray.get(ref)
                out[row:row + len(part)] = part
                row += len(part)
            if row != b:
                raise RuntimeError(f"{fn.__name__}: rows {a}:{b} came back as {row - a} rows")
            bar.update(b - a)
            nxt = next(todo, None)
            if nxt is not None:
                pending[task.remote(fn, *nxt, *shared, **kwargs)] = nxt
        bar.close()
