"""Check pogdiff.comm_model against DeepSpeed's comms logger, then apply it to SD v1.5. Prints JSON.

    python benchmarks/comm_check.py [--steps 2] [--cases zero2,zero3_stop] [--out check.json]

Two gloo ranks (torch.multiprocessing, DS_ACCELERATOR=cpu, fp32) train the tiny UNet through
pogdiff.objectives.Objective under DeepSpeed ZeRO-2 / ZeRO-3 with the comms logger on (prof_all).
Per optimizer step and per op, the logged bytes are compared with the model applied to the tiny
UNet's parameters; scalar messages (<= 16 bytes: overflow / norm checks) and set-up broadcasts are
listed as "unmodelled". The "sd15" part is the model's prediction for the SD v1.5 UNet on 8-GPU
H100 nodes (docs/comm_model.md): byte counts are exact, times rest on the stated assumptions.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import METHODS, PEAK_BF16_TFLOPS, SD15_UNET, emit, machine  # noqa: E402

from pogdiff.comm_model import (BUCKET, Cluster, logged_bytes, step_estimate, unet_forwards,  # noqa: E402
                                zero2_step, zero3_gathers, zero3_step)

WORLD = 2
MICRO_BATCH = 2
SCALAR_BYTES = 16
# ZeRO-3's memory-saving mode: every parameter is released after use and gathered again.
ZERO3_RELEASE = {"stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 0,
                 "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}
CASES = {
    "zero2": dict(stage=2, zero={}, method="pogdiff_stop"),
    "zero2_reduce": dict(stage=2, zero={"use_multi_rank_bucket_allreduce": False}, method="pogdiff_stop"),
    "zero2_accum2": dict(stage=2, zero={}, method="pogdiff_full", accum=2),
    "zero3_vanilla": dict(stage=3, zero=ZERO3_RELEASE, method="vanilla"),
    "zero3_stop": dict(stage=3, zero=ZERO3_RELEASE, method="pogdiff_stop"),
    "zero3_full": dict(stage=3, zero=ZERO3_RELEASE, method="pogdiff_full"),
    # DeepSpeed's default live/reuse limits (1e9 elements) keep the whole tiny UNet gathered,
    # but not across PoGDiff's second (split y') forward
    "zero3_keep_live": dict(stage=3, zero={"stage3_param_persistence_threshold": 0}, method="vanilla"),
    "zero3_keep_live_stop": dict(stage=3, zero={"stage3_param_persistence_threshold": 0}, method="pogdiff_stop"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(case: dict, steps: int, warmup: int) -> dict:
    """Train the tiny UNet ``warmup + steps`` optimizer steps; the logged bytes of the last ``steps``."""
    import deepspeed
    from deepspeed.comm.comm import comms_logger
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from pogdiff.config import MethodConfig
    from pogdiff.models.components import tiny_unet_config
    from pogdiff.method.objectives import Batch, Objective, TextConditioner
    from train_step import neighbour_sampler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config())
    numels = [p.numel() for p in unet.parameters()]
    accum = case.get("accum", 1)
    config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": accum,
              "zero_optimization": {"stage": case["stage"], **case["zero"]}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9, "comms_logger": {"enabled": True, "verbose": False, "prof_all": True}}
    engine, *_ = deepspeed.initialize(model=unet, optimizer=torch.optim.AdamW(unet.parameters(), lr=1e-4), config=config)

    n, g = 16, torch.Generator().manual_seed(0)
    latents = torch.randn((n, 4, unet.config.sample_size, unet.config.sample_size), generator=g)
    text = torch.randn((n, 8, unet.config.cross_attention_dim), generator=g)
    alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    objective = Objective(MethodConfig(**METHODS[case["method"]]), alphas, text=TextConditioner.from_table(text),
                          sampler=neighbour_sampler(n, 4, 0), backend="torch")

    def unet_fn(x, t, cond):
        return engine(x, t, encoder_hidden_states=cond, return_dict=False)[0]

    per_step = []
    for step in range(warmup + steps):
        comms_logger.reset_data()
        for micro in range(accum):
            index = torch.arange(MICRO_BATCH) + (step * accum + micro) * MICRO_BATCH % (n - MICRO_BATCH)
            loss = objective(unet_fn, Batch(index, latents[index], index[:, None]), g).loss
            engine.backward(loss)
            engine.step()
        logged: dict[str, int] = {}
        for op, sizes in comms_logger.get_raw_data().items():
            for size, record in sizes.items():
                key = op if size > SCALAR_BYTES else f"{op} (scalar)"
                logged[key] = logged.get(key, 0) + int(size) * record[0]
        per_step.append(logged)
    engine.destroy()
    return {"numels": numels, "per_step": per_step[warmup:]}


def worker(rank: int, port: int, names: list[str], steps: int, warmup: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    os.dup2(2, 1)  # the ranks' chatter goes to stderr: stdout is the JSON
    os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported: CPU accelerator, gloo
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {name: run_case(CASES[name], steps, warmup) for name in names}
    if rank == 0:
        queue.put(results)


def model_bytes(case: dict, numels: list[int]) -> dict[str, int]:
    """The model's logged bytes per optimizer step for a case (fp32 on CPU: 4-byte grads and params)."""
    accum = case.get("accum", 1)
    if case["stage"] == 2:
        model = zero2_step(sum(numels), WORLD, 4, 4, accum, case["zero"].get("use_multi_rank_bucket_allreduce", True))
    else:
        spec = METHODS[case["method"]]
        forwards = unet_forwards(spec["name"].value, getattr(spec.get("grad_mode"), "value", "full"),
                                 spec.get("stop_split_forward", True))
        gathers = zero3_gathers(forwards, 1, release_after_use=case["zero"] == ZERO3_RELEASE)
        model = zero3_step(numels, WORLD, 4, 4, gathers, accum)
    return logged_bytes(model)


