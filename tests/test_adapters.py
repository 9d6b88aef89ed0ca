"""LoRA adapters (peft) through the objective: the gradient against autograd through the merged
weight, which parameters train, and the strict load of a checkpoint's trainable weights."""
import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch.func import functional_call

from pogdiff.config import GradMode, Method, MethodConfig, TrainConfig
from pogdiff.method.neighbours import NeighbourSampler, NeighbourTable
from pogdiff.method.objectives import Batch, Objective, TextConditioner
from pogdiff.models.adapters import apply_adapter, load_trained, trainable_names
from pogdiff.models.components import tiny_unet_config

N = 5
LORA = TrainConfig(adapter="lora", lora_rank=2, lora_alpha=3.0)


def _objective(grad_mode: GradMode, dtype: torch.dtype = torch.float32) -> Objective:
    g = torch.Generator().manual_seed(2)
    text = torch.randn(N, 3, 32, generator=g, dtype=dtype)
    table = NeighbourTable(torch.tensor([[(i + 1) % N, (i + 3) % N] for i in range(N)]),
                           torch.full((N, 2), 0.5), torch.zeros(N, 2, dtype=torch.bool))
    psi = torch.rand(N, 2, generator=g) + 0.5
    return Objective(MethodConfig(name=Method.pogdiff, grad_mode=grad_mode), torch.linspace(0.99, 0.05, 20),
                     text=TextConditioner.from_table(text), sampler=NeighbourSampler(table, psi), backend="torch")


def _adapted(base: UNet2DConditionModel) -> UNet2DConditionModel:
    unet = copy.deepcopy(base)
    apply_adapter(unet, LORA)
    with torch.no_grad():  # peft starts B at zero, where A's gradient is zero too
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return unet


@pytest.mark.parametrize("grad_mode", [GradMode.full, GradMode.stop])
def test_pogdiff_gradient_wrt_lora_equals_autograd_through_the_merged_weight(grad_mode):
    base = UNet2DConditionModel(**tiny_unet_config()).eval().double()  # float64: the two paths agree to ~1e-12
    unet = _adapted(base)
    obj = _objective(grad_mode, torch.float64)
    idx = torch.tensor([0, 2, 3])
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    batch = Batch(idx, latents, idx[:, None])

    out = obj(lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample, batch, torch.Generator().manual_seed(9))
    lora = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    got = dict(zip(lora, torch.autograd.grad(out.loss, list(lora.values()))))

    # The reference: the plain UNet whose adapted weights are W + (alpha / r) B A, differentiated
    # through that product with respect to leaf copies of A and B.
    scale = LORA.lora_alpha / LORA.lora_rank
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in lora.items()}
    modules = sorted({n.split(".lora_")[0] for n in leaves})
    assert set(modules) == {n for n, _ in base.named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))}

    def merged() -> dict[str, torch.Tensor]:
        weights = {}
        for m in modules:
            w = base.get_submodule(m).weight
            weights[f"{m}.weight"] = w + scale * leaves[f"{m}.lora_B.default.weight"] @ leaves[f"{m}.lora_A.default.weight"]
        return weights

    ref = obj(lambda x, t, c: functional_call(base, merged(), (x, t), {"encoder_hidden_states": c}).sample, batch,
              torch.Generator().manual_seed(9))
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-10, atol=0)
    want = dict(zip(leaves, torch.autograd.grad(ref.loss, list(leaves.values()))))
    assert all(want[n].abs().sum() > 0 for n in want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-7, atol=1e-10, msg=n)


def test_stop_and_full_gradients_differ_on_the_adapter():
    """The grad mode reaches the adapter: e' is detached only in stop mode."""
    base = UNet2DConditionModel(**tiny_unet_config()).eval()
    grads = {}
    for mode in (GradMode.full, GradMode.stop):
        unet = _adapted(base)
        obj = _objective(mode)
        idx = torch.tensor([1, 4])
        out = obj(lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample,
                  Batch(idx, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), idx[:, None]),
                  torch.Generator().manual_seed(4))
        out.loss.backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in unet.parameters() if p.requires_grad])
    assert not torch.allclose(grads[GradMode.full], grads[GradMode.stop])


def test_only_the_adapter_trains_and_a_checkpoint_of_another_setting_is_refused():
    base = UNet2DConditionModel(**tiny_unet_config())
    unet = copy.deepcopy(base)
    apply_adapter(unet, LORA)
    names = trainable_names(unet)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"to_q", "to_k", "to_v", "0"}
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) < 0.1 * sum(p.numel() for p in base.parameters())
    weights = {n: torch.full_like(p, 0.5) for n, p in unet.named_parameters() if p.requires_grad}
    load_trained(unet, weights, "a checkpoint")
    assert all((p == 0.5).all() for _, p in unet.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="another train.adapter"):  # a full fine-tune's weights
        load_trained(unet, dict(base.named_parameters()), "a checkpoint")
    other = copy.deepcopy(base)
    apply_adapter(other, TrainConfig(adapter="lora", lora_target_modules=["to_q"]))
    with pytest.raises(ValueError, match="unexpected"):
        load_trained(other, weights, "a checkpoint")
    with pytest.raises(ValueError, match="matched no module"):
        apply_adapter(copy.deepcopy(base), TrainConfig(adapter="lora", lora_target_modules=["no_such_layer"]))
