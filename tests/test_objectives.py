"""Baselines and PoGDiff through Objective, against formulas written out independently."""
import pytest
import torch

from pogdiff.config import GradMode, Method, MethodConfig
from pogdiff.method.neighbours import NeighbourSampler, NeighbourTable
from pogdiff.method.objectives import Batch, Objective, TextConditioner

N, C, H = 6, 2, 3
ABAR = torch.linspace(0.99, 0.05, 10)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, C, H, H, generator=g), torch.randn(N, 5, 4, generator=g)


class LinearUNet(torch.nn.Module):
    """Tiny differentiable stand-in whose output depends on x, t and the conditioning."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7))
        self.v = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x, t, cond):
        return self.w * x + self.v * cond.mean((1, 2)).view(-1, 1, 1, 1) + 0.01 * t.view(-1, 1, 1, 1)


def _objective(method, **kw):
    lat, text = _data()
    table = NeighbourTable(torch.tensor([[(i + 1) % N, (i + 2) % N] for i in range(N)]),
                           torch.full((N, 2), 0.5), torch.zeros(N, 2, dtype=torch.bool))
    psi = torch.arange(N * 2, dtype=torch.float32).view(N, 2) / 10
    cfg = MethodConfig(name=method, **kw)
    obj = Objective(cfg, ABAR, text=TextConditioner.from_table(text), sampler=NeighbourSampler(table, psi),
                    log_density=torch.arange(N, dtype=torch.float32), backend="torch")
    return obj, lat, text, psi


def _replay(seed, bsz):
    """The objective's random draws in order: noise, t."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((bsz, C, H, H), generator=g)
    t = torch.randint(0, len(ABAR), (bsz,), generator=g)
    return g, noise, t


