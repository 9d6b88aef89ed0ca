"""``pogdiff eval``: the paper's metrics for one trained run (Sec. 4.1, App. C, F; DESIGN §2).

Real image sets per identity, read from the prepared dataset's shards (prepare.keep_images):
    training  the images the run trained on: what gRecall must cover
    held-out  the dataset's held-out split (``data.heldout_images`` per identity where the identity
              had enough images): the DINO-style score's real set; an identity without held-out
              images is scored against its training images, and ``dino_reference`` says which
    FID       training + held-out: "all images of the identity in the original dataset" (App. C)
All embeddings come from ``eval.encoder`` (pogdiff.eval.recognizer), never from the neighbours'
encoder. "All" averages over every identity, "Few" over the minority identities (at most
``data.minority_images`` training images).

Features are extracted a batch at a time, streaming over the dataset's shards and the run's
sample shards, in this process or (``sample.ray_workers`` > 0) by a pool of Ray actors, one encoder
each (a GPU each on a cluster with GPUs). They go into (n, d) float32 .npy files grouped by
identity: the real ones in the dataset's eval cache (``artifacts/eval-<encoder fp>/``, shared by
every run scored with that encoder), the generated ones beside the samples. The metrics are then
computed one identity at a time from that identity's rows, so no process holds more than a batch
of images and one identity's embeddings (the files are written and read by rows, never mapped:
pogdiff.npyrows). Embeddings rather than per-identity sufficient statistics, because gRecall needs
every training embedding (which of them a generated image covers), and because the metrics then
come from the same arithmetic on the same arrays as pogdiff.eval.metrics on in-memory embeddings:
the same values.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from pogdiff.config import Config
from pogdiff.eval import metrics as M
from pogdiff.npyrows import NpyWriter, read_rows
from pogdiff.runs import RunFiles, atomic_path, fingerprint, write_json

METRICS = ("fid", "dino", "grecall")

Batches = Iterator[tuple[list[int], np.ndarray]]  # (identities, (B, d) float32 embeddings) per batch


def few_ids(cfg: Config, index) -> list[int]:
    """The evaluated minority identities (every one, or ``sample.few_ids`` of them)."""
    from pogdiff.eval.sampling import evaluated_identities

    counts = index.identity_counts()
    return [i for i in evaluated_identities(cfg, index) if counts[i] <= cfg.data.minority_images]


class IdentityEmbeddings(Mapping):
    """identity -> its (n, d) float32 embeddings: rows ``ranges[identity]`` of a .npy, read from the
    file when asked for (pogdiff.npyrows: no memory map keeps the rows read in this process)."""

    def __init__(self, path: Optional[Path], ranges: dict[int, tuple[int, int]]):
        self.path, self.ranges = path, ranges

    def __getitem__(self, identity: int) -> np.ndarray:
        start, stop = self.ranges[identity]
        return read_rows(self.path, start, stop)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ranges)

    def __len__(self) -> int:
        return len(self.ranges)

    def restrict(self, ids: Iterable[int]) -> "IdentityEmbeddings":
        ids = set(ids)
        return IdentityEmbeddings(self.path, {i: r for i, r in self.ranges.items() if i in ids})

    @classmethod
    def load(cls, path: Path) -> Optional["IdentityEmbeddings"]:
        """The embeddings written by ``write_grouped`` if complete (their ranges file is written last)."""
        ranges = path.with_suffix(".json")
        if not ranges.is_file():
            return None
        table = json.loads(ranges.read_text())["ranges"]
        return cls(path if table else None, {i: (a, b) for i, a, b in table})


def write_grouped(path: Path, counts: Mapping[int, int], batches: Batches) -> IdentityEmbeddings:
    """The embeddings of ``batches`` into ``path`` (temp + rename), (sum(counts), d) float32, each
    identity's rows together in the order they came; then their ranges (``.json``, the completion marker)."""
    offsets, total = {}, 0
    for identity, count in counts.items():
        offsets[identity], total = total, total + count
    filled = dict.fromkeys(counts, 0)
    if total:
        with atomic_path(path) as tmp, contextlib.ExitStack() as opened:
            out = None
            for identities, emb in batches:
                if out is None:
                    out = opened.enter_context(NpyWriter(tmp, np.float32, (total, emb.shape[1])))
                slots = []
                for identity in identities:
                    slots.append(offsets[identity] + filled[identity])
                    filled[identity] += 1
                out[slots] = emb
            if filled != dict(counts):
                wrong = {i: (filled[i], c) for i, c in counts.items() if filled[i] != c}
                raise RuntimeError(f"{path.name}: identity -> (images read, images the index lists): "
                                   f"{dict(list(wrong.items())[:5])}")
    ranges = {i: (offsets[i], offsets[i] + c) for i, c in counts.items() if c}
    write_json(path.with_suffix(".json"), {"ranges": [[i, a, b] for i, (a, b) in ranges.items()]})
    return IdentityEmbeddings(path if ranges else None, ranges)


