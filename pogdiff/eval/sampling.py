"""``pogdiff sample``: DDIM images of every identity from a trained run (Sec. 4.1, App. C).

The run's exported StableDiffusionPipeline (DDIM scheduler, classifier-free guidance against the
empty caption, which is also what caption dropout trained) generates ``sample.images_per_id``
images per identity from the prompt ``sample.prompt_template`` (the paper's "An image of {p}.").
Each image starts from noise seeded by (sample.seed, identity, index) and DDIM with eta = 0 is
deterministic, so a rerun, or a different split over Ray workers, gives the same images.

Output, under the method's run directory: ``images.safetensors`` (uint8 (N, H, W, 3),
identity and index per image) and one PNG grid per identity, under ``generated/``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file

from pogdiff.config import Config
from pogdiff.runs import RunFiles, atomic_path


def image_seed(seed: int, identity: int, index: int) -> int:
    digest = hashlib.blake2b(f"sample/{seed}/{identity}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are < 2**63


def initial_noise(shape: tuple[int, ...], seed: int, identity: int, indices: range) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(seed, identity, i)))
                        for i in indices])


def load_pipeline(pipeline_dir: str | Path, device: torch.device):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipeline_dir = Path(pipeline_dir)
    if not (pipeline_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"no trained pipeline at '{pipeline_dir}': run `pogdiff train` or `pogdiff train-dist` "
                                "with this config (method, seed, run_name, output_dir) first")
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir), safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    # Latents are scaled to unit variance, so clipping the predicted x0 to [-1, 1] (the DDIM default
    # when a config does not say) would distort them; SD's own scheduler config sets it off too.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate(pipe, prompts: dict[int, str], n: int, steps: int, guidance_scale: float, seed: int,
             batch_size: int, progress: bool = False) -> dict[int, np.ndarray]:
    """``n`` images per identity, (n, H, W, 3) uint8 each. A batch may hold several identities:
    each image starts from its own (seed, identity, index) noise, so which batch or worker it lands
    in changes it only by the float rounding of a batched kernel."""
    from tqdm import tqdm

    unet = pipe.unet
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    jobs = [(identity, index) for identity in prompts for index in range(n)]
    images: dict[int, list[np.ndarray]] = {identity: [] for identity in prompts}
    with tqdm(total=len(jobs), desc="sample", unit="img", disable=not progress) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            latents = torch.cat([initial_noise(shape, seed, identity, range(index, index + 1)) for identity, index in batch])
            result = pipe(prompt=[prompts[identity] for identity, _ in batch],  # unconditional: the empty caption
                          num_inference_steps=steps, guidance_scale=guidance_scale,
                          latents=latents.to(pipe.device, unet.dtype), eta=0.0, output_type="np")
            for (identity, _), image in zip(batch, result.images):
                images[identity].append((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
            bar.update(len(batch))
    return {identity: np.stack(ims) for identity, ims in images.items()}


def _ray_generate(pipeline_dir: str, prompts: dict[int, str], n: int, steps: int, guidance_scale: float,
                  seed: int, batch_size: int, workers: int) -> dict[int, np.ndarray]:
    """The identities split into ``workers`` Ray tasks, each loading the pipeline once."""
    import ray

    from pogdiff.dist.cluster import connect, drop_source_checkout_from_sys_path

    started = connect(num_cpus=workers, log_to_driver=False)
    try:
        @ray.remote(num_cpus=1)
        def task(chunk: dict[int, str]) -> dict[int, np.ndarray]:
            drop_source_checkout_from_sys_path()
            torch.set_num_threads(1)
            return generate(load_pipeline(pipeline_dir, torch.device("cpu")), chunk, n, steps, guidance_scale, seed, batch_size)

        items = list(prompts.items())
        chunks = [dict(items[w::workers]) for w in range(workers) if items[w::workers]]
        out: dict[int, np.ndarray] = {}
        for part in ray.get([task.remote(c) for c in chunks]):
            out.update(part)
        return {i: out[i] for i in prompts}
    finally:
        if started:
            ray.shutdown()


def evaluated_identities(cfg: Config, index) -> list[int]:
    """The identities that are sampled and scored: all of them, or with ``sample.few_ids`` = N > 0
    every majority identity and N minority ones, drawn with ``sample.seed`` (so every run of an
    experiment is scored on the same identities)."""
    counts = {i: c for i, c in index.identity_counts().items() if i >= 0}
    few = sorted(i for i, c in counts.items() if c <= cfg.data.minority_images)
    if cfg.sample.few_ids <= 0 or cfg.sample.few_ids >= len(few):
        return sorted(counts)
    left_out = set(few) - set(np.random.default_rng(cfg.sample.seed).choice(few, cfg.sample.few_ids, replace=False).tolist())
    return sorted(set(counts) - left_out)


def identity_prompts(cfg: Config, index=None) -> dict[int, str]:
    """identity -> prompt, for every evaluated identity of the dataset (names from its manifest: the
    name column, else the identity label; the generator's names for synthetic data)."""
    if index is None:
        from pogdiff.data.dataset import resolve_dataset

        index = resolve_dataset(cfg, progress=False).index
    names = index.identity_names()
    if not names:
        raise ValueError(f"dataset '{index.root}' has no identity labels (data.identity_column): sampling and "
                         "evaluation are per identity")
    return {i: cfg.sample.prompt_template.format(p=names[i]) for i in evaluated_identities(cfg, index) if i in names}


def samples_dir(cfg: Config) -> Path:
    return RunFiles(cfg).samples


def _settings(cfg: Config) -> dict:
    """What the samples depend on: the sample settings and the exported model (re-exported on retraining)."""
    s = cfg.sample
    index = RunFiles(cfg).pipeline / "model_index.json"
    return dict(steps=s.steps, guidance_scale=s.guidance_scale, images_per_id=s.images_per_id,
                prompt_template=s.prompt_template, seed=s.seed, few_ids=s.few_ids,
                model=index.stat().st_mtime_ns if index.is_file() else None)


def save_samples(path: Path, images: dict[int, np.ndarray], metadata: dict[str, str]) -> None:
    """identity -> (n, H, W, 3) uint8 into one safetensors file (temp + rename)."""
    ids = np.concatenate([np.full(len(v), i, dtype=np.int64) for i, v in images.items()])
    index = np.concatenate([np.arange(len(v), dtype=np.int64) for v in images.values()])
    # safetensors writes the raw buffer: the stacked images must be C-ordered
    stacked = np.ascontiguousarray(np.concatenate(list(images.values())))
    with atomic_path(path) as tmp:
        save_file({"images": stacked, "identities": ids, "index": index}, str(tmp), metadata=metadata)


def read_samples(path: Path) -> tuple[dict[int, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        metadata = f.metadata()
    t = load_file(str(path))
    return {int(i): t["images"][t["identities"] == i] for i in np.unique(t["identities"])}, metadata


def load_samples(cfg: Config) -> Optional[dict[int, np.ndarray]]:
    """The run's samples if they exist and were made with the current sample settings."""
    path = samples_dir(cfg) / "images.safetensors"
    if not path.is_file():
        return None
    images, metadata = read_samples(path)
    return images if json.loads(metadata["settings"]) == _settings(cfg) else None


def sample_run(cfg: Config, progress: bool = True) -> dict[int, np.ndarray]:
    """Generate (or load the cached) samples of the run's method; writes images + grids."""
    cached = load_samples(cfg)
    if cached is not None:
        return cached
    from pogdiff.models.components import resolve_device
    from pogdiff.models.export import image_grid

    s = cfg.sample
    files = RunFiles(cfg)
    prompts = identity_prompts(cfg)
    args = (prompts, s.images_per_id, s.steps, s.guidance_scale, s.seed, s.batch_size)
    if s.ray_workers > 0:
        images = _ray_generate(str(files.pipeline), *args, workers=s.ray_workers)
    else:
        images = generate(load_pipeline(files.pipeline, resolve_device(cfg.train.device)), *args, progress=progress)
    out = samples_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for identity, ims in images.items():
        grid = image_grid([Image.fromarray(im) for im in ims], rows=max(1, len(ims) // 8))
        grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(out / f"id{identity:06d}.png")
    save_samples(out / "images.safetensors", images,
                 {"settings": json.dumps(_settings(cfg)), "prompts": json.dumps(prompts)})
    return images
