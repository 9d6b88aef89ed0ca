"""LoRA against full fine-tuning (issue 20), side by side in one run. Prints JSON.

    python benchmarks/lora.py --threads 1            # the tiny UNet on the CPU: ratios, parameters, bytes
    python benchmarks/lora.py --config sd15          # on a GPU

Two benches of benchmarks/train_step.py, one per adapter, the same method, data and seed; their
timed repetitions alternate (in a rotating order), and each repetition gives a LoRA/full step-time
ratio. Trainable parameters and the AdamW state's bytes (exp_avg + exp_avg_sq, fp32) are read off
the benches after their warm-up steps.

``--memory`` also computes, without running, what SD v1.5 and SDXL cost per GPU for full and LoRA
fine-tuning under ZeRO-2 and ZeRO-3 (bf16 weights, fp32 master + AdamW, N GPUs), from UNets built
on the meta device (nothing allocated, nothing downloaded).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import train_step  # noqa: E402

# SDXL base 1.0 unet/config.json, the values that differ from diffusers' defaults.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_UNET_PARAMS = 2_567_463_684  # the published SDXL base UNet


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t) and t.dim() > 0)


def per_gpu_gb(total: int, trainable: int, gpus: int, stage: int) -> dict:
    """Model states per GPU (ZeRO paper's accounting): bf16 weights 2 B/param (all of them; sharded
    only by ZeRO-3), bf16 gradients 2 B and fp32 master + two AdamW moments 12 B per trainable
    parameter, sharded by ZeRO-2 and -3. Activations not included."""
    weights = 2 * total / (gpus if stage == 3 else 1)
    grads = 2 * trainable / gpus
    optim = 12 * trainable / gpus
    return {"weights": weights / 1e9, "grads": grads / 1e9, "optimizer": optim / 1e9,
            "total": (weights + grads + optim) / 1e9}  # GB, as docs/scaling.md


def model_memory(gpus: int) -> dict:
    from diffusers import UNet2DConditionModel

    from pogdiff.config import TrainConfig
    from pogdiff.models.adapters import apply_adapter

    out = {}
    for name, config, published in (("sd15", train_step.SD15_UNET, train_step.SD15_UNET_PARAMS),
                                    ("sdxl", SDXL_UNET, SDXL_UNET_PARAMS)):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        total = sum(p.numel() for p in unet.parameters())
        if abs(total - published) > 0.001 * published:
            raise SystemExit(f"{name}: the config gives {total} parameters, expected ~{published}")
        with torch.device("meta"):
            apply_adapter(unet, TrainConfig(adapter="lora"))
        lora = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        out[name] = {"unet_params": total, "lora_params_rank4": lora,
                     "per_gpu_gb": {f"{kind}_zero{stage}": per_gpu_gb(total + (lora if kind == "lora" else 0),
                                                                         lora if kind == "lora" else total, gpus, stage)
                                     for kind in ("full", "lora") for stage in (2, 3)}}
    return {"gpus": gpus, "models": out}


def run(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="pogdiff_stop", choices=list(train_step.METHODS))
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--gpus", type=int, default=8, help="for --memory")
    known, rest = p.parse_known_args(argv)
    benches, args = {}, {}
    for adapter in ("none", "lora"):
        args[adapter] = train_step.parse_args(rest + ["--methods", f"vanilla,{known.method}", "--adapter", adapter])
        if args[adapter].threads:
            torch.set_num_threads(args[adapter].threads)
        benches[adapter] = train_step.Bench(args[adapter])
        benches[adapter].apply_levers()
        for _ in range(args[adapter].warmup):
            benches[adapter].step(known.method)
    a = args["none"]
    times = {k: [] for k in benches}
    order = list(benches)
    for rep in range(a.reps):
        for k in order[rep % 2:] + order[:rep % 2]:
            times[k].append(benches[k].timed(known.method, a.steps))
    ratios = [lo / full for lo, full in zip(times["lora"], times["none"])]
    result = {"benchmark": "lora", "machine": train_step.machine(a.device),
              "setup": {"config": a.config, "method": known.method, "batch_size": a.batch_size, "dtype": a.dtype,
                        "reps": a.reps, "steps_per_rep": a.steps, "lora": "rank 4, alpha 4, to_q/to_k/to_v/to_out.0"},
              "step_time_ratio_lora_to_full": train_step.spread(ratios)}
    for k, bench in benches.items():
        entry = {"unet_params": sum(p.numel() for p in bench.unet.parameters()),
                 "trainable_params": sum(p.numel() for p in bench.params),
                 "optimizer_state_bytes": optimizer_bytes(bench.optimizer)}
        if a.device.type == "cuda":
            entry["step_time_s"] = train_step.spread(times[k])
        result["full" if k == "none" else "lora"] = entry
    result["trainable_ratio"] = result["lora"]["trainable_params"] / result["full"]["trainable_params"]
    result["optimizer_bytes_ratio"] = result["lora"]["optimizer_state_bytes"] / result["full"]["optimizer_state_bytes"]
    if known.memory:
        result["computed"] = model_memory(known.gpus)
    return result


if __name__ == "__main__":
    train_step.emit(run(), None)
