"""Communication per training step under DeepSpeed ZeRO-2 / ZeRO-3, and its cost at N nodes.

docs/comm_model.md derives these; benchmarks/comm_check.py checks the byte counts against
DeepSpeed's comms logger. Every collective carries two byte counts:

* ``logged_bytes``: what DeepSpeed's comms logger records, the size of the op's *input* tensor:
  the gradient bucket for all_reduce / reduce, the full gradient for reduce_scatter_tensor, this
  rank's shard for all_gather_into_tensor.
* ``wire_bytes``: what each rank sends with a bandwidth-optimal ring over ``world`` ranks, for a
  full buffer of S bytes: all-reduce 2 (N-1)/N S; reduce-scatter, all-gather and the N per-owner
  reduces (together) (N-1)/N S.

PoGDiff's y' half only matters under ZeRO-3, where every UNet forward gathers the parameters:
grad_mode=stop with a split forward runs two forwards (one more gather) per micro-step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

ZERO2_ALIGNMENT = 2  # DeepSpeed stage 1/2 pads the flat 16/32-bit buffer to a multiple of 2 * world elements
BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size / allgather_bucket_size (elements)


@dataclass(frozen=True)
class Collective:
    op: str  # the comms logger's name for it
    passes: int  # full passes over the parameters per optimizer step
    full_bytes: int  # S: one pass's full (unsharded) buffer
    logged_bytes: int  # per optimizer step, as the comms logger sums it on one rank
    wire_bytes: float  # per optimizer step, sent by each rank (ring)
    calls: int  # collective calls per optimizer step (latency); at least this many for bucketed ops


def ring_factor(op: str, world: int) -> float:
    """Bytes each rank sends per byte of the full buffer, bandwidth-optimal algorithm."""
    share = (world - 1) / world
    return 2 * share if op == "all_reduce" else share


def _collective(op: str, passes: int, full_bytes: int, logged_per_pass: int, world: int, calls_per_pass: int) -> Collective:
    return Collective(op, passes, full_bytes, passes * logged_per_pass, passes * full_bytes * ring_factor(op, world),
                      passes * calls_per_pass)


def zero2_step(numel: int, world: int, grad_bytes: int, param_bytes: int, micro_steps: int = 1,
               bucket_allreduce: bool = True, reduce_bucket: int = BUCKET, allgather_bucket: int = BUCKET) -> list[Collective]:
    """ZeRO-2 (DeepSpeed stage_1_and_2): per micro-step the gradients are reduced during backward,
    in buckets of ``reduce_bucket`` elements; per optimizer step each rank's updated partition is
    all-gathered into the 16/32-bit weights.

    ``bucket_allreduce`` is DeepSpeed's ``use_multi_rank_bucket_allreduce`` (default true): each
    gradient bucket is all-reduced (2x the wire bytes of a reduce-scatter); false reduces each
    slice to the rank that owns it (``reduce``), which moves what a reduce-scatter would."""
    padded = math.ceil(numel / (ZERO2_ALIGNMENT * world)) * ZERO2_ALIGNMENT * world
    grads = numel * grad_bytes
    buckets = math.ceil(numel / reduce_bucket)
    if bucket_allreduce:
        reduce = _collective("all_reduce", micro_steps, grads, grads, world, buckets)
    else:  # one reduce per (bucket, owner) a bucket spans
        reduce = _collective("reduce", micro_steps, grads, grads, world, buckets + world - 1)
    shard = padded // world
    return [reduce, _collective("all_gather_into_tensor", 1, padded * param_bytes, shard * param_bytes, world,
                                math.ceil(shard / allgather_bucket))]


def zero3_gathers(forwards: int, backwards: int = 1, release_after_use: bool = True) -> int:
    """Parameter all-gathers per micro-step. Released after use (stage3_max_live_parameters and
    stage3_max_reuse_distance small: ZeRO-3's memory-saving mode), every forward and backward
    gathers again. Kept live (the model fits under those limits), one gather per micro-step, but
    only with one forward: every top-level forward restarts DeepSpeed's trace (its forward
    pre-hook calls reset_step), so a second forward (PoGDiff's split y' forward) gathers again
    and so does the backward."""
    return forwards + backwards if release_after_use or forwards > 1 else 1


def unet_forwards(method: str, grad_mode: str = "full", stop_split_forward: bool = True) -> int:
    """UNet forward calls per micro-step: PoGDiff stop with the split forward runs the y' half separately."""
    return 2 if method == "pogdiff" and grad_mode == "stop" and stop_split_forward else 1


