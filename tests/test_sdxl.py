"""SDXL through the model family seam: a tiny SDXL directory, saved here by StableDiffusionXLPipeline,
prepares a manifest of wide images, trains with every method, full and LoRA, exports, loads in
StableDiffusionXLPipeline and samples; the UNet gets each latent's time ids as prepare recorded them
from its crop (or its mirror's)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import own_data
from pogdiff.runs import RunFiles, load_run_config

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model.tiny_vae_steps=0", "density.epochs=5", "train.batch_size=4", "train.log_every=1",
        "train.checkpoint_every=2", "data.minority_images=2", "data.heldout_images=2", "train.steps=2",
        "data.identity_column=person", "data.center_crop=false", "data.random_flip=true"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """``model/`` (tiny SDXL) and ``mydata/`` (a JSONL manifest of 40-high images 40 to 56 wide)."""
    from diffusers import StableDiffusionXLPipeline

    from pogdiff.models.components import build_tiny_sdxl

    root = tmp_path_factory.mktemp("sdxl")
    c = build_tiny_sdxl(0)
    StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
                              tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet,
                              scheduler=c.ddim_scheduler()).save_pretrained(root / "model")
    source = own_data.write(root / "mydata", "jsonl", own_data.counts(n_ids=4, head=2, head_images=8))
    for i, row in enumerate(map(json.loads, source.read_text().splitlines())):
        path = source.parent / row["image"]
        with Image.open(path) as im:
            wide = im.resize((40 + 8 * (i % 3), 40))
        wide.save(path)
    return root


def cfg_for(root: Path, *extra):
    return load_run_config(str(ROOT / "configs/demo.yaml"), [
        f"output_dir={root / 'runs'}", f"model.name={root / 'model'}", f"data.source={root / 'mydata/manifest.jsonl'}",
        "run_name=xl", *FAST, *extra])


def test_the_unet_gets_each_latents_time_ids_from_its_crop_and_y_prime_shares_them(root):
    from pogdiff.data.dataset import resolve_dataset
    from pogdiff.data.stream import make_train_loader
    from pogdiff.train.loop import LocalEngine, stream_batches, training_inputs

    cfg = cfg_for(root, "method.name=pogdiff")
    ds = resolve_dataset(cfg, progress=False)
    inputs = training_inputs(cfg, ds, torch.device("cpu"))
    loader = make_train_loader(ds.root, batch_size=4, rank=0, world_size=1, num_workers=0, seed=3, random_flip=True)
    batch = next(stream_batches(loader, 0, torch.device("cpu"), torch.float32))
    assert batch.time_ids is not None and batch.time_ids.shape == (4, 6)
    for height, width, top, left, target_h, target_w in batch.time_ids.tolist():
        assert height == 40 and width in (40, 48, 56) and top == 0 and (target_h, target_w) == (32, 32)
        assert 0 <= left <= round(width * 32 / 40) - 32  # inside the image resized to 32 high

    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(root / "model" / "unet")
    seen = []
    unet.add_time_proj.register_forward_hook(lambda module, args, out: seen.append(args[0].view(-1, 6).clone()))
    engine = LocalEngine(unet, cfg.train)
    out = inputs.objective(engine, batch, torch.Generator().manual_seed(0))
    assert out.partner is not None  # y' was drawn, and the call was on [y; y']
    assert torch.equal(seen[-1], torch.cat([batch.time_ids, batch.time_ids]))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("adapter", ["none", "lora"])
@pytest.mark.parametrize("method", ["vanilla", "cbdm", "t2h", "pogdiff"])
def test_every_method_trains_an_sdxl_unet_full_and_lora(root, method, adapter):
    from pogdiff.train.assembly import run_train

    cfg = cfg_for(root, f"method.name={method}", f"train.adapter={adapter}")
    result = run_train(cfg, progress=False)
    assert result.steps == 2 and all(np.isfinite(result.losses))
    files = RunFiles(cfg)
    assert (files.lora if adapter == "lora" else files.pipeline).is_dir()


def test_sdxl_exports_load_in_the_xl_pipeline_and_sample(root):
    from diffusers import StableDiffusionXLPipeline

    from pogdiff.eval.sampling import generate, load_pipeline
    from pogdiff.train.assembly import run_train

    full, lora = (cfg_for(root, "method.name=pogdiff", f"train.adapter={a}") for a in ("none", "lora"))
    for cfg in (full, lora):
        if not RunFiles(cfg).export_marker():
            run_train(cfg, progress=False)
    pipe = StableDiffusionXLPipeline.from_pretrained(RunFiles(full).pipeline)
    assert json.loads((RunFiles(full).pipeline / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionXLPipeline"
    images = generate(load_pipeline(RunFiles(full).pipeline, torch.device("cpu")), {0: "a badge of orla quin"}, 1,
                      steps=2, guidance_scale=3.0, seed=0, batch_size=1)
    assert images[0].shape == (1, 32, 32, 3)

    base = StableDiffusionXLPipeline.from_pretrained(root / "model")
    base.set_progress_bar_config(disable=True)
    prompt = dict(prompt="a badge of orla quin", num_inference_steps=2, output_type="np")
    before = base(**prompt, generator=torch.Generator().manual_seed(0)).images
    base.load_lora_weights(str(RunFiles(lora).lora))
    after = base(**prompt, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(after - before).max() > 0  # the adapter changes the base's output
    via_loader = load_pipeline(root / "model", torch.device("cpu"), lora=RunFiles(lora).lora)
    assert type(via_loader).__name__ == "StableDiffusionXLPipeline"
    assert pipe.unet.config.addition_embed_type == "text_time"
