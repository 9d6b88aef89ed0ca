"""Evaluation: gRecall (App. F's worked examples), FID and the DINO-style score on hand-made
embeddings with known answers, and deterministic DDIM sampling on the tiny model."""
import numpy as np
import pytest
import torch

from pogdiff.eval import compute_metrics
from pogdiff.eval.metrics import dino_score_per_id, fid, frechet_distance, grecall, grecall_per_id, ledoit_wolf

D = 64
E = np.eye(D)


def _near(k: int, cos: float, spare: int = D - 1) -> np.ndarray:
    """A unit vector with cosine ``cos`` to basis vector k (the rest along a spare axis)."""
    return cos * E[k] + np.sqrt(1 - cos ** 2) * E[spare]


# App. F, AgeDB-IT2I-small: one majority ID (30 training images) and one minority ID (2).
# Training image j of the majority is E[j], of the minority E[30 + j]: all mutually orthogonal.
TRAIN = {0: E[:30], 1: E[30:32]}


def test_grecall_vanilla_example():  # 1/30 and 0/2 covered -> 0.0167
    gen = {0: np.stack([E[0], E[0], _near(0, 0.9), _near(5, 0.69)]),  # 0.69 is below the 0.7 threshold
           1: np.stack([_near(30, 0.5), E[40]])}
    assert grecall(gen, TRAIN, 0.7) == pytest.approx(0.5 * 1 / 30 + 0.5 * 0 / 2)
    assert round(grecall(gen, TRAIN, 0.7), 4) == 0.0167


def test_grecall_cbdm_example():  # 16/30 and 0/2 covered; the minority ID missing from `generated`
    gen = {0: np.stack([_near(j, 0.71) for j in range(16)] + [E[0]] * 3)}
    assert grecall(gen, TRAIN, 0.7) == pytest.approx(0.5 * 16 / 30)
    assert round(grecall(gen, TRAIN, 0.7), 4) == 0.2667


def test_grecall_pogdiff_example():  # 18/30 and 2/2 covered -> 0.8
    gen = {0: torch.tensor(np.stack([E[j] for j in range(18)] + [E[3]])), 1: torch.tensor(np.stack([E[30], E[31]]))}
    assert grecall(gen, TRAIN, 0.7) == pytest.approx(0.8)
    assert grecall_per_id(gen, TRAIN, 0.7) == {0: pytest.approx(18 / 30), 1: 1.0}


def test_grecall_is_per_identity_and_scale_free():
    # generated images of ID 1 that copy ID 0's training images cover nothing of ID 1
    gen = {0: 3.0 * E[:1], 1: E[:30]}
    assert grecall_per_id(gen, TRAIN, 0.7) == {0: pytest.approx(1 / 30), 1: 0.0}
    # a stricter threshold (the review version's 0.9) un-covers the 0.85 match
    gen = {0: np.stack([_near(0, 0.85)]), 1: E[30:32]}
    assert grecall(gen, TRAIN, 0.7) == pytest.approx(0.5 / 30 + 0.5)
    assert grecall(gen, TRAIN, 0.9) == pytest.approx(0.5)


def test_dino_score_is_mean_cosine_to_heldout():
    gen = {0: np.stack([E[0], E[0]]), 1: np.stack([E[1]])}
    heldout = {0: np.stack([_near(0, 0.5), 2 * E[0]]), 1: np.stack([_near(1, -0.2), _near(1, 0.6)])}
    per_id = dino_score_per_id(gen, heldout)
    assert per_id == {0: pytest.approx(0.75), 1: pytest.approx(0.2)}


def test_fid_identical_is_zero_and_shift_is_squared_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 16)) @ rng.normal(size=(16, 16))  # n close to d: needs the regulariser
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = rng.normal(size=16)
    assert fid(a + shift, a) == pytest.approx(float(shift @ shift), rel=1e-6)
    # same Gaussian, independent draws: small next to a shift of the mean
    b, c = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    assert fid(b, c) < 0.2 < 4.0 * 0.9 < fid(b + 2.0 * np.eye(8)[0], c)