def zero3_step(numels: Sequence[int], world: int, grad_bytes: int, param_bytes: int, gathers_per_micro_step: int,
               micro_steps: int = 1, gather_calls_per_pass: int | None = None,
               reduce_bucket: int = BUCKET) -> list[Collective]:
    """ZeRO-3: each parameter is partitioned on its own (padded to a multiple of world);
    ``gathers_per_micro_step`` all-gathers of the shards (see ``zero3_gathers``), one call per
    module that owns parameters (``gather_calls_per_pass``, default one per parameter), and one
    reduce-scatter of the gradients per micro-step."""
    shard = sum(math.ceil(n / world) for n in numels)
    calls = len(numels) if gather_calls_per_pass is None else gather_calls_per_pass
    return [
        _collective("all_gather_into_tensor", gathers_per_micro_step * micro_steps, shard * world * param_bytes,
                    shard * param_bytes, world, calls),
        _collective("reduce_scatter_tensor", micro_steps, shard * world * grad_bytes, shard * world * grad_bytes, world,
                    math.ceil(shard * world / reduce_bucket)),
    ]


def logged_bytes(collectives: Sequence[Collective]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in collectives:
        out[c.op] = out.get(c.op, 0) + c.logged_bytes
    return out


@dataclass(frozen=True)
class Cluster:
    """Nodes of GPUs: NVLink inside a node, InfiniBand between nodes (bandwidths per direction).
    ``efficiency`` and the per-hop latencies are assumptions, not measurements."""

    nodes: int
    gpus_per_node: int = 8
    nvlink_GBps: float = 450.0  # per GPU, one direction (H100 NVLink 4: 900 GB/s bidirectional)
    node_net_GBps: float = 400.0  # per node, one direction: 8 x 400 Gb/s InfiniBand
    efficiency: float = 0.8  # achieved / line rate for large messages
    hop_latency_nvlink_s: float = 2e-6
    hop_latency_net_s: float = 5e-6

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def collective_seconds(c: Collective, cluster: Cluster) -> float:
    """Hierarchical ring, per optimizer step: the intra-node phase over NVLink ((G-1)/G S per GPU),
    the inter-node phase over the node's NICs ((N-1)/N S per node), and per call (G-1) + (N-1)
    hop latencies; all-reduce does it all twice (reduce-scatter + all-gather)."""
    g, n = cluster.gpus_per_node, cluster.nodes
    twice = 2 if c.op == "all_reduce" else 1
    s = c.passes * c.full_bytes * twice
    intra = s * (g - 1) / g / (cluster.nvlink_GBps * 1e9 * cluster.efficiency)
    inter = s * (n - 1) / n / (cluster.node_net_GBps * 1e9 * cluster.efficiency)
    latency = c.calls * twice * ((g - 1) * cluster.hop_latency_nvlink_s + (n - 1) * cluster.hop_latency_net_s)
    return intra + inter + latency


def step_estimate(stage: int, collectives: Sequence[Collective], forward_s: float, backward_s: float,
                  cluster: Cluster, forwards: int = 1, last_bucket_fraction: float = 1.0) -> dict:
    """Step time = compute + the communication compute does not hide, as two bounds.

    serial: nothing overlaps. overlapped (overlap_comm, prefetch): ZeRO-2 reduces gradients on a
    side stream during backward except the last bucket (``last_bucket_fraction`` of them: it is
    only full when backward ends), and its parameter all-gather after the optimizer step is
    exposed. ZeRO-3 prefetches parameter gathers under the forward and backward they feed (the
    first module's gather of each forward cannot be) and reduce-scatters under backward except
    the last bucket. One micro-step per step; ``forwards``: UNet forwards in it."""
    t = {c.op: collective_seconds(c, cluster) for c in collectives}
    compute = forward_s + backward_s
    serial = sum(t.values())
    if stage == 2:
        grad = t.get("all_reduce", 0.0) + t.get("reduce", 0.0)
        tail = grad * last_bucket_fraction
        overlapped = max(grad - tail - backward_s, 0.0) + tail + t["all_gather_into_tensor"]
    elif stage == 3:
        gathers = next(c for c in collectives if c.op == "all_gather_into_tensor")
        per_gather = t["all_gather_into_tensor"] / gathers.passes
        fwd = min(forwards, gathers.passes)
        rs, rs_tail = t["reduce_scatter_tensor"], t["reduce_scatter_tensor"] * last_bucket_fraction
        first_module = fwd * per_gather * gathers.passes / gathers.calls
        overlapped = (max(fwd * per_gather - forward_s, 0.0) + first_module
                      + max((gathers.passes - fwd) * per_gather + rs - rs_tail - backward_s, 0.0) + rs_tail)
    else:
        raise ValueError(f"ZeRO stage must be 2 or 3, got {stage}")
    return {"compute_s": compute, "comm_s": serial,
            "exposed_overlapped_s": overlapped, "efficiency_overlapped": compute / (compute + overlapped),
            "efficiency_serial": compute / (compute + serial)}