def compare(case: dict, measured: dict, tolerance: float) -> dict:
    predicted = model_bytes(case, measured["numels"])
    errors, unmodelled = [], {}
    for logged in measured["per_step"]:
        for op, expected in predicted.items():
            errors.append(abs(logged.get(op, 0) - expected) / expected)
        for op, b in logged.items():
            if op not in predicted:
                unmodelled[op] = max(unmodelled.get(op, 0), b)
    return {"stage": case["stage"], "method": case["method"], "zero_optimization": case["zero"],
            "grad_accum": case.get("accum", 1), "model_bytes_per_step": predicted,
            "logged_bytes_per_step": measured["per_step"], "unmodelled_max_bytes_per_step": unmodelled,
            "max_rel_error": max(errors), "match": max(errors) <= tolerance}


def check(names: list[str], steps: int = 2, warmup: int = 2, tolerance: float = 1e-3) -> dict:
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(free_port(), names, steps, warmup, queue), nprocs=WORLD, join=True)
    results = queue.get()
    return {"world": WORLD, "dtype": "fp32", "tiny_unet_params": sum(results[names[0]]["numels"]),
            "cases": {name: compare(CASES[name], results[name], tolerance) for name in names}}


def sd15_prediction(batch: int = 16, mfu: float = 0.40, nodes=(1, 2, 4, 8, 16),
                    peak_tflops: float = PEAK_BF16_TFLOPS["H100 80GB HBM3"]) -> dict:
    """The model for the SD v1.5 UNet: bf16 gradients and parameters, ``batch`` images per GPU,
    compute at an assumed ``mfu`` of the H100's dense bf16 peak, FLOPs counted on the meta device."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        x, t, cond = torch.zeros(1, 4, 64, 64), torch.zeros(1, dtype=torch.long), torch.zeros(1, 77, 768)
    numels = [p.numel() for p in unet.parameters()]
    modules = sum(1 for m in unet.modules() if next(m.parameters(recurse=False), None) is not None)
    with FlopCounterMode(display=False) as fwd:
        out = unet(x, t, encoder_hidden_states=cond).sample
    with FlopCounterMode(display=False) as bwd:
        out.sum().backward()
    f, b = fwd.get_total_flops(), bwd.get_total_flops()
    flops = {"vanilla": (f, b), "pogdiff_stop": (2 * f, b), "pogdiff_full": (2 * f, 2 * b)}  # (forward, backward) per image
    rate = peak_tflops * 1e12 * mfu
    numel = sum(numels)
    rows = []
    for n in nodes:
        cluster = Cluster(nodes=n)
        w = cluster.world
        for method, (fw, bw) in flops.items():
            forwards = 2 if method == "pogdiff_stop" else 1
            variants = [  # (stage, label, collectives, reduce bucket, overlap_comm)
                (2, "DeepSpeed defaults: overlap_comm=false, all-reduce buckets 5e8",
                 zero2_step(numel, w, 2, 2), BUCKET, False),
                (2, "overlap_comm=true (pogdiff.dist on GPU), buckets 5e8", zero2_step(numel, w, 2, 2), BUCKET, True),
                (2, "overlap_comm=true, reduce_bucket_size=5e7",
                 zero2_step(numel, w, 2, 2, reduce_bucket=50_000_000), 50_000_000, True),
                (2, "overlap_comm=true, 5e7, use_multi_rank_bucket_allreduce=false",
                 zero2_step(numel, w, 2, 2, bucket_allreduce=False, reduce_bucket=50_000_000), 50_000_000, True),
                (3, "release after use, overlap_comm=true (ZeRO-3 default)",
                 zero3_step(numels, w, 2, 2, zero3_gathers(forwards), gather_calls_per_pass=modules), BUCKET, True),
            ]
            for stage, variant, collectives, bucket, overlap in variants:
                last = (numel % bucket or bucket) / numel if bucket < numel else 1.0
                est = step_estimate(stage, collectives, batch * fw / rate, batch * bw / rate, cluster, forwards, last)
                exposed = est["exposed_overlapped_s"] if overlap else est["comm_s"]
                rows.append({"nodes": n, "gpus": w, "method": method, "zero": stage, "variant": variant,
                             "wire_GB_per_gpu": round(sum(c.wire_bytes for c in collectives) / 1e9, 3),
                             "calls": sum(c.calls for c in collectives), "compute_ms": round(est["compute_s"] * 1e3, 1),
                             "comm_ms": round(est["comm_s"] * 1e3, 1), "exposed_comm_ms": round(exposed * 1e3, 1),
                             "scaling_efficiency": round(est["compute_s"] / (est["compute_s"] + exposed), 3),
                             "images_per_s_per_gpu": round(batch / (est["compute_s"] + exposed), 1)})
    return {"unet_params": numel, "modules_with_params": modules, "forward_flops_per_image": f,
            "backward_flops_per_image": b,
            "assumptions": {"batch_per_gpu": batch, "mfu": mfu, "peak_bf16_dense_tflops": peak_tflops,
                            "cluster": {k: v for k, v in Cluster(nodes=1).__dict__.items() if k != "nodes"},
                            "grad_and_param_bytes": 2},
            "rows": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"from {','.join(CASES)}")
    p.add_argument("--steps", type=int, default=2, help="measured optimizer steps per case")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps first (ZeRO-3 records its trace)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="relative, per op and step")
    p.add_argument("--no-sd15", action="store_true", help="skip the SD v1.5 prediction")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    names = args.cases.split(",")
    if unknown := [c for c in names if c not in CASES]:
        p.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    result = {"benchmark": "comm_check", "machine": {**machine(torch.device("cpu")), "deepspeed": deepspeed.__version__},
              **check(names, args.steps, args.warmup, args.tolerance)}
    if not args.no_sd15:
        result["sd15"] = sd15_prediction()
    return emit(result, args.out)


if __name__ == "__main__":
    main()