def test_frechet_distance_closed_forms():
    # diagonal covariances: sum (sqrt(s1) - sqrt(s2))^2 + ||mu1 - mu2||^2
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, 2.0])
    expected = 5.0 + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected)
    # rotation-invariant: rotate both Gaussians by the same orthogonal matrix
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    assert frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T) == pytest.approx(expected)


def test_ledoit_wolf_regularises_few_samples():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 32))  # n < d: the sample covariance is singular
    xc = x - x.mean(0)
    s = xc.T @ xc / len(x)
    lw = ledoit_wolf(x)
    assert np.linalg.eigvalsh(s).min() < 1e-10 < np.linalg.eigvalsh(lw).min()
    assert np.trace(lw) == pytest.approx(np.trace(s))  # shrinks towards (tr S / d) I
    many = rng.normal(size=(20000, 4)) * np.array([1.0, 2.0, 3.0, 4.0])
    assert np.allclose(ledoit_wolf(many), np.cov(many.T, bias=True), atol=0.05)  # little shrinkage with n >> d


def test_compute_metrics_splits_all_and_few():
    real = {"training": TRAIN, "heldout": {0: np.stack([E[0], E[1], E[2]]), 1: np.stack([E[30], E[31]])}}
    gen = {0: np.stack([E[0], E[1], E[2]]), 1: np.stack([E[40], E[41], E[42]])}
    out = compute_metrics(gen, real, few=[1], threshold=0.7, fid_eps=1e-6)["summary"]
    assert out["grecall_few"] == 0.0 and out["grecall_all"] == pytest.approx(0.5 * 3 / 30)
    assert out["dino_few"] == 0.0 and out["dino_all"] == pytest.approx(0.5 * (1 / 3))
    assert out["fid_few"] > out["fid_all"] > 0


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from pogdiff.models.export import make_pipeline
    from pogdiff.models.components import build_tiny
    from pogdiff.models.components import save_components

    model = tmp_path_factory.mktemp("model")
    components = build_tiny(0)
    save_components(components, model)
    return make_pipeline(model, components.unet)


def test_sampling_is_deterministic(tiny_pipe):
    from pogdiff.eval.sampling import generate

    prompts = {0: "An image of lukas brandt.", 3: "An image of mira okafor."}
    kw = dict(n=2, steps=2, guidance_scale=5.0, batch_size=2)
    a = generate(tiny_pipe, prompts, seed=1, **kw)
    b = generate(tiny_pipe, prompts, seed=1, **kw)
    c = generate(tiny_pipe, prompts, seed=2, **kw)
    assert a[0].shape == (2, 32, 32, 3) and a[0].dtype == np.uint8
    assert all(np.array_equal(a[i], b[i]) for i in prompts)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[3], c[3])
    assert not np.array_equal(a[0][0], a[0][1])  # per-image seeds: images of one identity differ
    # an identity's images do not depend on which other identities are sampled with it (Ray split)
    alone = generate(tiny_pipe, {3: prompts[3]}, seed=1, **kw)
    assert np.array_equal(alone[3], a[3])
    # nor on a batch that mixes identities (one pipeline call for 3 images), up to float rounding
    mixed = generate(tiny_pipe, prompts, seed=1, **{**kw, "batch_size": 3})
    assert all(np.abs(mixed[i].astype(int) - a[i]).max() <= 1 for i in prompts)


