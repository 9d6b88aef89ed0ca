"""The DeepSpeed config of a training job, generated from the run config (the one place it is made).

    deepspeed_config(cfg, world_size, use_gpu)

ZeRO-2 (default) shards gradients and optimizer state, ZeRO-3 the parameters too (``dist.zero_stage``).
bf16 on GPU, fp32 on CPU. The optimizer and LR schedule are client objects passed to
``deepspeed.initialize`` (torch AdamW or bitsandbytes AdamW8bit), so there is no "optimizer" or
"scheduler" section, and ZeRO-Offload (which needs DeepSpeed's own CPU Adam) is not used.
``dist.deepspeed_json`` names a JSON file deep-merged over the result, for anything else
(bucket sizes, ``stage3_*`` knobs, ...).
"""
from __future__ import annotations

import json
from pathlib import Path

from pogdiff.config import Config, ConfigError


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: Config, world_size: int, use_gpu: bool) -> dict:
    tc, dc = cfg.train, cfg.dist
    zero: dict = {"stage": dc.zero_stage, "contiguous_gradients": True, "overlap_comm": use_gpu}
    if dc.zero_stage == 3:
        # Keep the weights sharded on save: checkpoints gather fp32 weights through DeepSpeed's
        # tensor-fragment API instead of a 16-bit copy on rank 0.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config = {
        "train_micro_batch_size_per_gpu": tc.batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.batch_size * tc.grad_accum * world_size,
        "gradient_clipping": tc.grad_clip if tc.grad_clip > 0 else 0.0,
        "bf16": {"enabled": bool(use_gpu and dc.bf16)},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # client optimizers (torch AdamW, bitsandbytes AdamW8bit)
        "steps_per_print": 2**31 - 1,  # pogdiff logs by itself
        "wall_clock_breakdown": False,
    }
    if dc.deepspeed_json:
        path = Path(dc.deepspeed_json)
        if not path.is_file():
            raise ConfigError(f"dist.deepspeed_json: '{path}' does not exist")
        try:
            extra = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"dist.deepspeed_json: '{path}' is not valid JSON: {e}") from None
        config = deep_merge(config, extra)
    offload = config["zero_optimization"]
    if any(offload.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param")):
        raise ConfigError("ZeRO-Offload needs DeepSpeed's own CPU Adam, but pogdiff passes a client optimizer "
                          "(torch AdamW or bitsandbytes AdamW8bit) to deepspeed.initialize: drop offload_* "
                          "from dist.deepspeed_json, or raise dist.zero_stage / add workers")
    return config
