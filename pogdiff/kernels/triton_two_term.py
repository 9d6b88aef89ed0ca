"""Fused Triton kernel for the two-term loss (formula in ``reference.py``), Liger-Kernel style.

One pass over the inputs reads a, b and the target once, writes per-chunk partial losses and the
gradient of both halves; backward only scales the stored gradients by grad_output, in place.
Grid: one program per (sample, chunk of BLOCK elements); the chunk partials are summed by a tiny
second stage (``partial.view(B, chunks).sum(1)``), so the losses are deterministic (no atomics).

CUDA tensors run compiled. CPU tensors need the Triton interpreter: ``TRITON_INTERPRET=1`` set before
this module is first imported (triton 3.9 reads it when ``@triton.jit`` decorates the kernel).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from pogdiff.kernels.reference import TwoTermWeights

INTERPRETED = triton.knobs.runtime.interpret  # what @triton.jit below was decorated with
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _two_term_fwd_kernel(
    a_ptr, b_ptr, target_ptr,
    w_target_ptr, w_pair_ptr, w_grad_a_ptr, w_grad_b_ptr,
    partial_ptr, grad_a_ptr, grad_b_ptr,
    n_per_sample, chunks_per_sample, grad_scale,
    HAS_B: tl.constexpr, WRITE_GRAD_A: tl.constexpr, WRITE_GRAD_B: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // chunks_per_sample
    # int64 offsets: B * N passes 2**31 for large batches of large latents
    col = (pid % chunks_per_sample).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = col < n_per_sample
    offs = sample.to(tl.int64) * n_per_sample + col

    a = tl.load(a_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    t = tl.load(target_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    d = a - t
    w_target = tl.load(w_target_ptr + sample)
    partial = w_target * tl.sum(d * d, axis=0)
    grad_a = w_target * d
    if HAS_B:
        b = tl.load(b_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        e = a - b
        partial += tl.load(w_pair_ptr + sample) * tl.sum(e * e, axis=0)
        grad_a += tl.load(w_grad_a_ptr + sample) * e
        if WRITE_GRAD_B:
            grad_b = -grad_scale * tl.load(w_grad_b_ptr + sample) * e
            tl.store(grad_b_ptr + offs, grad_b.to(grad_b_ptr.dtype.element_ty), mask=mask)
    if WRITE_GRAD_A:
        tl.store(grad_a_ptr + offs, (grad_scale * grad_a).to(grad_a_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + pid, partial)


def _block_size(numel: int) -> int:
    if INTERPRETED:  # the interpreter runs programs one by one, ~5 ms each whatever their size
        return 4096
    # ~1024 programs per batch, 512..4096 elements each: enough programs to fill an H100 for small
    # batches, few enough that the partials stay tiny.
    return min(4096, max(512, triton.next_power_of_2(numel // 1024)))


def _fused_forward(a, b, target, weights, grad_a, grad_b) -> torch.Tensor:
    """Launch on flat contiguous (B, N) tensors; fills grad_a / grad_b when given. Returns losses (B,).

    weights: (w_target, w_pair, w_grad_a, w_grad_b), fp32 (B,). Unused pointers get stand-ins."""
    batch, n = a.shape
    block = _block_size(batch * n)
    chunks = triton.cdiv(n, block)
    partial = torch.empty(batch * chunks, dtype=torch.float32, device=a.device)
    _two_term_fwd_kernel[(batch * chunks,)](
        a, a if b is None else b, target, *weights,
        partial, a if grad_a is None else grad_a, a if grad_b is None else grad_b,
        n, chunks, 2.0 / n,
        HAS_B=b is not None, WRITE_GRAD_A=grad_a is not None, WRITE_GRAD_B=grad_b is not None,
        BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )
    return partial.view(batch, chunks).sum(1) / n


def _scale_(grad: Optional[torch.Tensor], grad_loss: torch.Tensor) -> Optional[torch.Tensor]:
    return None if grad is None else grad.mul_(grad_loss.view(-1, 1))


def _take_grads(ctx):
    if ctx.grads is None:
        raise RuntimeError(
            "two_term_loss_triton: backward ran twice on one forward; the gradients are computed in "
            "the forward and scaled in place, so run the loss again for another backward"
        )
    grads, ctx.grads = ctx.grads, None
    return grads


class TwoTermLoss(torch.autograd.Function):
    """a, b, target: flat contiguous (B, N); weights: fp32 (B,). Gradients are computed in forward."""

    @staticmethod
    def forward(ctx, a, b, target, *weights):
        grad_a = torch.empty_like(a) if ctx.needs_input_grad[0] else None
        # b without a gradient (PoGDiff stop's no_grad y' forward) gets nothing written. Zero grad_b
        # weights are not inspected: that would be a host sync every step.
        need_b = b is not None and ctx.needs_input_grad[1]
        grad_b = torch.empty_like(b) if need_b else None
        ctx.grads = (grad_a, grad_b)
        return _fused_forward(a, b, target, weights, grad_a, grad_b)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_a, grad_b = _take_grads(ctx)
        return _scale_(grad_a, grad_loss), _scale_(grad_b, grad_loss), None, None, None, None, None


class TwoTermLossConcat(torch.autograd.Function):
    """pred: flat contiguous (2B, N) = [a; b], the UNet output on [y; y']; one gradient buffer for pred."""

    @staticmethod
    def forward(ctx, pred, target, *weights):
        batch = target.shape[0]
        grad = torch.empty_like(pred) if ctx.needs_input_grad[0] else None
        grad_a, grad_b = (None, None) if grad is None else (grad[:batch], grad[batch:])
        ctx.grads = grad
        return _fused_forward(pred[:batch], pred[batch:], target, weights, grad_a, grad_b)

    @staticmethod
    def backward(ctx, grad_loss):
        grad = _take_grads(ctx)
        if grad is not None:
            grad.view(2, grad_loss.shape[0], -1).mul_(grad_loss.view(1, -1, 1))
        return grad, None, None, None, None, None


def _prepare(x: torch.Tensor, like: torch.Tensor, name: str, rows: int) -> torch.Tensor:
    if x.dtype not in _DTYPES:
        raise TypeError(f"two_term_loss_triton: {name} has dtype {x.dtype}; supported: {_DTYPES} (or backend='torch')")
    if x.device != like.device:
        raise ValueError(f"two_term_loss_triton: {name} is on {x.device}, expected {like.device}")
    return x.contiguous().view(rows, -1)  # copies only a non-contiguous input


def _prepare_weights(w: TwoTermWeights, has_b: bool, device: torch.device) -> list[torch.Tensor]:
    fields = [w.target, w.pair, w.grad_a, w.grad_b] if has_b else [w.target]
    if any(f.requires_grad for f in fields):
        raise ValueError("two_term_loss_triton treats the weights as constants: pass them detached")
    fields = [f.to(device=device, dtype=torch.float32).contiguous() for f in fields]
    return fields if has_b else fields * 4  # without b only w_target is read


def _check_device(x: torch.Tensor) -> None:
    if x.numel() == 0:
        raise ValueError(f"two_term_loss_triton: empty input of shape {tuple(x.shape)}")
    if not x.is_cuda and not INTERPRETED:
        raise RuntimeError(
            f"two_term_loss_triton got {x.device.type} tensors: Triton compiles for CUDA only. On CPU, "
            "set TRITON_INTERPRET=1 before pogdiff.kernels.triton_two_term is imported (the Triton "
            "interpreter, slow), or use backend='torch'"
        )


def two_term_loss_triton(
    a: torch.Tensor, b: Optional[torch.Tensor], target: torch.Tensor, weights: TwoTermWeights
) -> torch.Tensor:
    """Per-sample losses (B,) fp32, differentiable w.r.t. a and b (shapes checked by the dispatcher)."""
    _check_device(a)
    rows = a.shape[0]
    has_b = b is not None and weights.has_pair
    w = _prepare_weights(weights, has_b, a.device)
    b = _prepare(b, a, "b", rows) if has_b else None
    return TwoTermLoss.apply(_prepare(a, a, "a", rows), b, _prepare(target, a, "target", rows), *w)


def two_term_loss_concat_triton(pred: torch.Tensor, target: torch.Tensor, weights: TwoTermWeights) -> torch.Tensor:
    """``two_term_loss_triton(pred[:B], pred[B:], ...)`` for pred = [a; b] (2B, ...), with the gradient
    of pred written as one buffer instead of two slice gradients that autograd would zero-fill and add."""
    _check_device(pred)
    rows = target.shape[0]
    w = _prepare_weights(weights, True, pred.device)
    return TwoTermLossConcat.apply(_prepare(pred, pred, "pred", 2 * rows), _prepare(target, pred, "target", rows), *w)
