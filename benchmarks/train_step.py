"""Train-step throughput of Vanilla, PoGDiff (grad_mode stop / full) and CBDM (issue 9). Prints JSON.

    python benchmarks/train_step.py                                   # SD v1.5 UNet, 512 px, bf16, CUDA
    python benchmarks/train_step.py --config tiny --device cpu --threads 1   # ratios only

One UNet and one AdamW serve every method (step time does not depend on the weights' values);
the methods are interleaved over repetitions, in a rotating order, so drift cancels, and each
method's step time is also a ratio to Vanilla's in the same repetition (median and spread).
A step is the whole training step: Objective (noise, t, y' draw, UNet on [y; y'] or the split
no_grad y' forward, fused loss), backward, grad clipping, AdamW, zero_grad.

FLOPs: FlopCounterMode on one eager step per method (forward + backward, the y' forward included;
the optimizer's elementwise work is not counted). MFU = FLOPs / step time / peak dense bf16 FLOP/s.
Theory: vanilla = F + Bw, stop (split) = 2F + Bw, full and CBDM = 2(F + Bw); with Bw ~ 2F that is
4/3 and 2 times vanilla. On CPU (tiny config) only ratios are reported: no absolute claims.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pogdiff.config import GradMode, Method, MethodConfig, ModelConfig
from pogdiff.method.neighbours import NeighbourSampler, NeighbourTable
from pogdiff.method.objectives import Batch, Objective, TextConditioner, to_device

# Stable Diffusion v1.5 (runwayml/stable-diffusion-v1-5) unet/config.json, the values that differ
# from diffusers' defaults written out; random init, nothing downloaded.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_UNET_PARAMS = 859_520_964  # the published SD v1.5 UNet
# For --no-precomputed: the SD v1.5 VAE and CLIP ViT-L/14 text encoder (vae/, text_encoder/ config.json).
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
SD_VAE_SCALE = 0.18215

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, by torch device-name substring.
PEAK_BF16_TFLOPS = {
    "H100 80GB HBM3": 989.4,  # H100 SXM5
    "H100 PCIe": 756.0,
    "H200": 989.4,
    "GH200": 989.4,
    "A100": 312.0,
}

METHODS = {
    "vanilla": dict(name=Method.vanilla),
    "pogdiff_stop": dict(name=Method.pogdiff, grad_mode=GradMode.stop, stop_split_forward=True),
    "pogdiff_full": dict(name=Method.pogdiff, grad_mode=GradMode.full),
    "cbdm": dict(name=Method.cbdm),
    # stop with one concatenated call (e' detached): the split forward's alternative, ~2x
    "pogdiff_stop_concat": dict(name=Method.pogdiff, grad_mode=GradMode.stop, stop_split_forward=False),
}
TARGETS = {  # issue 9, one H100, sd15
    "pogdiff_stop_ratio_max": 1.40, "pogdiff_full_ratio_max": 2.05, "mfu_min": 0.40, "pogdiff_stop_images_per_s_min": 60.0,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_off = argparse.BooleanOptionalAction
    p.add_argument("--config", choices=("sd15", "tiny"), default=None, help="default: sd15 on CUDA, tiny on CPU")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--methods", default="vanilla,pogdiff_stop,pogdiff_full,cbdm", help=f"from {','.join(METHODS)}")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: 16 sd15, 8 tiny)")
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method per repetition")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method first (compile, autotune)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="bf16 = fp32 weights + bf16 autocast (default on CUDA)")
    p.add_argument("--attention", choices=("sdpa", "xformers"), default="sdpa")
    p.add_argument("--channels-last", action=on_off, default=False)
    p.add_argument("--compile", action=on_off, default=False, help="torch.compile the UNet (dynamic=False)")
    p.add_argument("--loss-backend", choices=("auto", "torch", "triton"), default="auto")
    p.add_argument("--precomputed", action=on_off, default=True,
                   help="precomputed latents and text embeddings; off: VAE + text encoder run in every step")
    p.add_argument("--overlap-data", action=on_off, default=True,
                   help="next batch gathered into pinned memory and copied non_blocking a step ahead; "
                        "off: gather + blocking copy at the start of the step")
    p.add_argument("--host-sync", action=on_off, default=False, help="loss.item() every step (per-step logging)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s (default: from the GPU name)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--dataset-size", type=int, default=256, help="samples in the host feature store")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter", choices=("none", "lora"), default="none",
                   help="lora: the UNet frozen, peft LoRA adapters as train.adapter=lora (rank 4, attention projections)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here (atomically)")
    args = p.parse_args(argv)
    args.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                               "cpu" if args.device == "auto" else args.device)
    args.config = args.config or ("sd15" if args.device.type == "cuda" else "tiny")
    args.batch_size = args.batch_size or (16 if args.config == "sd15" else 8)
    args.dtype = args.dtype or ("bf16" if args.device.type == "cuda" else "fp32")
    args.methods = args.methods.split(",")
    if unknown := [m for m in args.methods if m not in METHODS]:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if "vanilla" not in args.methods:
        p.error("--methods must include vanilla (every ratio is to it)")
    return args


def machine(device: torch.device) -> dict:
    import diffusers
    import triton

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    info = {"date": datetime.date.today().isoformat(), "host": platform.node(), "platform": platform.platform(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda}
    try:
        import xformers

        info["xformers"] = xformers.__version__
    except ImportError:
        info["xformers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def peak_tflops(args) -> tuple[float, str]:
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    name = torch.cuda.get_device_name(args.device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops, f"NVIDIA data sheet, dense bf16, matched '{key}' in '{name}'"
    raise SystemExit(f"no known bf16 peak for GPU '{name}': pass --peak-tflops (dense, no sparsity)")


def build_models(args):
    """(unet, encoders or None, latent shape (C, h, w), text shape (L, D)); the UNet in fp32 (master weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(args.seed)
    encoders = None
    if args.config == "sd15":
        with torch.device(args.device):  # no 3.4 GB CPU init
            unet = UNet2DConditionModel(**SD15_UNET)
        params = sum(p.numel() for p in unet.parameters())
        if abs(params - SD15_UNET_PARAMS) > 0.001 * SD15_UNET_PARAMS:
            raise SystemExit(f"SD15_UNET gives {params} parameters, expected ~{SD15_UNET_PARAMS}")
        if not args.precomputed:
            encoders = (AutoencoderKL(**SD15_VAE), CLIPTextModel(CLIPTextConfig(**SD15_TEXT)), SD_VAE_SCALE)
    else:
        from pogdiff.models.components import build_tiny

        parts = build_tiny(args.seed)
        unet = parts.unet
        if not args.precomputed:
            encoders = (parts.vae, parts.text_encoder, parts.vae_scale)
    if getattr(args, "adapter", "none") != "none":
        from pogdiff.config import TrainConfig
        from pogdiff.models.adapters import apply_adapter

        apply_adapter(unet, TrainConfig(adapter=args.adapter))
    unet.to(args.device).train()
    latent = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if encoders is not None:
        vae, text_encoder, scale = encoders
        enc_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32  # frozen: inference dtype
        for m in (vae, text_encoder):
            m.requires_grad_(False).eval().to(args.device, enc_dtype)
        encoders = (vae, text_encoder, scale)
        text = (text_encoder.config.max_position_embeddings, text_encoder.config.hidden_size)
    else:
        from pogdiff.models.components import TINY_MAX_TOKENS

        text = (77 if args.config == "sd15" else TINY_MAX_TOKENS, unet.config.cross_attention_dim)
    return unet, encoders, latent, text


class HostStore:
    """The dataset in host memory, as training reads it: per step a gather by index, then the copy."""

    def __init__(self, args, latent: tuple, text: tuple, encoders):
        g = torch.Generator().manual_seed(args.seed)
        n = args.dataset_size
        if encoders is None:
            self.fields = {"latents": torch.randn((n, *latent), generator=g).half()}
            self.text = torch.randn((n, *text), generator=g).half()  # y and y' states, looked up by row
        else:
            down = 2 ** (len(encoders[0].config.block_out_channels) - 1)
            vocab = encoders[1].config.vocab_size
            self.fields = {"images": torch.randint(0, 256, (n, 3, latent[1] * down, latent[2] * down), generator=g,
                                                   dtype=torch.uint8),
                           "tokens": torch.randint(0, vocab, (n, text[0]), generator=g)}
        self.indices = shuffled_batches(n, args.batch_size, args.seed)
        self.device, self.overlap = args.device, args.overlap_data
        self.pending = self._fetch() if self.overlap else None

    def _fetch(self) -> tuple[torch.Tensor, dict]:
        index = next(self.indices)
        move = (lambda x: to_device(x, self.device)) if self.overlap else (lambda x: x.to(self.device))
        return index, {k: move(v[index]) for k, v in self.fields.items()}

    def next(self) -> tuple[torch.Tensor, dict]:
        if not self.overlap:
            return self._fetch()
        current, self.pending = self.pending, self._fetch()  # the copy of the next batch is in flight now
        return current


def shuffled_batches(n: int, batch_size: int, seed: int):
    """Endless batches of row indices, a fresh seeded permutation per epoch."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(n // batch_size):
            yield perm[i * batch_size:(i + 1) * batch_size]


def neighbour_sampler(n: int, k: int, seed: int) -> NeighbourSampler:
    """A fixed table: sample i's neighbours are i+1..i+k (mod n), random sims and psi."""
    g = torch.Generator().manual_seed(seed)
    ids = (torch.arange(n)[:, None] + torch.arange(1, k + 1)[None, :]) % n
    table = NeighbourTable(ids, 0.2 + 0.8 * torch.rand((n, k), generator=g), torch.zeros((n, k), dtype=torch.bool))
    return NeighbourSampler(table, torch.rand((n, k), generator=g))


class Bench:
    def __init__(self, args):
        from diffusers import DDPMScheduler

        self.args = args
        self.unet, self.encoders, latent, text = build_models(args)
        self.store = HostStore(args, latent, text, self.encoders)
        n = args.dataset_size
        g = torch.Generator().manual_seed(args.seed + 1)
        alphas = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                               beta_end=0.012).alphas_cumprod
        sampler = neighbour_sampler(n, 10, args.seed)
        if self.encoders is None:  # precomputed y and y' states (N, L, D)
            conditioner = TextConditioner.from_table(self.store.text, torch.zeros(text, dtype=torch.float16))
        else:  # what training does: caption tokens (y from the batch, y' from the table) through the text encoder
            text_encoder = self.encoders[1]
            tokens = self.store.fields["tokens"]
            conditioner = TextConditioner(lambda ids: text_encoder(ids.to(args.device)).last_hidden_state, tokens,
                                          torch.zeros(tokens.shape[1], dtype=torch.long))
        self.objectives = {
            m: Objective(MethodConfig(**METHODS[m]), alphas, text=conditioner, sampler=sampler, caption_dropout=0.1,
                         backend=args.loss_backend)
            for m in args.methods
        }
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        cuda = args.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5, weight_decay=1e-2, fused=cuda, foreach=None if cuda else True)
        self.generator = torch.Generator().manual_seed(args.seed)
        self.autocast = (torch.autocast(args.device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext())
        self.model = self.unet  # what the step calls; FLOPs are always counted on the eager self.unet

    def apply_levers(self) -> None:
        from pogdiff.train.loop import configure_unet

        configure_unet(self.unet, ModelConfig(attention=self.args.attention), self.args.device)
        if self.args.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if self.args.compile:
            self.model = torch.compile(self.unet, dynamic=False)

    def batch(self) -> Batch:
        index, f = self.store.next()
        if self.encoders is None:
            latents, tokens = f["latents"].float(), index[:, None]
        else:
            vae, _, scale = self.encoders
            with torch.no_grad(), self.autocast:
                images = f["images"].to(vae.dtype) / 127.5 - 1.0
                latents = vae.encode(images).latent_dist.sample().float() * scale
            tokens = f["tokens"]
        if self.args.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        return Batch(index=index, latents=latents, tokens=tokens)

    def unet_fn(self, x, t, cond):
        return self.model(x, t, encoder_hidden_states=cond, return_dict=False)[0]

    def step(self, method: str) -> None:
        batch = self.batch()
        with self.autocast:
            out = self.objectives[method](self.unet_fn, batch, self.generator)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.args.host_sync:
            out.loss.item()

    def count_flops(self, method: str) -> int:
        """Forward + backward FLOPs of one step (eager). On CPU the fused SDPA op has no FLOP formula:
        count attention through the math path (the same matmuls)."""
        model, self.model = self.model, self.unet
        math = sdpa_kernel(SDPBackend.MATH) if self.args.device.type == "cpu" else nullcontext()
        batch = self.batch()
        with FlopCounterMode(display=False) as counter, math:
            with self.autocast:
                out = self.objectives[method](self.unet_fn, batch, self.generator)
            out.loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        self.model = model
        return counter.get_total_flops()

    def host_syncs(self, method: str) -> int | None:
        """Synchronizing CUDA calls in one step (torch.cuda sync debug mode); None off CUDA."""
        if self.args.device.type != "cuda":
            return None
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.step(method)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    def sync(self) -> None:
        if self.args.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, method: str, steps: int) -> float:
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step(method)
        self.sync()
        return (time.perf_counter() - start) / steps

    def peak_memory_gib(self, method: str) -> float | None:
        if self.args.device.type != "cuda":
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        self.step(method)
        self.sync()
        return torch.cuda.max_memory_allocated() / 2**30


