"""Fused two-term loss for PoGDiff and its baselines (installed as ``pogdiff.kernels``).

``pog_loss`` is the public contract; ``two_term_loss`` is the general form every method uses.
"""
from __future__ import annotations

from typing import Optional

import torch

from pogdiff.kernels.reference import TwoTermWeights, two_term_loss_reference

__all__ = ["TwoTermWeights", "pog_loss", "two_term_loss", "two_term_loss_concat", "two_term_loss_reference"]

_BACKENDS = ("auto", "torch", "triton")


def _resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if tensor.is_cuda and _triton_available() else "torch"
    return backend


def _triton_available() -> bool:
    try:
        from pogdiff.kernels import triton_two_term  # noqa: F401
    except ImportError:
        return False
    return True


def two_term_loss(
    a: torch.Tensor,
    b: Optional[torch.Tensor],
    target: torch.Tensor,
    weights: TwoTermWeights,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-sample two-term losses, shape (B,), fp32. See ``reference.py`` for the formula."""
    if target.shape != a.shape or (b is not None and b.shape != a.shape):
        raise ValueError(
            f"shape mismatch: a {tuple(a.shape)}, b {None if b is None else tuple(b.shape)}, "
            f"target {tuple(target.shape)}: all must be (B, ...) with the same shape"
        )
    if weights.target.shape != a.shape[:1]:
        raise ValueError(f"weights must have shape ({a.shape[0]},), got {tuple(weights.target.shape)}")
    if _resolve_backend(backend, a) == "triton":
        from pogdiff.kernels.triton_two_term import two_term_loss_triton

        return two_term_loss_triton(a, b, target, weights)
    return two_term_loss_reference(a, b, target, weights)


def two_term_loss_concat(
    pred: torch.Tensor, target: torch.Tensor, weights: TwoTermWeights, backend: str = "auto"
) -> torch.Tensor:
    """``two_term_loss(pred[:B], pred[B:], ...)`` for the UNet output on ``[y; y']``, pred (2B, ...).

    On Triton the gradient of pred is one buffer written by the kernel, not two slice gradients that
    autograd zero-fills to (2B, ...) and adds.
    """
    batch = target.shape[0]
    if pred.shape[0] != 2 * batch or pred.shape[1:] != target.shape[1:]:
        raise ValueError(
            f"pred must be (2B, ...) = {(2 * batch, *target.shape[1:])} for target {tuple(target.shape)}, "
            f"got {tuple(pred.shape)}"
        )
    if _resolve_backend(backend, pred) == "triton":
        if weights.target.shape != (batch,):
            raise ValueError(f"weights must have shape ({batch},), got {tuple(weights.target.shape)}")
        from pogdiff.kernels.triton_two_term import two_term_loss_concat_triton

        return two_term_loss_concat_triton(pred, target, weights)
    return two_term_loss(pred[:batch], pred[batch:], target, weights, backend="torch")


def pog_loss(
    eps_pred: torch.Tensor,
    noise: torch.Tensor,
    psi: torch.Tensor,
    grad_mode: str = "full",
    backend: str = "auto",
) -> torch.Tensor:
    """PoGDiff objective (Eq. 13): ``mean_i[ mse(e_i, eps_i) + psi_i * mse(e_i, e'_i) ]``.

    eps_pred: UNet output on the concatenated batch ``[y; y']``, shape (2B, ...).
    noise: (B, ...). psi: (B,). grad_mode "stop" gives the y' half no gradient.
    """
    batch = noise.shape[0]
    if eps_pred.shape[0] != 2 * batch or eps_pred.shape[1:] != noise.shape[1:]:
        raise ValueError(
            f"eps_pred must be (2B, ...) = {(2 * batch, *noise.shape[1:])} for noise {tuple(noise.shape)}, "
            f"got {tuple(eps_pred.shape)}"
        )
    if psi.shape != (batch,):
        raise ValueError(f"psi must have shape ({batch},), got {tuple(psi.shape)}")
    weights = TwoTermWeights.pogdiff(psi.to(torch.promote_types(psi.dtype, torch.float32)), grad_mode)
    return two_term_loss_concat(eps_pred, noise, weights, backend=backend).mean()