def cached_grouped(path: Path, counts: Mapping[int, int], batches: Callable[[], Batches]) -> IdentityEmbeddings:
    cached = IdentityEmbeddings.load(path)
    if cached is not None:
        return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_grouped(path, counts, batches())


def embed_pngs(encode, pngs) -> np.ndarray:
    """The per-batch step of every feature extraction: PNG bytes -> (B, d) float32 embeddings."""
    from pogdiff.eval.recognizer import decode_pngs

    return encode(decode_pngs(pngs)).numpy().astype(np.float32, copy=False)


class FeatureWorker:
    """A Ray actor holding one ``eval.encoder`` (the cached recogniser, or the local HF model)."""

    def __init__(self, device: str, cfg: Config, dataset_root: str):

        from pogdiff.data.dataset import Dataset
        from pogdiff.eval.recognizer import eval_encoder

        if device == "cpu":
            torch.set_num_threads(1)  # one CPU per actor
        self.encode = eval_encoder(cfg, Dataset.at(dataset_root), progress=False, device=device)[0]

    def embed(self, pngs: list[bytes]) -> np.ndarray:
        return embed_pngs(self.encode, pngs)


@contextlib.contextmanager
def feature_extractor(cfg: Config, ds, encoder) -> Iterator[Callable[[Iterable[tuple[int, bytes]]], Batches]]:
    """``embed(items)``: (identity, PNG) items -> their embeddings, ``eval.batch_size`` at a time, in
    order; here, or on ``sample.ray_workers`` Ray actors (started on first use, stopped with the
    block) with at most two batches per actor in flight."""
    from pogdiff.eval.recognizer import png_batches

    def here(items: Iterable[tuple[int, bytes]]) -> Batches:
        return ((ids, embed_pngs(encoder[0], pngs)) for ids, pngs in png_batches(items, cfg.eval.batch_size))

    if cfg.sample.ray_workers <= 0:
        yield here
        return
    from pogdiff.eval.sampling import ray_actor_pool

    with contextlib.ExitStack() as stack:
        pools = []  # the one pool, once started

        def on_actors(items: Iterable[tuple[int, bytes]]) -> Batches:
            if not pools:
                pools.append(stack.enter_context(ray_actor_pool(FeatureWorker, cfg.sample.ray_workers,
                                                                cfg.train.device, cfg, ds.location)))
            pool, actors = pools[0]
            # ActorPool.map would queue every batch's PNGs in this process: submit as results return.
            waiting: deque[list[int]] = deque()
            for ids, pngs in png_batches(items, cfg.eval.batch_size):
                if len(waiting) >= 2 * actors:
                    yield waiting.popleft(), pool.get_next()
                pool.submit(lambda actor, batch: actor.embed.remote(batch), pngs)
                waiting.append(ids)
            while waiting:
                yield waiting.popleft(), pool.get_next()

        yield on_actors


def dataset_embeddings(index, path: Path, embed) -> IdentityEmbeddings:
    """Every labelled image of a prepared split, streamed shard after shard, embedded per identity."""
    if index.meta.get("keep_images") is False:
        raise ValueError(f"dataset '{index.root}' has no images in its shards: prepare it with prepare.keep_images=true "
                         "(and identity labels) to evaluate on it")
    labelled = ((identity, png) for _, identity, png in index.images() if identity >= 0)
    counts = {i: c for i, c in index.identity_counts().items() if i >= 0}
    return cached_grouped(path, counts, lambda: embed(labelled))


