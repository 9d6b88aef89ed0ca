"""tiny-ssl, the neighbours' learned image encoder: its loss against a loop reference, its
augmentations, `pogdiff pretrain-encoder` run as a user runs it, and the committed encoder's
go/no-go recomputed from its weights."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pogdiff.models.ssl_encoder import SSL_DIR, META, augment, go_no_go, load_encoder, nt_xent

ROOT = Path(__file__).resolve().parents[1]
POGDIFF = str(Path(sys.executable).parent / "pogdiff")


@pytest.mark.parametrize("n,dim,temperature", [(1, 3, 0.5), (5, 7, 0.2), (16, 64, 0.07)])
def test_nt_xent_matches_a_loop_over_views(n, dim, temperature):
    g = torch.Generator().manual_seed(n)
    z1 = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    z2 = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    views = list(z1) + list(z2)
    terms = []
    for i, zi in enumerate(views):
        positive = (i + n) % (2 * n)
        others = [math.exp(float(zi @ zj) / temperature) for j, zj in enumerate(views) if j != i]
        terms.append(-(float(zi @ views[positive]) / temperature - math.log(sum(others))))
    assert float(nt_xent(z1, z2, temperature)) == pytest.approx(sum(terms) / len(terms), rel=1e-9)


def test_augment_keeps_shape_and_range_and_draws_from_its_generator():
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    a = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(2)))
    corner, centre = (a - x)[:, :, :2, :2].abs().mean(), (a - x)[:, :, 14:18, 14:18].abs().mean()
    assert corner > centre  # the background ring is refilled, the centre only moved and relit


@pytest.mark.slow
def test_pretrain_encoder_from_another_directory_and_prepare_with_it(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([POGDIFF, "pretrain-encoder", str(ROOT / "configs/encoder.yaml"), "ssl.steps=3",
                           "ssl.ids=16", "ssl.batch_size=8", "ssl.output=my-encoder"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["images"] == 16 * 4 and np.isfinite(out["last_loss"])
    for profile in ("agedb-m", "agedb-l"):
        for encoder in ("tiny", "tiny-ssl"):
            shares = out["go_no_go"][profile][encoder]
            assert 0 <= shares["knn_same_identity/tail"] <= 0.1 + 1e-9  # one other image among k = 10
            assert 0 <= shares["knn_recall/tail"] <= 1 and 0 < shares["knn_same_identity/head"] <= 1
    assert json.loads((tmp_path / "my-encoder" / META).read_text())["go_no_go"] == out["go_no_go"]

    from pogdiff.data.dataset import resolve_dataset
    from pogdiff.runs import load_run_config

    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        cfg = load_run_config(str(ROOT / "configs/demo.yaml"), [
            "data.profile=custom", "data.majority_ids=2", "data.minority_ids=2", "data.majority_images=6",
            "model.name=tiny", "model.tiny_vae_steps=0", "data.image_encoder=my-encoder"])
        ds = resolve_dataset(cfg, progress=False)
    finally:
        os.chdir(cwd)
    emb = np.asarray(ds.index.image_emb)
    assert emb.shape == (16, 64) and np.isfinite(emb).all()
    import webdataset as wds

    encoder = load_encoder(tmp_path / "my-encoder")
    urls = [str(u) for u in ds.index.shard_urls]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 16
    for sample in samples:  # each kept image, embedded again
        np.testing.assert_allclose(sample["imgemb.npy"], encoder([sample["png"]])[0].numpy(), atol=1e-5)


def test_the_committed_encoder_reproduces_its_go_no_go():
    from pogdiff.runs import load_run_config

    recorded = json.loads((SSL_DIR / META).read_text())
    settings = recorded["settings"]
    cfg = load_run_config(str(ROOT / "configs/encoder.yaml"), [f"data.image_size={settings['image_size']}",
                                                                f"data.seed={settings['data_seed']}"])
    measured = go_no_go(load_encoder(), cfg)
    for profile, encoders in recorded["go_no_go"].items():
        for encoder, shares in encoders.items():
            for key, value in shares.items():
                assert measured[profile][encoder][key] == pytest.approx(value, abs=2e-3), (profile, encoder, key)
