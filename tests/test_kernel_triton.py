"""The fused Triton two-term loss against autograd of the formulas as the methods write them.

Without CUDA the kernel runs in the Triton interpreter: TRITON_INTERPRET=1 is set here before the
kernel module is imported (triton 3.9 reads it when ``@triton.jit`` decorates the kernel). With CUDA
the same grid runs compiled.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from pogdiff.kernels import TwoTermWeights, pog_loss, two_term_loss, two_term_loss_concat  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="bf16/fp16 kernels are checked compiled, on a CUDA GPU")
# (rtol, share of the largest reference gradient used as atol): fp32 keeps ~1e-7; half precision
# rounds the stored gradient twice (forward, then the grad_output scaling).
TOL = {torch.float32: (2e-6, 1e-6), torch.bfloat16: (8e-3, 4e-3), torch.float16: (2e-3, 1e-3)}
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=needs_cuda), pytest.param(torch.float16, marks=needs_cuda)]
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]  # small cases: the interpreter emulates half types
ODD, SD64, SD128 = (3, 5, 7), (4, 64, 64), (4, 128, 128)


def mse(x, y):
    return ((x - y) ** 2).flatten(1).mean(1)


def written(mode, a, b, t, w):
    """Per-sample losses as written in DESIGN §1; detach() is the stop-gradient."""
    if mode == "vanilla":
        return mse(a, t)
    if mode == "full":
        return mse(a, t) + w * mse(a, b)
    if mode == "stop":
        return mse(a, t) + w * mse(a, b.detach())
    if mode == "cbdm":
        return mse(a, t) + w * (mse(a, b.detach()) + 0.25 * mse(a.detach(), b))
    raise ValueError(mode)


def method_weights(mode, w):
    if mode == "vanilla":
        return TwoTermWeights.single(w.shape[0], w)
    if mode == "cbdm":
        return TwoTermWeights.cbdm(w)
    return TwoTermWeights.pogdiff(w, mode)


def make_case(batch, shape, dtype, seed=0):
    """a, b, target in dtype on DEVICE; per-sample weights with psi = 0 and psi = 1000 in them."""
    g = torch.Generator().manual_seed(seed)
    a, b, t = (torch.randn(batch, *shape, generator=g).to(DEVICE, dtype) for _ in range(3))
    w = torch.rand(batch, generator=g) * 3
    if batch >= 3:
        w[0], w[1] = 0.0, 1000.0
    return a, b, t, w.to(DEVICE)


def reference(mode, a, b, t, w, grad_out):
    """Losses and gradients of the written formula in float64 on the same (rounded) inputs."""
    a64, b64 = (x.detach().double().requires_grad_(True) for x in (a, b))
    losses = written(mode, a64, b64, t.double(), w.double())
    (losses * grad_out.double()).sum().backward()
    grad_b = None if mode == "vanilla" else b64.grad
    return losses, a64.grad, grad_b


def assert_grad(got, ref, dtype):
    rtol, share = TOL[dtype]
    if ref is None or not ref.any():
        assert got is None or not got.any()
        return
    assert got is not None and got.dtype == dtype
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=share * ref.abs().max().item())


def assert_losses(got, ref):
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref.detach(), rtol=2e-6, atol=0)


GRID = [(1, ODD), (3, ODD), (8, ODD), (1, SD64), (3, SD64), (8, SD64), (3, SD128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["full", "stop", "cbdm", "vanilla"])
@pytest.mark.parametrize("batch,shape", GRID)
def test_two_term_loss_matches_written_formula(batch, shape, mode, dtype):
    a, b, t, w = make_case(batch, shape, dtype)
    grad_out = torch.linspace(0.5, 3.0, batch, device=DEVICE)  # per-sample weights: grad_output != 1
    a.requires_grad_(True)
    b.requires_grad_(True)
    losses = two_term_loss(a, None if mode == "vanilla" else b, t, method_weights(mode, w), backend="triton")
    (losses * grad_out).sum().backward()
    ref_losses, ref_ga, ref_gb = reference(mode, a, b, t, w, grad_out)
    assert_losses(losses, ref_losses)
    assert_grad(a.grad, ref_ga, dtype)
    assert_grad(b.grad, ref_gb, dtype)
    if mode == "stop":
        assert b.grad is None or not b.grad.any()  # grad_b weights all zero: an exactly zero gradient


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_mode", ["full", "stop"])
@pytest.mark.parametrize("batch,shape", GRID + [(8, SD128)])
def test_pog_loss_on_concatenated_batch(batch, shape, grad_mode, dtype):
    a, b, t, psi = make_case(batch, shape, dtype, seed=1)
    eps_pred = torch.cat([a, b]).requires_grad_(True)
    loss = 3 * pog_loss(eps_pred, t, psi, grad_mode=grad_mode, backend="triton")
    loss.backward()
    grad_out = torch.full((batch,), 3.0 / batch, device=DEVICE)
    ref_losses, ref_ga, ref_gb = reference(grad_mode, a, b, t, psi, grad_out)
    torch.testing.assert_close(loss.double(), 3 * ref_losses.detach().mean(), rtol=2e-6, atol=0)
    assert_grad(eps_pred.grad[:batch], ref_ga, dtype)
    assert_grad(eps_pred.grad[batch:], ref_gb, dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_cbdm_through_concat_path(dtype):
    a, b, t, c = make_case(3, ODD, dtype, seed=2)
    pred = torch.cat([a, b]).requires_grad_(True)
    grad_out = torch.tensor([2.0, -1.0, 0.25], device=DEVICE)
    (two_term_loss_concat(pred, t, TwoTermWeights.cbdm(c), backend="triton") * grad_out).sum().backward()
    _, ref_ga, ref_gb = reference("cbdm", a, b, t, c, grad_out)
    assert_grad(pred.grad[:3], ref_ga, dtype)
    assert_grad(pred.grad[3:], ref_gb, dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_b_under_no_grad_and_non_contiguous_inputs(dtype):
    batch = 3
    a = torch.randn(batch, 9, 11, 4).to(DEVICE, dtype).permute(0, 3, 1, 2).requires_grad_(True)  # (B, 4, 9, 11)
    t = torch.randn(batch, 4, 11, 9).to(DEVICE, dtype).transpose(2, 3)
    with torch.no_grad():
        b = a * 0.5 + 1.0  # keeps a's permuted strides
    psi = torch.tensor([0.5, 2.0, 0.0], device=DEVICE)
    assert not a.is_contiguous() and not t.is_contiguous()
    losses = two_term_loss(a, b, t, TwoTermWeights.pogdiff(psi), backend="triton")
    losses.sum().backward()
    ref_losses, ref_ga, _ = reference("full", a, b, t, psi, torch.ones(batch, device=DEVICE))
    assert_losses(losses, ref_losses)
    assert a.grad.shape == a.shape
    assert_grad(a.grad, ref_ga, dtype)


def test_non_contiguous_concatenated_batch():
    a, b, t, psi = make_case(3, ODD, torch.float32, seed=3)
    pred = torch.cat([a, b]).transpose(2, 3).contiguous().transpose(2, 3).requires_grad_(True)
    assert not pred.is_contiguous()
    pog_loss(pred, t, psi, backend="triton").backward()
    _, ref_ga, ref_gb = reference("full", a, b, t, psi, torch.full((3,), 1 / 3, device=DEVICE))
    assert_grad(pred.grad[:3], ref_ga, torch.float32)
    assert_grad(pred.grad[3:], ref_gb, torch.float32)


def test_losses_without_gradients_and_zero_psi_full_mode():
    a, b, t, _ = make_case(3, SD64, torch.float32, seed=4)
    psi = torch.zeros(3, device=DEVICE)
    with torch.no_grad():
        plain = two_term_loss(a, b, t, TwoTermWeights.pogdiff(psi), backend="triton")
    torch.testing.assert_close(plain.double(), mse(a.double(), t.double()), rtol=2e-6, atol=0)
    a.requires_grad_(True)
    b.requires_grad_(True)
    two_term_loss(a, b, t, TwoTermWeights.pogdiff(psi), backend="triton").sum().backward()
    assert b.grad is None or not b.grad.any()  # psi = 0 in full mode: an exactly zero gradient for b
    assert_grad(a.grad, 2 * (a - t).double().detach() / a[0].numel(), torch.float32)


def test_second_backward_is_a_clear_error():
    a, b, t, psi = make_case(2, ODD, torch.float32)
    a.requires_grad_(True)
    loss = two_term_loss(a, b, t, TwoTermWeights.pogdiff(psi), backend="triton").sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bad_inputs_are_clear_errors():
    a, b, t, psi = make_case(2, ODD, torch.float32)
    with pytest.raises(TypeError, match="float64"):
        two_term_loss(a.double(), b, t, TwoTermWeights.pogdiff(psi), backend="triton")
    with pytest.raises(ValueError, match="weights as constants"):
        two_term_loss(a, b, t, TwoTermWeights.pogdiff(psi.requires_grad_(True)), backend="triton")


def test_cpu_without_interpreter_asks_for_it():
    code = (
        "import torch; from pogdiff.kernels import TwoTermWeights, two_term_loss\n"
        "x = torch.randn(2, 3)\n"
        "two_term_loss(x, x, x, TwoTermWeights.pogdiff(torch.ones(2)), backend='triton')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "TRITON_INTERPRET=1" in proc.stderr and "backend='torch'" in proc.stderr


@pytest.mark.skipif(
    not CUDA or torch.cuda.get_device_properties(0).total_memory < 60 * 2**30,
    reason="needs a CUDA GPU with >= 60 GiB for 3 x 2**30 bf16 elements per input",
)
def test_offsets_past_int32_on_gpu():
    batch, n = 3, 2**30 + 3  # sample 2 starts at element 2**31 + 6
    a = torch.randn(batch, n, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    b, t = torch.randn_like(a), torch.randn_like(a)
    psi = torch.tensor([0.0, 1.0, 2.0], device="cuda")
    losses = two_term_loss(a, b, t, TwoTermWeights.pogdiff(psi, "stop"), backend="triton")
    losses.sum().backward()
    a2, b2, t2 = a[2].float(), b[2].float(), t[2].float()
    torch.testing.assert_close(losses[2], mse(a2[None], t2[None])[0] + 2.0 * mse(a2[None], b2[None])[0], rtol=1e-4, atol=0)
    tail = slice(n - 1000, n)
    ref = (2.0 / n) * ((a2[tail] - t2[tail]) + 2.0 * (a2[tail] - b2[tail]))
    torch.testing.assert_close(a.grad[2, tail].float(), ref, rtol=1.6e-2, atol=1e-2 * ref.abs().max().item())



COMPILE_FOR_H100 = """
import json
from triton import compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pogdiff.kernels.triton_two_term import _two_term_fwd_kernel as kernel