def eval_cache(ds, info: dict) -> Path:
    """Where the real images' embeddings by this encoder live, beside the dataset."""
    return ds.artifacts / f"eval-{fingerprint(info, 12)}"


def real_embeddings(cfg: Config, ds, encoder, reference_images: int = 0) -> dict[str, IdentityEmbeddings]:
    """Embeddings of the training and held-out images per identity (``encoder`` = (encode, info)).
    For synthetic datasets and with ``reference_images``, also that many fresh real images per
    identity ("reference": what a perfect generator would produce) and the same images through the
    dataset's VAE ("reference_vae")."""
    encode, info = encoder
    cache = eval_cache(ds, info)
    with feature_extractor(cfg, ds, encoder) as embed:
        out = {"training": dataset_embeddings(ds.index, cache / "training.npy", embed),
               "heldout": dataset_embeddings(ds.heldout, cache / "heldout.npy", embed) if ds.heldout is not None
               else IdentityEmbeddings(None, {})}
    synthetic = ds.meta.get("synthetic")
    if reference_images and synthetic:
        out.update(reference_embeddings(cfg, ds, encode, cache, reference_images, synthetic))
    return out


def reference_embeddings(cfg: Config, ds, encode, cache: Path, n: int, synthetic: dict) -> dict[str, IdentityEmbeddings]:
    """``n`` fresh renders per identity of the synthetic dataset (past its training and held-out
    images), embedded as they are and through the dataset's VAE, a batch at a time."""
    from pogdiff.data.synthetic import iter_records

    counts = synthetic["counts"]
    starts = [c + synthetic["heldout_images"] for c in counts]

    def batches(through_vae: bool) -> Batches:
        records = iter_records([n] * len(counts), synthetic["seed"], synthetic["image_size"], starts=starts,
                               names=synthetic.get("names", "grid"))  # datasets from before data.names: grid
        while batch := [r for _, r in zip(range(cfg.eval.batch_size), records)]:
            images = [r.image for r in batch]
            yield [r.identity for r in batch], encode(vae_roundtrip(ds.model_dir, images) if through_vae else images).numpy()

    wanted = dict.fromkeys(range(len(counts)), n)
    return {name: cached_grouped(cache / f"{name}-{n}.npy", wanted, lambda v=through_vae: batches(v))
            for name, through_vae in (("reference", False), ("reference_vae", True))}


