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


def test_samples_file_round_trip(tmp_path, tiny_pipe):
    from PIL import Image

    from pogdiff.eval.sampling import generate, read_samples, save_samples

    images = generate(tiny_pipe, {2: "An image of lukas brandt.", 0: "An image of mira okafor."}, n=2, steps=1,
                      guidance_scale=5.0, seed=3, batch_size=2)
    save_samples(tmp_path / "s.safetensors", images, {"settings": "{}"})
    back, meta = read_samples(tmp_path / "s.safetensors")
    assert meta == {"settings": "{}"} and sorted(back) == [0, 2]
    for i in images:  # pixel for pixel, as PIL sees them (a layout mix-up scrambles channels)
        assert np.array_equal(back[i], images[i])
        assert np.array_equal(np.asarray(Image.fromarray(back[i][1])), np.asarray(Image.fromarray(images[i][1])))
    strided = {7: np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8).transpose(0, 2, 3, 1)}
    save_samples(tmp_path / "t.safetensors", strided, {})
    assert np.array_equal(read_samples(tmp_path / "t.safetensors")[0][7], strided[7])


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
    md = write_report(cfg, ["vanilla", "cbdm", "pogdiff"], [0, 1], tmp_path / "report").read_text()
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "report" / "table1_fid.csv"))}
    assert float(rows["vanilla"]["fid_all_mean"]) == pytest.approx(11.0)
    assert float(rows["vanilla"]["fid_all_std"]) == pytest.approx(np.std([10.0, 12.0], ddof=1))
    assert float(rows["pogdiff"]["fid_few_mean"]) == pytest.approx(7.5) and rows["cbdm"]["seeds"] == "0"
    assert "| PoGDiff (ours) | **7.500 ± 0.707** |" in md
    assert "cbdm seed 0, cbdm seed 1" in md  # missing runs are listed, not invented
    # paired on the same seeds and identities, signed so that > 0 is PoGDiff better (FID: lower)
    assert "| All | FID ↓ | Vanilla | +3.000, +4.000 | 2/2 | +3.500 [+3.500, +3.500] | 2 / 0 of 2 | wins |" in md
    assert "CBDM" not in md.split("**Paired comparison")[1].split("Per-seed values")[0]  # no CBDM runs: no pairs
    assert "- FID ↓ All: PoGDiff 7.500 ± 0.707 wins against Vanilla (11.000 ± 1.414; 2/2 seeds)." in md
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