def test_streamed_metrics_are_the_in_memory_metrics_exactly(tmp_path):
    """compute_metrics one identity at a time on memory-mapped embeddings (written in batches that
    interleave identities) = pogdiff.eval.metrics on the whole in-memory embeddings."""
    from pogdiff.eval import IdentityEmbeddings, write_grouped
    from pogdiff.eval import metrics as M

    rng = np.random.default_rng(0)
    sizes = {0: 30, 1: 12, 2: 2, 3: 3, 4: 2}
    train = {i: rng.normal(size=(n, 8)).astype(np.float32) for i, n in sizes.items()}
    heldout = {i: rng.normal(size=(3, 8)).astype(np.float32) for i in (0, 1)}
    gen = {i: (train[i][:1] + rng.normal(scale=0.6, size=(4, 8))).astype(np.float32) for i in sizes}

    def stored(name: str, per_id: dict) -> IdentityEmbeddings:
        queues, rows = {i: list(block) for i, block in per_id.items()}, []
        while any(queues.values()):  # identities interleaved at random, each one's rows in order
            i = int(rng.choice([i for i, q in queues.items() if q]))
            rows.append((i, queues[i].pop(0)))
        batches = [([i for i, _ in rows[k:k + 5]], np.stack([e for _, e in rows[k:k + 5]])) for k in range(0, len(rows), 5)]
        out = write_grouped(tmp_path / f"{name}.npy", {i: len(b) for i, b in per_id.items()}, iter(batches))
        assert IdentityEmbeddings.load(tmp_path / f"{name}.npy").ranges == out.ranges
        assert all(np.array_equal(out[i], per_id[i]) for i in per_id)
        return out

    real = {"training": stored("training", train), "heldout": stored("heldout", heldout)}
    got = compute_metrics(stored("generated", gen), real, few=[2, 3, 4], threshold=0.5, fid_eps=1e-6)
    fid_real = {i: np.concatenate([train[i], heldout[i]]) if i in heldout else train[i] for i in train}
    want = {"fid": M.fid_per_id(gen, fid_real, 1e-6),
            "dino": M.dino_score_per_id(gen, {i: heldout.get(i, train[i]) for i in train}),
            "grecall": M.grecall_per_id(gen, train, 0.5)}
    assert got["per_id"] == {k: {str(i): v for i, v in d.items()} for k, d in want.items()}
    assert got["summary"]["grecall_all"] == M.grecall(gen, train, 0.5)
    assert got["summary"]["fid_few"] == float(np.mean([want["fid"][i] for i in (2, 3, 4)]))
    assert 0 < got["summary"]["grecall_all"] < 1 and got["dino_reference"]["heldout"] == [0, 1]


def _eval_scale():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("eval_scale", Path(__file__).resolve().parents[1] / "benchmarks" / "eval_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A prepared dataset with PNGs in its shards (3 identities of 12 images and 5 of 2; 3 held out
    per majority identity; 10 rows a shard) and a tiny random-init pipeline as the run's export."""
    from pogdiff.runs import load_run_config

    bench = _eval_scale()
    work = tmp_path_factory.mktemp("run")
    bench.write_prepared(work / "dataset", [12] * 3 + [2] * 5, per_shard=10)
    bench.write_prepared(work / "dataset" / "heldout", [3] * 3, first_image=12)
    cfg = load_run_config(None, [f"output_dir={work}", f"data.source={work / 'dataset'}", "sample.steps=1",
                                 "sample.images_per_id=3", "sample.batch_size=2", "eval.recognizer_steps=40",
                                 "data.minority_images=2", "train.device=cpu"])
    bench.export_tiny_pipeline(cfg)
    return cfg


def test_samples_stream_into_shards_and_a_rerun_continues(run):
    import dataclasses
    import json

    from pogdiff.eval.sampling import generate, load_pipeline, load_samples, sample_run

    samples = sample_run(run, progress=False)
    folder = samples.folder
    # 8 identities x 3 images in shards of 2 x BATCHES_PER_SHARD = 16: identity 5 straddles the two
    assert (len(samples), samples.num_images, samples.plan["shards"]) == (8, 24, 2)
    assert [(i, j) for i, j, _ in samples.records()] == [(i, j) for i in range(8) for j in range(3)]
    pipe = load_pipeline(folder.parent / "pipeline", torch.device("cpu"))
    want = generate(pipe, samples.prompts, 3, steps=1, guidance_scale=run.sample.guidance_scale, seed=run.sample.seed,
                    batch_size=2)
    assert all(samples[i].shape == (3, 32, 32, 3) and np.array_equal(samples[i], want[i]) for i in range(8))
    assert sorted(p.name for p in folder.glob("id*.png")) == [f"id{i:06d}.png" for i in range(8)]

    # interrupted after the first shard: the rerun makes the second only
    plan = json.loads((folder / "samples.json").read_text())
    (folder / "samples.json").write_text(json.dumps({**plan, "complete": False}))
    (folder / "shard-000001.json").unlink()
    first = (folder / "shard-000000-00.tar").stat().st_mtime_ns
    assert load_samples(run) is None
    again = sample_run(run, progress=False)
    assert (folder / "shard-000000-00.tar").stat().st_mtime_ns == first and (folder / "shard-000001.json").is_file()
    assert all(np.array_equal(again[i], want[i]) for i in range(8))
    assert load_samples(run) is not None
    assert load_samples(dataclasses.replace(run, sample=dataclasses.replace(run.sample, seed=5))) is None  # other settings


