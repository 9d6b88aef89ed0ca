import numpy as np
import pytest
import torch

from pogdiff.method.neighbours import NeighbourSampler, NeighbourTable, exact_knn, neighbour_weights, psi_img, psi_table


def test_eq8_weights_hand_computed():
    sims = torch.tensor([[0.6, 0.3, 0.1], [0.5, -0.2, 0.5], [-0.1, -0.3, 0.0]])
    ids = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3]])
    w = neighbour_weights(sims, ids)
    torch.testing.assert_close(w[0], torch.tensor([0.6, 0.3, 0.1]))
    torch.testing.assert_close(w[1], torch.tensor([0.5, 0.0, 0.5]))  # negative clamps to 0
    torch.testing.assert_close(w[2], torch.zeros(3))  # no mass -> psi 0 later
    # missing neighbours (-1) never get weight
    w2 = neighbour_weights(torch.tensor([[0.5, 0.5]]), torch.tensor([[3, -1]]))
    torch.testing.assert_close(w2, torch.tensor([[1.0, 0.0]]))


def test_eq9_psi_img_paper_example_and_no_nan():
    s = torch.tensor([0.4, 0.4, -0.5, 0.0])
    diff = torch.tensor([False, True, True, False])
    out = psi_img(s, diff, a1=1.0, a2=1.0)
    # paper: s=0.4, a1=a2=1: same person 0.4^1, different 0.4^2
    torch.testing.assert_close(out[:2], torch.tensor([0.4, 0.16]))
    assert out[2] == 0 and not torch.isnan(out).any()
    # fractional exponent with a negative base would be NaN without the clamp
    assert not torch.isnan(psi_img(torch.tensor([-0.3]), torch.tensor([True]), 0.5, 0.25)).any()


def test_eq12_psi_combines_img_and_inv_with_ablations():
    table = NeighbourTable(torch.tensor([[1, 2], [0, -1], [0, 1]]), torch.tensor([[0.5, 0.25], [0.8, 0.0], [-0.2, -0.1]]),
                           torch.tensor([[False, True], [False, False], [True, True]]))
    log_inv = torch.log(torch.tensor([2.0, 0.5, 3.0]))
    psi = psi_table(table, log_inv, a1=1.0, a2=1.0)
    torch.testing.assert_close(psi[0], torch.tensor([0.5 * 2, 0.25 ** 2 * 2]))
    torch.testing.assert_close(psi[1], torch.tensor([0.8 * 0.5, 0.0]))  # missing neighbour -> 0
    torch.testing.assert_close(psi[2], torch.zeros(2))  # all sims <= 0 -> psi 0
    no_inv = psi_table(table, None, 1.0, 1.0)
    torch.testing.assert_close(no_inv[0], torch.tensor([0.5, 0.0625]))
    no_img = psi_table(table, log_inv, 1.0, 1.0, use_psi_img=False)
    torch.testing.assert_close(no_img[0], torch.tensor([2.0, 2.0]))


def test_exact_knn_matches_numpy_and_excludes_self():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 7)).astype(np.float32)
    ids = torch.arange(50) % 5
    t = exact_knn(torch.from_numpy(z), 4, ids)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    s = zn @ zn.T
    np.fill_diagonal(s, -np.inf)
    ref = np.argsort(-s, axis=1)[:, :4]
    assert (t.ids.numpy() == ref).all()
    np.testing.assert_allclose(t.sims.numpy(), np.take_along_axis(s, ref, 1), rtol=1e-5)
    assert (t.different_identity.numpy() == (ids.numpy()[ref] != ids.numpy()[:, None])).all()


def test_exact_knn_small_set_pads_and_nan_is_error():
    t = exact_knn(torch.randn(3, 4), k=5)
    assert (t.ids[:, 2:] == -1).all() and (t.ids[:, :2] >= 0).all()
    bad = torch.randn(4, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        exact_knn(bad, 2)


def test_sampler_follows_categorical_weights():
    table = NeighbourTable(torch.tensor([[1, 2, 3]]), torch.tensor([[0.6, 0.3, 0.1]]), torch.zeros(1, 3, dtype=torch.bool))
    psi = torch.tensor([[10.0, 20.0, 30.0]])
    sampler = NeighbourSampler(table, psi)
    g = torch.Generator().manual_seed(0)
    draws = [sampler.sample(torch.zeros(1000, dtype=torch.long), g) for _ in range(20)]
    nid = torch.cat([d[0] for d in draws])
    freq = torch.bincount(nid, minlength=4)[1:].float() / nid.numel()
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.01, rtol=0)
    ps = torch.cat([d[1] for d in draws])
    assert set(ps.unique().tolist()) == {10.0, 20.0, 30.0}
    assert ((nid == 1) == (ps == 10.0)).all()  # psi belongs to the drawn neighbour


def test_sampler_sample_without_usable_neighbour_gets_psi_zero():
    table = NeighbourTable(torch.tensor([[-1, -1], [0, -1]]), torch.tensor([[0.0, 0.0], [-0.5, 0.0]]),
                           torch.zeros(2, 2, dtype=torch.bool))
    sampler = NeighbourSampler(table, torch.ones(2, 2))
    nid, psi = sampler.sample(torch.tensor([0, 1]))
    assert nid.tolist() == [0, 1] and psi.tolist() == [0.0, 0.0]


def test_psi_summary_head_mass_and_own_identity_share_by_hand():
    from pogdiff.method.neighbours import NeighbourTable, summarize_psi

    # 4 samples, k = 2: rows 0-1 head, rows 2-3 tail; row 3 has one missing neighbour
    ids = torch.tensor([[1, 2], [0, 3], [3, 0], [2, -1]])
    sims = torch.tensor([[0.9, 0.5], [0.9, 0.2], [0.6, 0.2], [0.8, 0.0]])
    different = torch.tensor([[False, True], [False, True], [False, True], [False, False]])
    psi = np.array([[0.1, 0.3], [0.2, 0.0], [2.0, 1.0], [4.0, 0.0]], dtype=np.float32)
    is_minority = np.array([False, False, True, True])
    table = NeighbourTable(ids, sims, different)
    for rows in (1, 3, 1 << 16):  # chunking changes nothing
        out = summarize_psi(psi, is_minority, table, rows=rows)
        assert out["head_mass_share"] == pytest.approx(0.6 / 7.6)
        assert out["tail_over_head"] == pytest.approx(((3.0 / 2 + 4.0 / 2) / 2) / ((0.4 / 2 + 0.2 / 2) / 2))
        # E_w[psi] of a drawn partner (w = s / sum s) and the share from the own identity
        w = sims / sims.sum(1, keepdim=True)
        drawn = (w.double() * torch.from_numpy(psi).double())
        assert out["pair_weight_tail"] == pytest.approx(float(drawn[2:].sum(1).mean()))
        own_tail = float(drawn[2, 0] + drawn[3, 0]) / float(drawn[2:].sum())
        assert out["own_identity_mass_tail"] == pytest.approx(own_tail)
        assert out["own_identity_mass_head"] == pytest.approx(float(drawn[0, 0] + drawn[1, 0]) / float(drawn[:2].sum()))
        share = drawn[:, 0] / drawn.sum(1)  # per sample, then the mean over the part
        assert out["own_identity_share_tail"] == pytest.approx(float(share[2:].mean()))
        assert out["own_identity_share_head"] == pytest.approx(float(share[:2].mean()))
