import math

import numpy as np
import pytest
import torch

from pogdiff.config import DensityConfig
from pogdiff.method.density import (SCORE_BLOCK_ROWS, SHUFFLE_BLOCK_ROWS, TextDensity, column_stats, fit_text_density,
                                    kth_smallest, map_row_ranges, nll_rows, psi_rows, rows_output, uses_cluster)
from pogdiff.method.neighbours import NeighbourTable, psi_table


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
    # Eq. 11's one constant: psi_inv = 1 (a3 = 1) at the anchor quantile (0.99) of the training -ELBO
    n = len(y)
    assert abs(float(log_inv.sort().values[round(0.99 * (n - 1))])) < 1e-4
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
    for form in ("eq11", "temperature"):
        d.form = form
        psi = d.log_psi_inv(far).exp()
        assert torch.isfinite(psi).all() and (psi >= 0).all()
    # the temperature map at T = 1 without its clip is Eq. 11 up to a constant
    d.form, d.temperature, d.log_clip = "temperature", 1.0, float("inf")
    nll = d.nll(y[:5])
    torch.testing.assert_close(d.log_psi_inv(y[:5]) - d.log_psi_inv(y[:5])[0], nll - nll[0])


def test_psi_inv_is_exp_minus_elbo_over_a3_up_to_one_constant():
    """Eq. 11 as printed, psi_inv = exp(-ELBO) / a3, computed directly (float64, 2-d inputs: -ELBO of a
    few nats, no overflow) from the VAE's own ELBO, against the log-space default: the ratio is one
    constant, exp(anchor), over every row and every a3."""
    y, _ = _imbalanced(n_major=40, n_minor=3, dim=2, seed=3)
    cfg = DensityConfig(epochs=30, latent_dim=2, hidden_dim=16, elbo_samples=4)
    d = fit_text_density(y, cfg)
    assert d.form == "eq11"
    ys = (y - d.mean) / d.std
    with torch.no_grad():  # block 0's noise, as nll uses it
        elbo = d.vae.elbo(ys, d.elbo_samples, torch.Generator().manual_seed(d.seed)).double()
    assert elbo.abs().max() < 50  # exp() of it is representable: the direct formula is exact here
    for a3 in (1.0, 4.0, 0.25):
        direct = torch.exp(-elbo) / a3
        ours = d.log_psi_inv(y, a3=a3).double().exp()
        torch.testing.assert_close(ours / direct, torch.full_like(direct, math.exp(-d.anchor_nll)), rtol=1e-4, atol=0)
    # the anchor is the anchor_quantile quantile of the training -ELBO
    k = round(cfg.anchor_quantile * (len(y) - 1))
    assert d.anchor_nll == float((-elbo).float().sort().values[k])


def test_eq11_clips_only_against_overflow_and_counts_it():
    from pogdiff.method.density import MAX_LOG_PSI_INV, psi_inv_stats

    y, n_major = _imbalanced(n_major=30, n_minor=2, dim=4)
    d = fit_text_density(y, DensityConfig(epochs=5, latent_dim=2, hidden_dim=16))
    nll = d.nll(y)
    far = nll.clone()
    far[-1] = d.anchor_nll + MAX_LOG_PSI_INV + 30  # a caption exp(110) times rarer than the anchor
    log_inv = d.log_psi_inv_from_nll(far)
    assert float(log_inv[-1]) == MAX_LOG_PSI_INV and torch.isfinite(log_inv.exp()).all()
    torch.testing.assert_close(log_inv[:-1], far[:-1] - d.anchor_nll)  # nothing else touched: no exponent, no floor
    is_minority = np.arange(len(y)) >= n_major
    stats = psi_inv_stats(d, far.numpy(), is_minority)
    assert stats["psi_inv_clipped_share"] == 1 / len(y) and stats["psi_inv_form"] == "eq11"
    inv = log_inv.double().exp()
    assert math.isclose(stats["psi_inv_head_mass_share"], float(inv[:n_major].sum() / inv.sum()), rel_tol=1e-9)
    assert math.isclose(stats["psi_inv_tail_over_head"], float(inv[n_major:].mean() / inv[:n_major].mean()), rel_tol=1e-9)


def test_nan_embedding_is_clear_error():
    y = torch.randn(10, 8)
    y[3, 0] = float("nan")
    try:
        fit_text_density(y, DensityConfig(epochs=1))
    except ValueError as e:
        assert "rows [3]" in str(e)
    else:
        raise AssertionError("NaN embedding accepted")


def _memmap(path, array):
    np.save(path, array)
    return np.load(path, mmap_mode="r")