def test_eval_streams_features_and_scores_like_the_in_memory_reference(run):
    """evaluate_run (shards -> memory-mapped embeddings -> per-identity metrics) = metrics.py on
    embeddings of every image decoded and encoded in memory; the recogniser trained from the shard
    stream tells the identities apart."""
    import io

    from PIL import Image

    from pogdiff.data.dataset import resolve_dataset
    from pogdiff.eval import evaluate_run
    from pogdiff.eval import metrics as M
    from pogdiff.eval.recognizer import eval_encoder, to_pil
    from pogdiff.eval.sampling import load_samples

    result = evaluate_run(run, progress=False)
    ds = resolve_dataset(run, progress=False)
    encode, info = eval_encoder(run, ds, progress=False)
    assert info["source"] == "dataset" and info["heldback_images"] == 9 and info["heldback_accuracy"] >= 0.8
    assert result["valid"] and result["few_ids"] == [3, 4, 5, 6, 7]

    def in_memory(index) -> dict[int, np.ndarray]:
        rows = [(identity, Image.open(io.BytesIO(png)).convert("RGB")) for _, identity, png in index.images()]
        emb, ids = encode([im for _, im in rows]).numpy(), np.array([i for i, _ in rows])
        return {int(i): emb[ids == i] for i in np.unique(ids)}

    train, heldout = in_memory(ds.index), in_memory(ds.heldout)
    samples = load_samples(run)
    emb = encode(to_pil(np.concatenate([samples[i] for i in samples]))).numpy()
    gen = {i: emb[3 * k:3 * k + 3] for k, i in enumerate(samples)}
    fid_real = {i: np.concatenate([train[i], heldout[i]]) if i in heldout else train[i] for i in train}
    want = {"fid": M.fid_per_id(gen, fid_real, run.eval.fid_eps),
            "dino": M.dino_score_per_id(gen, {i: heldout.get(i, train[i]) for i in train}),
            "grecall": M.grecall_per_id(gen, train, run.eval.grecall_threshold)}
    assert result["per_id"] == {k: {str(i): v for i, v in d.items()} for k, d in want.items()}
    assert result["summary"]["dino_all"] == M.mean_over(want["dino"], train)


def test_recognizer_stream_holds_back_the_last_image_of_each_identity(tmp_path):
    """Own data without a held-out split: the last row of every identity with >= 3 images is held
    back; the training stream draws every other labelled image (and only those) from the shards."""
    import io

    from PIL import Image

    from pogdiff.data.dataset import Dataset
    from pogdiff.data.encode import images_to_tensor
    from pogdiff.eval.recognizer import BATCH, _training_stream, held_back_rows

    bench = _eval_scale()
    bench.write_prepared(tmp_path / "d", [5, 5, 2, 4], per_shard=4)
    ds = Dataset(tmp_path / "d")
    held = held_back_rows(ds.index)
    assert held == {4, 9, 15}
    pixels = {row: images_to_tensor([Image.open(io.BytesIO(png)).convert("RGB")])[0]
              for row, _, png in ds.index.images()}
    identity_of = dict(enumerate(np.asarray(ds.index.identities).tolist()))
    seen = set()
    for _, (x, y) in zip(range(3), _training_stream(ds, held)):
        assert x.shape == (BATCH, 3, 32, 32)
        for image, label in zip(x, y.tolist()):
            [row] = [r for r, p in pixels.items() if torch.equal(p, image)]
            assert row not in held and identity_of[row] == label
            seen.add(row)
    assert seen == set(pixels) - held  # 3 x 64 draws of 13 images: every one


