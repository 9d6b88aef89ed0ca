"""A user's own data, end to end through the CLI, exactly as a user runs it: from their own working
directory, with relative paths, in both manifest forms (a JSONL manifest with its own identity
column name, and a Hugging Face imagefolder), on images nothing in pogdiff generates:

    prepare -> train-dist (2 workers) on the prepared directory -> sample -> eval -> load the export
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pogdiff.cli import main

import own_data

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model.tiny_vae_steps=0", "density.epochs=5", "train.batch_size=4", "train.log_every=1",
        "train.checkpoint_every=2", "sample.steps=4", "sample.images_per_id=2", "eval.recognizer_steps=30",
        "data.minority_images=2", "data.heldout_images=3"]


def run(capsys, *argv) -> dict:
    rc = main(list(argv))
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    return json.loads([line for line in out.out.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
@pytest.mark.parametrize("form", ["jsonl", "imagefolder"])
def test_own_data_end_to_end(form, tmp_path, monkeypatch, capsys):
    per_id = own_data.counts()
    source = own_data.write(tmp_path / "mydata", form, per_id)
    monkeypatch.chdir(tmp_path)
    config = str(Path("cfg.yaml"))
    Path(config).write_text((ROOT / "configs/demo.yaml").read_text())
    rel_source = str(source.relative_to(tmp_path))
    columns = ["data.identity_column=person"] if form == "jsonl" else []

    prepared = run(capsys, "prepare", config, f"data.source={rel_source}", *columns, *FAST)
    # rows in = samples + held out + counted skips; identities with > 2 + 3 images give 3 to the held-out split
    assert prepared["records"] + prepared["heldout"] + sum(prepared["skipped"].values()) == sum(per_id)
    assert prepared["heldout"] == 3 * sum(c > 5 for c in per_id) and prepared["skipped"] == {}
    dataset = Path(prepared["output"])
    assert dataset.is_absolute() and dataset.is_relative_to(tmp_path / "runs" / "datasets")
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["num_samples"] == prepared["samples"] and meta["keep_images"]

    rel_dataset = str(dataset.relative_to(tmp_path))  # the prepared directory is a source too
    common = [f"data.source={rel_dataset}", *FAST, "method.name=pogdiff"]
    trained = run(capsys, "train-dist", config, *common, "train.steps=4", "dist.num_workers=2")
    assert trained["steps"] == 4 and np.isfinite(trained["first_loss"]) and np.isfinite(trained["last_loss"])
    method_dir = Path(trained["export"])
    assert method_dir.is_relative_to(tmp_path / "runs" / "demo")  # not under Ray's own working directory
    ranks = [json.loads((method_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["module_sha256"] == ranks[1]["module_sha256"] and ranks[0]["dataset"] == str(dataset)
    assert (method_dir / "metrics.jsonl").is_file() and (method_dir / "tb").is_dir()

    sampled = run(capsys, "sample", config, *common, "train.steps=4")
    assert sampled["identities"] == len(per_id) and sampled["images"] == 2 * len(per_id)

    scored = run(capsys, "eval", config, *common, "train.steps=4")
    metrics = json.loads((method_dir / "metrics.json").read_text())
    for name in ("grecall", "dino", "fid"):
        for split in ("all", "few"):
            assert np.isfinite(metrics["summary"][f"{name}_{split}"]) and scored[f"{name}_{split}"] == metrics["summary"][f"{name}_{split}"]
    assert metrics["few_ids"] == [i for i, c in enumerate(per_id) if c <= 2]
    assert metrics["encoder"]["source"] == "dataset" and metrics["encoder"]["classes"] == len(per_id)
    assert metrics["dino_reference"]["heldout"] == [i for i, c in enumerate(per_id) if c > 5]
    assert isinstance(metrics["valid"], bool)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(method_dir / "pipeline"), safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    image = pipe(f"An image of {own_data.NAMES[0]}.", num_inference_steps=3, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert np.asarray(image).shape == (32, 32, 3)


def test_unprepared_source_is_prepared_once_and_reused(tmp_path, monkeypatch, capsys):
    """A manifest given straight to a training verb is prepared on first use and reused after."""
    source = own_data.write(tmp_path / "mydata", "csv", own_data.counts(n_ids=4, head=1, head_images=8))
    monkeypatch.chdir(tmp_path)
    args = ["train", str(ROOT / "configs/demo.yaml"), f"data.source={source.relative_to(tmp_path)}",
            "data.identity_column=person", *FAST, "method.name=vanilla", "train.steps=2"]
    run(capsys, *args)
    datasets = list((tmp_path / "runs" / "datasets").iterdir())
    assert len(datasets) == 1
    stamp = (datasets[0] / "dataset.json").stat().st_mtime_ns
    run(capsys, *args[:-1], "train.steps=3")  # another run, same data: no second prepare
    assert list((tmp_path / "runs" / "datasets").iterdir()) == datasets
    assert (datasets[0] / "dataset.json").stat().st_mtime_ns == stamp
