"""Benchmark the fused two-term loss (issue 3): ``pog_loss`` forward + backward on eps_pred (2B, 4, H, W).

Compares the Triton kernel with the eager PyTorch reference and with torch.compile of it, and judges
the kernel against a copy-bandwidth ceiling measured in the same run. Prints one JSON object.

Bytes model (N = B*C*H*W elements per half, s = bytes per element, inputs and gradient in one dtype):
  forward kernel   reads a, b, target (3 N s), writes the gradient of [a; b] (2 N s)   = 5 N s
  backward         scales that gradient by grad_output in place (reads + writes 2 N s) = 4 N s
5 N s is also the least any fused loss+gradient can move, so ``fwd_bw_fraction`` is the kernel's
own figure and ``step_fraction_of_minimum`` charges the backward scaling pass against it.

    python benchmarks/loss_kernel.py [--quick] [--no-compile]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported

import triton  # noqa: E402

from pogdiff.kernels import TwoTermWeights, pog_loss, two_term_loss_concat  # noqa: E402

SHAPES_64 = [(b, 4, 64, 64) for b in (8, 16, 32, 64, 128, 256)]
SHAPES_128 = [(b, 4, 128, 128) for b in (8, 32, 64, 128, 256)]


def machine() -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def bench_ms(fn, grad_to_none=None) -> float:
    return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write): the ceiling for a streaming kernel."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench_ms(lambda: dst.copy_(src)) * 1e-3)


def peak_extra_bytes(step, pred) -> int:
    pred.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_config(shape, dtype, ceiling, use_compile) -> dict:
    batch = shape[0]
    pred = torch.randn(2 * batch, *shape[1:], device="cuda", dtype=dtype, requires_grad=True)
    noise = torch.randn(shape, device="cuda", dtype=dtype)
    psi = torch.rand(batch, device="cuda") * 3
    weights = TwoTermWeights.pogdiff(psi)

    def step(loss_fn):
        return lambda: loss_fn(pred, noise, psi).backward()

    impls = {
        "triton": lambda p, n, s: pog_loss(p, n, s, backend="triton"),
        "eager": lambda p, n, s: pog_loss(p, n, s, backend="torch"),
    }
    if use_compile:
        torch._dynamo.reset()  # one fresh static-shape compile per configuration
        impls["compile"] = torch.compile(impls["eager"], dynamic=False)

    n, s = noise.numel(), noise.element_size()
    grad_bytes = 2 * n * s
    out = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "grad_buffer_bytes": grad_bytes}
    with torch.no_grad():
        out["max_abs_loss_diff_vs_eager"] = abs(impls["triton"](pred, noise, psi) - impls["eager"](pred, noise, psi)).item()
    for name, fn in impls.items():
        out[f"{name}_ms"] = bench_ms(step(fn), grad_to_none=[pred])
        out[f"{name}_peak_extra_bytes"] = peak_extra_bytes(step(fn), pred)
    fwd_ms = bench_ms(lambda: two_term_loss_concat(pred, noise, weights, backend="triton"))
    out["triton_fwd_ms"] = fwd_ms
    out["fwd_bw_fraction"] = 5 * n * s / (fwd_ms * 1e-3) / ceiling
    out["step_fraction_of_model"] = 9 * n * s / (out["triton_ms"] * 1e-3) / ceiling
    out["step_fraction_of_minimum"] = 5 * n * s / (out["triton_ms"] * 1e-3) / ceiling
    out["speedup_vs_eager"] = out["eager_ms"] / out["triton_ms"]
    if use_compile:
        out["speedup_vs_compile"] = out["compile_ms"] / out["triton_ms"]
    out["triton_peak_extra_over_grad_buffer"] = out["triton_peak_extra_bytes"] / grad_bytes
    return out


def cpu_smoke() -> dict:
    """No GPU: one small configuration through the interpreter and the reference, checked to agree."""
    batch, shape = 2, (4, 16, 16)
    pred = torch.randn(2 * batch, *shape, requires_grad=True)
    noise, psi = torch.randn(batch, *shape), torch.rand(batch) * 3
    result = {}
    for backend in ("triton", "torch"):
        pred.grad = None
        start = time.perf_counter()
        loss = pog_loss(pred, noise, psi, backend=backend)
        loss.backward()
        result[f"{backend}_s"] = time.perf_counter() - start
        result[f"{backend}_loss"] = loss.item()
        result[f"{backend}_grad"] = pred.grad.clone()
    diff = (result.pop("triton_grad") - result.pop("torch_grad")).abs().max().item()
    return {"shape": [batch, *shape], "dtype": "float32", "triton_interpreter": True, "max_abs_grad_diff": diff, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes per dtype")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (one compile per shape)")
    args = parser.parse_args()
    torch.manual_seed(0)
    report = {"benchmark": "loss_kernel", "machine": machine()}
    if not torch.cuda.is_available():
        report["note"] = "GPU figures require CUDA; this is a CPU smoke run (Triton interpreter vs torch reference)"
        report["smoke"] = cpu_smoke()
        print(json.dumps(report, indent=1))
        return
    shapes = [SHAPES_64[0], SHAPES_128[-1]] if args.quick else SHAPES_64 + SHAPES_128
    ceiling = copy_bandwidth()
    report["copy_bandwidth_gb_s"] = ceiling / 1e9
    report["results"] = []
    for dtype in (torch.bfloat16, torch.float32):
        for shape in shapes:
            print(f"loss_kernel: {tuple(shape)} {dtype}", file=sys.stderr, flush=True)
            report["results"].append(run_config(shape, dtype, ceiling, not args.no_compile))
            torch.cuda.empty_cache()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
