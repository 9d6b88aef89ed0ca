"""``pogdiff prepare``: shards against the encoders, parallel backends, bad input, resume, name
masking and the imbalance protocol."""
import json
from pathlib import Path
import logging
import re

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pogdiff.data import prepare as prep
from pogdiff.cli import main as cli_main
from pogdiff.config import ModelConfig, load_config
from pogdiff.data.encode import encode_batch, tiny_image_embedding
from pogdiff.models.components import load_components, tokenize
from pogdiff.data.prepare import PrepareError, mask_caption, prepare, select_identities
from pogdiff.data.shards import DatasetIndex
from pogdiff.data.synthetic import iter_records, make_identity, render

SMALL = ["data.profile=custom", "data.majority_ids=2", "data.majority_images=6", "data.minority_ids=2",
         "data.minority_images=2"]  # 16 synthetic records


def cfg_for(tmp_path, *overrides, name="ds"):
    return load_config(None, [f"output_dir={tmp_path}", f"prepare.output={tmp_path / name}", "prepare.backend=serial",
                              "prepare.samples_per_shard=5", *overrides])


def shard_samples(root):
    urls = [str(root / p["url"]) for p in json.loads((root / "dataset.json").read_text())["shards"]]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode()}


def write_images(folder, specs):
    """specs: (identity index, image index, size) -> a rendered synthetic face saved as JPEG/PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ident, j, (w, h) in specs:
        image, _ = render(make_identity(ident, 0), j, 0, size=48)
        path = folder / f"id{ident}_{j}.{'jpg' if j % 2 else 'png'}"
        image.resize((w, h)).save(path)
        paths.append(path)
    return paths


def write_manifest(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_synthetic_shards_hold_what_the_encoders_give(tmp_path):
    cfg = cfg_for(tmp_path, *SMALL)
    dataset = prepare(cfg, progress=False)
    root = tmp_path / "ds"
    assert dataset["num_samples"] == 16 and len(dataset["shards"]) == 4  # 5 + 5 + 5 + 1
    records = list(iter_records([6, 6, 2, 2], seed=0, size=32, names=cfg.data.names))
    components = load_components(ModelConfig(name=str(root / dataset["model"])), with_unet=False)
    enc = encode_batch(components, [r.image for r in records], [r.caption for r in records], torch.device("cpu"))
    got = shard_samples(root)
    assert list(got) == [r.key for r in records]
    for j, r in enumerate(records):
        s = got[r.key]
        np.testing.assert_allclose(s["latent.npy"].astype(np.float32),
                                   (enc.latents[j] * components.vae_scale).half().float().numpy(), atol=2e-3)
        assert np.array_equal(s["tokens.npy"], tokenize(components, [r.caption])[0].numpy())
        np.testing.assert_allclose(s["imgemb.npy"], tiny_image_embedding([r.image])[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(s["pooled.npy"], enc.pooled[j].numpy(), atol=1e-4)
        assert s["json"] == {"key": r.key, "ordinal": j, "identity": r.identity, "name": r.name, "caption": r.caption,
                             "time_ids": [32, 32, 0, 0, 32, 32]}  # generated at the target size: no crop
    # the calibrated tiny VAE: latents have unit std, as SD's scaling factor intends
    assert 0.5 < float(np.std([s["latent.npy"] for s in got.values()])) < 2.0
    index = DatasetIndex.load(root)
    assert index.keys == [r.key for r in records] and index.identities.tolist() == [r.identity for r in records]
    np.testing.assert_array_equal(index.tokens, np.stack([got[k]["tokens.npy"] for k in index.keys]))
    assert (root / "label_distribution.png").is_file()


def test_the_ray_data_pipeline_gives_the_same_dataset_for_any_number_of_workers(tmp_path):
    serial = prepare(cfg_for(tmp_path, *SMALL, name="serial"), progress=False)
    # the same frozen encoders, now given as a local diffusers directory (the tiny tokenizer's BPE
    # training is not deterministic, so a second tiny build would number tokens differently)
    model = f"model.name={tmp_path / 'serial' / 'model'}"
    import ray

    from pogdiff.dist.cluster import session

    with session(num_cpus=3):  # one embedded cluster for both runs
        one = prepare(cfg_for(tmp_path, *SMALL, "prepare.backend=ray", "prepare.workers=1", model, name="one"),
                      progress=False)
        two = prepare(cfg_for(tmp_path, *SMALL, "prepare.backend=ray", "prepare.workers=2", model, name="two"),
                      progress=False)
        assert ray.is_initialized()  # prepare joined the session rather than starting its own
    for name, dataset in (("one", one), ("two", two)):
        assert dataset["shards"] == serial["shards"], name  # the same parts, sizes and sha256
        for part in serial["shards"]:
            assert (tmp_path / name / part["url"]).read_bytes() == (tmp_path / "serial" / part["url"]).read_bytes()
        for column in ("index.jsonl", "tokens.npy", "pooled.npy", "image_emb.npy", "identities.npy",
                       "row_of_ordinal.npy", "heldout/index.jsonl"):
            assert (tmp_path / name / column).read_bytes() == (tmp_path / "serial" / column).read_bytes(), (name, column)
        assert dataset["summary"] == serial["summary"]


BAD_CASES = {  # reason -> manifest row (the images are written by the fixture)
    "unreadable_file": {"image": "does_not_exist.png", "caption": "c", "identity": "a"},
    "corrupt_image": {"image": "garbage.jpg", "caption": "c", "identity": "a"},
    "truncated": {"image": "truncated.jpg", "caption": "c", "identity": "a"},
    "empty_caption": {"image": "id0_0.png", "key": "empty", "caption": "  ", "identity": "a"},
    "missing_identity": {"image": "id0_0.png", "key": "noid", "caption": "c"},
    "duplicate_key": {"image": "id1_1.jpg", "key": "id0_0", "caption": "c", "identity": "b"},
    "nan_embedding": {"image": "magenta.png", "caption": "c", "identity": "a"},
    "bad_manifest_row": '{"image": "id0_0.png", "caption": ',
}
REASON = {"truncated": "corrupt_image"}


@pytest.fixture
def image_dir(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    write_images(folder, [(0, 0, (48, 40)), (0, 1, (40, 48)), (1, 0, (48, 48)), (1, 1, (64, 48))])
    (folder / "garbage.jpg").write_bytes(b"\xff\xd8 not really a jpeg" * 10)
    jpg = (folder / "id0_1.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    Image.new("RGB", (48, 48), (255, 0, 255)).save(folder / "magenta.png")

    def nan_for_magenta(name, device):  # an image encoder that fails on one image
        def encode(images):
            emb = tiny_image_embedding(images)
            magenta = torch.tensor([im.getpixel((0, 0)) == (255, 0, 255) for im in images])
            return torch.where(magenta[:, None], torch.full_like(emb, float("nan")), emb)
        return encode

    monkeypatch.setattr(prep, "load_image_encoder", nan_for_magenta)
    monkeypatch.setattr(prep, "_ENCODERS", {})
    return folder


GOOD = [{"image": "id0_0.png", "caption": "a person smiling", "identity": "a"},
        {"image": "id0_1.jpg", "caption": "a person frowning", "identity": "a"},
        {"image": "id1_0.png", "caption": "a person with a hat", "identity": "b"},
        {"image": "id1_1.jpg", "caption": "a person with glasses", "identity": "b"}]


def test_bad_records_are_skipped_logged_and_counted(tmp_path, image_dir, caplog):
    manifest = write_manifest(image_dir / "manifest.jsonl", GOOD + list(BAD_CASES.values()))
    with caplog.at_level(logging.WARNING, logger="pogdiff.prepare"):
        dataset = prepare(cfg_for(tmp_path, f"data.source={manifest}"), progress=False)
    expected = {}
    for case in BAD_CASES:
        expected[REASON.get(case, case)] = expected.get(REASON.get(case, case), 0) + 1
    assert dataset["summary"]["skipped"] == expected
    assert DatasetIndex.load(tmp_path / "ds").keys == ["id0_0", "id0_1", "id1_0", "id1_1"]
    # one log line per bad record, naming it by manifest line
    for line_no, case in enumerate(BAD_CASES, start=len(GOOD) + 1):
        reason = REASON.get(case, case)
        assert re.search(rf"manifest\.jsonl:{line_no}\b.*{reason}", caplog.text), (case, caplog.text)


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_strict_makes_each_bad_record_an_error(tmp_path, image_dir, case):
    manifest = write_manifest(image_dir / "manifest.jsonl", GOOD + [BAD_CASES[case]])
    with pytest.raises(PrepareError, match=rf"manifest\.jsonl:{len(GOOD) + 1}\b.*{REASON.get(case, case)}"):
        prepare(cfg_for(tmp_path, f"data.source={manifest}", "prepare.strict=true"), progress=False)


def test_resume_redoes_only_unfinished_shards(tmp_path):
    ran = []

    def crash_at_task_2(task):
        if task.index == 2:
            (tmp_path / "ds" / "shards" / ".shard-000002-00.tar.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt("killed")
        ran.append(task.index)
        return prep.decode_task(task)

    cfg = cfg_for(tmp_path, *SMALL)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, progress=False, stages=prep.Stages(decode=crash_at_task_2))
    assert ran == [0, 1] and not (tmp_path / "ds" / "dataset.json").exists()

    def record(task):
        ran.append((Path(task.folder).parent.name, task.index))
        return prep.decode_task(task)

    ran.clear()
    resumed = prepare(cfg, progress=False, stages=prep.Stages(decode=record))
    # finished shards are not redone; then the held-out split (4 identities x 4 images, 5 per shard)
    assert ran == [("ds", 2), ("ds", 3)] + [("heldout", t) for t in range(4)], ran
    assert not list((tmp_path / "ds" / "shards").glob(".*"))
    fresh = prepare(cfg_for(tmp_path, *SMALL, f"model.name={tmp_path / 'ds' / 'model'}", name="fresh"), progress=False)
    assert resumed["shards"] == fresh["shards"]
    for part in fresh["shards"]:  # byte-identical shards
        assert (tmp_path / "ds" / part["url"]).read_bytes() == (tmp_path / "fresh" / part["url"]).read_bytes()
    with pytest.raises(PrepareError, match="different plan"):
        prepare(cfg_for(tmp_path, *SMALL, "data.majority_images=7"), progress=False)


def test_keys_fit_webdataset_and_ustar():
    clean = prep.sanitize_key("people/Ann.Lee/img 01")
    assert clean.startswith("people_Ann_Lee_img_01_") and "." not in clean and "/" not in clean
    assert prep.sanitize_key("people_Ann_Lee_img_01") == "people_Ann_Lee_img_01"  # a clean key stays as it is
    assert prep.sanitize_key("a b") != prep.sanitize_key("a_b")  # never two records on one key
    long_a, long_b = "x/" * 100 + "a", "x/" * 100 + "b"
    assert len(prep.sanitize_key(long_a)) == prep.MAX_KEY
    assert prep.sanitize_key(long_a) != prep.sanitize_key(long_b)


def test_mask_caption_replaces_full_name_and_parts():
    assert mask_caption("Albert Einstein smiling; einstein wears a hat. Albert!", "Albert Einstein", "Lukas Brandt") == \
        "Lukas Brandt smiling; Brandt wears a hat. Lukas!"
    assert mask_caption("Alberta is not Albert", "Albert Einstein", "Lukas Brandt") == "Alberta is not Lukas"


def test_name_masking_is_consistent_per_identity(tmp_path):
    folder = tmp_path / "images"
    write_images(folder, [(i, j, (40, 40)) for i in range(3) for j in range(2)])
    real = {0: ("albert_einstein", "Albert Einstein"), 1: ("marie_curie", "Marie Curie"), 2: ("ada_lovelace", None)}
    rows = [{"image": f"id{i}_{j}.{'jpg' if j % 2 else 'png'}", "identity": real[i][0],
             **({"name": real[i][1]} if real[i][1] else {}),
             "caption": f"{(real[i][1] or 'Ada Lovelace')} in a photo {j}, {(real[i][1] or 'Ada Lovelace').split()[-1]} smiles"}
            for i in range(3) for j in range(2)]
    manifest = write_manifest(folder / "manifest.jsonl", rows)
    prepare(cfg_for(tmp_path, f"data.source={manifest}", "prepare.mask_names=true", "prepare.seed=5"), progress=False)
    root = tmp_path / "ds"
    index = DatasetIndex.load(root)
    name_map = json.loads((root / "name_map.json").read_text())
    assert sorted(name_map) == ["ada_lovelace", "albert_einstein", "marie_curie"]
    assert len(set(name_map.values())) == 3
    for identity in range(3):
        rows_of = [r for r in range(len(index)) if index.identities[r] == identity]
        names = {index.names[r] for r in rows_of}
        assert len(rows_of) == 2 and len(names) == 1
        generic = names.pop()
        first, last = generic.split()
        for r in rows_of:
            caption = index.captions[r]
            assert caption.startswith(f"{generic} in a photo") and caption.endswith(f"{last} smiles")
            assert not re.search("einstein|albert|marie|curie|ada|lovelace", caption, re.IGNORECASE)
    components = load_components(ModelConfig(name=str(root / "model")), with_unet=False)
    np.testing.assert_array_equal(index.tokens, tokenize(components, index.captions).numpy())
    # the same seed gives the same names, on a rerun elsewhere
    prepare(cfg_for(tmp_path, f"data.source={manifest}", "prepare.mask_names=true", "prepare.seed=5", name="again"),
            progress=False)
    assert json.loads((tmp_path / "again" / "name_map.json").read_text()) == name_map


def test_select_identities_counts_and_seed():
    labels = [f"big{i}" for i in range(5) for _ in range(35)] + [f"small{i}" for i in range(8) for _ in range(3)]
    labels += ["single0", "single1"]
    by_label = {}
    for pos, label in enumerate(labels):
        by_label.setdefault(label, []).append(pos)
    sizes = {label: len(p) for label, p in by_label.items()}
    counts = [30, 30, 2, 2, 2, 2]

    def select(counts, seed):
        chosen, singles = select_identities(sizes, counts, seed, by_label.__getitem__)
        return chosen, singles

    chosen, singles = select(counts, 0)
    assert sorted(map(len, chosen.values()), reverse=True) == counts
    assert all(lab.startswith("big") for lab, kept in chosen.items() if len(kept) == 30)
    assert all(labels[p] == lab for lab, kept in chosen.items() for p in kept)  # an identity's own images
    assert all(len(set(kept)) == len(kept) for kept in chosen.values())
    assert singles == ["single0", "single1"]
    assert select(counts, 0)[0] == chosen
    assert select(counts, 1)[0] != chosen
    with pytest.raises(PrepareError, match="6 identities with >= 30 images are needed but the data has 5"):
        select([30] * 6, 0)


def test_imbalance_protocol_end_to_end_with_plot(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    specs = [(i, j, (40, 40)) for i in range(3) for j in range(6)] + [(i, j, (40, 40)) for i in range(3, 7) for j in range(3)]
    specs.append((7, 0, (40, 40)))
    write_images(folder, specs)
    rows = [{"image": f"id{i}_{j}.{'jpg' if j % 2 else 'png'}", "caption": f"person {i} photo {j}", "identity": i}
            for i, j, _ in specs]
    manifest = folder / "manifest.csv"  # the CSV form of a manifest
    manifest.write_text("image,caption,identity\n" + "".join(f"{r['image']},{r['caption']},{r['identity']}\n" for r in rows))
    plotted = []
    real_plot = prep.plot_label_distribution
    monkeypatch.setattr(prep, "plot_label_distribution", lambda ids, path, title: plotted.append(real_plot(ids, path, title)))
    dataset = prepare(cfg_for(tmp_path, f"data.source={manifest}", "prepare.imbalance=true", "data.profile=custom",
                              "data.majority_ids=2", "data.majority_images=5", "data.minority_ids=3",
                              "data.minority_images=2"), progress=False)
    assert dataset["summary"]["skipped"] == {"single_image_identity": 1}
    assert dataset["summary"]["imbalance"]["records_selected"] == 16
    assert dataset["summary"]["imbalance"]["short_identities"] == {}
    summary = dataset["summary"]  # the single-image identity's row is skipped, not also "not selected"
    assert summary["rows_in"] == 31 == summary["samples"] + summary["heldout"] + summary["skipped_total"] + \
        summary["not_selected"]
    ids = DatasetIndex.load(tmp_path / "ds").identities
    assert sorted(np.unique(ids, return_counts=True)[1].tolist(), reverse=True) == [5, 5, 2, 2, 2]
    assert plotted == [[5, 5, 2, 2, 2]]
    png = Image.open(tmp_path / "ds" / "label_distribution.png")
    assert png.format == "PNG" and png.size == (720, 360)
    assert len(set(png.convert("RGB").getdata())) > 10  # something was drawn


def test_label_distribution_of_many_identities_is_the_same_picture_in_bounded_memory(tmp_path, monkeypatch):
    import tracemalloc

    counts = np.sort(np.random.default_rng(0).zipf(1.6, 60_000).clip(1, 500))[::-1]
    prep.plot_label_distribution(counts[:10], tmp_path / "warm.png", "t")  # matplotlib's fonts, once
    tracemalloc.start()
    steps = prep.plot_label_distribution(counts, tmp_path / "steps.png", "t")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(steps) <= prep.PLOT_STEPS and steps[0] == counts[0] and steps[-1] >= counts[-1]
    assert peak < 10 * 2**20, peak  # 1.2 MB; a step per identity: 29 MB
    monkeypatch.setattr(prep, "PLOT_STEPS", len(counts))
    assert prep.plot_label_distribution(counts, tmp_path / "all.png", "t") == counts.tolist()
    a, b = (np.asarray(Image.open(tmp_path / f).convert("L"), np.int16) for f in ("steps.png", "all.png"))
    assert (np.abs(a - b) > 8).mean() < 0.002


def test_cli_verb(tmp_path, capsys):
    rc = cli_main(["prepare", "configs/demo.yaml", f"output_dir={tmp_path}", "prepare.backend=serial", *SMALL,
                   "data.majority_ids=1", "data.minority_ids=1"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["samples"] == 8 and out["skipped"] == {} and "/datasets/synthetic-custom-" in out["output"]
    assert cli_main(["prepare", "configs/demo.yaml", f"output_dir={tmp_path}", "data.source=/nope.jsonl"]) == 2


def test_local_hugging_face_image_encoders(tmp_path):
    from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig,
                              CLIPVisionConfig, Dinov2Config, Dinov2Model)

    from pogdiff.data.encode import load_image_encoder

    dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=28, patch_size=14))
    dino.save_pretrained(tmp_path / "dino")
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(tmp_path / "dino")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)
    clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "clip")
    images = [render(make_identity(i, 0), 0, 0, size=40)[0] for i in range(3)]
    with torch.no_grad():
        pixels = BitImageProcessor.from_pretrained(tmp_path / "dino")(images=images, return_tensors="pt")["pixel_values"]
        want_dino = dino.eval()(pixel_values=pixels).pooler_output  # the CLS token after the final layer norm
        pixels = CLIPImageProcessor.from_pretrained(tmp_path / "clip")(images=images, return_tensors="pt")["pixel_values"]
        want_clip = clip.eval().visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
    np.testing.assert_allclose(load_image_encoder(str(tmp_path / "dino"))(images), want_dino, atol=1e-5)
    np.testing.assert_allclose(load_image_encoder(str(tmp_path / "clip"))(images), want_clip, atol=1e-5)
    with pytest.raises(ValueError, match="nor a local Hugging Face model directory"):
        load_image_encoder(str(tmp_path / "missing"))
    dataset = prepare(cfg_for(tmp_path, *SMALL, f"data.image_encoder={tmp_path / 'dino'}"), progress=False)
    assert dataset["image_emb_dim"] == 32 and dataset["image_encoder"] == str(tmp_path / "dino")


@pytest.mark.parametrize("overrides, resources, pool", [
    ([], {"CPU": 64.0, "GPU": 32.0}, (32, 1.0)),  # 4 nodes x 8 GPUs: one encoder actor per GPU
    ([], {"CPU": 3.0}, (2, 0.0)),  # the embedded cluster of a 2-core machine: 2 actors, a CPU for decoding
    (["prepare.device=cpu"], {"CPU": 64.0, "GPU": 8.0}, (63, 0.0)),
    (["prepare.gpus_per_worker=0.5"], {"CPU": 64.0, "GPU": 8.0}, (16, 0.5)),
    (["prepare.workers=4"], {"CPU": 64.0, "GPU": 8.0}, (4, 1.0)),
    (["prepare.workers=3", "prepare.gpus_per_worker=0"], {"CPU": 8.0, "GPU": 8.0}, (3, 0.0)),
])
def test_the_encoder_pool_follows_the_cluster(overrides, resources, pool):
    assert prep.encoder_pool(load_config(None, overrides).prepare, resources) == pool
