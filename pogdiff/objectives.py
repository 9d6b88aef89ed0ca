"""The training objective of each method as one two-term loss (DESIGN §1).

    vanilla  mse(e, eps)
    pogdiff  mse(e, eps) + psi * mse(e, e'),  y' ~ Cat(w) over the sample's neighbours (Eq. 8-13)
    cbdm     mse(e, eps) + (t/T) tau [mse(e, sg(e')) + 1/4 mse(sg(e), e')],  y' uniform over the set
    t2h      mse(e, target'),  target' from a density-gated transfer to a batch neighbour's x0

Each builds per-sample weights for ``pogdiff.kernels.two_term_loss`` and runs the UNet once on
the concatenated batch [x_t; x_t], [t; t], [y; y'] (or, for grad_mode=stop, the y' half as a
separate no_grad call: ~4/3 of a vanilla step instead of ~2x).

Min-SNR weighting (``snr_gamma``, epsilon prediction) multiplies each sample's whole two-term loss
by ``min(SNR(t), gamma) / SNR(t)``, SNR(t) = abar_t / (1 - abar_t): y and y' share x_t and t, so the
pair term is weighted like the denoising term it regularises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from pogdiff.kernels import TwoTermWeights, two_term_loss, two_term_loss_concat

from .config import GradMode, Method, MethodConfig
from .neighbours import NeighbourSampler

# unet_fn(x_t, t, cond) -> eps prediction
UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Batch:
    index: torch.Tensor  # (B,) dataset indices, on CPU
    latents: torch.Tensor  # x0 (B, C, H, W)
    text: torch.Tensor  # y (B, L, D)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    target_mse: torch.Tensor  # (B,) detached
    pair_mse: Optional[torch.Tensor]  # (B,) detached, None without a pair term
    weights: TwoTermWeights
    timesteps: torch.Tensor


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> ``device`` without a host sync.

    A plain ``x.to("cuda")`` from pageable memory is cudaMemcpyAsync + cudaStreamSynchronize: the
    CPU waits for every queued kernel, and the GPU idles while the next ones are launched. Staged
    in pinned memory the copy is asynchronous; the values (the CPU generator's draws) are unchanged.
    """
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


