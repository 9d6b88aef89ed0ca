"""Nothing non-finite reaches the weights, the EMA, a checkpoint or an export."""
from __future__ import annotations

import itertools

import pytest
import torch

from pogdiff.data.dataset import prepare_artifacts, resolve_dataset
from pogdiff.method.objectives import Batch
from pogdiff.runs import load_run_config
from pogdiff.train.loop import LocalEngine, fit, make_ema, make_loader, stream_batches, training_inputs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    cfg = load_run_config("configs/demo.yaml", [f"output_dir={root}", "data.profile=agedb-s", "model.tiny_vae_steps=0",
                                                "density.epochs=3", "train.batch_size=4", "train.log_every=1",
                                                "train.ema=true", "train.report_to=none", "prepare.backend=serial"])
    ds = resolve_dataset(cfg, progress=False)
    prepare_artifacts(cfg, ds, progress=False)
    return cfg, ds, root


def poisoned(batches, rows: set[int], every: bool = False):
    """The stream with NaN latents for ``rows`` (or for every batch)."""
    for batch in batches:
        bad = torch.tensor([every or i in rows for i in batch.index.tolist()])
        if bad.any():
            latents = batch.latents.clone()
            latents[bad] = float("nan")
            batch = Batch(batch.index, latents, batch.tokens, batch.keys)
        yield batch


def run(cfg, ds, root, steps, rows=(), every=False, max_bad=5):
    import dataclasses

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps, max_bad_steps=max_bad))
    inputs = training_inputs(cfg, ds, torch.device("cpu"))
    engine = LocalEngine(inputs.unet, cfg.train)
    ema = make_ema(cfg.train, engine)
    batches = poisoned(stream_batches(make_loader(cfg, ds, 0, 1), 0, torch.device("cpu"), torch.float32), set(rows), every)
    result = fit(cfg, engine, inputs.objective, batches, 0, root / "guard", inputs.is_minority, ema=ema, progress=False)
    return result, engine, ema


def test_nan_samples_are_skipped_counted_and_quarantined(setup, caplog):
    cfg, ds, root = setup
    # the rows of the first two batches: certain to be drawn, and each again later in the stream
    first = list(itertools.islice(stream_batches(make_loader(cfg, ds, 0, 1), 0, torch.device("cpu"), torch.float32), 2))
    rows = {int(first[0].index[0]), int(first[1].index[0])}
    with caplog.at_level("WARNING", logger="pogdiff.train"):
        result, engine, ema = run(cfg, ds, root, steps=40, rows=rows)
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())
    assert all(torch.isfinite(s).all() for s in ema.shadow)
    last = result.history[-1]
    assert last["bad_steps"] >= 2 and last["quarantined"] >= 1, last
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert any("non-finite samples here" in r.message and ds.index.keys[min(rows)] in r.message for r in caplog.records) \
        or any(ds.index.keys[r] in m.message for r in rows for m in caplog.records)


def test_bad_steps_in_a_row_stop_the_run(setup):
    cfg, ds, root = setup
    with pytest.raises(FloatingPointError, match="3 training steps in a row"):
        run(cfg, ds, root, steps=10, every=True, max_bad=3)


def test_export_and_checkpoint_refuse_non_finite_weights(setup, tmp_path):
    from pogdiff.models.export import export_pipeline
    from pogdiff.train.checkpoint import write_checkpoint

    cfg, ds, _ = setup
    inputs = training_inputs(cfg, ds, torch.device("cpu"))
    weights = {n: p.detach().clone() for n, p in inputs.unet.named_parameters()}
    name = next(iter(weights))
    weights[name][0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        export_pipeline(ds.model_dir, weights, tmp_path / "out")
    assert not (tmp_path / "out" / "pipeline").exists()
    engine = LocalEngine(inputs.unet, cfg.train)
    with torch.no_grad():
        next(inputs.unet.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(FloatingPointError):
        write_checkpoint(tmp_path / "ckpt", engine, None, 1)
    assert not (tmp_path / "ckpt" / "unet.safetensors").exists()
