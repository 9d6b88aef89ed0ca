"""pogdiff.comm_model against hand-computed values, and against DeepSpeed's comms logger on 2 gloo ranks."""
import importlib
import sys
from pathlib import Path

import pytest

from pogdiff.comm_model import (Cluster, collective_seconds, logged_bytes, ring_factor, step_estimate, unet_forwards,
                                zero2_step, zero3_gathers, zero3_step)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_ring_factors():
    assert ring_factor("all_reduce", 4) == pytest.approx(1.5)
    assert ring_factor("reduce_scatter_tensor", 4) == pytest.approx(0.75)
    assert ring_factor("all_gather_into_tensor", 8) == pytest.approx(0.875)


def test_zero2_bytes_hand_computed():
    # 1001 elements over 4 ranks pad to a multiple of 2 * 4 = 8: 1008, shard 252
    ar, ag = zero2_step(1001, world=4, grad_bytes=2, param_bytes=2)
    assert (ar.op, ar.logged_bytes, ar.full_bytes, ar.calls) == ("all_reduce", 2002, 2002, 1)
    assert ar.wire_bytes == pytest.approx(2 * 3 / 4 * 2002)
    assert (ag.op, ag.logged_bytes, ag.full_bytes) == ("all_gather_into_tensor", 504, 2016)
    assert ag.wire_bytes == pytest.approx(3 / 4 * 2016)
    # gradient accumulation: one reduction per micro-step, one gather per optimizer step
    rd, ag2 = zero2_step(1000, world=2, grad_bytes=4, param_bytes=2, micro_steps=3, bucket_allreduce=False,
                         reduce_bucket=300)
    assert (rd.op, rd.logged_bytes, rd.passes) == ("reduce", 12000, 3)
    assert rd.wire_bytes == pytest.approx(3 * 4000 / 2)  # reduce-to-owner moves what a reduce-scatter would
    assert rd.calls == 3 * (4 + 1)  # ceil(1000 / 300) buckets, + world - 1 owner boundaries
    assert logged_bytes([rd, ag2]) == {"reduce": 12000, "all_gather_into_tensor": 1000}


def test_zero3_bytes_and_the_y_prime_forward():
    # parameters of 10, 7 and 4 elements over 4 ranks: shards 3 + 2 + 1 = 6 elements
    assert unet_forwards("pogdiff", "stop", True) == 2
    assert unet_forwards("pogdiff", "stop", False) == unet_forwards("pogdiff", "full") == unet_forwards("vanilla") == 1
    assert zero3_gathers(1) == 2 and zero3_gathers(2) == 3
    assert zero3_gathers(1, release_after_use=False) == 1
    assert zero3_gathers(2, release_after_use=False) == 3  # a second forward restarts DeepSpeed's trace
    ag, rs = zero3_step([10, 7, 4], world=4, grad_bytes=4, param_bytes=2, gathers_per_micro_step=3,
                        gather_calls_per_pass=2)
    assert (ag.logged_bytes, ag.full_bytes, ag.passes, ag.calls) == (3 * 12, 48, 3, 6)
    assert ag.wire_bytes == pytest.approx(3 * 48 * 3 / 4)
    assert (rs.op, rs.logged_bytes, rs.full_bytes) == ("reduce_scatter_tensor", 96, 96)
    assert rs.wire_bytes == pytest.approx(72)


def test_collective_seconds_hand_computed():
    cluster = Cluster(nodes=2, gpus_per_node=8, nvlink_GBps=400, node_net_GBps=100, efficiency=0.5,
                      hop_latency_nvlink_s=1e-6, hop_latency_net_s=10e-6)
    _, ag = zero2_step(8_000_000_000, world=16, grad_bytes=1, param_bytes=1)  # S = 8 GB, one call
    # NVLink: 8e9 * 7/8 / 200e9 = 35 ms; network: 8e9 * 1/2 / 50e9 = 80 ms; latency: 7 * 1 us + 1 * 10 us
    assert collective_seconds(ag, cluster) == pytest.approx(0.035 + 0.080 + 17e-6)
    ar, _ = zero2_step(8_000_000_000, world=16, grad_bytes=1, param_bytes=1, reduce_bucket=4_000_000_000)
    assert collective_seconds(ar, cluster) == pytest.approx(2 * (0.035 + 0.080) + 2 * 2 * 17e-6)


def test_step_estimate_zero2_hides_all_but_the_last_bucket_and_the_gather():
    cluster = Cluster(nodes=1, gpus_per_node=8, nvlink_GBps=100, efficiency=1.0, hop_latency_nvlink_s=0.0)
    coll = zero2_step(8_000_000_000, world=8, grad_bytes=1, param_bytes=1)
    # all-reduce: 2 * 8e9 * 7/8 / 100e9 = 140 ms; all-gather 70 ms
    est = step_estimate(2, coll, forward_s=0.1, backward_s=0.2, cluster=cluster, last_bucket_fraction=0.25)
    assert est["comm_s"] == pytest.approx(0.21)
    assert est["exposed_overlapped_s"] == pytest.approx(0.25 * 0.14 + 0.07)  # 105 ms fit under 200 ms of backward
    assert est["efficiency_serial"] == pytest.approx(0.3 / 0.51)
    short = step_estimate(2, coll, forward_s=0.1, backward_s=0.05, cluster=cluster, last_bucket_fraction=0.25)
    assert short["exposed_overlapped_s"] == pytest.approx((0.105 - 0.05) + 0.035 + 0.07)


def test_logged_bytes_of_deepspeed_zero_steps_on_two_ranks():
    """One optimizer step each of ZeRO-2 and ZeRO-3 (PoGDiff stop, split y' forward), 2 gloo ranks."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        comm_check = importlib.import_module("comm_check")
    finally:
        sys.path.remove(str(BENCHMARKS))
    import torch
    from diffusers import UNet2DConditionModel

    from pogdiff.models.components import tiny_unet_config

    with torch.device("meta"):
        params = sum(p.numel() for p in UNet2DConditionModel(**tiny_unet_config()).parameters())
    out = comm_check.check(["zero2", "zero3_stop"], steps=1, warmup=0, tolerance=1e-3)
    assert out["tiny_unet_params"] == params
    z2, z3 = out["cases"]["zero2"], out["cases"]["zero3_stop"]
    assert z2["match"] and z3["match"], (z2, z3)
    # independent of the formulas: fp32 gradients all-reduced once, this rank's half of the weights gathered once;
    # ZeRO-3 gathers the shard once per forward (2: the split y' forward) and once in backward
    step2, step3 = z2["logged_bytes_per_step"][0], z3["logged_bytes_per_step"][0]
    assert step2["all_reduce"] == 4 * params and step2["all_gather_into_tensor"] == 4 * params // 2
    assert step3["all_gather_into_tensor"] == 3 * 4 * params // 2 and step3["reduce_scatter_tensor"] == 4 * params