class Objective:
    """Everything a training step needs besides the UNet and the batch."""

    def __init__(
        self,
        cfg: MethodConfig,
        alphas_cumprod: torch.Tensor,
        text_table: Optional[torch.Tensor] = None,  # (N, L, D): y' lookup (pogdiff, cbdm)
        sampler: Optional[NeighbourSampler] = None,  # pogdiff
        log_density: Optional[torch.Tensor] = None,  # (N,) ELBO per sample (t2h)
        null_text: Optional[torch.Tensor] = None,  # (L, D) empty-caption embedding
        caption_dropout: float = 0.0,
        backend: str = "auto",
        snr_gamma: Optional[float] = None,  # Min-SNR: min(SNR, gamma) / SNR scales each whole per-sample loss
        noise_offset: float = 0.0,  # eps += noise_offset * N(0, 1) per (sample, channel)
    ):
        self.cfg, self.backend = cfg, backend
        self.snr_gamma, self.noise_offset = snr_gamma, noise_offset
        self.alphas_cumprod = alphas_cumprod.float()
        self.num_timesteps = alphas_cumprod.shape[0]
        self.text_table, self.sampler, self.log_density = text_table, sampler, log_density
        self.null_text, self.caption_dropout = null_text, caption_dropout
        needs = {Method.pogdiff: ("text_table", "sampler"), Method.cbdm: ("text_table",), Method.t2h: ("log_density",)}
        for attr in needs.get(cfg.name, ()):
            if getattr(self, attr) is None:
                raise ValueError(f"method '{cfg.name.value}' needs {attr}")
        if caption_dropout > 0 and null_text is None:
            raise ValueError("caption_dropout > 0 needs the empty-caption embedding (null_text)")

    def __call__(self, unet: UNetFn, batch: Batch, generator: torch.Generator, with_terms: bool = False) -> LossOutput:
        x0, y = batch.latents, batch.text
        bsz, device = x0.shape[0], x0.device
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
        if self.noise_offset > 0:
            noise += self.noise_offset * torch.randn(x0.shape[:2] + (1,) * (x0.dim() - 2), generator=generator)
        noise = to_device(noise.to(x0.dtype), device)
        t = torch.randint(0, self.num_timesteps, (bsz,), generator=generator)
        abar = to_device(self.alphas_cumprod[t], device)
        shape = (bsz,) + (1,) * (x0.dim() - 1)
        x_t = abar.sqrt().view(shape) * x0 + (1 - abar).sqrt().view(shape) * noise
        t_dev = to_device(t, device)

        dropped = None
        if self.caption_dropout > 0:
            dropped = torch.rand(bsz, generator=generator) < self.caption_dropout
            y = torch.where(to_device(dropped, device).view(-1, 1, 1), to_device(self.null_text, device).to(y.dtype), y)

        method = self.cfg.name
        target, y_prime = noise, None
        if method == Method.vanilla:
            weights = TwoTermWeights.single(bsz, x0)
        elif method == Method.t2h:
            target = self.t2h_target(x0, x_t, noise, abar, batch.index, generator)
            weights = TwoTermWeights.single(bsz, x0)
        elif method == Method.pogdiff:
            nid, psi = self.sampler.sample(batch.index, generator)
            if dropped is not None:  # an unconditional y has no neighbour to agree with
                psi = torch.where(dropped, torch.zeros_like(psi), psi)
            y_prime = self.neighbour_text(nid, device, y.dtype)
            weights = TwoTermWeights.pogdiff(to_device(psi, device), self.cfg.grad_mode.value)
        elif method == Method.cbdm:
            nid = torch.randint(0, self.text_table.shape[0], (bsz,), generator=generator)
            y_prime = self.neighbour_text(nid, device, y.dtype)
            weights = TwoTermWeights.cbdm(self.cfg.cbdm_tau * t_dev.float() / self.num_timesteps)
        else:  # pragma: no cover - the config enum admits nothing else
            raise ValueError(f"unknown method {method}")

        if y_prime is None:
            a, b = unet(x_t, t_dev, y), None
            per_sample = two_term_loss(a, b, target, weights, backend=self.backend)
        elif method == Method.pogdiff and self.cfg.grad_mode == GradMode.stop and self.cfg.stop_split_forward:
            a = unet(x_t, t_dev, y)
            with torch.no_grad():
                b = unet(x_t, t_dev, y_prime)
            per_sample = two_term_loss(a, b, target, weights, backend=self.backend)
        else:
            pred = unet(torch.cat([x_t, x_t]), torch.cat([t_dev, t_dev]), torch.cat([y, y_prime]))
            a, b = pred[:bsz], pred[bsz:]
            # one gradient buffer for the whole (2B, ...) output, not two zero-filled slice gradients
            per_sample = two_term_loss_concat(pred, target, weights, backend=self.backend)

        if self.snr_gamma is not None:  # one Min-SNR weight per sample scales its whole two-term loss
            snr = abar / (1 - abar)
            per_sample = per_sample * (snr.clamp(max=self.snr_gamma) / snr)
        target_mse = pair_mse = None
        if with_terms:
            with torch.no_grad():
                target_mse = (a.float() - target.float()).pow(2).flatten(1).mean(1)
                pair_mse = None if b is None else (a.float() - b.float()).pow(2).flatten(1).mean(1)
        return LossOutput(per_sample.mean(), target_mse, pair_mse, weights, t)

    def neighbour_text(self, nid: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """y' rows of the text table (gathered where the table lives), on ``device``."""
        table = self.text_table
        if table.device.type == "cpu":
            return to_device(table[nid], device).to(dtype)  # copy in the table's (narrower) dtype
        return table[to_device(nid, table.device)].to(device, dtype)

    @torch.no_grad()
    def t2h_target(self, x0, x_t, noise, abar, index, generator) -> torch.Tensor:
        """T2H (official ``do_transfer_x0``), density standing in for class frequency.

        j ~ p(j | i) ∝ exp(-||x0_i + sigma_t eps_i - x0_j||^2 / (2 sigma_t^2)), sigma_t^2 = 1/abar_t - 1,
        kept only if density(j) >= density(i); the target becomes (x_t - sqrt(abar_t) x0_j) / sqrt(1 - abar_t).
        """
        bsz = x0.shape[0]
        sigma2 = (1.0 / abar - 1.0).clamp(min=1e-12)  # (B,)
        perturbed = (x_t.float() / abar.sqrt().view(-1, *[1] * (x0.dim() - 1))).flatten(1)
        d2 = torch.cdist(perturbed, x0.float().flatten(1)).pow(2)  # (B, B)
        logits = -d2 / (2 * sigma2[:, None])
        probs = torch.softmax(logits, dim=1)
        # j ~ Cat(probs) by inverse CDF on the device (no device -> host copy); u from the CPU generator
        u = to_device(torch.rand(bsz, 1, generator=generator), x0.device)
        j = torch.searchsorted(probs.cumsum(1), u, right=True).squeeze(1).clamp(max=bsz - 1)
        dens = to_device(self.log_density[index.cpu()], x0.device)
        keep = (dens[j] >= dens) & (j != torch.arange(bsz, device=x0.device))
        shape = (bsz,) + (1,) * (x0.dim() - 1)
        transferred = (x_t.float() - abar.sqrt().view(shape) * x0[j].float()) / (1 - abar).sqrt().view(shape)
        return torch.where(keep.view(shape), transferred.to(noise.dtype), noise)