@functools.lru_cache(maxsize=1)
def frozen_vae(model_dir: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval()


@torch.no_grad()
def vae_roundtrip(model_dir: str, images: list) -> list:
    """The images replaced by decode(encode(image)) through the frozen VAE of ``model_dir``."""
    from pogdiff.data.encode import images_to_tensor
    from pogdiff.eval.recognizer import to_pil

    vae = frozen_vae(model_dir)
    y = vae.decode(vae.encode(images_to_tensor(images)).latent_dist.mean).sample
    return to_pil(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def generated_embeddings(cfg: Config, ds, samples, encoder) -> IdentityEmbeddings:
    """The run's samples (pogdiff.eval.sampling.Samples), streamed from their shards and embedded;
    cached beside them (``embeddings-<encoder fp>.npy``) until they are sampled again."""
    path = samples.folder / f"embeddings-{fingerprint(encoder[1], 12)}.npy"
    items = ((identity, png) for identity, _, png in samples.records())
    with feature_extractor(cfg, ds, encoder) as embed:
        return cached_grouped(path, dict.fromkeys(samples, samples.images_per_id), lambda: embed(items))


def restrict(real: dict[str, IdentityEmbeddings], ids) -> dict[str, IdentityEmbeddings]:
    """The real embeddings of the evaluated identities only."""
    return {name: per_id.restrict(ids) for name, per_id in real.items()}


def compute_metrics(generated: Mapping[int, np.ndarray], real: Mapping[str, Mapping[int, np.ndarray]],
                    few: list[int], threshold: float, fid_eps: float) -> dict:
    """Per-identity metrics and their All / Few means, from embeddings (dicts, or IdentityEmbeddings
    read one identity at a time)."""
    train, heldout = real["training"], real["heldout"]
    per_id: dict[str, dict[int, float]] = {name: {} for name in METRICS}
    for i in train:
        generated_i = {i: generated[i]} if i in generated else {}
        train_i = {i: train[i]}
        heldout_i = heldout[i] if i in heldout else None
        fid_real = {i: np.concatenate([train_i[i], heldout_i]) if heldout_i is not None else train_i[i]}
        per_id["fid"].update(M.fid_per_id(generated_i, fid_real, fid_eps))
        per_id["dino"].update(M.dino_score_per_id(generated_i, {i: heldout_i if heldout_i is not None else train_i[i]}))
        per_id["grecall"].update(M.grecall_per_id(generated_i, train_i, threshold))
    summary = {}
    for name, values in per_id.items():
        summary[f"{name}_all"] = M.mean_over(values, train)
        summary[f"{name}_few"] = M.mean_over(values, few)
    return {"summary": summary, "per_id": {k: {str(i): v for i, v in d.items()} for k, d in per_id.items()},
            "dino_reference": {"heldout": sorted(i for i in train if i in heldout),
                               "training": sorted(i for i in train if i not in heldout)},
            # real images per identity: gRecall's resolution is 1 / training; FID's real set is both
            "real_images": {"training": {str(i): _rows(train, i) for i in train},
                            "heldout": {str(i): _rows(heldout, i) for i in train if i in heldout}}}


def _rows(per_id: Mapping[int, np.ndarray], identity: int) -> int:
    """How many embeddings ``identity`` has (IdentityEmbeddings: from its ranges, nothing read)."""
    if isinstance(per_id, IdentityEmbeddings):
        start, stop = per_id.ranges[identity]
        return stop - start
    return len(per_id[identity])


def validity(cfg: Config, info: dict) -> tuple[bool, Optional[str]]:
    """Metrics are only as good as the encoder: a recogniser that cannot tell the identities apart
    on held-back images makes any gRecall meaningless."""
    accuracy = info.get("heldback_accuracy")
    if info.get("encoder") != "recognizer":
        return True, None
    if accuracy is None:
        return False, "the recogniser's accuracy could not be measured (no held-back images)"
    if accuracy < cfg.eval.min_encoder_accuracy:
        return False, (f"the recogniser identifies only {accuracy:.2f} of held-back images correctly "
                       f"(< eval.min_encoder_accuracy={cfg.eval.min_encoder_accuracy})")
    return True, None


# Per-identity FID from fewer generated images than this is noisy: eval says so in the log, and every
# report's resolution lines in bold.
FID_MIN_IMAGES = 16


def evaluate_run(cfg: Config, progress: bool = True, encoder=None, real=None, ds=None) -> dict:
    """Sample (cached) and score one trained run; writes ``<method>/metrics.json``. ``encoder`` /
    ``real`` / ``ds`` let a caller that scores many runs compute them once. With
    ``sample.guidance_scales``, the same weights are also sampled (each scale in its own folder,
    cached the same way) and scored at every one of them and at sample.guidance_scale:
    ``by_guidance`` = {scale: {summary, per_id}}; ``summary`` stays at sample.guidance_scale."""
    import logging

    from pogdiff.data.dataset import resolve_dataset
    from pogdiff.eval.recognizer import eval_encoder
    from pogdiff.eval.sampling import evaluated_identities, guidance_key, guidance_scales, sample_run

    log = logging.getLogger("pogdiff.eval")
    ds = ds or resolve_dataset(cfg, progress)
    encoder = encoder or eval_encoder(cfg, ds, progress)
    real = real or real_embeddings(cfg, ds, encoder)
    if cfg.sample.images_per_id < FID_MIN_IMAGES:
        log.info("FID per identity of %s is computed from %d generated images per identity (sample.images_per_id), "
                    "fewer than %d: a noisy estimate", RunFiles(cfg).method.name, cfg.sample.images_per_id,
                    FID_MIN_IMAGES)
    few = few_ids(cfg, ds.index)
    evaluated = restrict(real, evaluated_identities(cfg, ds.index))

    def score(guidance: Optional[float]) -> dict:
        generated = generated_embeddings(cfg, ds, sample_run(cfg, progress, guidance), encoder)
        return compute_metrics(generated, evaluated, few, cfg.eval.grecall_threshold, cfg.eval.fid_eps)

    result = score(None)
    scales = guidance_scales(cfg)
    if scales:
        main = float(cfg.sample.guidance_scale)
        result["by_guidance"] = {guidance_key(g): {k: (result if g == main else score(g))[k] for k in ("summary", "per_id")}
                                 for g in scales}
    info = encoder[1]
    valid, why = validity(cfg, info)
    result.update(method=RunFiles(cfg).method.name, seed=cfg.train.seed, encoder=info, valid=valid,
                  invalid_reason=why, dataset=str(ds.root), images_per_id=cfg.sample.images_per_id, few_ids=few,
                  guidance_scale=float(cfg.sample.guidance_scale))
    if not valid:
        log.warning("metrics of %s are marked invalid: %s", RunFiles(cfg).method, why)
    write_json(RunFiles(cfg).metrics, result)
    return result


def resolution(metrics: dict) -> list[str]:
    """What the Few metrics can resolve, as markdown bullets, from one run's metrics.json: gRecall
    per identity moves in steps of 1 / (the identity's training images), its mean over the n Few
    identities in steps of 1 / (that * n); DINO-style and FID are continuous; how many images each
    identity's FID compares."""
    few = metrics.get("few_ids") or []
    per_id = metrics.get("images_per_id")
    real = metrics.get("real_images")
    if real is None and metrics.get("dataset"):  # metrics written before real_images: the dataset's index
        try:
            from pogdiff.data.dataset import Dataset

            ds = Dataset.at(metrics["dataset"])
            real = {"training": {str(i): c for i, c in ds.index.identity_counts().items()},
                    "heldout": {str(i): c for i, c in ds.heldout.identity_counts().items()} if ds.heldout else {}}
        except Exception:  # noqa: BLE001 - the dataset is not where it was: say what is not known
            real = None

    def spread(values: list[int]) -> str:
        return str(values[0]) if len(values) == 1 else f"{values[0]} to {values[-1]}"

    train = sorted({real["training"][str(i)] for i in few if str(i) in real["training"]}) if real else []
    held = sorted({real["heldout"].get(str(i), 0) for i in few}) if real else []
    if not few:
        lines = ["- gRecall Few: no Few identities scored."]
    elif train:
        step = math.lcm(*train)
        each = f"1/{train[0]}" if len(train) == 1 else "1/n"
        who = "the 1 Few identity has" if len(few) == 1 else f"the {len(few)} Few identities have"
        lines = [f"- gRecall Few: steps of {each} per identity ({who} {'n = ' if len(train) > 1 else ''}"
                 f"{spread(train)} training images each), 1/({step}·{len(few)}) = 1/{step * len(few)} for the mean "
                 "over them."]
    else:
        lines = ["- gRecall Few: steps of 1/(the identity's training images) per identity (counts not recorded)."]
    lines.append("- DINO-style and FID: continuous.")
    if per_id is not None:
        real_txt = f" ({spread(train)} training + {spread(held)} held-out)" if train else ""
        low = f" (**fewer than {FID_MIN_IMAGES}: a noisy estimate**)" if per_id < FID_MIN_IMAGES else ""
        lines.append(f"- FID per identity: {per_id} generated images of the identity{low} against its real "
                     f"images{real_txt}; DINO-style and gRecall from the same {per_id} images per identity.")
    return lines


def metrics_path(cfg: Config) -> Path:
    return RunFiles(cfg).metrics


def evaluate_reference(cfg: Config, ds, encoder, real: Optional[dict] = None) -> dict:
    """The metrics of fresh real images, and of the same images through the VAE, in place of
    generated ones (synthetic datasets only): an upper reference and the ceiling of any generator
    decoding with this VAE."""
    encode, info = encoder
    if real is None or "reference" not in real:
        real = real_embeddings(cfg, ds, encoder, cfg.sample.images_per_id)
    from pogdiff.eval.sampling import evaluated_identities

    real = restrict(real, evaluated_identities(cfg, ds.index))
    result = {}
    for name in ("reference", "reference_vae"):
        if name in real:
            result[name] = compute_metrics(real[name], real, few_ids(cfg, ds.index), cfg.eval.grecall_threshold,
                                           cfg.eval.fid_eps)
            result[name].update(encoder=info, images_per_id=cfg.sample.images_per_id)
    run_dir = RunFiles(cfg).root
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "reference_metrics.json", result)
    return result
