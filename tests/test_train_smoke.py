"""The one-machine path: synthetic data -> prepare -> neighbours -> density -> streamed training."""
import json

import pytest
import torch

from pogdiff.config import ConfigError

from pogdiff.runs import RunFiles, load_run_config
from pogdiff.train.assembly import run_train


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def _cfg(root, *extra):
    return load_run_config("configs/demo.yaml", [
        f"output_dir={root}", "run_name=smoke", "data.profile=custom", "data.majority_ids=2", "data.minority_ids=3",
        "data.majority_images=12", "train.steps=60", "train.log_every=10", "train.batch_size=8",
        "train.lr=1e-3", "density.epochs=30", "model.name=tiny", "model.tiny_vae_steps=5", *extra,  # learns from random init
    ])


def test_pogdiff_loss_falls(run_root):
    cfg = _cfg(run_root)
    result = run_train(cfg, progress=False)
    assert result.steps == 60
    first, last = result.losses[0], result.losses[-1]
    assert last < 0.7 * first, result.losses
    files = RunFiles(cfg)
    hist = json.loads(files.history.read_text())
    assert hist["method"] == "pogdiff" and hist["psi"]["psi_mean_tail"] > 0
    last = hist["history"][-1]  # the conditioning diagnostics, at every logged step
    for key in ("text/null/head", "text/null/tail", "text/swap/head", "text/swap/tail", "text/name_swap/head",
                "text/name_swap/tail", "pair_share", "partner/same_identity/head", "partner/same_identity/tail"):
        assert last[key] is not None and 0 <= last[key] < float("inf"), (key, last)
    assert 0 < last["pair_share"] < 1 and last["text/null/head"] > 0
    assert (files.unet / "config.json").is_file()


def test_resume_continues_from_checkpoint(run_root):
    cfg = _cfg(run_root, "method.name=vanilla", "train.steps=20", "train.checkpoint_every=10", "run_name=resume")
    full = run_train(cfg, progress=False)
    files = RunFiles(cfg)
    assert sorted(p.name for p in files.checkpoints.glob("step_*")) == ["step_00000010", "step_00000020"]
    trainer = json.loads((files.checkpoints / "step_00000020" / "trainer.json").read_text())
    assert trainer["data"]["micro_batches"] == 20  # the stream position travels with the checkpoint
    # a second run with more steps starts at 20, not 0
    cfg2 = _cfg(run_root, "method.name=vanilla", "train.steps=30", "train.checkpoint_every=10", "run_name=resume")
    more = run_train(cfg2, progress=False)
    assert more.steps == 30 and len(more.history) == 1 and more.history[0]["step"] == 30
    assert full.steps == 20


def test_rerun_with_another_training_config_is_refused_unless_asked(run_root):
    from pogdiff.config import ConfigError

    base = ["method.name=vanilla", "train.steps=4", "train.checkpoint_every=2", "run_name=rerun", "train.log_every=1"]
    run_train(_cfg(run_root, *base), progress=False)
    with pytest.raises(ConfigError, match=r"train.lr: 0.001 -> 0.002.*train.resume=never"):
        run_train(_cfg(run_root, *base, "train.lr=2e-3", "train.steps=6"), progress=False)
    files = RunFiles(_cfg(run_root, *base))
    logged = lambda: [h["step"] for h in json.loads(files.history.read_text())["history"]]  # noqa: E731
    forced = run_train(_cfg(run_root, *base, "train.lr=2e-3", "train.steps=6", "train.resume=force"), progress=False)
    assert [h["step"] for h in forced.history] == [5, 6]  # resumed at 4
    assert logged() == [1, 2, 3, 4, 5, 6]  # history.json keeps what the first invocation logged
    again = run_train(_cfg(run_root, *base, "train.lr=2e-3", "train.steps=6", "train.resume=force"), progress=False)
    assert again.history == [] and logged() == [1, 2, 3, 4, 5, 6]  # nothing left to train: it was emptied here
    fresh = run_train(_cfg(run_root, *base, "train.lr=3e-3", "train.resume=never"), progress=False)
    assert [h["step"] for h in fresh.history] == [1, 2, 3, 4] and logged() == [1, 2, 3, 4]  # from step 0
    [archived] = (files.method / "archive").iterdir()  # the earlier run's logs, archived, not deleted
    assert [h["step"] for h in json.loads((archived / "history.json").read_text())["history"]] == [1, 2, 3, 4, 5, 6]
    assert len((archived / "metrics.jsonl").read_text().splitlines()) == 6
    longer = run_train(_cfg(run_root, *base, "train.lr=3e-3", "train.steps=8"), progress=False)  # only steps changed
    assert [h["step"] for h in longer.history] == [5, 6, 7, 8] and logged() == list(range(1, 9))


