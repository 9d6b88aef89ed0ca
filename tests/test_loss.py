"""pog_loss / two_term_loss (PyTorch backend) against hand-written formulas and autograd."""
import pytest
import torch

from pogdiff.kernels import TwoTermWeights, pog_loss, two_term_loss


def written_pog(a, b, eps, psi):
    """Eq. 13 as written, per sample mean over elements, mean over samples."""
    t = ((a - eps) ** 2).flatten(1).mean(1)
    p = ((a - b) ** 2).flatten(1).mean(1)
    return (t + psi * p).mean()


def test_hand_computed_value():
    # B=1, two elements: a=[1,2], b=[0,0], eps=[1,0], psi=0.5
    a = torch.tensor([[1.0, 2.0]]); b = torch.tensor([[0.0, 0.0]]); eps = torch.tensor([[1.0, 0.0]])
    pred = torch.cat([a, b])
    # mse(a, eps) = (0 + 4)/2 = 2; mse(a, b) = (1 + 4)/2 = 2.5; 2 + 0.5*2.5 = 3.25
    assert pog_loss(pred, eps, torch.tensor([0.5]), backend="torch").item() == pytest.approx(3.25)


@pytest.mark.parametrize("shape", [(1, 4, 3, 5), (3, 4, 8, 8), (8, 7)])
def test_full_matches_autograd_of_written_formula(shape):
    b_ = shape[0]
    pred = torch.randn(2 * b_, *shape[1:], dtype=torch.float64, requires_grad=True)
    eps = torch.randn(shape, dtype=torch.float64)
    psi = torch.rand(b_, dtype=torch.float64) * 3
    loss = pog_loss(pred, eps, psi, grad_mode="full", backend="torch")
    (g,) = torch.autograd.grad(loss, pred)
    pred2 = pred.detach().clone().requires_grad_(True)
    ref = written_pog(pred2[:b_], pred2[b_:], eps, psi)
    (g_ref,) = torch.autograd.grad(ref, pred2)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-6, atol=1e-9)


def test_stop_zero_grad_into_second_half_and_same_first_half():
    b_ = 3
    pred = torch.randn(2 * b_, 4, 5, 5, requires_grad=True)
    eps, psi = torch.randn(b_, 4, 5, 5), torch.rand(b_) + 0.5
    loss_stop = pog_loss(pred, eps, psi, grad_mode="stop", backend="torch")
    (g,) = torch.autograd.grad(loss_stop, pred)
    assert torch.count_nonzero(g[b_:]) == 0
    # first half: the written formula with e' detached
    p2 = pred.detach().clone().requires_grad_(True)
    ref = written_pog(p2[:b_], p2[b_:].detach(), eps, psi)
    (g_ref,) = torch.autograd.grad(ref, p2)
    torch.testing.assert_close(g[:b_], g_ref[:b_])
    assert loss_stop.item() == pytest.approx(ref.item(), rel=1e-6)


def test_psi_zero_is_vanilla():
    b_ = 2
    pred = torch.randn(2 * b_, 3, 4)
    eps = torch.randn(b_, 3, 4)
    vanilla = ((pred[:b_] - eps) ** 2).mean()
    assert pog_loss(pred, eps, torch.zeros(b_), backend="torch").item() == pytest.approx(vanilla.item(), rel=1e-6)


def test_cbdm_value_and_gradient_split():
    """L = mse(e,eps) + c [mse(e, sg(e')) + 1/4 mse(sg(e), e')], written with detach."""
    b_ = 4
    a = torch.randn(b_, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(b_, 2, 3, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(b_, 2, 3, dtype=torch.float64)
    c = torch.rand(b_, dtype=torch.float64)
    mse = lambda x, y: ((x - y) ** 2).flatten(1).mean(1)  # noqa: E731
    ref = (mse(a, eps) + c * (mse(a, b.detach()) + 0.25 * mse(a.detach(), b))).mean()
    ga_ref, gb_ref = torch.autograd.grad(ref, (a, b))
    out = two_term_loss(a, b, eps, TwoTermWeights.cbdm(c), backend="torch").mean()
    ga, gb = torch.autograd.grad(out, (a, b))
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(ga.double(), ga_ref)
    torch.testing.assert_close(gb.double(), gb_ref)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"eps_pred must be \(2B"):
        pog_loss(torch.randn(3, 4), torch.randn(2, 4), torch.ones(2))
    with pytest.raises(ValueError, match="psi must have shape"):
        pog_loss(torch.randn(4, 4), torch.randn(2, 4), torch.ones(3))
    with pytest.raises(ValueError, match="grad_mode"):
        pog_loss(torch.randn(4, 4), torch.randn(2, 4), torch.ones(2), grad_mode="half")


@pytest.mark.parametrize("grad_mode", ["full", "stop"])
def test_fp64_inputs_are_computed_in_fp64(grad_mode):
    """The reference keeps the input dtype when it is wider than fp32: fp64 agrees with the written
    formula to fp64 precision (fp32 arithmetic was 5.7e-7 off)."""
    torch.manual_seed(3)
    pred = torch.randn(6, 3, 7, 5, dtype=torch.float64) * 10
    eps = torch.randn(3, 3, 7, 5, dtype=torch.float64)
    psi = torch.rand(3, dtype=torch.float64) * 3
    loss = pog_loss(pred, eps, psi, grad_mode=grad_mode, backend="torch")
    assert loss.dtype == torch.float64
    assert abs(loss.item() - written_pog(pred[:3], pred[3:], eps, psi).item()) < 1e-12