def test_chunked_passes_equal_in_memory_numpy(tmp_path):
    rng = np.random.default_rng(0)
    values = np.round(rng.normal(30, 4, 10007), 1).astype(np.float32)  # many duplicates
    values[:3000] = 31.0  # a run of one value larger than a chunk
    column = _memmap(tmp_path / "v.npy", values)
    for k in (0, 1, 2999, 5003, 10006):
        assert kth_smallest(column, k, chunk_rows=100) == float(np.partition(values, k)[k])
    rows = _memmap(tmp_path / "r.npy", rng.normal(5, 3, (1001, 7)).astype(np.float32))
    mean, std = column_stats(rows, "rows", chunk_rows=64)
    np.testing.assert_allclose(mean, np.asarray(rows, np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, np.asarray(rows, np.float64).std(0, ddof=1), rtol=1e-12)


def test_streamed_fit_and_chunked_scoring_on_a_memmap_equal_in_memory(tmp_path):
    # N odd, not a multiple of the scoring block, the shuffle block or the shuffle window
    n = 2 * SCORE_BLOCK_ROWS + 809
    rows = np.random.default_rng(1).normal(0, 1, (n, 6)).astype(np.float32)
    rows[: n // 2] += 3.0
    column = _memmap(tmp_path / "pooled.npy", rows)
    cfg = DensityConfig(epochs=2, latent_dim=2, hidden_dim=16, batch_size=512, elbo_samples=2)
    window = 3 * SHUFFLE_BLOCK_ROWS
    d = fit_text_density(column, cfg, nll_path=tmp_path / "nll.npy", window_rows=window)
    # the same training from an in-memory tensor: the window reads change nothing
    d_mem = fit_text_density(torch.from_numpy(rows), cfg, window_rows=window)
    for p, q in zip(d.vae.parameters(), d_mem.vae.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # reference: the fitted model scoring the whole in-memory tensor in one call
    reference = d.nll(torch.from_numpy(rows))
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "nll.npy")), reference)
    assert d.median_nll == float(reference.median())
    assert math.isclose(d.temperature, float(reference.std()), rel_tol=1e-5)
    # the map in ranges of one block into a memmap, as text_density writes it
    with rows_output(tmp_path / "nll2.npy", (n,), np.float32) as out:
        map_row_ranges(nll_rows, n, out, (d, column), rows_per_task=SCORE_BLOCK_ROWS)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "nll2.npy")), reference)
    assert not list(tmp_path.glob(".*tmp"))


def test_scoring_map_as_ray_tasks_equals_in_process(tmp_path):
    n, k = 2 * SCORE_BLOCK_ROWS + 77, 3
    rng = np.random.default_rng(2)
    column = _memmap(tmp_path / "pooled.npy", rng.normal(0, 1, (n, 5)).astype(np.float32))
    table = tmp_path / "neighbours"
    table.mkdir()
    np.save(table / "ids.npy", np.where(rng.random((n, k)) < 0.1, -1, rng.integers(0, n, (n, k))))
    np.save(table / "sims.npy", rng.uniform(-0.2, 1, (n, k)).astype(np.float32))
    np.save(table / "different_identity.npy", rng.random((n, k)) < 0.5)
    cfg = DensityConfig(epochs=1, latent_dim=2, hidden_dim=8, elbo_samples=2, distributed_min_rows=1)
    d = fit_text_density(column[:SCORE_BLOCK_ROWS], cfg)
    assert uses_cluster(n, cfg, None)  # the tiny threshold: Ray tasks on an embedded cluster, through connect
    results = {}
    for distributed in (False, uses_cluster(n, cfg, None)):
        with rows_output(tmp_path / f"nll-{distributed}.npy", (n,), np.float32) as nll:
            map_row_ranges(nll_rows, n, nll, (d, column), distributed=distributed, device="cpu",
                           rows_per_task=SCORE_BLOCK_ROWS)
        nll = np.load(tmp_path / f"nll-{distributed}.npy", mmap_mode="r")
        with rows_output(tmp_path / f"psi-{distributed}.npy", (n, k), np.float32) as psi:
            map_row_ranges(psi_rows, n, psi, (str(table), 1.0, 2.0, True, d, nll, 1.0), distributed=distributed,
                           rows_per_task=SCORE_BLOCK_ROWS)
        results[distributed] = tuple(np.load(tmp_path / f"{name}-{distributed}.npy") for name in ("nll", "psi"))
    np.testing.assert_array_equal(results[True][0], results[False][0])
    np.testing.assert_array_equal(results[True][1], results[False][1])
    # psi per range is psi_table of the whole table (Eq. 12 unchanged)
    whole = NeighbourTable(*(torch.from_numpy(np.load(table / f"{name}.npy"))
                             for name in ("ids", "sims", "different_identity")))
    expected = psi_table(whole, d.log_psi_inv_from_nll(torch.from_numpy(results[False][0])), 1.0, 2.0)
    np.testing.assert_array_equal(results[True][1], expected.numpy())
    assert (results[True][1][:, 0] > 0).any() and (results[True][1] == 0).any()


@pytest.mark.slow
def test_a_scoring_task_killed_from_outside_is_retried_and_changes_nothing(tmp_path):
    """SIGKILL, from outside, to the Ray worker process running an NLL range: Ray retries the task
    (a system failure) and the scores equal this process's."""
    from faults import always, killing

    n, dim, rows_per_task = 8 * SCORE_BLOCK_ROWS + 5, 384, 2 * SCORE_BLOCK_ROWS
    column = _memmap(tmp_path / "pooled.npy", np.random.default_rng(3).normal(0, 1, (n, dim)).astype(np.float32))
    cfg = DensityConfig(epochs=1, latent_dim=8, hidden_dim=256, elbo_samples=16, distributed_min_rows=1)
    d = fit_text_density(column[:SCORE_BLOCK_ROWS], cfg)
    with rows_output(tmp_path / "here.npy", (n,), np.float32) as out:
        map_row_ranges(nll_rows, n, out, (d, column), device="cpu", rows_per_task=rows_per_task)
    with killing({"ray::nll_rows": always}) as killed:
        with rows_output(tmp_path / "ray.npy", (n,), np.float32) as out:
            map_row_ranges(nll_rows, n, out, (d, column), distributed=True, device="cpu", rows_per_task=rows_per_task)
    assert killed, "no scoring task was killed (did every range finish first?)"
    np.testing.assert_array_equal(np.load(tmp_path / "ray.npy"), np.load(tmp_path / "here.npy"))
