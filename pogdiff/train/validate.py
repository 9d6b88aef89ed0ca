"""DDIM validation grids during training (``train.validate_every``)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from pogdiff.config import Config
from pogdiff.models.components import resolve_device
from pogdiff.train.ema import ShardedEMA
from pogdiff.train.metrics import MetricsLog


class Validator:
    """DDIM sample grids (prompts x images) from the EMA, else the raw weights: every rank gathers,
    rank 0 samples and writes ``samples/step_XXXXXXXX.png`` and a TensorBoard image."""

    def __init__(self, cfg: Config, engine, ema: Optional[ShardedEMA], model_dir: Path, out_dir: Path, prompts: list[str]):
        self.cfg, self.engine, self.ema, self.model_dir, self.out_dir, self.prompts = cfg, engine, ema, model_dir, out_dir, prompts

    def __call__(self, step: int, metrics: MetricsLog) -> Path | None:
        from pogdiff.models.adapters import trained_unet
        from pogdiff.models.export import image_grid, make_pipeline

        weights = self.ema.gather(self.engine.all_gather) if self.ema is not None else self.engine.full_weights()
        if self.engine.rank != 0:
            return None
        tc = self.cfg.train
        device = resolve_device(tc.device) if self.engine.world_size == 1 else next(self.engine.module.parameters()).device
        pipe = make_pipeline(self.model_dir, trained_unet(self.model_dir, weights, tc), tc.prediction_type).to(device)
        pipe.set_progress_bar_config(disable=True)
        images = pipe([p for p in self.prompts for _ in range(tc.validation_images)],
                      num_inference_steps=tc.validation_ddim_steps, guidance_scale=self.cfg.sample.guidance_scale,
                      generator=torch.Generator().manual_seed(self.cfg.sample.seed)).images
        grid = image_grid(images, rows=len(self.prompts))
        path = self.out_dir / "samples" / f"step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        metrics.image(step, "validation", grid)
        return path


def default_prompts(cfg: Config, index) -> list[str]:
    """``train.validation_prompts``, else the most and the least frequent identity's name
    (``index``: the dataset's pogdiff.data.shards.DatasetIndex)."""
    if cfg.train.validation_prompts:
        return list(cfg.train.validation_prompts)
    counts = {i: c for i, c in index.identity_counts().items() if i >= 0}
    if not counts:
        return [cfg.sample.prompt_template.format(p=index.captions[0])]
    names = index.identity_names()
    head, tail = max(counts, key=counts.get), min(counts, key=counts.get)
    return [cfg.sample.prompt_template.format(p=names[i]) for i in dict.fromkeys([head, tail])]