def test_ray_actors_sample_and_embed_what_this_process_does(run, tmp_path):
    """sample.ray_workers > 0: the same shards from an actor pool, and the same features, in order
    (one actor: a 2-core test machine; the shard plan does not depend on the number)."""
    import dataclasses

    import ray

    from pogdiff.data.dataset import resolve_dataset
    from pogdiff.dist.cluster import connect
    from pogdiff.eval import feature_extractor
    from pogdiff.eval.recognizer import eval_encoder
    from pogdiff.eval.sampling import sample_run

    here = sample_run(run, progress=False)
    on_ray = dataclasses.replace(run, output_dir=str(tmp_path), sample=dataclasses.replace(run.sample, ray_workers=1))
    _eval_scale().export_tiny_pipeline(on_ray)
    started = connect(num_cpus=2)
    try:
        samples = sample_run(on_ray, progress=False)
        assert samples.plan["shards"] == 2 and all(np.array_equal(samples[i], here[i]) for i in here)
        ds = resolve_dataset(run, progress=False)
        encoder = eval_encoder(run, ds, progress=False)
        items = [(i, png) for i, _, png in samples.records()]
        with feature_extractor(dataclasses.replace(on_ray, eval=dataclasses.replace(run.eval, batch_size=5)), ds,
                               encoder) as embed:
            batches = list(embed(items))
        with feature_extractor(dataclasses.replace(run, eval=dataclasses.replace(run.eval, batch_size=5)), ds,
                               encoder) as embed:
            reference = list(embed(items))
        assert [ids for ids, _ in batches] == [ids for ids, _ in reference] == [[i for i, _ in items[k:k + 5]]
                                                                                 for k in range(0, 24, 5)]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(batches, reference))
    finally:
        if started:
            ray.shutdown()


@pytest.mark.slow
def test_ray_actors_killed_mid_stage_change_nothing(run, tmp_path):
    """SIGKILL, from outside, to the sampling actor once its first shard is written and to the
    feature actor as soon as it starts: each is restarted, its call retried, and the samples and
    features equal this process's."""
    import dataclasses

    import ray
    from faults import always, killing

    from pogdiff.data.dataset import resolve_dataset
    from pogdiff.dist.cluster import connect
    from pogdiff.eval import feature_extractor
    from pogdiff.eval.recognizer import eval_encoder
    from pogdiff.eval.sampling import sample_run, samples_dir

    here = sample_run(run, progress=False)
    on_ray = dataclasses.replace(run, output_dir=str(tmp_path), sample=dataclasses.replace(run.sample, ray_workers=1),
                                 eval=dataclasses.replace(run.eval, batch_size=5))
    _eval_scale().export_tiny_pipeline(on_ray)
    folder = samples_dir(on_ray)
    started = connect(num_cpus=2)
    try:
        with killing({"ray::SampleWorker": lambda: any(folder.glob("*.tar")), "ray::FeatureWorker": always}) as killed:
            samples = sample_run(on_ray, progress=False)
            assert all(np.array_equal(samples[i], here[i]) for i in here)
            ds = resolve_dataset(run, progress=False)
            encoder = eval_encoder(run, ds, progress=False)
            items = [(i, png) for i, _, png in samples.records()]
            with feature_extractor(on_ray, ds, encoder) as embed:
                batches = list(embed(items))
        with feature_extractor(dataclasses.replace(run, eval=on_ray.eval), ds, encoder) as embed:
            reference = list(embed(items))
        assert set(killed) == {"ray::SampleWorker", "ray::FeatureWorker"}, f"not every actor was killed: {killed}"
        assert [ids for ids, _ in batches] == [ids for ids, _ in reference]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(batches, reference))
    finally:
        if started:
            ray.shutdown()


def _looks(caption: str) -> str:
    """The identity's fixed attributes as its caption states them (name, expression, background, light cut).
    A bald identity's beard colour is drawn but not captioned: those captions are left out."""
    text = ", ".join(caption.split(", a person with ")[1].split(", ")[:-3])
    return "" if "no hair" in text and "beard" in text else text


