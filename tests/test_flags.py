"""diffusers' train_text_to_image.py flags and their pogdiff keys (docs/diffusers_flags.md): each
one changes what the run does, measured here on the one-machine path."""
import json
import math

import pytest
import torch

torch.set_num_threads(1)

from pogdiff.config import ConfigError, load_config
from pogdiff.runs import RunFiles, load_run_config
from pogdiff.train.loop import LocalEngine, autocast_dtype, build_optimizer, resolve_schedule
from pogdiff.train.assembly import run_train


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    return tmp_path_factory.mktemp("flags")


def _cfg(root, *extra):
    return load_run_config("configs/demo.yaml", [
        f"output_dir={root}", "run_name=flags", "method.name=vanilla", "data.profile=custom", "data.majority_ids=2",
        "data.minority_ids=3", "data.majority_images=12", "train.steps=4", "train.log_every=1", "train.batch_size=4",
        "density.epochs=5", "model.tiny_vae_steps=0", "prepare.backend=serial", "train.lr_scheduler=constant",
        "train.lr_warmup_steps=0", *extra])


def test_epochs_validation_epochs_and_scale_lr_resolve_against_the_data_and_world():
    cfg = load_config(None, ["train.batch_size=4", "train.grad_accum=2", "train.num_train_epochs=3",
                             "train.validation_epochs=2", "train.scale_lr=true", "train.lr=1e-5"])
    got = resolve_schedule(cfg, num_samples=100, world_size=3).train
    per_epoch = math.ceil(100 / (4 * 2 * 3))  # 5
    assert (got.steps, got.validate_every) == (3 * per_epoch, 2 * per_epoch)
    assert got.lr == pytest.approx(1e-5 * 4 * 2 * 3)
    plain = load_config(None, ["train.steps=7"])
    assert resolve_schedule(plain, 100, 3).train == plain.train


