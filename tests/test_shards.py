"""The shard format: writer -> tar -> (WebDataset's own reader, and the fast reader) round trip; index."""
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from pogdiff.data.shards import (DatasetIndex, Sample, ShardWriter, encode_sample, npy_load, read_tar, read_task_record,
                            write_index, write_task)


def make_samples(n, start=0, seed=0, caption_len=5):
    rng = np.random.default_rng(seed)
    return [Sample(key=f"k{start + i:05d}", ordinal=start + i, identity=(start + i) % 3, name="ada holm",
                   caption=" ".join(["word"] * caption_len) + f" {start + i}",
                   latent=rng.standard_normal((4, 8, 8)).astype(np.float16),
                   tokens=rng.integers(0, 49408, 77).astype(np.int32),
                   pooled=rng.standard_normal(32).astype(np.float32),
                   image_emb=rng.standard_normal(16).astype(np.float32)) for i in range(n)]


def test_round_trip_through_webdataset(tmp_path):
    samples = make_samples(23)
    write_task(tmp_path, 0, samples, max_samples=10, max_bytes=1 << 30, skipped=[])
    parts = sorted(tmp_path.glob("*.tar"))
    assert [p.name for p in parts] == ["shard-000000-00.tar", "shard-000000-01.tar", "shard-000000-02.tar"]
    # WebDataset's stock reader and decoders (independent of ours) see exactly what was written
    got = list(wds.WebDataset([str(p) for p in parts], shardshuffle=False).decode())
    assert [s["__key__"] for s in got] == [s.key for s in samples]
    for s, g in zip(samples, got):
        assert g["latent.npy"].dtype == np.float16 and np.array_equal(g["latent.npy"], s.latent)
        assert g["tokens.npy"].dtype == np.int32 and np.array_equal(g["tokens.npy"], s.tokens)
        assert np.array_equal(g["pooled.npy"], s.pooled) and np.array_equal(g["imgemb.npy"], s.image_emb)
        assert g["json"] == s.meta
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_fast_reader_matches_tarfile(tmp_path):
    write_task(tmp_path, 0, make_samples(7), max_samples=100, max_bytes=1 << 30, skipped=[])
    path = tmp_path / "shard-000000-00.tar"
    with tarfile.open(path) as tf:
        expected = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    with open(path, "rb") as f:
        got = [(m["fname"], m["data"]) for m in read_tar(f)]
    assert got == expected
    blob = path.read_bytes()
    for cut in (700, len(blob) // 2 + 100):  # truncated inside a header, inside data
        with pytest.raises(tarfile.ReadError, match="truncated"):
            list(read_tar(io.BytesIO(blob[:cut])))
    flipped = bytearray(blob)
    flipped[50] ^= 0xFF  # a byte of the first member's name
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(read_tar(io.BytesIO(bytes(flipped))))


def test_npy_load_matches_numpy():
    for a in (np.arange(12, dtype=np.float16).reshape(3, 4), np.asfortranarray(np.ones((2, 5), np.int32)),
              np.float32(3.5) * np.ones(7, np.float32)):
        buf = io.BytesIO()
        np.save(buf, a)
        np.testing.assert_array_equal(npy_load(buf.getvalue()), np.load(io.BytesIO(buf.getvalue())))
        assert npy_load(buf.getvalue()).shape == a.shape


def test_parts_are_bounded_by_bytes(tmp_path):
    samples = make_samples(12)
    one = sum(512 + -(-len(v) // 512) * 512 for v in encode_sample(samples[0]).values())
    max_bytes = 3 * one + ShardWriter.END  # room for exactly three samples
    write_task(tmp_path, 4, samples, max_samples=100, max_bytes=max_bytes, skipped=[])
    parts = sorted(tmp_path.glob("shard-000004-*.tar"))
    assert len(parts) == 4
    assert all(p.stat().st_size <= max_bytes for p in parts)
    record = read_task_record(tmp_path, 4)
    assert [p["samples"] for p in record["parts"]] == [3, 3, 3, 3]
    assert [s["shard"] for s in record["samples"]] == [p.name for p in parts for _ in range(3)]


def test_index_merges_tasks_with_gaps(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    # ordinals 0..9 planned in two tasks; ordinals 3 and 7 were skipped by their tasks
    a = [s for s in make_samples(5, 0) if s.ordinal != 3]
    b = [s for s in make_samples(5, 5) if s.ordinal != 7]
    write_task(shards, 0, a, 100, 1 << 30, skipped=[{"record": "k00003", "reason": "corrupt_image", "detail": "x"}])
    write_task(shards, 1, b, 100, 1 << 30, skipped=[])
    dataset = write_index(tmp_path, num_tasks=2, num_records=10, meta={"model": "m"})
    assert dataset["num_samples"] == 8 and dataset["token_length"] == 77 and dataset["model"] == "m"
    rows = np.load(tmp_path / "row_of_ordinal.npy")
    assert rows.tolist() == [0, 1, 2, -1, 3, 4, 5, -1, 6, 7]
    index = DatasetIndex.load(tmp_path)
    kept = a + b
    assert index.keys == [s.key for s in kept]
    assert index.shards[0] == "shards/shard-000000-00.tar" and index.shards[-1] == "shards/shard-000001-00.tar"
    np.testing.assert_array_equal(index.tokens, np.stack([s.tokens for s in kept]))
    np.testing.assert_array_equal(index.image_emb, np.stack([s.image_emb for s in kept]))
    np.testing.assert_array_equal(index.pooled, np.stack([s.pooled for s in kept]))
    assert index.identities.tolist() == [s.identity for s in kept]
    assert json.loads((tmp_path / "dataset.json").read_text())["shards"][0]["samples"] == 4


def test_unfinished_task_is_not_done(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_task(shards, 0, make_samples(3), 100, 1 << 30, skipped=[])
    assert read_task_record(shards, 0) is not None
    (shards / "shard-000000-00.tar").unlink()  # a part went missing: the task must be redone
    assert read_task_record(shards, 0) is None
    with pytest.raises(RuntimeError, match="have not finished"):
        write_index(tmp_path, 1, 3, {})
