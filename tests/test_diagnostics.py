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
    for part in (head, tail):  # no names known (a table of states): the name-only probe counts nothing
        want += [d_null[part].sum(), (d_swap * (part & differs)).sum(), part.sum(), (part & differs).sum(), 0, 0]
    torch.testing.assert_close(sums.float(), torch.tensor(want).float())
    again = diagnostics.text_sensitivity(CaptionShift(), obj, batch, TAIL, IDENTITIES, seed=1, step=7)
    assert torch.equal(sums, again)  # its own seeded noise: the same step measures the same
    values = diagnostics.entries(torch.zeros(7, dtype=torch.float64), torch.cat([torch.zeros(3, dtype=torch.float64), sums]),
                                 has_pair=False)
    assert values["text/null/tail"] == pytest.approx(float(d_null[tail].mean()))
    assert values["text/name_swap/head"] is None and values["text/name_swap/tail"] is None
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
    values = diagnostics.entries(term, torch.cat([s, torch.zeros(diagnostics.SUMS - 3, dtype=torch.float64)]),
                                 has_pair=True)
    assert values["pair_share"] == pytest.approx(pair / (pair + 10.0))
    assert values["partner/same_identity/head"] == 0.5 and values["partner/same_identity/tail"] == 0.5
    assert values["text/null/head"] is None  # nothing measured: no value, not a zero


# ------------------------------------------------------------------------ the name-only probe (issue 31)

NAMES = {0: "lukas brandt", 1: "mira okafor", 2: "hanna lena zeller", 3: "zorbo q"}  # 2, 2, 3 tokens; 3: bytes


def _tokenizers(sdxl: bool):
    from types import SimpleNamespace

    from pogdiff.data.synthetic import vocabulary
    from pogdiff.models.components import build_tiny_tokenizer

    first = build_tiny_tokenizer(vocabulary())
    second = None
    if sdxl:  # SDXL's second tokenizer pads with "!", not with its end token
        second = build_tiny_tokenizer(vocabulary())
        second.pad_token = "!"
        assert second.pad_token_id != second.eos_token_id
    return SimpleNamespace(tokenizer=first, tokenizer_2=second)


@pytest.mark.parametrize("sdxl", [False, True])
def test_the_splice_replaces_only_the_name(sdxl):
    from pogdiff.models.components import tokenize

    c = _tokenizers(sdxl)
    names = diagnostics.NameTokens.build([c.tokenizer, c.tokenizer_2], NAMES)
    assert [len(t) for t in names.names[3]] == [5] * (2 if sdxl else 1)  # an unknown word: byte-level pieces
    for caption, own, other in [("An image of lukas brandt, a person with blue eyes.", 0, 2),
                                ("An image of hanna lena zeller, smiling, in front of a white background.", 2, 1),
                                ("An image of mira okafor. mira okafor, smiling.", 1, 3),  # every occurrence
                                ("An image of zorbo q, smiling.", 3, 0)]:
        row = tokenize(c, [caption])[0]
        spliced = names.splice(row, own, other)
        want = tokenize(c, [caption.replace(NAMES[own], NAMES[other])])[0]
        assert spliced == want.tolist(), caption  # the other name in place, the rest and the padding as tokenize's
    for caption in ("An image of a person, smiling.", "An image of xlukas brandt."):  # no name, or inside a word
        assert names.splice(tokenize(c, [caption])[0], 0, 1) is None
    long = "An image of lukas brandt, " + ", ".join(["smiling"] * 40) + "."  # truncated by the tokenizer
    spliced = names.splice(tokenize(c, [long])[0], 0, 2)
    assert spliced == tokenize(c, [long.replace(NAMES[0], NAMES[2])])[0].tolist()  # re-truncated, EOS kept
    # the batch: the other identity from the batch, else the dataset's next one; nameless samples left out
    tokens = tokenize(c, ["An image of lukas brandt.", "An image of mira okafor.", "An image of someone."])
    rows, found = names.swap_batch(tokens, torch.tensor([0, 1, -1]), torch.tensor([0, 0, 1]))
    assert found.tolist() == [True, True, False]
    assert rows.tolist() == tokenize(c, ["An image of mira okafor.", "An image of lukas brandt."]).tolist()


def test_names_of_a_dataset_leave_out_identities_without_one():
    class Index:
        def identity_names(self):
            return {0: "lukas brandt", 1: "mira okafor", 7: "7"}  # 7: no name, its label stands in

    c = _tokenizers(False)
    names = diagnostics.NameTokens.of_dataset([c.tokenizer, None], Index())
    assert sorted(names.names) == [0, 1] and names.fallback == {0: 1, 1: 0}
    assert diagnostics.NameTokens.of_dataset([c.tokenizer], type("Empty", (), {"identity_names": lambda self: {}})()) \
        is None


