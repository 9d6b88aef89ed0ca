"""PyTorch reference of the two-term loss that every method of DESIGN §1 reduces to.

Per sample i, with a = first half of the UNet output, b = second half (the y' half), t = target:

    loss_i = w_target_i * mse(a_i, t_i) + w_pair_i * mse(a_i, b_i)

and the pair term's gradient is scaled separately into each half:

    d loss_i / d a_i = w_target_i * d mse(a_i, t_i)/d a_i + w_grad_a_i * d mse(a_i, b_i)/d a_i
    d loss_i / d b_i =                                     w_grad_b_i * d mse(a_i, b_i)/d b_i

PoGDiff full: w_pair = w_grad_a = w_grad_b = psi.  PoGDiff stop: w_grad_b = 0.
CBDM: w_pair = 5/4 c, w_grad_a = c, w_grad_b = c/4 with c = tau * t / T.  Vanilla, T2H: no pair term.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class TwoTermWeights:
    """Per-sample weights, each of shape (B,)."""

    target: torch.Tensor
    pair: Optional[torch.Tensor] = None
    grad_a: Optional[torch.Tensor] = None
    grad_b: Optional[torch.Tensor] = None

    @classmethod
    def pogdiff(cls, psi: torch.Tensor, grad_mode: str = "full") -> "TwoTermWeights":
        if grad_mode not in ("full", "stop"):
            raise ValueError(f"grad_mode must be 'full' or 'stop', got {grad_mode!r}")
        return cls(
            target=torch.ones_like(psi),
            pair=psi,
            grad_a=psi,
            grad_b=psi if grad_mode == "full" else torch.zeros_like(psi),
        )

    @classmethod
    def cbdm(cls, c: torch.Tensor) -> "TwoTermWeights":
        # mse(e, sg(e')) + 1/4 mse(sg(e), e'): value 5/4 c, gradient c into e and c/4 into e'.
        return cls(target=torch.ones_like(c), pair=1.25 * c, grad_a=c, grad_b=0.25 * c)

    @classmethod
    def single(cls, batch: int, like: torch.Tensor) -> "TwoTermWeights":
        return cls(target=torch.ones(batch, dtype=torch.float32, device=like.device))

    @property
    def has_pair(self) -> bool:
        return self.pair is not None


def _per_sample_mse(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (x.to(dtype) - y.to(dtype)).pow(2).flatten(1).mean(1)


def two_term_loss_reference(
    a: torch.Tensor, b: Optional[torch.Tensor], target: torch.Tensor, w: TwoTermWeights
) -> torch.Tensor:
    """Per-sample losses (B,), with the gradient scaling above expressed via stop-gradients. Computed
    in fp32, or in the inputs' dtype where that is wider (fp64 stays fp64)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    loss = w.target.to(dtype) * _per_sample_mse(a, target, dtype)
    if b is None or not w.has_pair:
        return loss
    pair, ga, gb = w.pair.to(dtype), w.grad_a.to(dtype), w.grad_b.to(dtype)
    ad, bd = a.detach(), b.detach()
    value = _per_sample_mse(ad, bd, dtype)
    # Each piece carries one gradient path; the detached remainder makes the value w_pair * mse.
    loss = loss + ga * _per_sample_mse(a, bd, dtype) + gb * _per_sample_mse(ad, b, dtype) + (pair - ga - gb) * value
    return loss
