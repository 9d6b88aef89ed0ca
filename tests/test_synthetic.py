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
