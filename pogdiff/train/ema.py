"""Exponential moving average of the UNet, sharded the way ZeRO-3 shards parameters.

Each rank averages only its shard of every parameter: the flat parameter padded to a multiple of
``world`` and cut into ``world`` equal pieces (exactly DeepSpeed ZeRO-3's ``ds_tensor`` partition).
So the EMA costs 4 bytes per parameter / world of memory (on the CPU with ``offload``) and no
communication per step; ``gather`` assembles full tensors for checkpoints, validation and export.
diffusers' EMAModel keeps a full copy on every rank and *copies* rather than averages any tensor
that does not require grad (ZeRO-3 shards, CPU copies), hence this small class.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

# all_gather(shard) -> the shards of every rank, in rank order
AllGather = Callable[[torch.Tensor], list[torch.Tensor]]


def flat_shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's piece of ``t`` flattened and zero-padded to ``world * ceil(numel / world)``."""
    size = math.ceil(t.numel() / world)
    piece = t.reshape(-1)[rank * size:(rank + 1) * size]
    return piece if piece.numel() == size else torch.cat([piece, piece.new_zeros(size - piece.numel())])


class ShardedEMA:
    def __init__(self, names: Sequence[str], shapes: Sequence[torch.Size], shards: Sequence[torch.Tensor],
                 decay: float, device: torch.device | None = None):
        self.names, self.shapes, self.decay, self.updates = list(names), list(shapes), decay, 0
        self.shadow = [s.detach().to(device or s.device, torch.float32, copy=True) for s in shards]

    def current_decay(self) -> float:
        """diffusers' EMAModel warm-up: 0 for the first update (a copy), then min(decay, (1 + n) / (10 + n))."""
        n = self.updates
        return 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, shards: Sequence[torch.Tensor]) -> None:
        weight = 1.0 - self.current_decay()
        sources = [s.detach().to(sh.device, torch.float32) for s, sh in zip(shards, self.shadow)]
        torch._foreach_lerp_(self.shadow, sources, weight)
        self.updates += 1

    @torch.no_grad()
    def gather(self, all_gather: AllGather) -> dict[str, torch.Tensor]:
        """Full fp32 tensors by name, on the CPU (collective: every rank calls it)."""
        out = {}
        for name, shape, shard in zip(self.names, self.shapes, self.shadow):
            pieces = all_gather(shard)
            out[name] = torch.cat([p.cpu() for p in pieces])[:math.prod(shape)].view(shape).clone()
        return out

    @torch.no_grad()
    def load(self, full: dict[str, torch.Tensor], updates: int, rank: int, world: int) -> None:
        missing = [n for n in self.names if n not in full]
        if missing:
            raise KeyError(f"EMA checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for name, shadow in zip(self.names, self.shadow):
            shadow.copy_(flat_shard(full[name].float(), rank, world))
        self.updates = updates