def test_allow_tf32_sets_the_cuda_matmul_and_cudnn_flags_on_cuda_only():
    from pogdiff.train.loop import configure_backends

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        on = load_config(None, ["train.allow_tf32=true"]).train
        configure_backends(on, torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32
        configure_backends(load_config(None).train, torch.device("cuda"))  # off by default
        assert not torch.backends.cuda.matmul.allow_tf32
        configure_backends(on, torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_adam_epsilon_reaches_the_optimizer():
    opt = build_optimizer(load_config(None, ["train.adam_epsilon=1e-3"]).train, [torch.nn.Parameter(torch.zeros(2))])
    assert opt.param_groups[0]["eps"] == 1e-3


def test_mixed_precision_is_fp32_on_cpu_and_refused_when_asked_there(run_root, capsys):
    from pogdiff.cli import main

    cpu = torch.device("cpu")
    assert autocast_dtype(load_config(None).train, cpu) is None  # auto
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        autocast_dtype(load_config(None, ["train.mixed_precision=bf16"]).train, cpu)
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"  # YAML's `no` is false
    assert main(["train", "configs/demo.yaml", f"output_dir={run_root}", "train.mixed_precision=fp16"]) == 2
    assert "train.mixed_precision=fp16" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_local_engine_autocasts_and_scales_fp16(dtype):
    """The engine's mixed-precision path (CUDA in real runs; CPU autocast runs the same code)."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(4, 4, 3, padding=1)
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = model

        def forward(self, x, t, encoder_hidden_states):
            return type("Out", (), {"sample": self.conv(x)})

    tc = load_config(None, ["train.lr=1e-2"]).train
    engine = LocalEngine(Wrapped(), tc, autocast=dtype)
    before = model.weight.detach().clone()
    out = engine(torch.randn(2, 4, 8, 8), None, None)
    assert seen == [dtype] and out.dtype == torch.float32
    engine.backward(out.pow(2).mean())
    engine.step()
    assert (engine.scaler is not None) == (dtype == torch.float16)
    assert model.weight.dtype == torch.float32 and not torch.equal(model.weight, before)


def test_input_perturbation_noises_x_t_more_but_keeps_the_target():
    from diffusers import DDPMScheduler

    from pogdiff.config import Method, MethodConfig
    from pogdiff.method.objectives import Batch, Objective, TextConditioner

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    text = TextConditioner.from_table(torch.randn(6, 5, 8))
    batch = Batch(index=torch.arange(6), latents=torch.zeros(6, 4, 16, 16), tokens=torch.arange(6)[:, None])
    seen = {}

    def zero(x, t, y):  # x0 = 0: x_t = sqrt(1 - abar_t) * (the forward noise)
        seen["x"], seen["t"] = x, t
        return torch.zeros_like(x)

    results = {}
    for p in (0.0, 1.0):
        obj = Objective(MethodConfig(name=Method.vanilla), sched.alphas_cumprod, text=text, input_perturbation=p)
        loss = obj(zero, batch, torch.Generator().manual_seed(3)).loss.item()  # = mean(target^2) = mean(eps^2)
        forward_noise = seen["x"] / (1 - sched.alphas_cumprod[seen["t"]]).sqrt().view(-1, 1, 1, 1)
        results[p] = loss, forward_noise.var().item()
    assert results[1.0][0] == pytest.approx(results[0.0][0])  # the target is the unperturbed eps
    assert results[0.0][1] == pytest.approx(1.0, rel=0.1) and results[1.0][1] == pytest.approx(2.0, rel=0.1)


def test_num_train_epochs_and_scale_lr_in_a_run(run_root):
    cfg = _cfg(run_root, "run_name=epochs", "train.num_train_epochs=2", "train.scale_lr=true", "train.lr=1e-4")
    result = run_train(cfg, progress=False)
    from pogdiff.data.dataset import resolve_dataset

    samples = len(resolve_dataset(cfg, progress=False))
    assert result.steps == 2 * math.ceil(samples / 4)
    assert result.history[0]["lr"] == pytest.approx(1e-4 * 4)


def test_resume_from_a_checkpoint_of_another_run(run_root, capsys):
    from pogdiff.cli import main

    first = _cfg(run_root, "run_name=source", "train.checkpoint_every=2")
    run_train(first, progress=False)
    step2 = RunFiles(first).checkpoints / "step_00000002"
    assert step2.is_dir()
    cfg = _cfg(run_root, "run_name=target", "train.steps=6", f"train.resume_from_checkpoint={step2}")
    result = run_train(cfg, progress=False)
    assert [h["step"] for h in result.history] == [3, 4, 5, 6]
    assert main(["train", "configs/demo.yaml", f"output_dir={run_root}", "run_name=nowhere",
                 f"train.resume_from_checkpoint={run_root}/no/step_1"]) == 2
    assert "train.resume_from_checkpoint" in capsys.readouterr().err


def test_report_to_wandb_logs_the_run_offline(run_root, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is in the dev extra")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(run_root, "run_name=wandb", "train.report_to=all")
    run_train(cfg, progress=False)
    method = RunFiles(cfg).method
    runs = list((method / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((method / "wandb").iterdir())
    # wandb >= 0.19 reads its .wandb log only in its Go core; the logged values are in it verbatim
    logged = next(runs[0].glob("*.wandb")).read_bytes()
    rows = [json.loads(line) for line in (method / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(json.dumps(r["loss"]).encode() in logged for r in rows)
    assert b"target_mse" in logged
    assert (method / "tb").is_dir()  # "all": TensorBoard too


# ------------------------------------------------------------------ data: prepare-time image flags

def test_max_train_samples_keeps_a_seeded_subset_and_accounts_for_every_row(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import own_data
    from pogdiff.data.dataset import resolve_dataset
    from pogdiff.data.prepare import prepare

    source = own_data.write(tmp_path / "mine", "jsonl", own_data.counts(n_ids=4, head=1, head_images=8))  # 14 rows

    def run(*extra):
        cfg = load_run_config("configs/demo.yaml", [
            f"output_dir={tmp_path}/runs", f"data.source={source}", "data.identity_column=person", "model.tiny_vae_steps=0",
            "prepare.backend=serial", *extra])
        meta = prepare(cfg, progress=False)
        return meta["summary"], set(resolve_dataset(cfg, progress=False).index.keys)

    full, all_keys = run()
    some, keys = run("data.max_train_samples=5")
    again, same = run("data.max_train_samples=5", "prepare.batch_size=7")  # another prepare, same selection
    assert (full["rows_in"], full["samples"], full["heldout"]) == (14, 10, 4)
    assert (some["samples"], some["not_selected"], some["heldout"]) == (5, 5, 4)
    assert some["rows_in"] == some["samples"] + some["heldout"] + some["skipped_total"] + some["not_selected"]
    assert keys < all_keys and len(keys) == 5 and same == keys


def test_random_crop_draws_a_window_per_seed_and_centre_crop_is_centred(tmp_path):
    """... and each crop's SDXL time ids say where it is: the source's size, the crop's top-left in
    the resized image (the mirror's counted from the flipped image's left), the target size."""
    import numpy as np
    from PIL import Image, ImageOps

    from pogdiff.data.prepare import crop_time_ids, load_image

    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, :, 0] = np.arange(80, dtype=np.uint8)[None, :] * 3  # red encodes the column
    Image.fromarray(wide).save(tmp_path / "wide.png")

    def first_column(im):  # the crop's left edge in the resized (40 x 20) image: red = 3 * 2 * column
        return round(float(np.asarray(im)[10, 0, 0]) / 6)

    centre, centre_crop = load_image(str(tmp_path / "wide.png"), 20)
    loaded = [load_image(str(tmp_path / "wide.png"), 20, seed) for seed in range(8)]
    crops = [im for im, _ in loaded]
    assert centre.size == (20, 20) and all(c.size == (20, 20) for c in crops)
    assert abs(first_column(centre) - 10) <= 1  # 80x40 -> 40x20: the centred window starts at column 10
    assert crop_time_ids(centre_crop, 20) == [40, 80, 0, 10, 20, 20]
    lefts = {first_column(c) for c in crops}
    assert len(lefts) > 3 and min(lefts) >= 0 and max(lefts) <= 20
    for im, crop in loaded:
        height, width, top, left, target_h, target_w = crop_time_ids(crop, 20)
        assert (height, width, top, target_h, target_w) == (40, 80, 0, 20, 20)
        assert abs(left - first_column(im)) <= 1
        mirror = ImageOps.mirror(im)  # the same window of the flipped 40-wide image starts at 40 - left - 20
        assert crop_time_ids(crop, 20, mirrored=True)[3] == 40 - left - 20
        assert abs(round(float(np.asarray(mirror)[10, -1, 0]) / 6) - left) <= 1  # its right edge is the crop's left
    assert np.array_equal(np.asarray(crops[3]), np.asarray(load_image(str(tmp_path / "wide.png"), 20, 3)[0]))


def test_random_flip_stores_the_mirror_latent_and_the_reader_picks_either_half_the_time(tmp_path):
    import numpy as np

    from pogdiff.data.dataset import resolve_dataset
    from pogdiff.data.shards import LATENT, LATENT_FLIP, npy_load
    from pogdiff.data.stream import make_train_loader, tar_samples, SkipAndLog

    cfg = load_run_config("configs/demo.yaml", [
        f"output_dir={tmp_path}", "data.profile=custom", "data.majority_ids=2", "data.minority_ids=2",
        "data.majority_images=6", "model.tiny_vae_steps=0", "prepare.backend=serial", "data.random_flip=true"])
    ds = resolve_dataset(cfg, progress=False)
    stored = {}
    for sample in tar_samples(iter(ds.index.shard_urls), SkipAndLog(0)):
        stored[sample["__key__"]] = npy_load(sample[LATENT]), npy_load(sample[LATENT_FLIP])
    assert len(stored) == len(ds) and all(not np.array_equal(a, b) for a, b in stored.values())

    def picks(epoch: int, flip: bool = True) -> list[bool]:
        loader = make_train_loader(ds.root, batch_size=len(ds), rank=0, world_size=1, num_workers=0, resampled=False,
                                   shuffle_buffer=1, random_flip=flip)
        loader.set_epoch(epoch)
        batch = next(iter(loader))
        return [np.array_equal(lat.numpy(), stored[key][1]) for key, lat in zip(batch["key"], batch["latents"])]

    chosen = [picks(e) for e in range(4)]
    share = np.mean(chosen)
    assert 0.25 < share < 0.75 and chosen[0] != chosen[1]  # about half, drawn anew each epoch
    assert picks(2) == chosen[2]  # a pure function of (seed, epoch, row): resume sees the same
    assert not any(picks(0, flip=False))
    plain = resolve_dataset(load_run_config("configs/demo.yaml", [
        f"output_dir={tmp_path}", "data.profile=custom", "data.majority_ids=2", "data.minority_ids=2",
        "data.majority_images=6", "model.tiny_vae_steps=0", "prepare.backend=serial"]), progress=False)
    with pytest.raises(ValueError, match="prepared without mirrored latents"):
        make_train_loader(plain.root, batch_size=4, rank=0, world_size=1, num_workers=0, random_flip=True)
