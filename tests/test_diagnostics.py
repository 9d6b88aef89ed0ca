"""The conditioning diagnostics (issue 22) against sums written out independently, and in a run."""
import numpy as np
import pytest
import torch

from pogdiff.config import Method, MethodConfig
from pogdiff.kernels.reference import TwoTermWeights
from pogdiff.method.objectives import Batch, LossOutput, Objective, TextConditioner
from pogdiff.train import diagnostics
from pogdiff.train.metrics import term_stats

N = 6
IDENTITIES = np.array([0, 0, 0, 1, 2, 2])  # rows 4, 5: the tail
TAIL = torch.tensor([False, False, False, False, True, True])


class CaptionShift(torch.nn.Module):
    """eps = 0.5 x + (the caption's mean state) * t / 1000: its caption effect is known in closed form."""

    def forward(self, x, t, cond):
        return 0.5 * x + (cond.mean((1, 2)) * t / 1000).view(-1, 1, 1, 1)


def test_text_sensitivity_is_the_caption_effect_on_head_and_tail():
    g = torch.Generator().manual_seed(0)
    states, null = torch.randn(N, 3, 4, generator=g), torch.randn(3, 4, generator=g)
    obj = Objective(MethodConfig(name=Method.vanilla), torch.linspace(0.99, 0.01, 1000),
                    text=TextConditioner.from_table(states, null), backend="torch")
    idx = torch.tensor([0, 3, 4, 5])
    batch = Batch(idx, torch.randn(4, 2, 3, 3, generator=g), idx[:, None])
    sums = diagnostics.text_sensitivity(CaptionShift(), obj, batch, TAIL, IDENTITIES, seed=1, step=7)
    shift = lambda c: c.mean((-1, -2)) * 500 / 1000  # noqa: E731  t = T/2
    d_null = (shift(states[idx]) - shift(null)) ** 2
    other = idx.roll(1)  # 5, 0, 3, 4
    d_swap = (shift(states[idx]) - shift(states[other])) ** 2
    differs = torch.tensor(IDENTITIES[idx.numpy()] != IDENTITIES[other.numpy()])
    head, tail = ~TAIL[idx], TAIL[idx]
    want = []
    for part in (head, tail):
        want += [d_null[part].sum(), (d_swap * (part & differs)).sum(), part.sum(), (part & differs).sum()]
    torch.testing.assert_close(sums.float(), torch.stack(want).float())
    again = diagnostics.text_sensitivity(CaptionShift(), obj, batch, TAIL, IDENTITIES, seed=1, step=7)
    assert torch.equal(sums, again)  # its own seeded noise: the same step measures the same
    values = diagnostics.entries(torch.zeros(7, dtype=torch.float64), torch.cat([torch.zeros(3, dtype=torch.float64), sums]),
                                 has_pair=False)
    assert values["text/null/tail"] == pytest.approx(float(d_null[tail].mean()))
    assert "pair_share" not in values


def test_partner_identity_shares_and_the_pair_terms_share():
    idx = torch.tensor([0, 1, 4, 5])
    partner = torch.tensor([2, 3, 5, 0])  # same id, other, same (tail), other (tail)
    weights = TwoTermWeights.pogdiff(torch.tensor([1.0, 0.5, 2.0, 0.0]))
    out = LossOutput(torch.tensor(0.0), torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 0.5, 1.0, 9.0]),
                     weights, torch.zeros(4), None, partner)
    outs = [(Batch(idx, torch.zeros(4, 1), idx[:, None]), out)]
    s = diagnostics.pair_sums(outs, TAIL, IDENTITIES)
    pair = 1.0 * 0.5 + 0.5 * 0.5 + 2.0 * 1.0 + 0.0 * 9.0
    assert s.tolist() == pytest.approx([pair, 1, 1])
    term = term_stats(outs, TAIL)
    assert term[1] == 10.0 and term[4] == 2 and term[6] == 2  # the target term, and the head and tail draws
    values = diagnostics.entries(term, torch.cat([s, torch.zeros(8, dtype=torch.float64)]), has_pair=True)
    assert values["pair_share"] == pytest.approx(pair / (pair + 10.0))
    assert values["partner/same_identity/head"] == 0.5 and values["partner/same_identity/tail"] == 0.5
    assert values["text/null/head"] is None  # nothing measured: no value, not a zero
