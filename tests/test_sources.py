"""Sources beyond a JSON/CSV manifest: img2dataset-style WebDataset shards (a directory, a brace
pattern) and Parquet manifests, from another working directory with relative paths."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pogdiff.config import load_config
from pogdiff.data.prepare import PrepareError, prepare
from pogdiff.data.shards import DatasetIndex
from test_prepare import write_images

SMALL = ["model.tiny_vae_steps=0", "prepare.backend=serial", "data.heldout_images=0", "data.image_size=32",
         "model.name=tiny"]


def img2dataset_shards(folder, samples_per_shard=3):
    """WebDataset shards as img2dataset writes them: <key>.jpg + <key>.txt + <key>.json, 9 people."""
    import webdataset as wds

    from pogdiff.data.synthetic import make_identity, render

    folder.mkdir(parents=True)
    rows = []
    for n in range(9):
        ident, j = n % 3, n // 3
        image, _ = render(make_identity(ident, 0), j, 0, size=40)
        rows.append((f"{n:09d}", image, f"photo {n} of person {ident}", {"person": f"p{ident}", "url": f"http://x/{n}",
                                                                        "alt": f"alt text {n}"}))
    for s in range(0, len(rows), samples_per_shard):
        with wds.TarWriter(str(folder / f"{s // samples_per_shard:05d}.tar")) as sink:
            for key, image, caption, meta in rows[s:s + samples_per_shard]:
                buf = io.BytesIO()
                image.save(buf, format="JPEG")
                sink.write({"__key__": key, "jpg": buf.getvalue(), "txt": caption, "json": json.dumps(meta)})
    return rows


def test_img2dataset_shards_are_a_source_from_another_directory(tmp_path, monkeypatch):
    rows = img2dataset_shards(tmp_path / "data" / "shards")
    with tarfile.open(tmp_path / "data" / "shards" / "00002.tar", "a") as tar:  # a sample with no image
        info = tarfile.TarInfo("000000099.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)  # relative paths, from another working directory
    overrides = [*SMALL, "output_dir=out", "data.identity_column=person", "prepare.samples_per_shard=4"]
    dataset = prepare(load_config(None, ["data.source=../data/shards", *overrides]), progress=False)
    summary = dataset["summary"]
    assert summary["rows_in"] == 10 and summary["samples"] == 9 and summary["skipped"] == {"bad_manifest_row": 1}
    assert "00002.tar:000000099" in summary["skipped_records"][0]["record"]
    index = DatasetIndex.load(Path(dataset_dir(work / "out")))
    assert sorted(index.keys) == [key for key, *_ in rows]
    by_key = dict(zip(index.keys, index.captions))
    assert all(by_key[key] == caption for key, _, caption, _ in rows)  # the caption is the txt member
    assert sorted(index.identity_counts().values()) == [3, 3, 3]
    # the caption from a json field instead, and the shards as a brace pattern
    other = prepare(load_config(None, ["data.source=../data/shards/{00000..00002}.tar", *overrides,
                                       "data.caption_column=alt", "prepare.output=out/alt"]), progress=False)
    alt = DatasetIndex.load(work / "out" / "alt")
    assert other["summary"]["samples"] == 9
    assert dict(zip(alt.keys, alt.captions))["000000004"] == "alt text 4"
    # the image comes from the member itself: the latents equal those of the same JPEGs in a manifest
    for key, image, caption, meta in rows:
        (tmp_path / "data" / f"{key}.jpg").write_bytes(_jpeg(image))
    (tmp_path / "data" / "m.jsonl").write_text("".join(json.dumps({"image": f"{k}.jpg", "caption": c, "identity": m["person"]})
                                                       + "\n" for k, _, c, m in rows))
    manifest = prepare(load_config(None, ["data.source=../data/m.jsonl", *overrides, "prepare.output=out/manifest",
                                          f"model.name={work / 'out' / 'alt' / 'model'}"]), progress=False)
    same = DatasetIndex.load(work / "out" / "manifest")
    latents = _latents(work / "out" / "manifest")
    assert manifest["summary"]["samples"] == 9 and latents == _latents(work / "out" / "alt")
    assert np.array_equal(np.asarray(same.image_emb)[np.argsort(same.keys)], np.asarray(alt.image_emb)[np.argsort(alt.keys)])


def _jpeg(image):
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


def _latents(root):
    import webdataset as wds

    urls = [str(root / p["url"]) for p in json.loads((root / "dataset.json").read_text())["shards"]]
    return {s["__key__"]: s["latent.npy"] for s in wds.WebDataset(urls, shardshuffle=False)}


def dataset_dir(out):
    [found] = [p.parent for p in (out / "datasets").glob("*/dataset.json")]
    return found


def test_a_parquet_manifest_is_a_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "imgs"
    write_images(folder, [(i, j, (40, 40)) for i in range(2) for j in range(3)])
    table = pa.table({"file_name": [f"id{i}_{j}.{'jpg' if j % 2 else 'png'}" for i in range(2) for j in range(3)],
                      "text": [f"person {i} photo {j}" for i in range(2) for j in range(3)],
                      "identity": [i for i in range(2) for j in range(3)]})
    pq.write_table(table, folder / "manifest.parquet")
    (folder / "broken.parquet").write_text("not parquet")
    dataset = prepare(load_config(None, [f"data.source={folder / 'manifest.parquet'}", *SMALL, f"output_dir={tmp_path}"]),
                      progress=False)
    assert dataset["summary"]["rows_in"] == 6 and dataset["summary"]["samples"] == 6
    with pytest.raises(PrepareError, match="broken.parquet.*not a readable Parquet"):
        prepare(load_config(None, [f"data.source={folder / 'broken.parquet'}", *SMALL, f"output_dir={tmp_path}"]),
                progress=False)