def test_disjoint_identities_share_nothing_with_the_fine_tuning_set():
    from pogdiff.data.synthetic import caption_for, make_identity
    from pogdiff.models.tiny_vae import disjoint_records

    def described(ident) -> str:  # a caption that states the whole look
        return _looks(caption_for(ident, "neutral", "white", "even"))

    def look_of(record) -> str:  # the record's identity, rebuilt from its key (index) and the salted seed
        return described(make_identity(int(record.key[len("disjoint"):].split("_")[0]), 0 + 7919 * 2))

    fine_tuning = [make_identity(i, 0) for i in range(300)]
    taken = {described(i) for i in fine_tuning}
    records = list(disjoint_records(60, 2, 0, 32, salt=2, exclude=fine_tuning))
    assert [r.identity for r in records] == [i // 2 for i in range(120)]
    assert all(r.name in r.caption for r in records)
    assert not {look_of(r) for r in records} & taken - {""}
    unfiltered = list(disjoint_records(60, 1, 0, 32, salt=2))
    assert {look_of(r) for r in unfiltered} & taken - {""}  # 300 identities do collide by chance: the filter matters


def test_tiny_vae_pretraining_learns_and_is_cached(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from pogdiff.models.components import tiny_vae_config
    from pogdiff.models.tiny_vae import pretrain_tiny_vae, train_autoencoder

    def fresh():
        torch.manual_seed(0)
        return AutoencoderKL(**tiny_vae_config())

    losses = train_autoencoder(fresh(), 10, 0, 32, batch_size=4, lr=2e-3, kl_weight=1e-6, n_images=16, progress=False)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    monkeypatch.setenv("POGDIFF_CACHE", str(tmp_path))
    a, b, untouched = fresh(), fresh(), fresh()
    pretrain_tiny_vae(a, 1, 0, 32, progress=False)
    assert len(list(tmp_path.glob("tiny_vae-*.safetensors"))) == 1
    pretrain_tiny_vae(b, 1, 0, 32, progress=False)  # from the cache
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.decoder.conv_out.weight, untouched.decoder.conv_out.weight)


def test_report_tables_are_mean_and_std_over_seeds(tmp_path):
    import csv
    import json

    from pogdiff.config import variant_config
    from pogdiff.eval import metrics_path
    from pogdiff.experiment.report import write_report
    from pogdiff.runs import load_run_config

    cfg = load_run_config("configs/experiment.yaml", [f"output_dir={tmp_path}", "data.profile=agedb-s",
                                                      "model.tiny_vae_steps=0", "prepare.backend=serial"])
    fid = {("vanilla", 0): 10.0, ("vanilla", 1): 12.0, ("pogdiff", 0): 7.0, ("pogdiff", 1): 8.0}
    for (variant, seed), value in fid.items():
        summary = {f"{m}_{s}": value if m == "fid" else 0.5 for m in ("fid", "dino", "grecall") for s in ("all", "few")}
        per_id = {m: {"0": summary[f"{m}_all"], "1": summary[f"{m}_few"]} for m in ("fid", "dino", "grecall")}
        path = metrics_path(variant_config(cfg, variant, seed))
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"summary": summary, "per_id": per_id, "encoder": {"encoder": "x"}}))
    from pogdiff.runs import RunFiles

    swap = {"vanilla": [0.2, 0.4, 0.4], "pogdiff": [0.1, 0.1, 0.2]}  # the last half: 0.4 and 0.15 on average
    for variant, values in swap.items():
        for seed in (0, 1):
            history = [{"step": i, "loss": 1.0, "text/swap/head": v, "text/swap/tail": v} for i, v in enumerate(values)]
            RunFiles(variant_config(cfg, variant, seed)).history.write_text(json.dumps({"history": history}))
    md = write_report(cfg, ["vanilla", "cbdm", "pogdiff"], [0, 1], tmp_path / "report").read_text()
    assert "**Conditioning diagnostics**" in md
    assert "- Tail identities: PoGDiff's sensitivity to another identity's caption is 0.38x Vanilla's, lower" in md
    diag = {r["variant"]: r for r in csv.DictReader(open(tmp_path / "report" / "diagnostics.csv"))}
    assert float(diag["vanilla"]["text/swap/tail"]) == pytest.approx(0.4)
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "report" / "table1_fid.csv"))}
    assert float(rows["vanilla"]["fid_all_mean"]) == pytest.approx(11.0)
    assert float(rows["vanilla"]["fid_all_std"]) == pytest.approx(np.std([10.0, 12.0], ddof=1))
    assert float(rows["pogdiff"]["fid_few_mean"]) == pytest.approx(7.5) and rows["cbdm"]["seeds"] == "0"
    assert "| PoGDiff (ours) | **7.500 ± 0.707** |" in md
    assert "cbdm seed 0, cbdm seed 1" in md  # missing runs are listed, not invented
    # paired on the same seeds and identities, signed so that > 0 is PoGDiff better (FID: lower)
    assert "| All | FID ↓ | Vanilla | +3.000, +4.000 | 2/0/0 | +3.500 [+3.500, +3.500] | 2 / 0 of 2 | wins |" in md
    assert "CBDM" not in md.split("**Paired comparison")[1].split("Per-seed values")[0]  # no CBDM runs: no pairs
    assert "- FID ↓ All: PoGDiff 7.500 ± 0.707 wins against Vanilla (11.000 ± 1.414; seeds W/T/L 2/0/0)." in md
    assert "| All | DINO-style ↑ | Vanilla | +0.000, +0.000 | 0/2/0 |" in md  # equal is a tie, not a win
    # per Few identity (identity 1) and seed, raw (FID: negative favours PoGDiff), identity bootstrap
    assert "| PoGDiff (ours) | Vanilla | FID ↓ Few | 1 | 2 | -3.5000 | [-3.5000, -3.5000] | 2/0/0 |" in md
    assert "| PoGDiff (ours) | Vanilla | gRecall ↑ Few | 1 | 2 | +0.0000 | [+0.0000, +0.0000] | 0/2/0 |" in md
    few = {(r["method"], r["baseline"], r["metric"]): r for r in csv.DictReader(open(tmp_path / "report" / "paired_few.csv"))}
    assert set(few) == {("pogdiff", "vanilla", f"{m}_few") for m in ("fid", "dino", "grecall")}  # no CBDM runs
    assert (few[("pogdiff", "vanilla", "fid_few")]["wins"], few[("pogdiff", "vanilla", "fid_few")]["n_pairs"]) == ("2", "2")
    assert "- gRecall Few: steps of 1/" in md and "- DINO-style and FID: continuous." in md
    assert "**Few scores per guidance scale**" not in md  # no run scored at other scales
    assert "- FID ↓ Few: PoGDiff 7.500 ± 0.707 ties (no spread to judge by) against Vanilla" in md  # one identity
    paired = {(r["split"], r["metric"], r["baseline"]): r for r in csv.DictReader(open(tmp_path / "report" / "paired.csv"))}
    assert paired[("all", "dino", "vanilla")]["outcome"] == "ties" and float(paired[("all", "dino", "vanilla")]["id_mean"]) == 0


