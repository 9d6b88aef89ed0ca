"""``pogdiff sample``: DDIM images of every identity from a trained run (Sec. 4.1, App. C).

The run's exported pipeline (StableDiffusionPipeline, or StableDiffusionXLPipeline for an SDXL
base; DDIM scheduler, classifier-free guidance against the empty caption, which is also what
caption dropout trained) generates ``sample.images_per_id`` images per identity from the prompt
``sample.prompt_template`` (the paper's "An image of {p}.").
Each image starts from noise seeded by (sample.noise_seed, else sample.seed; identity, index) and
DDIM with eta = 0 is deterministic, so a rerun, or a different split over workers, gives the same
images. (An experiment's runs get a noise seed per training seed: pogdiff.config.variant_config.)
With ``sample.guidance_scales``, eval samples the same weights again at each of those scales, each
into a folder of its own (``generated-g<scale>/``, laid out like ``generated/``).

The work, every (identity, index) in identity-major order, is planned as shards of
``sample.batch_size * BATCHES_PER_SHARD`` images. The shards are generated in this process
(``sample.ray_workers=0``) or by a pool of Ray actors, one pipeline each (one GPU each on a cluster
with GPUs, in bf16 there); either way the same ``write_shard`` makes one shard from the same
batches, so the images do not depend on how many workers there are. A shard is written as it is
made (no process holds more than a batch of images) and a rerun continues from the finished ones.

Output, under the method's run directory, ``generated/``:
    samples.json            the plan: sample settings, prompts, shard size; "complete" once all is written
    shard-SSSSSS-00.tar     shard S (WebDataset): ``id<identity>_<index>.png`` + ``.json`` {identity, index}
    shard-SSSSSS.json       shard S's record, written last: the shard is finished
    id<identity>.png        one grid per identity
Readers get a ``Samples`` (identity -> that identity's images, read from its shards on access, and
a stream of every image), never all images at once.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from pogdiff.config import Config
from pogdiff.data.shards import IMAGE, META, ShardWriter, read_tar, task_name
from pogdiff.runs import RunFiles, atomic_path, atomic_write, write_json

BATCHES_PER_SHARD = 8
MAX_SHARD_BYTES = 1 << 30  # a part rolls over past this (ShardWriter); a shard is one part at any usual size


def image_seed(seed: int, identity: int, index: int) -> int:
    digest = hashlib.blake2b(f"sample/{seed}/{identity}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are < 2**63


def initial_noise(shape: tuple[int, ...], seed: int, identity: int, indices: range) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(seed, identity, i)))
                        for i in indices])


def load_pipeline(model_dir: str | Path, device: torch.device, lora: str | Path | None = None):
    """A trained model as a pipeline with a DDIM scheduler on ``device``: an exported pipeline
    directory, or a base model directory with a LoRA directory loaded into it
    (``RunFiles.trained_model``); fp32 on the CPU, bf16 on a GPU (fp16 on one without bf16)."""
    from diffusers import DDIMScheduler

    from pogdiff.models.export import PIPELINES, lora_pipeline, pipeline_class

    model_dir = Path(model_dir)
    dtype = None
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if lora is not None:
        pipe = lora_pipeline(model_dir, lora)
        pipe = pipe.to(dtype=dtype) if dtype is not None else pipe
    elif not (model_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"no trained pipeline at '{model_dir}': run `pogdiff train` or `pogdiff train-dist` "
                                "with this config (method, seed, run_name, output_dir) first")
    else:
        cls = pipeline_class(model_dir)
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} \
            if cls is PIPELINES["sd"] else {}
        pipe = cls.from_pretrained(str(model_dir), torch_dtype=dtype, **extra)
    # Latents are scaled to unit variance, so clipping the predicted x0 to [-1, 1] (the DDIM default
    # when a config does not say) would distort them; SD's own scheduler config sets it off too.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate_batches(pipe, jobs: Sequence[tuple[int, int]], prompts: Mapping[int, str], steps: int,
                     guidance_scale: float, seed: int, batch_size: int) -> Iterator[tuple[list, np.ndarray]]:
    """(the batch's (identity, index) jobs, their (B, H, W, 3) uint8 images), ``batch_size`` jobs at
    a time. A batch may hold several identities: each image starts from its own (seed, identity,
    index) noise, so which batch it lands in changes it only by the float rounding of a batched kernel."""
    unet = pipe.unet
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    for start in range(0, len(jobs), batch_size):
        batch = list(jobs[start:start + batch_size])
        latents = torch.cat([initial_noise(shape, seed, identity, range(index, index + 1)) for identity, index in batch])
        result = pipe(prompt=[prompts[identity] for identity, _ in batch],  # unconditional: the empty caption
                      num_inference_steps=steps, guidance_scale=guidance_scale,
                      latents=latents.to(pipe.device, unet.dtype), eta=0.0, output_type="np")
        yield batch, (np.clip(result.images, 0, 1) * 255).round().astype(np.uint8)


def generate(pipe, prompts: dict[int, str], n: int, steps: int, guidance_scale: float, seed: int,
             batch_size: int, progress: bool = False) -> dict[int, np.ndarray]:
    """``n`` images per identity, (n, H, W, 3) uint8 each, in memory (for a few identities)."""
    from tqdm import tqdm

    jobs = [(identity, index) for identity in prompts for index in range(n)]
    images: dict[int, list[np.ndarray]] = {identity: [] for identity in prompts}
    with tqdm(total=len(jobs), desc="sample", unit="img", disable=not progress) as bar:
        for batch, batch_images in generate_batches(pipe, jobs, prompts, steps, guidance_scale, seed, batch_size):
            for (identity, _), image in zip(batch, batch_images):
                images[identity].append(image)
            bar.update(len(batch))
    return {identity: np.stack(ims) for identity, ims in images.items()}


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


def noise_seed(cfg: Config) -> int:
    """The seed of the run's initial noise: sample.noise_seed, else sample.seed."""
    return cfg.sample.seed if cfg.sample.noise_seed is None else cfg.sample.noise_seed


def guidance_key(scale: float) -> str:
    """A guidance scale as a name (folder, JSON key): the shortest repr of the float, one per value."""
    return repr(float(scale))


def guidance_scales(cfg: Config) -> list[float]:
    """The scales eval scores at besides the main one: sample.guidance_scale and every one of
    sample.guidance_scales, once each, ascending; empty when sample.guidance_scales is."""
    if not cfg.sample.guidance_scales:
        return []
    return sorted({float(g) for g in [cfg.sample.guidance_scale, *cfg.sample.guidance_scales]})


def samples_dir(cfg: Config, guidance: Optional[float] = None) -> Path:
    """The run's samples at sample.guidance_scale (``guidance`` None or that scale), or at another
    scale: a folder per scale, so samples of two scales never share one."""
    if guidance is None or float(guidance) == float(cfg.sample.guidance_scale):
        return RunFiles(cfg).samples
    return RunFiles(cfg).method / f"generated-g{guidance_key(guidance)}"


def _settings(cfg: Config, guidance: Optional[float] = None) -> dict:
    """What the samples depend on: the sample settings and the exported model (re-exported on retraining)."""
    s = cfg.sample
    marker = RunFiles(cfg).export_marker()
    out = dict(steps=s.steps, guidance_scale=s.guidance_scale if guidance is None else float(guidance),
               images_per_id=s.images_per_id, prompt_template=s.prompt_template, seed=s.seed, few_ids=s.few_ids,
               model=marker.stat().st_mtime_ns if marker is not None else None)
    if s.noise_seed is not None:  # (a plain config's settings, and so its cached samples, as before)
        out["noise_seed"] = s.noise_seed
    return out


# --------------------------------------------------------------------------------------- the shards

def sample_key(identity: int, index: int) -> str:
    return f"id{identity:06d}_{index:06d}"


def shard_jobs(plan: dict, shard: int) -> list[tuple[int, int]]:
    """The (identity, index) images of ``shard``: positions [shard * S, (shard + 1) * S) of the
    identity-major list of every identity's ``images_per_id`` images."""
    n, size, identities = plan["images_per_id"], plan["images_per_shard"], plan["identities"]
    return [(identities[p // n], p % n) for p in range(shard * size, min((shard + 1) * size, len(identities) * n))]


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(pipe, folder: Path, plan: dict, shard: int) -> int:
    """Generate one shard of the plan into ``folder``, image by image into its tar; its record last.
    Returns the number of images."""
    s, prompts = plan["settings"], dict(zip(plan["identities"], plan["prompts"]))
    jobs = shard_jobs(plan, shard)
    writer = ShardWriter(folder, shard, max_samples=len(jobs), max_bytes=MAX_SHARD_BYTES)
    seed = s.get("noise_seed", s["seed"])
    for batch, images in generate_batches(pipe, jobs, prompts, s["steps"], s["guidance_scale"], seed,
                                          plan["batch_size"]):
        for (identity, index), image in zip(batch, images):
            writer.write(sample_key(identity, index), {IMAGE: png_bytes(image),
                                                       META: json.dumps({"identity": identity, "index": index}).encode()})
    atomic_write(folder / f"{task_name(shard)}.json", json.dumps({"shard": shard, "parts": writer.close()}))
    return len(jobs)


def shard_record(folder: Path, shard: int) -> Optional[dict]:
    """The shard's record if it is finished (record and parts present), else None."""
    path = folder / f"{task_name(shard)}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if all((folder / p["url"]).is_file() for p in record["parts"]) else None


class Samples(Mapping):
    """A run's finished samples: identity -> its (n, H, W, 3) uint8 images, decoded from the shards
    that hold them when asked for; ``records()`` streams every image, shard after shard."""

    def __init__(self, folder: Path, plan: dict):
        self.folder, self.plan = Path(folder), plan
        self._position = {identity: p for p, identity in enumerate(plan["identities"])}

    @property
    def prompts(self) -> dict[int, str]:
        return dict(zip(self.plan["identities"], self.plan["prompts"]))

    @property
    def images_per_id(self) -> int:
        return self.plan["images_per_id"]

    @property
    def num_images(self) -> int:
        return len(self) * self.images_per_id

    def __len__(self) -> int:
        return len(self._position)

    def __iter__(self) -> Iterator[int]:
        return iter(self.plan["identities"])

    def __contains__(self, identity) -> bool:
        return identity in self._position

    def _records(self, shards: range) -> Iterator[tuple[int, int, bytes]]:
        import webdataset as wds

        for shard in shards:
            record = shard_record(self.folder, shard)
            if record is None:
                raise FileNotFoundError(f"sample shard {shard} under '{self.folder}' is missing: run `pogdiff sample` again")
            for part in record["parts"]:
                url = str(self.folder / part["url"])
                with open(url, "rb") as f:
                    for sample in wds.tariterators.group_by_keys({**m, "__url__": url} for m in read_tar(f, url)):
                        meta = json.loads(sample[META])
                        yield meta["identity"], meta["index"], sample[IMAGE]

    def records(self) -> Iterator[tuple[int, int, bytes]]:
        """(identity, index, PNG bytes) of every image, identity-major."""
        return self._records(range(self.plan["shards"]))

    def __getitem__(self, identity: int) -> np.ndarray:
        p, n, size = self._position[identity], self.images_per_id, self.plan["images_per_shard"]
        pngs = sorted((index, png) for i, index, png in self._records(range(p * n // size, ((p + 1) * n - 1) // size + 1))
                      if i == identity)
        return np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for _, png in pngs])


def read_plan(folder: Path) -> Optional[dict]:
    path = folder / "samples.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_samples(cfg: Config, guidance: Optional[float] = None) -> Optional[Samples]:
    """The run's samples (at ``guidance``, None: sample.guidance_scale) if they are complete (every
    shard still there) and were made with the current sample settings."""
    folder = samples_dir(cfg, guidance)
    plan = read_plan(folder)
    if plan is None or not plan["complete"] or plan["settings"] != _settings(cfg, guidance) or \
            any(shard_record(folder, shard) is None for shard in range(plan["shards"])):
        return None
    return Samples(folder, plan)


def write_grids(samples: Samples) -> None:
    """``id<identity>.png``: each identity's images in a grid of rows of 8, scaled 2x."""
    from pogdiff.models.export import image_grid

    for identity, records in itertools.groupby(samples.records(), key=lambda r: r[0]):
        ims = [Image.open(io.BytesIO(png)).convert("RGB") for _, _, png in records]
        grid = image_grid(ims, rows=max(1, len(ims) // 8))
        with atomic_path(samples.folder / f"id{identity:06d}.png") as tmp:
            grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(tmp, format="PNG")


# ------------------------------------------------------------------------------ workers and the run

@contextlib.contextmanager
def ray_actor_pool(actor_class, workers: int, device: str, *args):
    """(a ray.util.ActorPool, its size) of ``workers`` actors ``actor_class(device, *args)`` on the
    cluster of pogdiff.dist.cluster.connect: one GPU each when ``device`` (train.device) is cuda, or
    auto on a cluster with GPUs (then at most one actor per GPU), else one CPU each."""
    import ray
    from ray.util import ActorPool

    from pogdiff.dist.cluster import session

    actors = []
    with session(num_cpus=workers, log_to_driver=False), contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: [ray.kill(actor) for actor in actors])
        gpus = int(ray.cluster_resources().get("GPU", 0))
        gpu = device == "cuda" or (device == "auto" and gpus > 0)
        if gpu and gpus == 0:
            raise RuntimeError("train.device=cuda, but the Ray cluster has no GPU")
        # A killed actor is restarted and its call retried: a shard write and an embedding are
        # idempotent (atomic shard files, fixed seeds), so the stage's output is unchanged.
        remote = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_restarts=-1, max_task_retries=-1)(actor_class)
        actors = [remote.remote("cuda" if gpu else "cpu", *args) for _ in range(min(workers, gpus) if gpu else workers)]
        yield ActorPool(actors), len(actors)


class SampleWorker:
    """A Ray actor holding one pipeline; writes the shards it is handed."""

    def __init__(self, device: str, model_dir: str, lora: str | None):
        if device == "cpu":
            torch.set_num_threads(1)  # one CPU per actor
        self.pipe = load_pipeline(model_dir, torch.device(device), lora)

    def write_shard(self, folder: str, plan: dict, shard: int) -> int:
        return write_shard(self.pipe, Path(folder), plan, shard)


def sample_run(cfg: Config, progress: bool = True, guidance: Optional[float] = None) -> Samples:
    """Generate the run's samples (or continue them, or return the finished ones) at ``guidance``
    (None: sample.guidance_scale); writes the shards, then the grids, then marks the plan complete."""
    cached = load_samples(cfg, guidance)
    if cached is not None:
        return cached
    from tqdm import tqdm

    s, files, folder = cfg.sample, RunFiles(cfg), samples_dir(cfg, guidance)
    settings = _settings(cfg, guidance)
    prompts = identity_prompts(cfg)
    plan = read_plan(folder)
    if plan is None or plan["settings"] != settings or plan["identities"] != list(prompts):
        shutil.rmtree(folder, ignore_errors=True)  # samples of other settings (or of an older format)
        folder.mkdir(parents=True)
        size = s.batch_size * BATCHES_PER_SHARD
        plan = {"settings": settings, "identities": list(prompts), "prompts": list(prompts.values()),
                "images_per_id": s.images_per_id, "batch_size": s.batch_size, "images_per_shard": size,
                "shards": -(-len(prompts) * s.images_per_id // size), "complete": False}
        write_json(folder / "samples.json", plan)
    todo = [shard for shard in range(plan["shards"]) if shard_record(folder, shard) is None]
    model, lora = files.trained_model() if todo else (None, None)
    with tqdm(total=len(prompts) * s.images_per_id, desc="sample", unit="img", disable=not progress or not todo,
              initial=len(prompts) * s.images_per_id - sum(len(shard_jobs(plan, t)) for t in todo)) as bar:
        if todo and s.ray_workers > 0:
            import ray

            with ray_actor_pool(SampleWorker, s.ray_workers, cfg.train.device, str(model),
                                lora and str(lora)) as (pool, _):
                plan_ref = ray.put(plan)
                for images in pool.map_unordered(lambda a, t: a.write_shard.remote(str(folder), plan_ref, t), todo):
                    bar.update(images)
        elif todo:
            from pogdiff.models.components import resolve_device

            pipe = load_pipeline(model, resolve_device(cfg.train.device), lora)
            for shard in todo:
                bar.update(write_shard(pipe, folder, plan, shard))
    samples = Samples(folder, plan)
    write_grids(samples)
    plan["complete"] = True
    write_json(folder / "samples.json", plan)
    return samples