def test_vanilla_is_plain_mse():
    obj, lat, text, _ = _objective(Method.vanilla)
    unet = LinearUNet()
    idx = torch.tensor([0, 3, 5])
    out = obj(unet, Batch(idx, lat[idx], idx[:, None]), torch.Generator().manual_seed(7))
    _, noise, t = _replay(7, 3)
    abar = ABAR[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * lat[idx] + (1 - abar).sqrt() * noise
    ref = ((unet(x_t, t, text[idx]) - noise) ** 2).mean()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("grad_mode,split", [(GradMode.full, False), (GradMode.stop, True), (GradMode.stop, False)])
def test_pogdiff_loss_and_gradients(grad_mode, split):
    obj, lat, text, psi_tab = _objective(Method.pogdiff, grad_mode=grad_mode, stop_split_forward=split)
    idx = torch.tensor([1, 2, 4])
    unet = LinearUNet()
    out = obj(unet, Batch(idx, lat[idx], idx[:, None]), torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out.loss, list(unet.parameters()))
    # replay: noise, t, then the neighbour slot draw
    g, noise, t = _replay(3, 3)
    slot = torch.multinomial(torch.full((3, 2), 0.5), 1, generator=g).squeeze(1)
    nid = torch.tensor([[(i + 1) % N, (i + 2) % N] for i in range(N)])[idx, slot]
    psi = psi_tab[idx, slot]
    abar = ABAR[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * lat[idx] + (1 - abar).sqrt() * noise
    unet2 = LinearUNet()
    e = unet2(x_t, t, text[idx])
    e2 = unet2(x_t, t, text[nid])
    if grad_mode == GradMode.stop:
        e2 = e2.detach()
    ref = (((e - noise) ** 2).flatten(1).mean(1) + psi * ((e - e2) ** 2).flatten(1).mean(1)).mean()
    ref_grads = torch.autograd.grad(ref, list(unet2.parameters()))
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_cbdm_draws_uniformly_and_weights_by_t():
    obj, lat, text, _ = _objective(Method.cbdm, cbdm_tau=2.0)
    idx = torch.arange(4)
    unet = LinearUNet()
    out = obj(unet, Batch(idx, lat[idx], idx[:, None]), torch.Generator().manual_seed(11))
    g, noise, t = _replay(11, 4)
    nid = torch.randint(0, N, (4,), generator=g)
    c = 2.0 * t.float() / len(ABAR)
    abar = ABAR[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * lat[idx] + (1 - abar).sqrt() * noise
    e, e2 = unet(x_t, t, text[idx]), unet(x_t, t, text[nid])
    mse = lambda x, y: ((x - y) ** 2).flatten(1).mean(1)  # noqa: E731
    ref = (mse(e, noise) + c * (mse(e, e2.detach()) + 0.25 * mse(e.detach(), e2))).mean()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_t2h_transfers_only_towards_higher_density():
    obj, lat, text, _ = _objective(Method.t2h)
    # make every x0 identical but one: transfers are likely, and their targets are checkable
    idx = torch.arange(N)
    g = torch.Generator().manual_seed(5)
    _, noise, t = _replay(5, N)
    abar = ABAR[t]
    x_t = abar.sqrt().view(-1, 1, 1, 1) * lat + (1 - abar).sqrt().view(-1, 1, 1, 1) * noise
    g.manual_seed(5); torch.randn((N, C, H, H), generator=g); torch.randint(0, len(ABAR), (N,), generator=g)
    target = obj.t2h_target(lat, x_t, noise, abar, idx, g)
    changed = ~torch.isclose(target, noise).flatten(1).all(1)
    for i in changed.nonzero().flatten().tolist():
        # the new target must equal (x_t - sqrt(abar) x0_j)/sqrt(1-abar) for some j with density >= density(i)
        cands = [j for j in range(N) if j > i]  # log_density = arange: higher index = higher density
        ok = any(torch.allclose(target[i], (x_t[i] - abar[i].sqrt() * lat[j]) / (1 - abar[i]).sqrt(), atol=1e-5) for j in cands)
        assert ok, f"sample {i} transferred to a lower-density sample"
    # the highest-density sample can never transfer
    assert not changed[N - 1]


def test_t2h_transfer_probabilities_at_small_noise_pick_nearest():
    obj, lat, text, _ = _objective(Method.t2h)
    abar = torch.full((N,), 0.9999)
    noise = torch.zeros(N, C, H, H)
    x_t = abar.sqrt().view(-1, 1, 1, 1) * lat
    target = obj.t2h_target(lat, x_t, noise, abar, torch.arange(N), torch.Generator().manual_seed(0))
    # sigma_t -> 0: the softmax concentrates on j = i itself, so nothing transfers
    torch.testing.assert_close(target, noise)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_target_follows_the_prediction_type(prediction_type):
    """The regression target is diffusers' own: eps, scheduler.get_velocity(x0, eps, t), or x0."""
    from diffusers import DDPMScheduler

    obj, lat, text, _ = _objective(Method.vanilla)
    obj.prediction_type = prediction_type
    idx = torch.arange(N)
    zero = lambda x, t, y: torch.zeros_like(x)  # noqa: E731 - then target_mse = mean(target^2)
    out = obj(zero, Batch(idx, lat[idx], idx[:, None]), torch.Generator().manual_seed(4), with_terms=True)
    _, noise, t = _replay(4, N)
    sched = DDPMScheduler(num_train_timesteps=len(ABAR))
    sched.alphas_cumprod = ABAR
    want = {"epsilon": noise, "v_prediction": sched.get_velocity(lat[idx], noise, t), "sample": lat[idx]}[prediction_type]
    torch.testing.assert_close(out.target_mse, want.pow(2).flatten(1).mean(1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("prediction_type,denominator", [("epsilon", lambda s: s), ("v_prediction", lambda s: s + 1),
                                                         ("sample", lambda s: torch.ones_like(s))])
def test_min_snr_weighting_per_prediction_type(prediction_type, denominator):
    gamma = 2.0
    plain, lat, _, _ = _objective(Method.pogdiff)
    weighted, _, _, _ = _objective(Method.pogdiff)
    plain.prediction_type = weighted.prediction_type = prediction_type
    weighted.snr_gamma = gamma
    unet = LinearUNet()
    for seed in range(3):
        idx = torch.tensor([seed])
        a = plain(unet, Batch(idx, lat[idx], idx[:, None]), torch.Generator().manual_seed(seed))
        b = weighted(unet, Batch(idx, lat[idx], idx[:, None]), torch.Generator().manual_seed(seed))
        snr = ABAR[a.timesteps] / (1 - ABAR[a.timesteps])
        assert b.loss.item() == pytest.approx(a.loss.item() * (snr.clamp(max=gamma) / denominator(snr)).item(), rel=1e-5)


def test_pogdiff_trains_as_vanilla_until_pair_start():
    """method.pair_start: before it, the very loss (and random stream) of Vanilla; from it, PoGDiff's."""
    idx = torch.tensor([0, 3, 5])
    unet = LinearUNet()
    pog, lat, _, _ = _objective(Method.pogdiff, pair_start=4)
    vanilla, _, _, _ = _objective(Method.vanilla)
    plain, _, _, _ = _objective(Method.pogdiff)
    batch = Batch(idx, lat[idx], idx[:, None])
    run = lambda obj, step: obj(unet, batch, torch.Generator().manual_seed(7), True, step)  # noqa: E731
    early = run(pog, 3)
    assert early.pair_mse is None and early.partner is None
    assert early.loss.item() == run(vanilla, 3).loss.item()
    late = run(pog, 4)
    assert late.partner is not None and late.loss.item() == run(plain, 4).loss.item()
    assert run(pog, None).loss.item() == late.loss.item()  # no step given: the pair term is on