def test_the_name_probe_is_a_direct_unet_call_on_the_spliced_captions():
    from pogdiff.models.components import build_tiny, encode_tokens, tokenize
    from pogdiff.seeds import derive_seed

    c = build_tiny(0)
    c.unet.eval()
    captions = ["An image of lukas brandt, a person with blue eyes.",
                "An image of mira okafor, smiling. mira okafor again.",
                "An image of a person, neutral.",  # identity 3, its name not in its caption: not counted
                "An image of hanna lena zeller, in front of a grey background.",
                "An image of hanna lena zeller.",
                "An image of someone."]  # unlabelled
    identities = np.array([0, 1, 3, 2, 2, -1])
    tail = torch.tensor([False, False, False, True, True, False])
    table = tokenize(c, captions)
    cpu = torch.device("cpu")
    text = TextConditioner(lambda ids: encode_tokens(c, ids, cpu)[0], table, tokenize(c, [""])[0])
    text.names = diagnostics.NameTokens.build([c.tokenizer], NAMES)
    obj = Objective(MethodConfig(name=Method.vanilla), c.noise_scheduler.alphas_cumprod, text=text, backend="torch")
    idx = torch.arange(6)
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    unet = lambda x, t, cond: c.unet(x, t, encoder_hidden_states=cond).sample  # noqa: E731
    sums = diagnostics.text_sensitivity(unet, obj, Batch(idx, x0, table), tail, identities, seed=1, step=7)
    # written out: the probe's x_t and t, and the UNet on the captions with the name replaced as text;
    # each sample's other identity is the previous sample's (5, 0, 1, 2, 3, 4), else the dataset's next
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(derive_seed(1, diagnostics.PROBE_STREAM, 7)))
    abar = c.noise_scheduler.alphas_cumprod[500]
    x_t, t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise, torch.full((6,), 500)
    counted = {0: 1, 1: 0, 3: 3, 4: 3}  # row -> the other identity: 0's batch partner is unlabelled, 4's is its own
    swapped = list(captions)
    for row, other in counted.items():
        swapped[row] = captions[row].replace(NAMES[int(identities[row])], NAMES[other])
    with torch.no_grad():
        e = unet(x_t, t, encode_tokens(c, table, cpu)[0])
        e_name = unet(x_t, t, encode_tokens(c, tokenize(c, swapped), cpu)[0])
    d = (e - e_name).pow(2).flatten(1).mean(1).double()
    head_rows, tail_rows = [0, 1], [3, 4]
    assert (d[head_rows + tail_rows] > 0).all()
    got = sums.view(2, diagnostics.TEXT)[:, 4:]
    torch.testing.assert_close(got, torch.tensor([[d[head_rows].sum(), 2.0], [d[tail_rows].sum(), 2.0]],
                                                 dtype=torch.float64), rtol=1e-4, atol=1e-9)
    values = diagnostics.entries(torch.zeros(7, dtype=torch.float64),
                                 torch.cat([torch.zeros(3, dtype=torch.float64), sums]), has_pair=False)
    assert values["text/name_swap/tail"] == pytest.approx(float(d[tail_rows].mean()), rel=1e-4)


def test_the_report_shows_the_name_probe_beside_the_caption_swap():
    from pogdiff.experiment.report import diagnostics_section

    diag = {"vanilla": {"text/swap/head": 0.4, "text/swap/tail": 0.4, "text/name_swap/head": 0.2,
                        "text/name_swap/tail": 0.1},
            "pogdiff": {"text/swap/head": 0.4, "text/swap/tail": 0.2, "text/name_swap/head": 0.2,
                        "text/name_swap/tail": 0.05}}
    md, rows = diagnostics_section(diag)
    head = rows[0]
    assert head.index("text/name_swap/head") == head.index("text/swap/tail") + 1 and "text/name_swap/tail" in head
    assert "text vs other name, head | text vs other name, tail" in md[0]
    assert rows[2][head.index("text/name_swap/tail")] == 0.05
    text = "\n".join(md)
    assert "- Tail identities: PoGDiff's sensitivity to another identity's caption is 0.50x Vanilla's, lower" in text
    assert ("- Tail identities: PoGDiff's sensitivity to another identity's name alone (the rest of the caption "
            "kept) is 0.50x Vanilla's, lower: consistent with the hypothesis that the pair term teaches the UNet "
            "to use the name in its caption less.") in text
    assert "- Head identities: PoGDiff's sensitivity to another identity's name alone" in text
