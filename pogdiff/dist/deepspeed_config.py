"""The DeepSpeed config of a training job, generated from the run config (the one place it is made).

    deepspeed_config(cfg, world_size, use_gpu)

ZeRO-2 (default) shards gradients and optimizer state, ZeRO-3 the parameters too (``dist.zero_stage``).
bf16 on GPU (``train.mixed_precision``), fp32 on CPU. The optimizer and LR schedule are client objects passed to
``deepspeed.initialize`` (torch AdamW or bitsandbytes AdamW8bit), so there is no "optimizer" or
"scheduler" section, and ZeRO-Offload (which needs DeepSpeed's own CPU Adam) is not used.
``dist.deepspeed_json`` names a JSON file deep-merged over the result, for anything else
(bucket sizes, ``stage3_*`` knobs, ...); HF-style "auto" values in it are resolved, and values
that contradict the run config are refused before any worker starts.
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


def precision(cfg: Config, use_gpu: bool) -> str:
    """"bf16" or "fp32": ``train.mixed_precision`` as the DeepSpeed job runs it."""
    mp = cfg.train.mixed_precision
    if not use_gpu:
        if mp in ("fp16", "bf16"):
            raise ConfigError(f"train.mixed_precision={mp} needs GPUs (dist.use_gpu=true); the CPU job runs fp32: "
                              "use train.mixed_precision=auto or no")
        return "fp32"
    if mp == "fp16":
        raise ConfigError("train.mixed_precision=fp16 is not supported by train-dist: DeepSpeed's fp16 engine keeps "
                          "fp16 weights with its own loss scaler around pogdiff's client optimizer. Use bf16 "
                          "(train.mixed_precision=auto or bf16, Ampere GPUs and newer) or no (fp32)")
    return "fp32" if mp == "no" else "bf16"


def deepspeed_config(cfg: Config, world_size: int, use_gpu: bool) -> dict:
    """The generated config, with ``dist.deepspeed_json`` merged over it. Its ``"auto"`` values take
    pogdiff's (as HF Trainer and accelerate resolve them); a value that contradicts the run config
    is a ConfigError naming both keys, raised by ``pogdiff config`` and preflight alike."""
    tc, dc = cfg.train, cfg.dist
    bf16 = precision(cfg, use_gpu) == "bf16"
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
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # client optimizers (torch AdamW, bitsandbytes AdamW8bit)
        "steps_per_print": 2**31 - 1,  # pogdiff logs by itself
        "wall_clock_breakdown": False,
    }
    if dc.deepspeed_json:
        config = deep_merge(config, user_json(cfg, config))
    offload = config["zero_optimization"]
    if any(offload.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param")):
        raise ConfigError("ZeRO-Offload needs DeepSpeed's own CPU Adam, but pogdiff passes a client optimizer "
                          "(torch AdamW or bitsandbytes AdamW8bit) to deepspeed.initialize: drop offload_* "
                          "from dist.deepspeed_json, or raise dist.zero_stage / add workers")
    return config


# DeepSpeed key -> the pogdiff key it must agree with
RUN_CONFIG_KEYS = {"train_micro_batch_size_per_gpu": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
                   "train_batch_size": "train.batch_size x train.grad_accum x dist.num_workers",
                   "gradient_clipping": "train.grad_clip", "bf16.enabled": "train.mixed_precision / dist.use_gpu",
                   "zero_optimization.stage": "dist.zero_stage"}
OPTIMIZER_KEYS = {"lr": "lr", "weight_decay": "weight_decay", "eps": "adam_epsilon"}


def user_json(cfg: Config, generated: dict) -> dict:
    """``dist.deepspeed_json`` with its "auto" values resolved and checked against ``generated``."""
    path = Path(cfg.dist.deepspeed_json)
    if not path.is_file():
        raise ConfigError(f"dist.deepspeed_json: '{path}' does not exist")
    try:
        extra = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"dist.deepspeed_json: '{path}' is not valid JSON: {e}") from None
    if not isinstance(extra, dict):
        raise ConfigError(f"dist.deepspeed_json: '{path}' must hold a JSON object")
    problems = []
    if extra.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        problems.append("fp16.enabled=true: train-dist runs bf16 or fp32 (train.mixed_precision); drop the fp16 block")
    extra.pop("fp16", None)
    problems += _client_optimizer(cfg, extra)
    for ds_key, run_key in RUN_CONFIG_KEYS.items():
        mine, theirs = _get(generated, ds_key), _get(extra, ds_key)
        if theirs is not None and theirs != "auto" and theirs != mine:
            problems.append(f"{ds_key}={theirs} contradicts {run_key} (which gives {mine}): change one, or write \"auto\"")
    if problems:
        raise ConfigError(f"dist.deepspeed_json '{path}': " + "; ".join(problems))
    return _without_auto(extra)


def _client_optimizer(cfg: Config, extra: dict) -> list[str]:
    """pogdiff passes its own optimizer and LR schedule (train.*) to deepspeed.initialize: an
    "optimizer" section may only restate them (AdamW, values "auto" or equal) and is dropped."""
    problems = []
    optimizer = extra.pop("optimizer", None)
    if optimizer is not None:
        if str(optimizer.get("type", "AdamW")).lower() not in ("adamw", "adam"):
            problems.append(f"optimizer.type={optimizer.get('type')}: pogdiff's optimizer is train.optimizer (AdamW)")
        for key, value in optimizer.get("params", {}).items():
            mine = (cfg.train.adam_beta1, cfg.train.adam_beta2) if key == "betas" else \
                getattr(cfg.train, OPTIMIZER_KEYS[key]) if key in OPTIMIZER_KEYS else None
            if value != "auto" and (mine is None or (list(mine) if key == "betas" else mine) != value):
                problems.append(f"optimizer.params.{key}={value} contradicts the train.* optimizer settings "
                                f"(set them there, or write \"auto\")")
    if "scheduler" in extra:
        problems.append("a \"scheduler\" section: the LR schedule is train.lr_scheduler / train.lr_warmup_steps")
    return problems


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _without_auto(tree: dict) -> dict:
    """Drop "auto" leaves: the generated value stays (or DeepSpeed's default, for keys pogdiff does
    not generate, e.g. HF's bucket sizes derived from the model's hidden size)."""
    return {k: _without_auto(v) if isinstance(v, dict) else v for k, v in tree.items() if v != "auto"}