def test_a_weak_encoder_marks_the_metrics_invalid(tmp_path):
    """gRecall from a recogniser that cannot tell identities apart is meaningless: eval says so."""
    from pogdiff.config import load_config
    from pogdiff.eval import validity

    cfg = load_config(None, ["eval.min_encoder_accuracy=0.8"])
    weak = validity(cfg, {"encoder": "recognizer", "heldback_accuracy": 0.10})
    assert weak[0] is False and "0.10" in weak[1] and "eval.min_encoder_accuracy=0.8" in weak[1]
    assert validity(cfg, {"encoder": "recognizer", "heldback_accuracy": 0.93}) == (True, None)
    assert validity(cfg, {"encoder": "recognizer", "heldback_accuracy": None})[0] is False
    assert validity(cfg, {"encoder": "/models/dinov2"}) == (True, None)


def test_sample_few_ids_scores_every_majority_identity_and_the_same_minority_subset():
    from pogdiff.config import load_config
    from pogdiff.eval import few_ids
    from pogdiff.eval.sampling import evaluated_identities

    class Index:  # 5 majority identities (30 images), 40 minority ones (2), an unlabelled row (-1)
        def identity_counts(self):
            return {-1: 3, **{i: 30 for i in range(5)}, **{i: 2 for i in range(5, 45)}}

    every = load_config(None, ["sample.few_ids=0"])
    assert evaluated_identities(every, Index()) == list(range(45))
    cfg = load_config(None, ["sample.few_ids=7"])
    picked = evaluated_identities(cfg, Index())
    assert picked[:5] == list(range(5)) and len(picked) == 12 and picked == evaluated_identities(cfg, Index())
    assert few_ids(cfg, Index()) == picked[5:]
    other_seed = evaluated_identities(load_config(None, ["sample.few_ids=7", "sample.seed=9"]), Index())
    assert other_seed[5:] != picked[5:]
    assert evaluated_identities(load_config(None, ["sample.few_ids=400"]), Index()) == list(range(45))


