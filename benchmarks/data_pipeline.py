"""Data pipeline throughput: precomputed-latent shards vs decoding JPEGs and VAE-encoding on the fly.

    .venv/bin/python benchmarks/data_pipeline.py [--samples 8000] [--jpeg-samples 96] [--out result.json]

Per core = samples per CPU-second of the reading process (time.process_time), so a shared,
loaded machine does not distort it; wall-clock rates are printed beside it. Both paths run in
one process with torch.set_num_threads(1).

* precomputed: pogdiff.stream.ShardStream over shards written by pogdiff.shards (4x64x64 fp16
  latent, 77 int32 tokens, 768-d pooled and image embeddings, JSON meta per sample), shuffle buffer
  1000, batches of 32: tar read + decode + shuffle + collate. For comparison, WebDataset's stock
  reader (tarfile) + .decode() without shuffling or batching; and make_train_loader with 2
  DataLoader workers (wall clock only: on a 2-core machine shared with other jobs it says little).
* on the fly: shards of 512x512 JPEGs (synthetic faces, re-encoded at quality 90), read with the
  same tar reader, decoded by PIL, VAE-encoded to 4x64x64. The VAE is a TINY random-init
  AutoencoderKL with SD's 8x downsampling (4 blocks, 32-64 channels), so this is a generous upper
  bound for the on-the-fly path on CPU: SD's own VAE encoder costs the FLOPs reported under
  "flops" per image. JPEG decoding alone is reported too.
* flops: counted with torch.utils.flop_counter on meta tensors for the SD v1.5 architectures
  (no weights needed): the y' text-encoder forward the streaming design adds per sample, the
  UNet forward / forward+backward per sample at 64x64, the SD VAE encoder per 512x512 image.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pogdiff.data.shards import Sample, ShardWriter, read_tar, write_index, write_task
from pogdiff.data.stream import ShardStream, make_train_loader

TOKENS, DIM = 77, 768


def machine() -> dict:
    import webdataset

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "webdataset": webdataset.__version__,
            "platform": platform.platform(), "load_average": os.getloadavg()}


def rate(n: int, wall: float, cpu: float) -> dict:
    return {"samples": n, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "samples_per_s_wall": round(n / wall, 1), "samples_per_s_per_core": round(n / cpu, 1)}


def timed(fn) -> tuple[int, float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    n = fn()
    return n, time.perf_counter() - w0, time.process_time() - c0


def write_latent_dataset(root: Path, n: int, per_shard: int = 1000) -> Path:
    rng = np.random.default_rng(0)
    (root / "shards").mkdir(parents=True)
    tasks = -(-n // per_shard)
    for t in range(tasks):
        samples = (Sample(f"s{o:08d}", o, o % 100, "lukas brandt", f"Lukas Brandt, a person with a round face, photo {o}.",
                          rng.standard_normal((4, 64, 64)).astype(np.float16), rng.integers(0, 49408, TOKENS),
                          rng.standard_normal(DIM), rng.standard_normal(DIM))
                   for o in range(t * per_shard, min((t + 1) * per_shard, n)))
        write_task(root / "shards", t, samples, per_shard, 1 << 31, skipped=[])
    write_index(root, tasks, n, {"model": "benchmark"})
    return root


def bench_precomputed(root: Path) -> dict:
    urls = [str(root / p["url"]) for p in json.loads((root / "dataset.json").read_text())["shards"]]
    for u in urls:  # warm the page cache: measure decoding, not the disk
        Path(u).read_bytes()
    stream = ShardStream(urls, 32, 0, 1, resampled=False, shuffle_buffer=1000,
                         row_of_ordinal=str(root / "row_of_ordinal.npy"))
    one_core = rate(*timed(lambda: sum(len(b["key"]) for b in stream)))
    import webdataset as wds  # for comparison: the stock reader (tarfile) and decoders, no shuffle/batching

    stock = wds.WebDataset(urls, shardshuffle=False).decode()
    stock_one_core = rate(*timed(lambda: sum(1 for _ in stock)))
    loader = make_train_loader(root, batch_size=32, rank=0, world_size=1, num_workers=2, resampled=False)
    n, wall, _ = timed(lambda: sum(len(b["key"]) for b in loader))
    return {"one_core": one_core, "stock_webdataset_decode_one_core": stock_one_core, "loader_2_workers": {"samples": n, "wall_s": round(wall, 3),
                                                       "samples_per_s_wall": round(n / wall, 1)}}


def tiny_f8_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                         block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4).eval()


def bench_on_the_fly(root: Path, n: int) -> dict:
    from pogdiff.data.encode import images_to_tensor
    from pogdiff.data.synthetic import make_identity, render

    jpegs = []
    for i in range(min(n, 32)):
        image, _ = render(make_identity(i, 0), i, 0, size=512)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    (root / "jpeg").mkdir()
    writer = ShardWriter(root / "jpeg", 0, n, 1 << 31)
    for o in range(n):
        writer.write(f"j{o:08d}", {"jpg": jpegs[o % len(jpegs)], "tokens.npy": b"", "json": b"{}"})
    url = root / "jpeg" / writer.close()[0]["url"]
    url.read_bytes()

    def images():
        with open(url, "rb") as f:
            for m in read_tar(f):
                if m["fname"].endswith(".jpg"):
                    with Image.open(io.BytesIO(m["data"])) as im:
                        yield im.convert("RGB")

    decode_only = rate(*timed(lambda: sum(1 for _ in images())))
    vae = tiny_f8_vae()

    @torch.no_grad()
    def encode() -> int:
        count, batch = 0, []
        for im in images():
            batch.append(im)
            if len(batch) == 8:
                latents = vae.encode(images_to_tensor(batch)).latent_dist.mean.half()
                assert latents.shape[1:] == (4, 64, 64)
                count, batch = count + len(batch), []
        return count

    return {"jpeg_decode_only": decode_only, "jpeg_decode_plus_tiny_vae": rate(*timed(encode)),
            "vae": "tiny random-init AutoencoderKL, 4 down blocks (32, 32, 64, 64), 512x512 -> 4x64x64"}


def flops() -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    def count(fn) -> float:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops() / 1e9

    with torch.device("meta"):  # SD v1.5 architectures (diffusers configs), no weights
        unet = UNet2DConditionModel(
            sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
            attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        x = torch.zeros(1, 4, 64, 64, requires_grad=True)
        t, ids, cond = torch.zeros(1, dtype=torch.long), torch.zeros(1, TOKENS, dtype=torch.long), torch.zeros(1, TOKENS, DIM)
        image = torch.zeros(1, 3, 512, 512)
        tiny_vae = tiny_f8_vae()
    text_fwd = count(lambda: text(ids))
    unet_fwd = count(lambda: unet(x, t, encoder_hidden_states=cond).sample)
    unet_fwd_bwd = count(lambda: unet(x, t, encoder_hidden_states=cond).sample.sum().backward())
    vae_enc = count(lambda: vae.encode(image))
    tiny_vae_enc = count(lambda: tiny_vae.encode(image))
    return {"text_encoder_fwd_gflops_per_caption": round(text_fwd, 2), "unet_fwd_gflops_per_sample": round(unet_fwd, 1),
            "unet_fwd_bwd_gflops_per_sample": round(unet_fwd_bwd, 1), "sd_vae_encode_gflops_per_512px_image": round(vae_enc, 1),
            "tiny_f8_vae_encode_gflops_per_512px_image": round(tiny_vae_enc, 1),
            "y_prime_text_fwd_vs_unet_fwd_bwd": round(text_fwd / unet_fwd_bwd, 4),
            "y_prime_bytes_per_sample_tokens": TOKENS * 4, "y_prime_bytes_per_sample_hidden_states_fp16": TOKENS * DIM * 2,
            "latent_bytes_per_sample_fp16": 4 * 64 * 64 * 2}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8000)
    parser.add_argument("--jpeg-samples", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_latent_dataset(Path(tmp) / "latents", args.samples)
        result["shard_bytes_per_sample"] = round(sum(p.stat().st_size for p in (root / "shards").glob("*.tar")) / args.samples)
        result["precomputed_latents"] = bench_precomputed(root)
        result["on_the_fly"] = bench_on_the_fly(Path(tmp), args.jpeg_samples)
    result["flops"] = flops()
    result["target_precomputed_per_core"] = 5000
    result["target_met"] = result["precomputed_latents"]["one_core"]["samples_per_s_per_core"] >= 5000
    result["machine"]["load_average_end"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
