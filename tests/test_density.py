import math

import torch

from pogdiff.config import DensityConfig
from pogdiff.method.density import TextDensity, fit_text_density


def _imbalanced(n_major=60, n_minor=4, dim=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    major = torch.randn(1, dim, generator=g) * 2 + 0.1 * torch.randn(n_major, dim, generator=g)
    minor = torch.randn(n_minor, dim, generator=g) * 2
    return torch.cat([major, minor]), n_major


def test_minority_captions_weighted_above_majority(tmp_path):
    y, n_major = _imbalanced()
    d = fit_text_density(y, DensityConfig(epochs=150, latent_dim=4, hidden_dim=64))
    log_inv = d.log_psi_inv(y)
    assert torch.isfinite(log_inv).all()
    assert log_inv[n_major:].min() > log_inv[:n_major].max()
    # normalisation: the training median of log psi_inv is ~0 (a3 = 1)
    assert abs(float(log_inv.median())) < 1e-4
    # a3 divides psi_inv (Eq. 11)
    torch.testing.assert_close(d.log_psi_inv(y, a3=4.0), log_inv - math.log(4.0))
    # round trip
    d.save(tmp_path / "d.safetensors")
    d2 = TextDensity.load(tmp_path / "d.safetensors")
    torch.testing.assert_close(d2.log_psi_inv(y), log_inv)


def test_psi_inv_finite_for_extreme_inputs_and_768d():
    y = torch.randn(40, 768)
    d = fit_text_density(y, DensityConfig(epochs=5, latent_dim=4, hidden_dim=32))
    far = torch.cat([y[:2] * 1e4, torch.full((1, 768), 1e6)])
    psi = d.log_psi_inv(far).exp()
    assert torch.isfinite(psi).all() and (psi > 0).all()
    # temperature 1 is Eq. 11 up to a constant: differences of log psi are differences of nll
    d.temperature, d.log_clip = 1.0, float("inf")
    nll = d.nll(y[:5])
    torch.testing.assert_close(d.log_psi_inv(y[:5]) - d.log_psi_inv(y[:5])[0], nll - nll[0])


def test_nan_embedding_is_clear_error():
    y = torch.randn(10, 8)
    y[3, 0] = float("nan")
    try:
        fit_text_density(y, DensityConfig(epochs=1))
    except ValueError as e:
        assert "rows [3]" in str(e)
    else:
        raise AssertionError("NaN embedding accepted")
