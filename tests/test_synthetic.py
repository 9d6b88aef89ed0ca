import dataclasses

import numpy as np
import pytest

from pogdiff.data import synthetic as s


def test_deterministic_and_streaming():
    a = list(s.iter_records([3, 2], seed=4, size=24))
    b = list(s.iter_records([3, 2], seed=4, size=24))
    assert [r.key for r in a] == [r.key for r in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert a[0].image.size == (24, 24)
    gen = s.iter_records([30] * 100_000, seed=0)  # 3M images: a generator, nothing materialised
    first = next(gen)
    assert first.identity == 0


def test_identity_attributes_fixed_images_vary():
    recs = list(s.iter_records([5], seed=1))
    assert len({r.name for r in recs}) == 1
    assert all(r.caption.startswith(f"An image of {recs[0].name}, a person") for r in recs)
    # the per-image part (expression, background, light) varies
    assert len({r.caption for r in recs}) > 1
    assert len({np.asarray(r.image).tobytes() for r in recs}) == 5


def test_names_unique_per_identity():
    names = [s.identity_name(i, 0) for i in range(5000)]
    assert len(set(names)) == 5000


def test_profiles_shape_like_paper():
    assert s.profile_counts("agedb-s") == [30, 2]
    counts = s.profile_counts("agedb-l")
    assert len(counts) == 223 and abs(sum(counts) - 976) <= 5
    assert s.profile_counts("custom", 2, 3, 10, 1) == [10, 10, 1, 1, 1]
    with pytest.raises(ValueError, match="unknown imbalance profile"):
        s.profile_counts("agedb-xl")


def test_heldout_images_differ_from_training():
    counts = [4, 2]
    train = {r.key for r in s.iter_records(counts)}
    held = list(s.iter_records([2, 2], starts=counts))
    assert not train & {r.key for r in held}
    assert [r.identity for r in held] == [0, 0, 1, 1]


def test_vocabulary_covers_captions():
    vocab = set(s.vocabulary())
    for r in s.iter_records([3, 3, 3], seed=2):
        words = r.caption.lower().replace(",", " ").replace(".", " ").split()  # the tokenizer lowercases
        assert set(words) <= vocab, set(words) - vocab


def test_captions_describe_part_of_the_look_and_always_name_the_person():
    """A caption hints at the look (each attribute with probability LOOK_DETAIL), so only the name is
    shared by every caption of an identity; the image does not depend on what the caption says."""
    ident = s.make_identity(3, seed=0)
    recs = list(s.iter_records([0, 0, 0, 400], seed=0))
    skin = f"{ident.skin} skin"
    assert all(r.caption.startswith(f"An image of {ident.name}, ") for r in recs)
    said = np.mean([skin in r.caption for r in recs])
    assert abs(said - s.LOOK_DETAIL) < 0.07, said
    full = s.caption_for(ident, "neutral", "white", "even")
    assert skin in full and f"{ident.eyes} eyes" in full
    assert s.caption_for(ident, "neutral", "white", "even", (False,) * 5) == (
        f"An image of {ident.name}, a person, neutral, in front of a white background, even light.")


# data.names (issue 31): "distinct" names share no part between identities; "grid" is the old scheme.

def _parts(names):
    firsts, lasts = zip(*(n.split() for n in names))
    return firsts, lasts


@pytest.mark.parametrize("profile, seed", [("agedb-s", 0), ("agedb-m", 0), ("agedb-l", 0), ("digiface-l", 0),
                                           ("agedb-l", 3), ("custom", 0)])
def test_distinct_names_share_no_part_between_identities(profile, seed):
    counts = s.profile_counts(profile, 1000, 2500)  # custom: 3500 identities
    names = [s.identity_name(i, seed, "distinct") for i in range(len(counts))]
    firsts, lasts = _parts(names)
    assert len(set(firsts)) == len(set(lasts)) == len(counts)  # no first (last) name used twice
    assert not set(firsts) & set(lasts)  # no word is both a first and a last name
    assert all(w.isascii() and w.isalpha() and w.islower() for w in firsts + lasts)
    known = s.VOCABULARY_NAMED  # the first identities take whole vocabulary names, the rest pseudo-words
    assert set(firsts[:known]) <= set(s.FIRST_NAMES) and set(lasts[:known]) <= set(s.LAST_NAMES)
    assert not (set(firsts[known:]) | set(lasts[known:])) & set(s.vocabulary())  # no caption word nor grid name


def test_grid_names_share_parts():
    """What distinct names remove: on agedb-l every grid identity shares a name part with another."""
    firsts, lasts = _parts([s.identity_name(i, 0, "grid") for i in range(len(s.profile_counts("agedb-l")))])
    assert len(set(firsts)) < len(firsts) and len(set(lasts)) < len(lasts)


def test_distinct_names_are_a_bijection_of_the_index_up_to_max_identities():
    names = [s.distinct_name(i, 0) for i in range(s.MAX_IDENTITIES)]
    firsts, lasts = _parts(names)
    assert len(set(firsts)) == len(set(lasts)) == s.MAX_IDENTITIES and not set(firsts) & set(lasts)
    with pytest.raises(ValueError, match="at most"):
        s.identity_name(s.MAX_IDENTITIES, 0, "distinct")
    with pytest.raises(ValueError, match="name scheme"):
        s.identity_name(0, 0, "unique")


def test_distinct_names_are_deterministic_per_seed_and_index():
    a = [s.identity_name(i, 5, "distinct") for i in (0, 1, 222, 150_000)]
    s._syllable_orders.cache_clear()
    assert a == [s.identity_name(i, 5, "distinct") for i in (0, 1, 222, 150_000)]
    assert a != [s.identity_name(i, 6, "distinct") for i in (0, 1, 222, 150_000)]  # the seed picks the names
    assert a[0] == s.make_identity(0, 5, "distinct").name
    # the scheme only names: looks and images are the grid's, captions differ by the name alone
    grid, distinct = (list(s.iter_records([2, 1], seed=5, names=names)) for names in ("grid", "distinct"))
    assert [r.name for r in distinct] == [a[0], a[0], a[1]]
    for g, d in zip(grid, distinct):
        assert np.array_equal(np.asarray(g.image), np.asarray(d.image))
        assert d.caption == g.caption.replace(g.name, d.name, 1)
    assert s.make_identity(7, 5, "distinct") == dataclasses.replace(s.make_identity(7, 5, "grid"),
                                                                    name=s.identity_name(7, 5, "distinct"))


def test_grid_names_are_the_old_generators():
    """Hard-checked values, computed with the generator before data.names existed."""
    assert [s.identity_name(i, 0) for i in (0, 1, 2, 7, 222)] == [
        "lina holm", "viktor eklund", "mateo adler", "tomas nyberg", "kasimir birch"]
    assert [s.identity_name(i, 1, "grid") for i in (0, 1, 2, 7, 222)] == [
        "silas ramos", "nadia dragan", "anton bauer", "selma rossi", "anton ulrich"]
    assert [s.identity_name(i, 42, "grid") for i in (0, 1, 2, 7, 222)] == [
        "bruno olsen", "yara quint", "livia varga", "bruno colby", "cyrus kowalski"]
    assert [s.identity_name(i, 0, "grid") for i in (3500, 12345, 100_000)] == [
        "pavel lukas yilmaz", "hugo jonas novak", "ivo dario moreau"]
    assert s.make_identity(1, 0).name == "viktor eklund" and next(s.iter_records([1], seed=0)).name == "lina holm"


def test_distinct_names_tokenize_into_pieces_of_the_committed_tokenizer():
    """The committed tiny base's tokenizer (trained on vocabulary()) splits a distinct name into
    known pieces: no unknown token, and the pieces spell the name back."""
    from pathlib import Path

    from transformers import CLIPTokenizer

    import pogdiff.models

    tok = CLIPTokenizer.from_pretrained(Path(pogdiff.models.__file__).parent / "tiny_base", subfolder="tokenizer")
    for i in range(len(s.profile_counts("agedb-l"))):
        name = s.identity_name(i, 0, "distinct")
        ids = tok(name).input_ids[1:-1]
        assert tok.unk_token_id not in ids, name
        assert "".join(tok.convert_ids_to_tokens(ids)).replace("</w>", " ").split() == name.split()
    vocab = set(s.vocabulary())
    for first, pseudo in ((0, False), (s.VOCABULARY_NAMED, True)):  # every other caption word is still a word
        for r in s.iter_records([2, 2], seed=2, names="distinct", first_identity=first):
            words = r.caption.lower().replace(",", " ").replace(".", " ").split()
            assert set(words) - vocab == (set(r.name.split()) if pseudo else set())
            if not pseudo:  # a vocabulary name is one token per part
                assert len(tok(r.name).input_ids) == 2 + len(r.name.split())


def test_data_names_is_a_config_key_distinct_by_default_and_enters_the_fingerprint(tmp_path, capsys):
    from pogdiff.cli import main
    from pogdiff.config import ConfigError, load_config
    from pogdiff.data.prepare import make_plan, source_fingerprint

    assert load_config(None).data.names == "distinct"
    grid, distinct, pseudo = (load_config(None, [f"data.names={n}"]) for n in ("grid", "distinct", "pseudo"))
    with pytest.raises(ConfigError, match=r"data\.names must be distinct\|grid\|pseudo, got 'unique'"):
        load_config(None, ["data.names=unique"])
    assert main(["config", "configs/demo.yaml", "data.names=unique"]) == 2
    assert "data.names" in capsys.readouterr().err
    # datasets of two schemes never share a folder (nor a resumable plan)
    assert len({source_fingerprint(c) for c in (grid, distinct, pseudo)}) == 3
    assert make_plan(grid, tmp_path).fingerprint(grid) != make_plan(distinct, tmp_path).fingerprint(distinct)


def test_pseudo_names_are_pseudo_words_for_every_identity_and_share_no_part():
    names = [s.identity_name(i, 0, "pseudo") for i in range(len(s.profile_counts("agedb-l")))]
    firsts, lasts = _parts(names)
    assert len(set(firsts)) == len(set(lasts)) == len(names) and not set(firsts) & set(lasts)
    assert not (set(firsts) | set(lasts)) & set(s.vocabulary())
    # past the vocabulary, distinct names are these very pseudo-words
    assert s.identity_name(s.VOCABULARY_NAMED + 3, 0, "distinct") == s.identity_name(s.VOCABULARY_NAMED + 3, 0, "pseudo")