def test_sample_guidance_scales_are_validated():
    from pogdiff.config import ConfigError, load_config

    assert load_config(None, ["sample.guidance_scales=[2, 7.5]"]).sample.guidance_scales == [2.0, 7.5]
    assert load_config(None, []).sample.guidance_scales == []
    for bad in ("[1.5, 0]", "[-1]", "[.inf]", "[.nan]"):
        with pytest.raises(ConfigError, match="sample.guidance_scales must be positive finite"):
            load_config(None, [f"sample.guidance_scales={bad}"])


def test_guidance_scales_score_the_same_weights_each_in_a_folder_of_its_own(run, caplog):
    """sample.guidance_scales: the run's weights sampled again at each scale, each into its own
    folder (cached: a rerun samples nothing); metrics.json's by_guidance per scale, the main
    summary as without them; a log line that FID comes from fewer than 16 images per identity."""
    import dataclasses
    import json
    import logging

    from pogdiff.eval import evaluate_run
    from pogdiff.eval.sampling import load_samples, read_plan, samples_dir
    from pogdiff.runs import RunFiles

    plain = evaluate_run(run, progress=False)
    assert "by_guidance" not in plain and samples_dir(run) == RunFiles(run).samples
    cfg = dataclasses.replace(run, sample=dataclasses.replace(run.sample, guidance_scales=[1.0, 3.0]))
    with caplog.at_level(logging.INFO, logger="pogdiff.eval"):
        result = evaluate_run(cfg, progress=False)
    assert "from 3 generated images per identity" in caplog.text and "fewer than 16" in caplog.text
    assert result["summary"] == plain["summary"] and result["per_id"] == plain["per_id"]  # the main path unchanged
    assert set(result["by_guidance"]) == {"1.0", "3.0", "5.0"}
    assert result["by_guidance"]["5.0"] == {"summary": plain["summary"], "per_id": plain["per_id"]}
    assert json.loads(RunFiles(cfg).metrics.read_text())["by_guidance"]["1.0"] == json.loads(json.dumps(result["by_guidance"]["1.0"]))
    folders = {g: samples_dir(cfg, g) for g in (1.0, 3.0, 5.0)}
    assert len(set(folders.values())) == 3 and folders[5.0] == RunFiles(cfg).samples
    assert {g: read_plan(f)["settings"]["guidance_scale"] for g, f in folders.items()} == {1.0: 1.0, 3.0: 3.0, 5.0: 5.0}
    low, high = load_samples(cfg, 1.0), load_samples(cfg, 3.0)
    assert not all(np.array_equal(low[i], high[i]) for i in low)  # other guidance, other images
    tars = {p: p.stat().st_mtime_ns for f in folders.values() for p in f.glob("shard-*.tar")}
    assert evaluate_run(cfg, progress=False)["by_guidance"] == json.loads(json.dumps(result["by_guidance"]))
    assert {p: p.stat().st_mtime_ns for p in tars} == tars  # cached: nothing sampled again


def test_every_experiment_variant_has_a_label_in_the_reports():
    from pogdiff.config import VARIANTS
    from pogdiff.experiment.report import LABELS

    assert set(VARIANTS) <= set(LABELS), set(VARIANTS) - set(LABELS)
