"""DigiFace-like synthetic identities with the paper's imbalance profiles.

Each identity has fixed attributes (face shape, skin, hair colour and style, eye colour,
accessories) and a generic name; each image varies pose, expression, background and lighting.
Everything is a pure function of (seed, identity, image index), so records stream: a million
images never sit in memory, and any one of them can be regenerated on its own.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

FIRST_NAMES = (
    "lukas mira jonas elena tomas nadia felix ines oskar greta milan sofia anton lena viktor clara "
    "pavel irene hugo alma emil nora bruno vera leon ida mateo rosa aron lina dario eva kasimir "
    "talia ruben yara silas maren otto livia jasper freya nico hanna theo selma bastian ada "
    "cyrus dalia ezra fiona gideon helga ivo juna konrad lotte"
).split()
LAST_NAMES = (
    "brandt okafor lindqvist moreau tanaka kowalski ferreira novak haddad petrov oduya castell "
    "varga nilsen duarte keller rossi sato mbeki larsen quint adler bauer costa dragan "
    "eklund falk garber holm iversen jansen kerr lorenz marsh nyberg olsen pardo ramos "
    "sandoval thorne ulrich vance weber yilmaz zeller abbot birch colby dunmore elway "
    "frost gale hale irwin"
).split()
MIDDLE_NAMES = FIRST_NAMES  # third name only when more identities than first x last exist
MAX_IDENTITIES = len(FIRST_NAMES) * len(LAST_NAMES) * (len(MIDDLE_NAMES) + 1)  # distinct generic names

# How identities are named (data.names). "grid": FIRST_NAMES x LAST_NAMES (then a middle name), so
# identities share first or last names; the pretraining sets (pogdiff pretrain, the SSL encoder,
# the tiny VAE, the recogniser) keep it, as does every function here by default. "distinct" (the
# fine-tuning default, issue 31): every identity has a first and a last name of its own that no
# other identity of the dataset uses in either place, like the paper's distinct people: whole
# vocabulary names while they last, then pseudo-words (distinct_name). "pseudo": pseudo-words for
# every identity (pseudo_name), names the tiny base's text encoder never saw.
NAME_SCHEMES = ("distinct", "grid", "pseudo")
# Pseudo-word names are syllables: a first name is three open syllables ("kelomu": it ends in a
# vowel), a last name two closed ones ("bandok": it ends in a consonant), so no word is both. The
# letter sets keep every such word off the words of vocabulary() (captions' words, the grid's
# names: no first name starts with "t" ("tanaka"), no last name ends in n, r or d ("person",
# "keller", "konrad")), so a name never reuses a word the base was trained on as a whole.
_ONSETS, _VOWELS = "bdfgklmnprstvz", "aeiou"
_FIRST_SYLLABLES = (tuple(o + v for o in _ONSETS.replace("t", "") for v in _VOWELS),
                    tuple(o + v for o in _ONSETS for v in _VOWELS),
                    tuple(o + v for o in _ONSETS for v in _VOWELS))
_LAST_SYLLABLES = (tuple(o + v + c for o in _ONSETS for v in _VOWELS for c in "lmnrsktd"),
                   tuple(o + v + c for o in _ONSETS for v in _VOWELS for c in "lmskt"))
DISTINCT_CAPACITY = min(math.prod(map(len, _FIRST_SYLLABLES)), math.prod(map(len, _LAST_SYLLABLES)))  # 196,000
assert DISTINCT_CAPACITY >= MAX_IDENTITIES  # MAX_IDENTITIES bounds both schemes (the config check's limit)

FACE_SHAPES = {"round": (0.62, 0.66), "oval": (0.52, 0.72), "long": (0.46, 0.78), "square": (0.6, 0.62), "heart": (0.56, 0.7)}
SKIN_TONES = {
    "pale": (250, 225, 205), "fair": (238, 200, 170), "olive": (200, 160, 115),
    "tan": (185, 135, 95), "brown": (140, 95, 60), "dark": (95, 62, 40),
}
HAIR_COLOURS = {
    "black": (25, 20, 20), "brown": (100, 60, 30), "blonde": (230, 200, 110), "red": (180, 60, 30),
    "grey": (150, 150, 150), "white": (240, 240, 235), "blue": (50, 90, 200),
}
HAIRSTYLES = ("short", "long", "bald", "curly", "bun", "spiky")
EYE_COLOURS = {"brown": (90, 50, 20), "blue": (40, 100, 200), "green": (40, 140, 60), "grey": (120, 125, 130)}
EXPRESSIONS = ("neutral", "smiling", "frowning", "surprised")
BACKGROUNDS = {
    "white": (235, 235, 235), "grey": (128, 128, 128), "green": (90, 160, 90), "blue": (90, 120, 190),
    "yellow": (220, 200, 90), "purple": (140, 90, 160), "orange": (225, 140, 60),
}
LIGHTING = {"bright": 1.15, "dim": 0.75, "warm": (1.1, 1.0, 0.85), "cool": (0.88, 0.97, 1.12), "even": 1.0}

# The paper's datasets, as (majority ids, minority ids) with 30 and 2 images (App. / Sec. 4.1).
# Counts are the nearest integers to the stated totals: e.g. AgeDB-IT2I-L has 976 images over
# 223 ids, which 30/2 images reach with 19 majority ids (978 images).
PROFILES = {
    "agedb-s": (1, 1),
    "agedb-m": (3, 7),
    "agedb-l": (19, 204),
    "digiface-l": (22, 157),
}


@dataclass(frozen=True)
class Identity:
    index: int
    name: str
    face_shape: str
    skin: str
    hair_colour: str
    hairstyle: str
    eyes: str
    glasses: bool
    beard: bool
    hat: bool


@dataclass(frozen=True)
class Record:
    key: str
    identity: int
    name: str
    caption: str
    image: Image.Image


def _rng(*parts: int | str) -> np.random.Generator:
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def identity_name(index: int, seed: int, names: str = "grid") -> str:
    """A generic name, unique per identity within a seed: ``names="grid"``, a bijection on the name
    grid (identities share first and last names); ``"distinct"``, ``distinct_name``."""
    if names == "distinct":
        return distinct_name(index, seed)
    if names == "pseudo":
        return pseudo_name(index, seed)
    if names != "grid":
        raise ValueError(f"unknown name scheme '{names}'; choose one of {list(NAME_SCHEMES)}")
    n_first, n_last = len(FIRST_NAMES), len(LAST_NAMES)
    grid = n_first * n_last
    perm = _rng("names", seed).permutation(grid)
    cell = int(perm[index % grid])
    name = f"{FIRST_NAMES[cell // n_last]} {LAST_NAMES[cell % n_last]}"
    if index >= grid:
        if index >= MAX_IDENTITIES:
            raise ValueError(f"at most {MAX_IDENTITIES} distinct synthetic identities")
        first, last = name.split()
        name = f"{first} {MIDDLE_NAMES[index // grid - 1]} {last}"
    return name


VOCABULARY_NAMED = min(len(FIRST_NAMES), len(LAST_NAMES))  # identities named from the vocabulary


@functools.lru_cache(maxsize=16)
def _syllable_orders(seed: int, part: str) -> tuple[tuple[int, ...], ...]:
    tables = _FIRST_SYLLABLES if part == "first" else _LAST_SYLLABLES
    return tuple(tuple(int(v) for v in _rng("distinct-names", seed, part, p).permutation(len(table)))
                 for p, table in enumerate(tables))


def _spread(index: int, sizes: Sequence[int]) -> list[int]:
    """A bijection of ``[0, prod(sizes))`` onto positions ``v[p] in [0, sizes[p])``: ``index``'s
    mixed-radix digits ``d``, then ``v[0] = d[0]``, ``v[p] = d[p] + d[0] - (d[1] + .. + d[p-1])``
    (mod ``sizes[p]``): triangular, so invertible. With ``sizes[0]`` the smallest, the first
    ``sizes[0]`` indices differ at every position (no syllable of a small set repeats in place)."""
    digits = []
    for m in sizes:
        index, d = divmod(index, m)
        digits.append(d)
    return [digits[0]] + [(digits[p] + digits[0] - sum(digits[1:p])) % m for p, m in enumerate(sizes) if p]


def distinct_name(index: int, seed: int) -> str:
    """``data.names=distinct``: a first and a last name that no other identity of the seed has, in
    either place; a bijection of ``index``.

    The first ``VOCABULARY_NAMED`` identities take whole names of the vocabulary (each first and
    each last name once, in a seeded order): words the committed tiny base's tokenizer holds as one
    token and its text encoder was pretrained on, as a real text encoder knows real names. Beyond
    them, lowercase a-z pseudo-words that are no vocabulary word (first names end in a vowel, last
    names in a consonant; syllables by ``_spread``, each position's syllables in a seeded order):
    the tokenizer splits them into pieces no pretraining caption held, so their embeddings are
    nearly untrained (benchmarks/RESULTS.md, "Distinct synthetic names")."""
    if not 0 <= index < MAX_IDENTITIES:
        raise ValueError(f"at most {MAX_IDENTITIES} distinct synthetic identities")
    if index < VOCABULARY_NAMED:
        first = _rng("distinct-vocabulary-names", seed, "first").permutation(len(FIRST_NAMES))
        last = _rng("distinct-vocabulary-names", seed, "last").permutation(len(LAST_NAMES))
        return f"{FIRST_NAMES[first[index]]} {LAST_NAMES[last[index]]}"
    return pseudo_name(index, seed)


def pseudo_name(index: int, seed: int) -> str:
    """``data.names=pseudo`` (and ``distinct`` past the vocabulary): a first and a last pseudo-word
    that no other identity of the seed has, in either place; a bijection of ``index``."""
    if not 0 <= index < MAX_IDENTITIES:
        raise ValueError(f"at most {MAX_IDENTITIES} distinct synthetic identities")
    words = []
    for part, tables in (("first", _FIRST_SYLLABLES), ("last", _LAST_SYLLABLES)):
        orders = _syllable_orders(seed, part)
        # the last name's positions are taken from its end: the first min(sizes) identities differ in every syllable
        positions = _spread(index, [len(t) for t in tables]) if part == "first" else \
            _spread(index, [len(t) for t in tables[::-1]])[::-1]
        words.append("".join(table[order[v]] for table, order, v in zip(tables, orders, positions)))
    return " ".join(words)


def make_identity(index: int, seed: int, names: str = "grid") -> Identity:
    """``names``: the name scheme (NAME_SCHEMES); the look does not depend on it."""
    r = _rng("identity", seed, index)
    pick = lambda options: options[int(r.integers(len(options)))]  # noqa: E731
    return Identity(
        index=index,
        name=identity_name(index, seed, names),
        face_shape=pick(list(FACE_SHAPES)),
        skin=pick(list(SKIN_TONES)),
        hair_colour=pick(list(HAIR_COLOURS)),
        hairstyle=pick(HAIRSTYLES),
        eyes=pick(list(EYE_COLOURS)),
        glasses=bool(r.random() < 0.3),
        beard=bool(r.random() < 0.3),
        hat=bool(r.random() < 0.15),
    )


# A caption describes each attribute of the identity's look with this probability, as a captioner
# (the paper's LLaVA) hints at a face without pinning it down: the name is the one word every
# caption of an identity shares, so "An image of {name}." has to be learned, as on real faces.
LOOK_DETAIL = 0.25
GENERATOR_VERSION = 2  # 2: captions "An image of <name>, ..." with a partial description of the look
# data.names=distinct datasets are fingerprinted apart from grid ones (prepare.source_fingerprint):
# a grid dataset keeps the folder it had before the scheme existed.


def caption_for(ident: Identity, expression: str, background: str, lighting: str,
                mention: Sequence[bool] = (True,) * 5) -> str:
    """``mention``: which of the look's attributes (face shape, skin, hair, eyes, what the person
    wears) the caption describes."""
    extras = [w for w, on in (("glasses", ident.glasses), ("a beard", ident.beard), ("a hat", ident.hat)) if on]
    hair = "no hair" if ident.hairstyle == "bald" else f"{ident.hair_colour} {ident.hairstyle} hair"
    looks = [f"{'an' if ident.face_shape[0] in 'aeiou' else 'a'} {ident.face_shape} face", f"{ident.skin} skin", hair,
             f"{ident.eyes} eyes"]
    said = [part for part, on in zip(looks, mention) if on]
    described = f"a person with {', '.join(said[:-1]) + ' and ' + said[-1] if len(said) > 1 else said[0]}" if said \
        else "a person"
    wearing = f", with {' and '.join(extras)}" if extras and mention[4] else ""
    return f"An image of {ident.name}, {described}{wearing}, {expression}, in front of a {background} background, {lighting} light."


def render(ident: Identity, image_index: int, seed: int, size: int = 32) -> tuple[Image.Image, str]:
    """One image of an identity and its caption."""
    r = _rng("image", seed, ident.index, image_index)
    expression = EXPRESSIONS[int(r.integers(len(EXPRESSIONS)))]
    background = list(BACKGROUNDS)[int(r.integers(len(BACKGROUNDS)))]
    lighting = list(LIGHTING)[int(r.integers(len(LIGHTING)))]
    yaw = float(r.uniform(-0.08, 0.08))  # horizontal shift of the face, as a fraction of the image
    pitch = float(r.uniform(-0.05, 0.05))
    scale = float(r.uniform(0.92, 1.08))

    s = size * 4  # draw large, then downsample: anti-aliasing for free
    img = Image.new("RGB", (s, s), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    cx, cy = s * (0.5 + yaw), s * (0.55 + pitch)
    fw, fh = (v * s * 0.5 * scale for v in FACE_SHAPES[ident.face_shape])
    skin, hair = SKIN_TONES[ident.skin], HAIR_COLOURS[ident.hair_colour]
    if ident.hairstyle == "long":
        d.rectangle([cx - fw * 1.05, cy - fh * 0.7, cx + fw * 1.05, cy + fh * 0.9], fill=hair)
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=skin)
    top = cy - fh
    if ident.hairstyle in ("short", "long"):
        d.chord([cx - fw, top - fh * 0.1, cx + fw, top + fh * 0.9], 180, 360, fill=hair)
    elif ident.hairstyle == "curly":
        for k in range(7):
            a = math.pi * (k / 6)
            d.ellipse([cx - fw * math.cos(a) - fw * 0.3, top + fh * 0.2 - fh * 0.35 * math.sin(a) - fw * 0.3,
                       cx - fw * math.cos(a) + fw * 0.3, top + fh * 0.2 - fh * 0.35 * math.sin(a) + fw * 0.3], fill=hair)
    elif ident.hairstyle == "bun":
        d.chord([cx - fw, top - fh * 0.05, cx + fw, top + fh * 0.8], 180, 360, fill=hair)
        d.ellipse([cx - fw * 0.35, top - fh * 0.45, cx + fw * 0.35, top + fh * 0.1], fill=hair)
    elif ident.hairstyle == "spiky":
        for k in range(5):
            x = cx - fw * 0.8 + k * fw * 0.4
            d.polygon([(x - fw * 0.2, top + fh * 0.25), (x, top - fh * 0.3), (x + fw * 0.2, top + fh * 0.25)], fill=hair)
    if ident.hat:
        d.rectangle([cx - fw * 1.2, top + fh * 0.05, cx + fw * 1.2, top + fh * 0.2], fill=(40, 40, 60))
        d.rectangle([cx - fw * 0.8, top - fh * 0.4, cx + fw * 0.8, top + fh * 0.1], fill=(40, 40, 60))
    ey, ex, er = cy - fh * 0.15, fw * 0.4, fw * 0.14
    for sx in (-1, 1):
        d.ellipse([cx + sx * ex - er * 1.3, ey - er, cx + sx * ex + er * 1.3, ey + er], fill=(250, 250, 250))
        d.ellipse([cx + sx * ex - er * 0.7, ey - er * 0.7, cx + sx * ex + er * 0.7, ey + er * 0.7], fill=EYE_COLOURS[ident.eyes])
        if ident.glasses:
            d.ellipse([cx + sx * ex - er * 2, ey - er * 1.7, cx + sx * ex + er * 2, ey + er * 1.7], outline=(20, 20, 20), width=max(2, s // 64))
    if ident.beard:
        d.chord([cx - fw * 0.85, cy + fh * 0.1, cx + fw * 0.85, cy + fh * 1.0], 0, 180, fill=hair)
    my, mw = cy + fh * 0.45, fw * 0.45
    mouth = (150, 40, 40)
    if expression == "smiling":
        d.arc([cx - mw, my - fh * 0.2, cx + mw, my + fh * 0.15], 20, 160, fill=mouth, width=max(2, s // 48))
    elif expression == "frowning":
        d.arc([cx - mw, my, cx + mw, my + fh * 0.3], 200, 340, fill=mouth, width=max(2, s // 48))
    elif expression == "surprised":
        d.ellipse([cx - mw * 0.35, my - fh * 0.1, cx + mw * 0.35, my + fh * 0.15], fill=mouth)
    else:
        d.line([cx - mw * 0.7, my, cx + mw * 0.7, my], fill=mouth, width=max(2, s // 48))

    arr = np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.float32)
    light = LIGHTING[lighting]
    arr = arr * np.asarray(light if isinstance(light, tuple) else (light,) * 3, dtype=np.float32)
    arr += r.normal(0.0, 4.0, arr.shape).astype(np.float32)  # sensor noise
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    mention = (_rng("caption", seed, ident.index, image_index).random(5) < LOOK_DETAIL).tolist()
    return image, caption_for(ident, expression, background, lighting, mention)


def profile_counts(profile: str, majority_ids: int = 1, minority_ids: int = 1,
                   majority_images: int = 30, minority_images: int = 2) -> list[int]:
    """Images per identity: majority identities first, then minority ones."""
    if profile != "custom":
        if profile not in PROFILES:
            raise ValueError(f"unknown imbalance profile '{profile}'; choose one of {sorted(PROFILES)} or 'custom'")
        majority_ids, minority_ids = PROFILES[profile]
    return [majority_images] * majority_ids + [minority_images] * minority_ids


def iter_records(counts: Sequence[int], seed: int = 0, size: int = 32,
                 starts: Sequence[int] | None = None, first_identity: int = 0, names: str = "grid") -> Iterator[Record]:
    """Stream images ``starts[i] .. starts[i] + counts[i]`` of every identity ``first_identity + i``
    (starts default 0), named by the scheme ``names`` (NAME_SCHEMES: the fine-tuning sets pass
    ``data.names``; images never depend on it).

    Held-out images of the same identities are ``iter_records(per_id, starts=train_counts)``.
    """
    for index, count in enumerate(counts, first_identity):
        ident = make_identity(index, seed, names)
        first = starts[index - first_identity] if starts is not None else 0
        for j in range(first, first + count):
            image, caption = render(ident, j, seed, size)
            yield Record(key=f"id{index:06d}_img{j:04d}", identity=index, name=ident.name, caption=caption, image=image)


def vocabulary() -> list[str]:
    """Every word a synthetic caption or prompt can contain: what the tiny tokenizer is trained on.
    Distinct names (data.names=distinct) are not words of it: they tokenize into its pieces."""
    words = set(FIRST_NAMES) | set(LAST_NAMES) | set(MIDDLE_NAMES)
    for table in (FACE_SHAPES, SKIN_TONES, HAIR_COLOURS, EYE_COLOURS, BACKGROUNDS, LIGHTING):
        words |= set(table)
    words |= set(HAIRSTYLES) | set(EXPRESSIONS)
    words |= set("a an image of person with face skin hair no and eyes glasses beard hat in front background light".split())
    words |= set(", .".split())
    return sorted(words)
