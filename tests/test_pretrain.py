"""`pogdiff pretrain` and the committed base (model.name=tiny-base)."""
import json

import pytest
import torch

torch.set_num_threads(1)

from pogdiff.data.synthetic import make_identity
from pogdiff.models.pretrain import BASE_DIR, FINE_TUNING_IDS, base_records
from pogdiff.models.tiny_vae import looks
from pogdiff.runs import load_run_config


def test_base_identities_are_disjoint_from_every_fine_tuning_identity():
    fine = [make_identity(i, 0) for i in range(FINE_TUNING_IDS)]
    records = list(base_records(40, 2, seed=0, size=32))
    names = {r.name for r, _ in records}
    assert len(names) == 40 and [r.identity for r, _ in records] == [i // 2 for i in range(80)]
    assert not names & {f.name for f in fine}
    assert all(len(n.split()) == 2 for n in names)  # the fine-tuning sets' name shape
    fine_looks = {looks(f) for f in fine}
    assert not {looks(make_identity(int(r.key[4:10]), 0 + 7919 * 3)) for r, _ in records} & fine_looks


def test_pretrain_writes_a_diffusers_directory_and_a_go_no_go(tmp_path):
    from diffusers import StableDiffusionPipeline

    from pogdiff.models.components import build_tiny
    from pogdiff.models.pretrain import pretrain

    cfg = load_run_config("configs/pretrain.yaml", [
        f"output_dir={tmp_path}", "pretrain.output=null", "pretrain.ids=6", "pretrain.images_per_id=4",
        "pretrain.steps=150", "pretrain.batch_size=8", "pretrain.warmup_steps=5", "pretrain.eval_ids=3", "sample.steps=3",
        "sample.images_per_id=2", "eval.recognizer_steps=20", "model.tiny_vae_steps=0"])
    summary = pretrain(cfg, progress=False)
    out = tmp_path / "tiny-base"
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    init = build_tiny(0)
    trained, fresh = pipe.text_encoder.state_dict(), init.text_encoder.state_dict()
    embedding = next(k for k in trained if "token_embedding" in k)
    assert not torch.equal(trained[embedding], fresh[embedding])  # the text encoder trained too
    assert summary["last_loss"] < summary["first_loss"]
    written = json.loads((out / "pretrain.json").read_text())
    assert set(written["go_no_go"]) >= {"base", "random_init", "go", "recognizer_heldout_accuracy"}


@pytest.mark.skipif(not (BASE_DIR / "model_index.json").is_file(), reason="the base is committed with the code")
def test_committed_base_is_small_and_denoises_its_identities_far_better_than_random_init():
    from pogdiff.data.encode import encode_latents
    from pogdiff.models.components import build_tiny, load_components, tokenize
    from pogdiff.config import ModelConfig

    assert load_run_config("configs/demo.yaml", ["model.name=tiny-base"]).model.name == str(BASE_DIR)
    size = sum(f.stat().st_size for f in BASE_DIR.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, size
    settings = json.loads((BASE_DIR / "pretrain.json").read_text())["settings"]
    base = load_components(ModelConfig(name=str(BASE_DIR)))
    random_init = build_tiny(settings["model_seed"])
    # held-out renders (image indices past the trained ones) of 8 base identities, prompted by name
    records = [r for r, j in base_records(8, settings["images_per_id"] + 2, settings["data_seed"], 32)
               if j >= settings["images_per_id"]]
    x0 = encode_latents(base, [r.image for r in records], torch.device("cpu")) * base.vae.config.scaling_factor
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.full((len(records),), 400)
    abar = base.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    tokens = tokenize(base, [f"An image of {r.name}." for r in records])
    errors = {}
    with torch.no_grad():
        for name, c in (("base", base), ("random_init", random_init)):
            eps = c.unet(x_t, t, encoder_hidden_states=c.text_encoder(tokens).last_hidden_state).sample
            errors[name] = float((eps - noise).pow(2).mean())
    assert errors["base"] < 0.5 * errors["random_init"], errors