def test_force_resume_trains_at_the_new_optimizer_settings_and_warns_once(run_root, caplog):
    """train.resume=force with a new lr, schedule, warm-up, weight decay and beta1: the restored
    optimizer and schedule take them (the checkpoint's lr used to go on, silently), and one warning
    names each changed key, old -> new, and what now applies."""
    import logging

    from pogdiff.train.checkpoint import load_state_dict

    base = ["method.name=vanilla", "train.steps=4", "train.checkpoint_every=2", "run_name=force-lr", "train.log_every=1"]
    run_train(_cfg(run_root, *base), progress=False)  # lr 1e-3, constant_with_warmup over 25 steps
    new = ["train.lr=2e-3", "train.lr_scheduler=linear", "train.lr_warmup_steps=2", "train.weight_decay=0.05",
           "train.adam_beta1=0.8", "train.steps=6", "train.resume=force"]
    with caplog.at_level(logging.INFO):
        forced = run_train(_cfg(run_root, *base, *new), progress=False)
    # linear: warm-up to step 2, then down to 0 at step 6; the restored step is 4
    assert [(h["step"], h["lr"]) for h in forced.history] == [(5, pytest.approx(2e-3 / 4)), (6, 0.0)]
    state = load_state_dict(RunFiles(_cfg(run_root, *base)).checkpoints / "step_00000006" / "optimizer_rank0.safetensors")
    [group] = state["param_groups"]
    assert (group["initial_lr"], group["weight_decay"], list(group["betas"])) == (2e-3, 0.05, [0.8, 0.999])
    notes = [r for r in caplog.records if "train.resume=force" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.WARNING and notes[0].name.startswith("pogdiff")
    note = notes[0].getMessage()
    for changed in ("train.lr: 0.001 -> 0.002", "train.lr_scheduler: 'constant_with_warmup' -> 'linear'",
                    "train.lr_warmup_steps: 25 -> 2", "train.weight_decay: 0.01 -> 0.05", "train.adam_beta1: 0.9 -> 0.8",
                    "train.lr=0.002 on the linear schedule with 2 warm-up steps"):
        assert changed in note, note
    with pytest.raises(ConfigError, match=r"cannot change train.optimizer \('adamw' -> 'adamw8bit'\)"):
        run_train(_cfg(run_root, *base, *new, "train.optimizer=adamw8bit"), progress=False)


def test_a_v_prediction_model_trains_on_v_and_exports_as_v(run_root, tmp_path):
    """An SD 2.x-style model directory whose scheduler says v_prediction: training reads the type from
    it (the objective's target is the velocity), and the exported pipeline says v_prediction."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from pogdiff.data.dataset import resolve_dataset
    from pogdiff.models.components import build_tiny, save_components
    from pogdiff.train.loop import training_inputs

    model = tmp_path / "sd-v"
    components = build_tiny(0)
    components.noise_scheduler = DDPMScheduler.from_config(components.noise_scheduler.config, prediction_type="v_prediction")
    save_components(components, model)
    base = [f"model.name={model}", "method.name=vanilla", "train.steps=2", "train.log_every=1", "run_name=vpred"]
    cfg = _cfg(run_root, *base)
    inputs = training_inputs(cfg, resolve_dataset(cfg, progress=False), torch.device("cpu"))
    assert inputs.objective.prediction_type == "v_prediction"
    v = run_train(cfg, progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(str(RunFiles(cfg).pipeline), safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    eps_cfg = _cfg(run_root, *base, "train.prediction_type=epsilon", "run_name=vpred-as-eps")
    eps = run_train(eps_cfg, progress=False)
    assert eps.losses[0] != pytest.approx(v.losses[0], rel=1e-3)  # same data, noise and weights: another target
    assert json.loads((RunFiles(eps_cfg).pipeline / "scheduler" / "scheduler_config.json").read_text())[
        "prediction_type"] == "epsilon"
