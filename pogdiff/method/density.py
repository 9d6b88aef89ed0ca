"""Inverse text density (Eq. 10-11): a small VAE on pooled text embeddings, psi_inv in log space.

Eq. 11 is psi_inv(y) = exp(-ELBO(y)) / a3. For 768-d embeddings -ELBO is hundreds of nats, so
exp overflows. We compute, with nll = -ELBO,

    log psi_inv(y) = clip((nll(y) - median_train(nll)) / temperature, -log_clip, log_clip) - log a3

* subtracting the training median is a constant factor, i.e. a rescaled a3: Eq. 11 unchanged;
* temperature defaults to the standard deviation of the training NLL: psi_inv = exp(z-score of the
  caption's NLL), O(1) for any D and large enough to lift minority captions above psi_img's
  penalty (DESIGN §1); temperature=1 is Eq. 11 exactly;
* the clip keeps exp() finite for any input, and is monotone, so a caption with lower density
  (a minority caption) never gets a smaller psi_inv than a more typical one.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pogdiff.config import DensityConfig
from pogdiff.method.neighbours import check_finite


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
        """ELBO per row (N,), averaged over ``samples`` reparameterised draws of z."""
        h = self.encoder(y)
        mu, logvar = self.to_mu(h), self.to_logvar(h).clamp(-12, 12)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        std = (0.5 * logvar).exp()
        eps = torch.randn((samples, *mu.shape), generator=generator, device=y.device, dtype=y.dtype)
        recon = self.decoder(mu + std * eps)  # (S, N, D)
        var = self.out_logvar.exp()
        log_lik = -0.5 * ((y - recon).pow(2) / var + self.out_logvar + math.log(2 * math.pi)).sum(-1)
        return log_lik.mean(0) - kl


class TextDensity:
    """A fitted VAE plus the standardisation and normalisation that turn it into psi_inv."""

    def __init__(self, vae: TextVAE, mean: torch.Tensor, std: torch.Tensor, median_nll: float,
                 temperature: float, log_clip: float, elbo_samples: int, seed: int):
        self.vae, self.mean, self.std = vae.eval(), mean, std
        self.median_nll, self.temperature, self.log_clip = median_nll, temperature, log_clip
        self.elbo_samples, self.seed = elbo_samples, seed

    @torch.no_grad()
    def nll(self, y: torch.Tensor, batch: int = 4096) -> torch.Tensor:
        """-ELBO per row, deterministic (a fixed Monte-Carlo seed)."""
        check_finite(y, "text embeddings")
        g = torch.Generator().manual_seed(self.seed)
        out = [-self.vae.elbo((c.float() - self.mean) / self.std, self.elbo_samples, g) for c in y.split(batch)]
        return torch.cat(out)

    def log_psi_inv(self, y: torch.Tensor, a3: float = 1.0) -> torch.Tensor:
        return self.log_psi_inv_from_nll(self.nll(y), a3)

    def log_psi_inv_from_nll(self, nll: torch.Tensor, a3: float = 1.0) -> torch.Tensor:
        z = (nll.float() - self.median_nll) / self.temperature
        return z.clamp(-self.log_clip, self.log_clip) - math.log(a3)

    def log_density(self, y: torch.Tensor) -> torch.Tensor:
        """ELBO, the log-density estimate T2H uses in place of class frequency."""
        return -self.nll(y)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tensors = {f"vae.{k}": v.contiguous() for k, v in self.vae.state_dict().items()}
        tensors.update(mean=self.mean.contiguous(), std=self.std.contiguous())
        meta = dict(median_nll=self.median_nll, temperature=self.temperature, log_clip=self.log_clip,
                    elbo_samples=self.elbo_samples, seed=self.seed, dim=int(self.mean.shape[0]),
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
                   meta["elbo_samples"], meta["seed"])


def fit_text_density(embeddings: torch.Tensor, cfg: DensityConfig, progress: bool = False) -> TextDensity:
    """Fit the VAE on the training set's pooled text embeddings (N, D)."""
    check_finite(embeddings, "text embeddings")
    y = embeddings.float()
    n, dim = y.shape
    if n < 2:
        raise ValueError(f"the text density needs at least 2 captions, got {n}")
    mean, std = y.mean(0), y.std(0).clamp(min=1e-6)
    ys = (y - mean) / std
    torch.manual_seed(cfg.seed)
    vae = TextVAE(dim, cfg.latent_dim, cfg.hidden_dim)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    epochs = range(cfg.epochs)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="density VAE", unit="epoch")
    for _ in epochs:
        for idx in torch.randperm(n, generator=g).split(cfg.batch_size):
            loss = -vae.elbo(ys[idx], 1, g).mean() / dim
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    density = TextDensity(vae, mean, std, 0.0, 1.0, cfg.log_clip, cfg.elbo_samples, cfg.seed)
    nll = density.nll(y)
    density.median_nll = float(nll.median())
    # the spread of the training NLL: the NLL gap between rare and common captions grows with the
    # embedding dimension, and dividing by D (a per-dimension ratio) shrank it below psi_img's
    density.temperature = float(cfg.temperature) if cfg.temperature is not None else max(float(nll.std()), 1e-6)
    return density
