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

import numpy as np
import torch

from pogdiff.kernels import TwoTermWeights, two_term_loss, two_term_loss_concat

from pogdiff.config import GradMode, Method, MethodConfig
from pogdiff.method.neighbours import NeighbourSampler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# unet_fn(x_t, t, cond) -> the UNet's prediction (eps, v or x0: Objective.prediction_type)
UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Batch:
    """What the reader yields and the objective consumes (pogdiff.data.stream): the same type on
    every path."""

    index: torch.Tensor  # (B,) dataset rows, on CPU: neighbour table, psi, density
    latents: torch.Tensor  # x0 (B, C, H, W), already scaled by the VAE scaling factor
    tokens: torch.Tensor  # (B, L) int64 caption token ids of y
    keys: Optional[list[str]] = None  # dataset keys, for messages about bad samples
    skipped: int = 0  # samples the reader skipped (unreadable, corrupt, non-finite) since the previous batch
    time_ids: Optional[torch.Tensor] = None  # (B, 6) SDXL time ids of each latent (pogdiff.models.components)


class TextConditioner:
    """Caption token ids -> the UNet's cross-attention conditioning, through the frozen text encoder.

    ``tokens`` is the dataset's (N, L) token table (memory-mapped, pogdiff.data.shards): y' of row
    ``j`` is ``encode(tokens[j])``, so no step ever opens a tar file or holds (N, L, D) states.
    ``null_tokens`` (L,) is the empty caption (caption dropout, classifier-free guidance).
    ``pooled`` (SDXL): the pooled embedding's width, after which ``attach`` writes the image's time
    ids into the conditioning (pogdiff.models.components).
    """

    names = None  # the dataset's pogdiff.train.diagnostics.NameTokens (the name-only probe), where known

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], tokens, null_tokens: Optional[torch.Tensor] = None,
                 pooled: Optional[int] = None):
        self.encode, self.tokens, self.null_tokens, self.pooled = encode, tokens, null_tokens, pooled

    @classmethod
    def from_table(cls, table: torch.Tensor, null: Optional[torch.Tensor] = None) -> "TextConditioner":
        """Precomputed states (N, L, D): row ``i``'s "tokens" are ``[i]`` (tests and benchmarks)."""
        full = table if null is None else torch.cat([table, null[None]])
        return cls(lambda tok: full[tok[:, 0].cpu()], torch.arange(len(table))[:, None],
                   None if null is None else torch.tensor([len(table)]))

    def __len__(self) -> int:
        return len(self.tokens)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self.encode(tokens).to(device, dtype)

    def rows(self, rows: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        table = self.tokens
        tok = table[rows] if torch.is_tensor(table) else torch.from_numpy(np.asarray(table[rows.cpu().numpy()]))
        return self(tok.long(), device, dtype)

    def null(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self(self.null_tokens[None].long(), device, dtype)[0]

    def attach(self, cond: torch.Tensor, time_ids: Optional[torch.Tensor], repeat: int = 1) -> torch.Tensor:
        """``cond`` conditioning the batch's images (``repeat`` times over): with their time ids
        written in (SDXL), whichever caption it encodes; unchanged otherwise."""
        if self.pooled is None:
            return cond
        if time_ids is None:
            raise ValueError("an SDXL UNet needs each sample's time ids, and these shards have none: the dataset "
                             "was prepared before pogdiff recorded them; run `pogdiff prepare` into a new output")
        from pogdiff.models.components import attach_time_ids

        return attach_time_ids(cond, time_ids.repeat(repeat, 1), self.pooled)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    target_mse: torch.Tensor  # (B,) detached
    pair_mse: Optional[torch.Tensor]  # (B,) detached, None without a pair term
    weights: TwoTermWeights
    timesteps: torch.Tensor
    per_sample: Optional[torch.Tensor] = None  # (B,) detached: which samples made a loss non-finite
    partner: Optional[torch.Tensor] = None  # (B,) the dataset rows whose captions are y' (PoGDiff, CBDM)


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
        text: TextConditioner,  # y and y' from token ids
        sampler: Optional[NeighbourSampler] = None,  # pogdiff
        log_density: Optional[torch.Tensor] = None,  # (N,) ELBO per sample (t2h)
        caption_dropout: float = 0.0,
        backend: str = "auto",
        snr_gamma: Optional[float] = None,  # Min-SNR: min(SNR, gamma) / SNR scales each whole per-sample loss
        noise_offset: float = 0.0,  # eps += noise_offset * N(0, 1) per (sample, channel)
        input_perturbation: float = 0.0,  # x_t takes eps + input_perturbation * N(0, 1); the target keeps eps
        prediction_type: str = "epsilon",  # what the UNet predicts: "epsilon" | "v_prediction" | "sample"
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.cfg, self.backend, self.prediction_type = cfg, backend, prediction_type
        self.snr_gamma, self.noise_offset, self.input_perturbation = snr_gamma, noise_offset, input_perturbation
        self.alphas_cumprod = alphas_cumprod.float()
        self.num_timesteps = alphas_cumprod.shape[0]
        self.text, self.sampler, self.log_density = text, sampler, log_density
        self.caption_dropout = caption_dropout
        needs = {Method.pogdiff: ("sampler",), Method.t2h: ("log_density",)}
        for attr in needs.get(cfg.name, ()):
            if getattr(self, attr) is None:
                raise ValueError(f"method '{cfg.name.value}' needs {attr}")
        if caption_dropout > 0 and text.null_tokens is None:
            raise ValueError("caption_dropout > 0 needs the empty caption's tokens (TextConditioner.null_tokens)")

    def __call__(self, unet: UNetFn, batch: Batch, generator: torch.Generator, with_terms: bool = False,
                 step: Optional[int] = None) -> LossOutput:
        """The loss of ``batch``; ``step`` (the optimizer step) is what ``method.pair_start`` counts."""
        x0 = batch.latents
        bsz, device = x0.shape[0], x0.device
        y = self.text(batch.tokens, device, x0.dtype)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
        if self.noise_offset > 0:
            noise += self.noise_offset * torch.randn(x0.shape[:2] + (1,) * (x0.dim() - 2), generator=generator)
        noise = forward_noise = to_device(noise.to(x0.dtype), device)
        if self.input_perturbation > 0:
            extra = torch.randn(x0.shape, generator=generator)
            forward_noise = noise + self.input_perturbation * to_device(extra.to(x0.dtype), device)
        t = torch.randint(0, self.num_timesteps, (bsz,), generator=generator)
        abar = to_device(self.alphas_cumprod[t], device)
        shape = (bsz,) + (1,) * (x0.dim() - 1)
        x_t = abar.sqrt().view(shape) * x0 + (1 - abar).sqrt().view(shape) * forward_noise
        t_dev = to_device(t, device)

        dropped = None
        if self.caption_dropout > 0:
            dropped = torch.rand(bsz, generator=generator) < self.caption_dropout
            y = torch.where(to_device(dropped, device).view(-1, 1, 1), self.text.null(device, y.dtype), y)

        method = self.cfg.name
        if method == Method.pogdiff and step is not None and step < self.cfg.pair_start:
            method = Method.vanilla  # the warm-up: no y' drawn, no pair term
        target, x0_target, y_prime, nid = noise, x0, None, None
        if method == Method.vanilla:
            weights = TwoTermWeights.single(bsz, x0)
        elif method == Method.t2h:
            target, x0_target = self.t2h_transfer(x0, x_t, noise, abar, batch.index, generator)
            weights = TwoTermWeights.single(bsz, x0)
        elif method == Method.pogdiff:
            nid, psi = self.sampler.sample(batch.index, generator)
            if dropped is not None:  # an unconditional y has no neighbour to agree with
                psi = torch.where(dropped, torch.zeros_like(psi), psi)
            y_prime = self.text.rows(nid, device, y.dtype)
            weights = TwoTermWeights.pogdiff(to_device(psi, device), self.cfg.grad_mode.value)
        elif method == Method.cbdm:
            nid = torch.randint(0, len(self.text), (bsz,), generator=generator)
            y_prime = self.text.rows(nid, device, y.dtype)
            weights = TwoTermWeights.cbdm(self.cfg.cbdm_tau * t_dev.float() / self.num_timesteps)
        else:  # pragma: no cover - the config enum admits nothing else
            raise ValueError(f"unknown method {method}")

        target = self.in_parameterisation(target, x0_target, abar)
        y = self.text.attach(y, batch.time_ids)  # y' conditions the same image x: its time ids are x's
        y_prime = None if y_prime is None else self.text.attach(y_prime, batch.time_ids)
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
            # diffusers' weighting per parameterisation: the eps loss is the x0 loss / SNR, the v loss / (SNR + 1)
            denominator = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[self.prediction_type]
            per_sample = per_sample * (snr.clamp(max=self.snr_gamma) / denominator)
        target_mse = pair_mse = None
        if with_terms:
            with torch.no_grad():
                target_mse = (a.float() - target.float()).pow(2).flatten(1).mean(1)
                pair_mse = None if b is None else (a.float() - b.float()).pow(2).flatten(1).mean(1)
        return LossOutput(per_sample.mean(), target_mse, pair_mse, weights, t, per_sample.detach(), nid)

    def in_parameterisation(self, eps: torch.Tensor, x0: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """The regression target for this UNet from the (eps, x0) pair that makes x_t: eps itself,
        the velocity ``sqrt(abar) eps - sqrt(1 - abar) x0`` (diffusers' ``get_velocity``), or x0.
        Both PoGDiff terms then compare predictions in the same parameterisation."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0.to(eps.dtype)
        shape = (eps.shape[0],) + (1,) * (eps.dim() - 1)
        return (abar.sqrt().view(shape) * eps.float() - (1 - abar).sqrt().view(shape) * x0.float()).to(eps.dtype)

    def t2h_target(self, x0, x_t, noise, abar, index, generator) -> torch.Tensor:
        """T2H's epsilon target (see ``t2h_transfer``)."""
        return self.t2h_transfer(x0, x_t, noise, abar, index, generator)[0]

    @torch.no_grad()
    def t2h_transfer(self, x0, x_t, noise, abar, index, generator) -> tuple[torch.Tensor, torch.Tensor]:
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
        # (eps target, the x0 it pairs with): what any parameterisation's target is made of
        return torch.where(keep.view(shape), transferred.to(noise.dtype), noise), torch.where(keep.view(shape), x0[j], x0)