def spread(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q25": q[0], "q75": q[2], "min": min(values), "max": max(values)}


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.type == "cuda"
    if cuda:
        peak, source = peak_tflops(args)  # before the run: an unknown GPU fails fast
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    bench = Bench(args)
    methods = args.methods
    flops = {m: bench.count_flops(m) for m in methods}
    bench.apply_levers()
    for m in methods:
        for _ in range(args.warmup):
            bench.step(m)
    syncs = {m: bench.host_syncs(m) for m in methods}
    memory = {m: bench.peak_memory_gib(m) for m in methods}
    times = {m: [] for m in methods}
    for rep in range(args.reps):
        for m in methods[rep % len(methods):] + methods[:rep % len(methods)]:  # rotating order
            times[m].append(bench.timed(m, args.steps))
    ratios = {m: [t / v for t, v in zip(times[m], times["vanilla"])] for m in methods}

    result = {
        "benchmark": "train_step", "machine": machine(args.device),
        "setup": {"config": args.config, "unet_params": sum(p.numel() for p in bench.unet.parameters()),
                  "batch_size": args.batch_size, "dtype": args.dtype, "device": str(args.device),
                  "reps": args.reps, "steps_per_rep": args.steps, "warmup": args.warmup,
                  "optimizer": "AdamW fused" if cuda else "AdamW foreach", "grad_clip": 1.0},
        "levers": {"attention": args.attention, "channels_last": args.channels_last, "compile": args.compile,
                   "loss_backend": args.loss_backend, "precomputed": args.precomputed,
                   "overlap_data": args.overlap_data, "host_sync": args.host_sync},
        "methods": {},
    }
    if cuda:
        result["peak_bf16_dense_tflops"], result["peak_source"] = peak, source
    for m in methods:
        entry = {"step_time_ratio_to_vanilla": spread(ratios[m]),
                 "flops_per_step": flops[m], "flops_ratio_to_vanilla": flops[m] / flops["vanilla"]}
        if cuda:  # absolute figures only from a GPU
            step = statistics.median(times[m])
            entry.update(step_time_s=spread(times[m]), images_per_s=args.batch_size / step,
                         peak_memory_gib=memory[m], achieved_tflops=flops[m] / step / 1e12,
                         mfu=flops[m] / step / (peak * 1e12), host_syncs_per_step=syncs[m])
        result["methods"][m] = entry
    if cuda and args.config == "sd15":
        r = result["methods"]
        checks = {}
        if "pogdiff_stop" in r:
            checks["pogdiff_stop_ratio<=1.40"] = r["pogdiff_stop"]["step_time_ratio_to_vanilla"]["median"] <= TARGETS["pogdiff_stop_ratio_max"]
            checks["pogdiff_stop_images_per_s>=60"] = r["pogdiff_stop"]["images_per_s"] >= TARGETS["pogdiff_stop_images_per_s_min"]
        if "pogdiff_full" in r:
            checks["pogdiff_full_ratio<=2.05"] = r["pogdiff_full"]["step_time_ratio_to_vanilla"]["median"] <= TARGETS["pogdiff_full_ratio_max"]
        checks["mfu>=0.40 (every method)"] = all(e["mfu"] >= TARGETS["mfu_min"] for e in r.values())
        result["targets"] = checks
    return result


def emit(result: dict, out: Path | None) -> dict:
    """Print the JSON, and write it to ``out`` atomically (temp + rename)."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    return emit(run(args), args.out)


if __name__ == "__main__":
    main()
