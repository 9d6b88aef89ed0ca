"""Memory and communication of one training step of the SD v1.5 UNet under DeepSpeed ZeRO.

    python benchmarks/zero_memory.py [--workers 8] [--latent 64] [--out file.json]

No weights and no GPU: the UNet is built from the published SD1.5 UNet config
(train_step.SD15_UNET) on the meta device (exact parameter count). Activation memory is the bytes
autograd saves for backward in one forward of a meta-tensor batch (saved_tensors_hooks, each
storage counted once), with and without gradient checkpointing, in bf16, for a fused attention
kernel (GPU) and for PyTorch's math attention. Model/optimizer state and communication volumes
follow from the parameter count (ZeRO paper, Rajbhandari et al. 2020).
Prints JSON, including the machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from train_step import SD15_UNET  # the published SD1.5 unet/config.json (benchmarks/)

GB = 1e9


class FusedAttention(torch.autograd.Function):
    """What a fused SDPA kernel (flash / memory-efficient on GPU, xformers) keeps for backward:
    q, k, v, the output and the row log-sum-exp, not the L x L attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out


def activation_bytes(unet: torch.nn.Module, batch: int, latent: int, dtype: torch.dtype, fused: bool,
                     checkpointing: bool) -> tuple[int, int]:
    """(bytes kept for backward after one forward of ``batch`` samples, extra peak of the largest
    checkpointed block recomputed in backward). Meta tensors; each storage counted once.
    ``fused=False`` is PyTorch's math SDPA (what the meta device and old CPUs run)."""
    from unittest import mock

    kept: dict[int, int] = {}
    recompute = [0]

    def counter(store: dict):
        def pack(t: torch.Tensor):
            s = t.untyped_storage()
            store[s._cdata] = max(store.get(s._cdata, 0), s.nbytes())
            return t
        return pack

    def checkpoint(fn, *args, **kwargs):  # keeps its tensor inputs; recomputes the rest in backward
        for a in list(args) + list(kwargs.values()):
            if torch.is_tensor(a):
                counter(kept)(a)
        inner: dict[int, int] = {}
        with torch.autograd.graph.saved_tensors_hooks(counter(inner), lambda t: t):
            out = fn(*args, **kwargs)
        recompute[0] = max(recompute[0], sum(inner.values()))
        return out

    unet.disable_gradient_checkpointing()
    if checkpointing:
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
    x = torch.randn(batch, 4, latent, latent, device="meta", dtype=dtype)
    cond = torch.randn(batch, 77, 768, device="meta", dtype=dtype)
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    sdpa = (lambda q, k, v, **kw: FusedAttention.apply(q, k, v)) if fused else F.scaled_dot_product_attention
    with torch.autograd.graph.saved_tensors_hooks(counter(kept), lambda t: t), \
            mock.patch.object(F, "scaled_dot_product_attention", sdpa):
        unet(x, t, encoder_hidden_states=cond)
    return sum(kept.values()), recompute[0]


def zero_state_bytes(params: int, workers: int, stage: int, optim_bytes: int) -> float:
    """bf16 weights (2) + bf16 grads (2) + fp32 master and optimizer moments (optim_bytes) per parameter."""
    w, g, o = 2 * params, 2 * params, optim_bytes * params
    if stage >= 1:
        o /= workers
    if stage >= 2:
        g /= workers
    if stage >= 3:
        w /= workers
    return w + g + o


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px images)")
    ap.add_argument("--out")
    args = ap.parse_args()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET).to(torch.bfloat16)
    params = sum(p.numel() for p in unet.parameters())
    act = {}
    unet.train()
    for ckpt in (False, True):
        for fused in (True, False):
            key = ("checkpointing" if ckpt else "plain") + ("_fused_attention" if fused else "_math_attention")
            kept, peak = activation_bytes(unet, 1, args.latent, torch.bfloat16, fused, ckpt)
            act[key] = {"kept": round(kept / GB, 3), "recompute_peak": round(peak / GB, 3)} if ckpt else round(kept / GB, 3)
    n = args.workers
    state = {f"zero{s}": {"adamw": zero_state_bytes(params, n, s, 12) / GB, "adamw8bit": zero_state_bytes(params, n, s, 6) / GB}
             for s in (0, 1, 2, 3)}
    # Elements each GPU sends (ring collectives, ~ the same received) per optimizer step, x2 bytes (bf16).
    comm = {"zero0_1_allreduce": 2 * params, "zero2": 2 * params, "zero3": 3 * params,
            "zero3_with_checkpointing": 4 * params}
    out = {
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                    "cpu": platform.processor() or platform.machine(), "note": "meta device: no compute, exact shapes"},
        "unet_params": params, "unet_params_millions": round(params / 1e6, 1), "workers": n, "latent": args.latent,
        "activations_per_sample_gb_bf16": act,
        "model_and_optimizer_state_gb_per_gpu": {k: {o: round(b, 2) for o, b in v.items()} for k, v in state.items()},
        "ema_fp32_gb_per_gpu": {"sharded (pogdiff.ema)": round(4 * params / n / GB, 2), "full copy": round(4 * params / GB, 2),
                                "offloaded": 0.0},
        "comm_gb_per_gpu_per_step_bf16": {k: round(2 * v / GB, 2) for k, v in comm.items()},
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
