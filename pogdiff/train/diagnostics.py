"""Why a method helps or costs identity, measured in every run (issue 22), beside the loss.

At every logged step, for the samples of that step, head and tail apart (``data.minority_images``):

- ``text/null``: the mean over pixels of (eps(x_t, y) - eps(x_t, empty caption))^2, and
  ``text/swap``: the same against the caption of another identity from the batch. This is the
  UNet's text sensitivity. Both are taken on the step's last micro-batch, re-noised at
  t = T/2 with a noise seeded by the step, so a resumed run measures what an uninterrupted one
  does. If the pair term rewards a UNet that ignores its caption (the discussion's hypothesis),
  these fall under PoGDiff against Vanilla.
- ``text/name_swap``: the same against the sample's own caption with only the identity's name
  replaced by another identity's (``NameTokens``), so it separates "ignores the name" from
  "ignores the wording", which ``text/swap`` cannot. The other identity is the batch's, as for
  ``text/swap``, else the dataset's next one; a caption that does not hold its identity's name (a
  dataset without names) is not counted.
- ``partner/same_identity``: the share of drawn partners y' (PoGDiff's neighbours, CBDM's random
  captions) that have the sample's own identity.
- ``pair_share``: the pair term's share of the two-term loss (both before Min-SNR weighting).

Every rank computes its sums, and fit all-reduces them with the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pogdiff.method.objectives import Batch, LossOutput, Objective
from pogdiff.seeds import derive_seed

PROBE_STREAM = 0xD1A6  # derive_seed(train.seed, PROBE_STREAM, step) draws the probe's noise
# [pair term, same head, same tail,
#  null head, swap head, n head, n swap head, name swap head, n name swap head,
#  null tail, swap tail, n tail, n swap tail, name swap tail, n name swap tail];
# the target term and the head/tail counts of pair draws are pogdiff.train.metrics.term_stats' sums
SUMS = 15
TEXT = 6  # text_sensitivity's sums per part (head, tail)


def identities_of(identities, rows: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.asarray(identities[rows.cpu().numpy()], dtype=np.int64))


def pair_sums(outs: list[tuple[Batch, LossOutput]], is_minority: torch.Tensor, identities) -> torch.Tensor:
    """[pair term, partners of the sample's own identity among head draws, among tail draws]."""
    s = torch.zeros(3, dtype=torch.float64)
    for batch, out in outs:
        if out.pair_mse is None or out.partner is None:
            continue
        s[0] += (out.weights.pair.detach().double().cpu() * out.pair_mse.double().cpu()).sum()
        own = identities_of(identities, batch.index)
        same = ((identities_of(identities, out.partner) == own) & (own >= 0)).double()
        tail = is_minority[batch.index]
        s[1:3] += torch.stack([same[~tail].sum(), same[tail].sum()])
    return s


@dataclass(frozen=True, eq=False)
class Segment:
    """One tokenizer's part of a caption's token row: ``[bos, ids..., eos, pad...]``, ``length`` long."""

    length: int
    bos: int
    eos: int
    pad: int
    word_end: Optional[np.ndarray]  # per token id: it ends a word (CLIP BPE's "</w>"); None: no such marks


class NameTokens:
    """Per identity, its name's token ids as a caption holds them, one sequence per tokenizer segment
    of the token row (pogdiff.models.components.tokenize: SD one, SDXL two): ``splice`` swaps one
    identity's name for another's in a tokenized caption. It holds O(identities) short lists.

    CLIP's tokenizer splits text into words before its BPE, so a name's tokens are the same alone
    and inside a caption; a match must start a word (the token before it ends one) and the name's
    last token ends one, so "lukas" is not found in "nikolukas"."""

    def __init__(self, segments: list[Segment], names: dict[int, tuple[tuple[int, ...], ...]]):
        self.segments, self.names = segments, names
        ids = sorted(names)
        # an identity of the dataset with another name, for a sample whose batch offers none
        self.fallback: dict[int, int] = {}
        for at, i in enumerate(ids):
            self.fallback[i] = next((j for j in ids[at + 1:] + ids[:at] if names[j] != names[i]), None)

    @classmethod
    def build(cls, tokenizers, names: dict[int, str]) -> Optional["NameTokens"]:
        """``tokenizers``: the model's, in tokenize's order (None entries skipped); ``names``:
        identity -> name. None without a name to find."""
        tokenizers = [t for t in tokenizers if t is not None]
        segments = []
        for tok in tokenizers:
            vocab = tok.get_vocab()
            word_end = np.zeros(max(vocab.values()) + 1, dtype=bool)
            for token, i in vocab.items():
                word_end[i] = token.endswith("</w>")
            eos = tok.eos_token_id
            segments.append(Segment(tok.model_max_length, tok.bos_token_id, eos,
                                    eos if tok.pad_token_id is None else tok.pad_token_id,
                                    word_end if word_end.any() else None))
        out = {}
        for identity, name in names.items():
            per = []
            for tok, seg in zip(tokenizers, segments):
                ids = tok(name, truncation=True, max_length=seg.length).input_ids
                ids = ids[1:] if ids and ids[0] == seg.bos else ids
                ids = ids[:-1] if ids and ids[-1] == seg.eos else ids
                per.append(tuple(ids))
            if all(per):
                out[int(identity)] = tuple(per)
        return cls(segments, out) if out else None

    @classmethod
    def of_dataset(cls, tokenizers, index) -> Optional["NameTokens"]:
        """The names of a prepared dataset's identities (pogdiff.data.shards.DatasetIndex; an identity
        without a name, whose label stands in for it, has none to find)."""
        return cls.build(tokenizers, {i: n for i, n in index.identity_names().items() if n != str(i)})

    def other(self, own: int, candidate: int) -> Optional[int]:
        """The identity whose name replaces ``own``'s: ``candidate`` (the batch's) where it has another
        name, else the dataset's next identity with one; None where ``own`` has no name."""
        if own not in self.names:
            return None
        if candidate in self.names and self.names[candidate] != self.names[own]:
            return candidate
        return self.fallback[own]

    def _starts_word(self, seg: Segment, content: list[int], at: int) -> bool:
        if at == 0 or seg.word_end is None:
            return True
        prev = content[at - 1]
        return prev < len(seg.word_end) and bool(seg.word_end[prev])

    def splice(self, row, own: int, other: int) -> Optional[list[int]]:
        """``row`` (a caption's token ids) with every occurrence of ``own``'s name replaced by
        ``other``'s, re-padded (or truncated) to the segment's length with its BOS/EOS/padding; None
        where a segment does not hold the name (or the row is not laid out as this model's). A caption
        the tokenizer truncated stays cut where it was: the words after the cut are not in the row."""
        row = [int(v) for v in row]
        if own not in self.names or other not in self.names or len(row) != sum(s.length for s in self.segments):
            return None
        out, start = [], 0
        for seg, old, new in zip(self.segments, self.names[own], self.names[other]):
            part, start, old = row[start:start + seg.length], start + seg.length, list(old)
            if part[0] != seg.bos:
                return None
            end = part.index(seg.eos, 1) if seg.eos in part[1:] else len(part)
            content, swapped, at, found = part[1:end], [], 0, False
            while at < len(content):
                if content[at:at + len(old)] == old and self._starts_word(seg, content, at):
                    swapped += new
                    at += len(old)
                    found = True
                else:
                    swapped.append(content[at])
                    at += 1
            if not found:
                return None
            swapped = swapped[:seg.length - 2]
            out += [seg.bos, *swapped, seg.eos] + [seg.pad] * (seg.length - 2 - len(swapped))
        return out

    def swap_batch(self, tokens: torch.Tensor, own: torch.Tensor, candidate: torch.Tensor
                   ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """(the spliced token rows of the samples whose name was found, which samples those are (B,))."""
        rows, found = [], torch.zeros(len(own), dtype=torch.bool)
        for i, (row, o, c) in enumerate(zip(tokens.tolist(), own.tolist(), candidate.tolist())):
            other = self.other(o, c)
            spliced = None if other is None else self.splice(row, o, other)
            if spliced is not None:
                rows.append(spliced)
                found[i] = True
        return (torch.tensor(rows, dtype=torch.long) if rows else None), found


@torch.no_grad()
def text_sensitivity(engine, objective: Objective, batch: Batch, is_minority: torch.Tensor, identities,
                     seed: int, step: int) -> torch.Tensor:
    """[null, swap, n, n swap, name swap, n name swap] sums for head then tail: one UNet call on
    [y; empty; y_other; y with another identity's name] (the last where ``objective.text.names``
    holds the dataset's ``NameTokens``; without, its sums are 0)."""
    x0 = batch.latents
    device, dtype = x0.device, x0.dtype
    g = torch.Generator().manual_seed(derive_seed(seed, PROBE_STREAM, step))
    noise = torch.randn(x0.shape, generator=g).to(device, dtype)
    t = torch.full((len(x0),), objective.num_timesteps // 2, dtype=torch.long)
    abar = objective.alphas_cumprod[t].to(device).view(-1, *([1] * (x0.dim() - 1)))
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    y = objective.text(batch.tokens, device, dtype)
    null = objective.text.null(device, dtype).expand_as(y) if objective.text.null_tokens is not None else y
    own = identities_of(identities, batch.index)
    order = torch.arange(len(x0)).roll(1)  # another sample of the batch; counted where its identity differs
    differs = (own[order] != own) & (own >= 0) & (own[order] >= 0)
    blocks = [y, null, y[order.to(device)]]
    names = getattr(objective.text, "names", None)  # NameTokens, set by pogdiff.train.loop.text_conditioner
    named = torch.zeros(len(x0), dtype=torch.bool)
    if names is not None:  # the dataset's, so every rank makes the same number of blocks
        spliced, named = names.swap_batch(batch.tokens.cpu(), own, own[order])
        y_name = y.clone()
        if spliced is not None:
            y_name[named.to(device)] = objective.text(spliced, device, dtype)
        blocks.append(y_name)
    k = len(blocks)
    cond = objective.text.attach(torch.cat(blocks), batch.time_ids, repeat=k)
    eps = engine(x_t.repeat(k, *([1] * (x0.dim() - 1))), t.to(device).repeat(k), cond).float()
    e, *others = eps.chunk(k)
    d_null, d_swap, *d_name = [(e - o).pow(2).flatten(1).mean(1).double().cpu() for o in others]
    d_name = d_name[0] if d_name else torch.zeros(len(x0), dtype=torch.float64)
    tail = is_minority[batch.index]
    has_null = float(objective.text.null_tokens is not None)
    out = []
    for part in (~tail, tail):
        swap, by_name = part & differs, part & named
        out += [d_null[part].sum(), (d_swap * swap).sum(), part.sum().double() * has_null, swap.sum().double(),
                (d_name * by_name).sum(), by_name.sum().double()]
    return torch.stack(out)


def entries(term: torch.Tensor, sums: torch.Tensor, has_pair: bool) -> dict:
    """The logged values from the all-reduced sums: ``term`` is term_stats' (the target term is its
    target_mse sum, every method's target weight being 1; its head/tail counts are the pair draws'),
    ``sums`` this module's. None where nothing was counted."""
    ratio = lambda a, b: float(a / b) if b else None  # noqa: E731
    out = {}
    for i, part in ((3, "head"), (3 + TEXT, "tail")):
        out[f"text/null/{part}"] = ratio(sums[i], sums[i + 2])  # n is 0 without an empty caption
        out[f"text/swap/{part}"] = ratio(sums[i + 1], sums[i + 3])
        out[f"text/name_swap/{part}"] = ratio(sums[i + 4], sums[i + 5])
    if has_pair:
        out["pair_share"] = ratio(sums[0], sums[0] + term[1])
        out["partner/same_identity/head"] = ratio(sums[1], term[4])
        out["partner/same_identity/tail"] = ratio(sums[2], term[6])
    return out