result = {}
for dtype in ("fp32", "bf16", "fp16"):
    pointers = {"a_ptr": dtype, "b_ptr": dtype, "target_ptr": dtype, "grad_a_ptr": dtype, "grad_b_ptr": dtype}
    signature = {name: "*" + pointers.get(name, "fp32") for name in kernel.arg_names[:10]}
    signature.update(n_per_sample="i32", chunks_per_sample="i32", grad_scale="fp32")
    constexprs = {"HAS_B": True, "WRITE_GRAD_A": True, "WRITE_GRAD_B": True, "BLOCK": 4096}
    signature.update({name: "constexpr" for name in constexprs})
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(11)}  # 16-byte pointers, N % 16 == 0
    out = compile(ASTSource(kernel, signature, constexprs, aligned), target=GPUTarget("cuda", 90, 32),
                  options={"num_warps": 8})
    result[dtype] = {"cubin_bytes": len(out.asm["cubin"]), "v4_loads": out.asm["ptx"].count(".v4.b32")}
print(json.dumps(result))
"""


def test_kernel_compiles_for_h100():
    """CI has no GPU: compile to sm_90 cubins with Triton's bundled ptxas, in a process without the
    interpreter; with aligned inputs the loads and stores stay 128-bit despite the int64 offsets."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    for dtype in ("fp32", "bf16", "fp16"):
        assert result[dtype]["cubin_bytes"] > 0
        assert result[dtype]["v4_loads"] > 0, result
