"""The cluster job: Ray Train workers with DeepSpeed ZeRO on CPU (gloo, fp32), checkpoints, resume, export.

The Ray jobs share one embedded cluster and one synthetic data set; the first half of the file
checks the pieces (data split, DeepSpeed config, Min-SNR, noise offset, EMA, optimizer state,
exact one-machine resume) without Ray.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

# One thread per process: on a machine whose cores are busy, torch's second OpenMP thread makes the
# tiny UNet ~100x slower (spin-waiting), and the Ray workers run one thread each anyway.
torch.set_num_threads(1)

from pogdiff.config import ConfigError, GradMode, Method, MethodConfig, load_config
from pogdiff.data.dataset import Dataset, prepare_artifacts, resolve_dataset
from pogdiff.dist.cluster import connect, run_storage
from pogdiff.dist.deepspeed_config import deepspeed_config
from pogdiff.dist.ray_driver import run
from pogdiff.train.metrics import read_history
from pogdiff.method.objectives import Batch, Objective, TextConditioner
from pogdiff.runs import RunFiles, load_run_config
from pogdiff.train.checkpoint import checkpoint_state, load_state_dict, newest_complete, save_state_dict
from pogdiff.train.ema import ShardedEMA, flat_shard
from pogdiff.train.assembly import OneMachine
from pogdiff.train.loop import make_loader, stream_batches, training_inputs


BASE = ["run_name=dist", "model.name=tiny", "train.lr_scheduler=constant", "train.lr_warmup_steps=0", "data.profile=custom", "data.majority_ids=2", "data.minority_ids=3", "data.majority_images=12",
        "density.epochs=30", "train.batch_size=4", "train.lr=1e-3", "train.log_every=1", "prepare.samples_per_shard=10"]


def _overrides(root, *extra):
    return [f"output_dir={root}", f"dist.storage_path={root}/ray", *BASE, *extra]


def _cfg(root, *extra):
    return load_run_config("configs/demo.yaml", _overrides(root, *extra))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def data(root) -> Dataset:
    cfg = _cfg(root)
    ds = resolve_dataset(cfg, progress=False)
    prepare_artifacts(cfg, ds, progress=False)
    return ds


# ------------------------------------------------------------------------------------- without Ray

def test_stream_splits_ranks_evenly_and_resumes_at_its_position(root, data):
    """Every rank gets the same number of batches per epoch (resampled shards), and a stream started
    at micro-batch k yields exactly what the uninterrupted stream yields from k on."""
    cfg = _cfg(root, "train.batch_size=3")
    loaders = [make_loader(cfg, data, r, 2) for r in range(2)]
    n = len(data)
    assert [len(x) for x in loaders] == [-(-n // 6)] * 2
    epochs = [[b["index"] for b in x] for x in loaders]
    assert [len(e) for e in epochs] == [len(loaders[0])] * 2 and all(len(b) == 3 for e in epochs for b in e)
    assert not torch.equal(torch.cat(epochs[0]), torch.cat(epochs[1]))  # ranks draw their own samples
    full = stream_batches(make_loader(cfg, data, 1, 2), 0, torch.device("cpu"), torch.float32)
    seq = [next(full) for _ in range(2 * len(loaders[0]) + 3)]  # across an epoch boundary
    k = len(loaders[0]) + 1
    resumed = stream_batches(make_loader(cfg, data, 1, 2), k, torch.device("cpu"), torch.float32)
    for want in seq[k:]:
        got = next(resumed)
        assert torch.equal(got.index, want.index) and torch.equal(got.latents, want.latents) and got.keys == want.keys


def test_deepspeed_config(tmp_path):
    cfg = load_config(None, ["train.batch_size=3", "train.grad_accum=2", "dist.zero_stage=3"])
    ds = deepspeed_config(cfg, world_size=4, use_gpu=False)
    assert ds["train_batch_size"] == 3 * 2 * 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is False
    assert deepspeed_config(cfg, 4, use_gpu=True)["bf16"]["enabled"] is True
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}}))
    merged = deepspeed_config(load_config(None, [f"dist.deepspeed_json={extra}"]), 2, False)
    assert merged["zero_optimization"] == {**deepspeed_config(load_config(None), 2, False)["zero_optimization"],
                                           "reduce_bucket_size": 1000}
    extra.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    with pytest.raises(ConfigError, match="ZeRO-Offload"):
        deepspeed_config(load_config(None, [f"dist.deepspeed_json={extra}"]), 2, False)


HF_STYLE = {  # what HF Trainer / accelerate users write: "auto" everywhere the run config decides
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "zero_optimization": {"stage": "auto", "reduce_bucket_size": "auto", "allgather_bucket_size": 2e8},
}


def test_deepspeed_json_auto_values_take_the_run_configs(tmp_path):
    path = tmp_path / "hf.json"
    path.write_text(json.dumps(HF_STYLE))
    overrides = ["train.batch_size=3", "train.grad_accum=2", f"dist.deepspeed_json={path}"]
    for use_gpu in (False, True):
        got = deepspeed_config(load_config(None, overrides), 4, use_gpu)
        plain = deepspeed_config(load_config(None, overrides[:2]), 4, use_gpu)
        assert got == {**plain, "zero_optimization": {**plain["zero_optimization"], "allgather_bucket_size": 2e8}}
        assert "auto" not in json.dumps(got) and "optimizer" not in got and "fp16" not in got


@pytest.mark.parametrize("extra,names", [
    ({"train_micro_batch_size_per_gpu": 16}, ["train_micro_batch_size_per_gpu=16", "train.batch_size"]),
    ({"gradient_accumulation_steps": 4}, ["gradient_accumulation_steps=4", "train.grad_accum"]),
    ({"train_batch_size": 100}, ["train_batch_size=100"]),
    ({"bf16": {"enabled": True}}, ["bf16.enabled=True", "train.mixed_precision"]),  # a CPU job runs fp32
    ({"fp16": {"enabled": True}}, ["fp16.enabled=true"]),
    ({"zero_optimization": {"stage": 3}}, ["zero_optimization.stage=3", "dist.zero_stage"]),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.5}}}, ["optimizer.params.lr=0.5"]),
    ({"scheduler": {"type": "WarmupLR"}}, ["train.lr_scheduler"]),
])
def test_deepspeed_json_contradictions_exit_2_at_config_naming_the_keys(tmp_path, capsys, extra, names):
    from pogdiff.cli import main

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(extra))
    assert main(["config", "configs/demo.yaml", f"dist.deepspeed_json={path}"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in names), err


def test_fp16_under_deepspeed_is_refused_and_bf16_needs_gpus():
    with pytest.raises(ConfigError, match="fp16 is not supported by train-dist"):
        deepspeed_config(load_config(None, ["train.mixed_precision=fp16", "dist.use_gpu=true"]), 2, True)
    with pytest.raises(ConfigError, match="needs GPUs"):
        deepspeed_config(load_config(None, ["train.mixed_precision=bf16"]), 2, False)
    assert deepspeed_config(load_config(None, ["train.mixed_precision=no"]), 2, True)["bf16"]["enabled"] is False


def _objective(method=Method.pogdiff, **kw):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    n = 6
    from pogdiff.method.neighbours import NeighbourSampler, NeighbourTable

    table = NeighbourTable(ids=torch.tensor([[(i + 1) % n, (i + 2) % n] for i in range(n)]),
                           sims=torch.full((n, 2), 0.5), different_identity=torch.zeros(n, 2, dtype=torch.bool))
    sampler = NeighbourSampler(table, torch.full((n, 2), 0.7))
    obj = Objective(MethodConfig(name=method, grad_mode=GradMode.full), sched.alphas_cumprod,
                    text=TextConditioner.from_table(torch.randn(n, 5, 8)), sampler=sampler, **kw)
    return obj, sched


def test_min_snr_weights_the_whole_per_sample_loss():
    from diffusers.training_utils import compute_snr

    gamma = 5.0
    plain, sched = _objective()
    weighted, _ = _objective(snr_gamma=gamma)
    weighted.text = plain.text
    w = torch.randn(4, 4)

    def unet(x, t, y):  # depends on y, so the pair term is not zero
        return x + y.mean((1, 2)).view(-1, 1, 1, 1) * w

    for seed in range(4):  # one sample per call: the per-sample weight is the loss ratio
        batch = Batch(index=torch.tensor([seed]), latents=torch.randn(1, 4, 4, 4), tokens=torch.tensor([[seed]]))
        a = plain(unet, batch, torch.Generator().manual_seed(seed), with_terms=True)
        b = weighted(unet, batch, torch.Generator().manual_seed(seed))
        assert a.pair_mse.item() > 0
        snr = compute_snr(sched, a.timesteps)  # diffusers' own SNR, the independent reference
        assert b.loss.item() == pytest.approx(a.loss.item() * (snr.clamp(max=gamma) / snr).item(), rel=1e-5)


def test_noise_offset_adds_per_channel_noise():
    obj, _ = _objective(Method.vanilla, noise_offset=1.0)
    zero = lambda x, t, y: torch.zeros_like(x)  # noqa: E731 - the loss is then mean(eps^2)
    batch = Batch(index=torch.arange(6), latents=torch.zeros(6, 4, 16, 16), tokens=torch.arange(6)[:, None])
    losses = [obj(zero, batch, torch.Generator().manual_seed(s)).loss.item() for s in range(20)]
    # E[eps^2] = 1 + offset^2 = 2 (vs 1 without the offset)
    assert sum(losses) / len(losses) == pytest.approx(2.0, rel=0.15)


def test_sharded_ema_matches_diffusers_and_shards_gather():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    names, shapes = ["a", "b"], [p.shape for p in params]
    reference = EMAModel(params, decay=0.9)
    world = 3
    shards = [ShardedEMA(names, shapes, [flat_shard(p.detach(), r, world) for p in params], 0.9) for r in range(world)]
    for _ in range(5):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        reference.step(params)
        for r, ema in enumerate(shards):
            ema.update([flat_shard(p.detach(), r, world) for p in params])

    out = shards[0].gather(_RankGather(shards))
    for name, ref in zip(names, reference.shadow_params):
        torch.testing.assert_close(out[name], ref)
    fresh = ShardedEMA(names, shapes, [flat_shard(p.detach(), 1, world) for p in params], 0.9)
    fresh.load(out, updates=5, rank=1, world=world)
    for a, b in zip(fresh.shadow, shards[1].shadow):
        torch.testing.assert_close(a, b)


class _RankGather:
    """all_gather over simulated ranks: the i-th call gathers parameter i of every rank."""

    def __init__(self, shards):
        self.shards, self.i = shards, 0

    def __call__(self, _shard):
        out = [s.shadow[self.i] for s in self.shards]
        self.i += 1
        return out


@pytest.mark.parametrize("kind", ["adamw", "adamw8bit"])
def test_optimizer_state_roundtrip_without_pickle(tmp_path, kind):
    from pogdiff.config import TrainConfig
    from pogdiff.train.loop import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(128, 64)  # 8192 weights: above bitsandbytes' 4096 minimum for 8-bit state
    opt = build_optimizer(TrainConfig(optimizer=kind), model.parameters())
    for _ in range(2):
        model(torch.randn(4, 128)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    save_state_dict(opt.state_dict(), tmp_path / "opt.safetensors")
    twin = torch.nn.Linear(128, 64)
    twin.load_state_dict(model.state_dict())
    opt2 = build_optimizer(TrainConfig(optimizer=kind), twin.parameters())
    opt2.load_state_dict(load_state_dict(tmp_path / "opt.safetensors"))
    x = torch.randn(4, 128)
    for m, o in ((model, opt), (twin, opt2)):
        m(x).pow(2).mean().backward()
        o.step()
    torch.testing.assert_close(twin.weight, model.weight, rtol=0, atol=0)


def test_one_machine_resume_is_exact(root, data):
    """6 steps straight == 3 steps, a checkpoint, a fresh process state, 3 more (EMA, LR warmup, RNG, data
    position). (The schedule must not depend on train.steps, which differs between the two legs here.)"""
    extra = ["method.name=pogdiff", "train.ema=true", "train.lr_scheduler=constant_with_warmup", "train.lr_warmup_steps=4",
             "train.grad_accum=2", "train.snr_gamma=5", "train.noise_offset=0.05", "train.report_to=none"]
    weights = {}
    for name, stops in (("straight", [6]), ("resumed", [3, 6])):
        for steps in stops:
            cfg = _cfg(root, *extra, "train.steps=%d" % steps, "train.checkpoint_every=3", f"run_name=local-{name}")
            out = RunFiles(cfg).method
            result, weights[name] = OneMachine().train(cfg, data, progress=False)
        assert result.steps == 6
        assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000006"]
    for k in weights["straight"]:
        torch.testing.assert_close(weights["resumed"][k], weights["straight"][k], rtol=0, atol=0)


def test_a_lora_run_trains_the_adapter_alone_resumes_exactly_and_exports_for_load_lora_weights(root, data):
    """train.adapter=lora: the checkpoint holds the adapter and its optimizer state only; 2 + 2 steps
    through a checkpoint == 4 straight; the export loads into the base with load_lora_weights (and
    sample's loader), changes the base's images, and fuse_lora writes the same model as a pipeline."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from pogdiff.eval.sampling import load_pipeline
    from pogdiff.models.adapters import LORA_WEIGHTS
    from pogdiff.models.export import export_model, make_pipeline
    from pogdiff.train.checkpoint import load_unet_weights

    extra = ["method.name=pogdiff", "train.adapter=lora", "train.lora_rank=4", "train.lr=1e-2", "train.grad_accum=2",
             "train.report_to=none"]
    weights = {}
    for name, stops in (("straight", [4]), ("resumed", [2, 4])):
        for steps in stops:
            cfg = _cfg(root, *extra, "train.steps=%d" % steps, "train.checkpoint_every=2", f"run_name=lora-{name}")
            result, weights[name] = OneMachine().train(cfg, data, progress=False)
        assert result.steps == 4
    assert weights["straight"] and all(".lora_A." in k or ".lora_B." in k for k in weights["straight"])
    for k in weights["straight"]:
        torch.testing.assert_close(weights["resumed"][k], weights["straight"][k], rtol=0, atol=0)
    files = RunFiles(cfg)
    ckpt = files.checkpoints / "step_00000004"
    assert load_unet_weights(ckpt).keys() == weights["straight"].keys()
    assert len(load_state_dict(ckpt / "optimizer_rank0.safetensors")["state"]) == len(weights["straight"])

    def images(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(["An image of someone."], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    export_model(cfg.train, data.model_dir, weights["resumed"], files.method)
    assert (files.lora / LORA_WEIGHTS).is_file() and not files.pipeline.exists()
    base_pipe = make_pipeline(data.model_dir, UNet2DConditionModel.from_pretrained(Path(data.model_dir) / "unet"))
    before = images(base_pipe)
    base_pipe.load_lora_weights(files.lora)
    adapted = images(base_pipe)
    assert np.abs(adapted - before).max() > 1e-3
    model, lora = files.trained_model()
    assert (model, lora) == (Path(data.model_dir).resolve(), files.lora)
    np.testing.assert_allclose(images(load_pipeline(model, torch.device("cpu"), lora)), adapted, atol=1e-5)
    export_model(cfg.train, data.model_dir, weights["resumed"], files.method, fuse_lora=True)
    assert files.trained_model() == (files.pipeline, None)
    fused = StableDiffusionPipeline.from_pretrained(files.pipeline, safety_checker=None, feature_extractor=None,
                                                    requires_safety_checker=False)
    np.testing.assert_allclose(images(fused), adapted, atol=1e-4)


# ------------------------------------------------------------------------------------------ on Ray

@pytest.fixture(scope="module")
def cluster(root):
    import ray

    started = connect(num_cpus=4)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def _eval_loss(cfg, ds, weights=None) -> float:
    """Vanilla denoising loss on the whole training set (one exact pass), fixed noise and timesteps."""
    from pogdiff.data.stream import make_train_loader

    inputs = training_inputs(cfg, ds, torch.device("cpu"))
    unet = inputs.unet
    if weights is not None:
        unet.load_state_dict(weights)
    batches = list(make_train_loader(ds.root, len(ds), 0, 1, num_workers=0, resampled=False, shuffle_buffer=1))
    batch = Batch(index=torch.cat([b["index"] for b in batches]), latents=torch.cat([b["latents"] for b in batches]).float(),
                  tokens=torch.cat([b["tokens"] for b in batches]))
    obj = Objective(MethodConfig(name=Method.vanilla), inputs.objective.alphas_cumprod, text=inputs.objective.text)
    fn = lambda x, t, y: unet(x, t, encoder_hidden_states=y).sample  # noqa: E731
    with torch.no_grad():
        return sum(obj(fn, batch, torch.Generator().manual_seed(s)).loss.item() for s in range(4)) / 4


def _checkpoints(cfg) -> list[Path]:
    return sorted(run_storage(cfg).glob("step_*"))


def _final_checkpoint(cfg) -> Path:
    return newest_complete(_checkpoints(cfg))


def _kill_a_worker_after_first_checkpoint(cfg, seen: dict) -> None:
    """A real failure, from outside: SIGKILL one Ray Train worker process once the run has a
    complete checkpoint on storage; records the newest complete step at that moment."""
    import psutil

    deadline = time.time() + 600
    while time.time() < deadline:
        done = newest_complete(_checkpoints(cfg), verify=False) if run_storage(cfg).is_dir() else None
        if done is not None:
            workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
            if workers:
                seen["step_at_kill"] = checkpoint_state(done)["step"]
                workers[-1].kill()
                seen["killed"] = workers[-1].pid
                return
        time.sleep(0.05)


KILLED = ["dist.zero_stage=2", "train.seed=0", "train.steps=24", "train.checkpoint_every=4", "dist.max_failures=1",
          "train.ema=true"]
ZERO3 = ["dist.zero_stage=3", "train.seed=1", "train.steps=9", "train.checkpoint_every=3", "train.ema=true",
         "model.gradient_checkpointing=true", "train.validate_every=9", "train.validation_ddim_steps=3",
         "dist.deepspeed_json=configs/deepspeed/hf_auto.json"]  # an HF-style JSON of "auto" values


@pytest.fixture(scope="module")
def zero2_run(root, data, cluster):
    """ZeRO-2; one worker process is SIGKILLed after the first checkpoint; Ray restarts the group."""
    import threading

    cfg = _cfg(root, *KILLED)
    seen: dict = {}
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(cfg, seen), daemon=True)
    killer.start()
    result = run(cfg, progress=False)
    killer.join(5)
    return cfg, result, seen


@pytest.fixture(scope="module")
def uninterrupted_run(root, data, cluster):
    """The same job as zero2_run, never interrupted, under another run name."""
    cfg = _cfg(root, *KILLED, "run_name=dist-straight")
    return cfg, run(cfg, progress=False)


@pytest.fixture(scope="module")
def zero3_run(root, data, cluster):
    """ZeRO-3 through the `ray job submit` entrypoint; the driver is killed after the first
    checkpoint, then started again with the same run name."""
    cfg = _cfg(root, *ZERO3)
    cmd = [sys.executable, "-m", "pogdiff.dist.ray_driver", "configs/demo.yaml", *_overrides(root, *ZERO3)]
    env = {**os.environ, "RAY_ADDRESS": cluster}
    with open(Path(root) / "driver1.log", "w") as log:
        first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while not (run_storage(cfg).is_dir() and newest_complete(_checkpoints(cfg), verify=False)):
            assert first.poll() is None, (Path(root) / "driver1.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)  # the driver goes away mid-run
        first.wait()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = [line for line in second.stdout.splitlines() if line.startswith('{"run"')]  # Ray forwards worker logs too
    return cfg, json.loads(summary[-1])


def _ranks(cfg):
    return [json.loads((RunFiles(cfg).method / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("job", ["zero2_run", "zero3_run"])
def test_loss_falls_and_ranks_agree(job, request, data):
    cfg = request.getfixturevalue(job)[0]
    ranks = _ranks(cfg)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["module_sha256"] == ranks[1]["module_sha256"]
    from safetensors.torch import load_file

    final = load_file(str(_final_checkpoint(cfg) / "unet.safetensors"))
    before, after = _eval_loss(cfg, data), _eval_loss(cfg, data, final)
    assert after < 0.8 * before, (before, after)


def test_worker_killed_resumes_from_newest_checkpoint_at_its_data_position(zero2_run, uninterrupted_run):
    """A worker SIGKILLed mid-run: the group restarts from the newest complete checkpoint on storage
    (never an older one, registered by Ray or not) and, from there, sees the same samples, noise
    and weights as a run that was never interrupted: every step's logged loss is the same."""
    cfg, result, seen = zero2_run
    assert "killed" in seen, "no worker was killed: the run ended before its first checkpoint"
    assert result.steps == 24 and [h["step"] for h in result.history] == list(range(1, 25))
    starts = {r["start_step"] for r in _ranks(cfg)}
    assert len(starts) == 1 and starts.pop() >= seen["step_at_kill"] > 0, (_ranks(cfg), seen)
    assert checkpoint_state(_final_checkpoint(cfg))["step"] == 24
    straight_cfg, straight = uninterrupted_run
    assert [h["step"] for h in straight.history] == list(range(1, 25))
    for a, b in zip(result.history, straight.history):
        for key in ("loss", "target_mse", "pair_mse"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a, b)
    assert _ranks(cfg)[0]["module_sha256"] == _ranks(straight_cfg)[0]["module_sha256"]
    assert len(_checkpoints(cfg)) == cfg.train.checkpoint_keep


def test_restart_with_same_name_continues(zero3_run):
    cfg, summary = zero3_run
    ranks = _ranks(cfg)
    assert summary["steps"] == 9
    assert all(r["start_step"] in (3, 6) and r["steps"] == 9 for r in ranks), ranks  # not from step 0
    history = read_history(RunFiles(cfg).method / "metrics.jsonl")
    assert [h["step"] for h in history] == list(range(1, 10))


def test_tensorboard_and_validation_grid(zero3_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _ = zero3_run
    files = RunFiles(cfg)
    events = EventAccumulator(str(files.method / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "target_mse", "pair_mse", "psi/head", "psi/tail", "lr"} <= tags, tags
    assert "validation" in events.Tags()["images"]
    from PIL import Image

    grid = Image.open(files.method / "samples" / "step_00000009.png")
    assert grid.size == (2 * 32, 2 * 32)  # 2 prompts (head, tail) x 2 images of 32 px


def test_exported_pipeline_loads_and_samples(zero3_run):
    import numpy as np
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    cfg, _ = zero3_run
    files = RunFiles(cfg)
    ema = load_file(str(_final_checkpoint(cfg) / "ema.safetensors"))
    unet = UNet2DConditionModel.from_pretrained(files.unet)
    for name, p in unet.named_parameters():
        torch.testing.assert_close(p.detach(), ema[name])  # the export is the EMA
    pipe = StableDiffusionPipeline.from_pretrained(files.pipeline, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    image = pipe("An image of someone.", num_inference_steps=4, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    arr = np.asarray(image)
    assert arr.shape == (32, 32, 3) and arr.std() > 0


def test_bad_deepspeed_json_exits_2(root, capsys):
    from pogdiff.cli import main

    assert main(["train-dist", "configs/demo.yaml", f"output_dir={root}", "dist.deepspeed_json=/nonexistent.json"]) == 2
    assert "dist.deepspeed_json" in capsys.readouterr().err


@pytest.mark.slow
def test_a_lora_run_under_zero3_trains_the_adapter_alone_and_a_rerun_continues(root, data, cluster):
    """train.adapter=lora on 2 ZeRO-3 workers: only the adapter reaches the optimizer and the
    checkpoints, the ranks agree, a rerun with more steps continues from the checkpoint, and the
    export is diffusers LoRA weights on the dataset's base model."""
    from pogdiff.models.adapters import LORA_WEIGHTS
    from pogdiff.train.checkpoint import load_unet_weights

    lora = ["dist.zero_stage=3", "method.name=pogdiff", "method.grad_mode=stop", "train.adapter=lora",
            "train.lr=1e-2", "train.checkpoint_every=3", "run_name=dist-lora"]
    first = run(_cfg(root, *lora, "train.steps=3"), progress=False)
    assert first.steps == 3
    cfg = _cfg(root, *lora, "train.steps=6")
    result = run(cfg, progress=False)
    ranks = _ranks(cfg)
    assert result.steps == 6 and [r["start_step"] for r in ranks] == [3, 3]
    assert ranks[0]["module_sha256"] == ranks[1]["module_sha256"]
    final = _final_checkpoint(cfg)
    weights = load_unet_weights(final)
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert max(w.abs().max().item() for k, w in weights.items() if ".lora_B." in k) > 0  # B starts at zero
    for r in range(2):
        state = load_state_dict(final / f"optimizer_rank{r}.safetensors")
        shard = sum(s["exp_avg"].numel() for s in state["state"].values())
        assert 0 < shard < sum(w.numel() for w in weights.values())  # ZeRO-3: a part of the adapter, not the UNet
    files = RunFiles(cfg)
    assert (files.lora / LORA_WEIGHTS).is_file() and files.trained_model() == (Path(data.model_dir).resolve(), files.lora)
