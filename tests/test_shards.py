"""The shard format: writer -> tar -> (WebDataset's own reader, and the fast reader) round trip; index."""
import io
import json
import logging
import tarfile

import numpy as np
import pytest
import webdataset as wds

from pogdiff.data.shards import (DatasetIndex, Sample, ShardWriter, UnsupportedTar, encode_sample, npy_load, read_tar,
                                 read_task_record, write_index, write_task)
from pogdiff.data.stream import SkipAndLog, tar_samples


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


LONG_KEY = "long/" + "k" * 120  # a name over 100 bytes: a pax path record, a GNU long name


def tarfile_members(blob):
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf if m.isreg()]


def fast_members(blob):
    return [(m["fname"], m["data"]) for m in read_tar(io.BytesIO(blob))]


def tar_member(name, data, kind=tarfile.REGTYPE, fmt=tarfile.USTAR_FORMAT, patch=None):
    """One member's bytes as tarfile writes them (extended headers, header, padded data); ``patch``
    edits the header in place, whose checksum is then redone."""
    info = tarfile.TarInfo(name)
    info.size, info.type = len(data), kind
    blocks = bytearray(info.tobuf(format=fmt))
    header = blocks[-512:]
    if patch is not None:
        patch(header)
        header[148:156] = b" " * 8
        header[148:155] = b"%06o\0" % sum(header)
    return bytes(blocks[:-512] + header) + data + bytes(-len(data) % 512)


def webdataset_pax_shard(path, samples):
    with wds.TarWriter(str(path)) as sink:  # tarfile's PAX_FORMAT: every member gets a pax header (float mtime)
        for s in samples:
            sink.write({"__key__": s.key, **encode_sample(s)})
    return path.read_bytes()


def test_fast_reader_reads_pax_and_gnu_tars(tmp_path):
    samples = make_samples(4)
    samples[2].key = LONG_KEY
    pax = webdataset_pax_shard(tmp_path / "pax.tar", samples)
    assert b"path=" + LONG_KEY.encode() in pax
    assert fast_members(pax) == tarfile_members(pax) and len(fast_members(pax)) == 4 * 6  # 5 payloads + crc32

    with tarfile.open(tmp_path / "gnu.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in ((LONG_KEY + ".json", b"{}"), ("k1.json", b"[1]")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in (tarfile.TarInfo("a-dir"), tarfile.TarInfo("a-link")):  # not files: skipped
            info.type = tarfile.DIRTYPE if info.name == "a-dir" else tarfile.SYMTYPE
            info.linkname = LONG_KEY if info.issym() else ""  # a long link name: a GNU 'K' header
            tf.addfile(info)
    gnu = (tmp_path / "gnu.tar").read_bytes()
    assert gnu.count(b"././@LongLink") == 2  # the long name, the long link name
    assert fast_members(gnu) == tarfile_members(gnu) == [(LONG_KEY + ".json", b"{}"), ("k1.json", b"[1]")]

    def base256_size(header):
        header[124:136] = b"\x80" + int(header[124:136].strip(b"\0 "), 8).to_bytes(11, "big")
    big = tar_member("k2.json", b"x" * 700, fmt=tarfile.GNU_FORMAT, patch=base256_size) + bytes(1024)
    assert fast_members(big) == tarfile_members(big) == [("k2.json", b"x" * 700)]


def test_truncated_or_corrupt_pax_shard_is_an_error(tmp_path):
    url = tmp_path / "pax.tar"
    blob = webdataset_pax_shard(url, make_samples(3))
    for cut in (512 + 40, 1024 + 10, 1536 + 50):  # inside the pax records, the header, the data
        with pytest.raises(tarfile.ReadError, match="truncated"):
            list(read_tar(io.BytesIO(blob[:cut])))
    second = blob.index(b"k00001.") - 1024  # k00001's first member: pax header, pax records, its header
    url.write_bytes(blob[:second + 512 + 40])
    handler = SkipAndLog(max_consecutive=10)
    got = list(tar_samples(iter([str(url)]), handler, expected={str(url): 3}))
    assert [g["__key__"] for g in got] == ["k00000"] and handler.take()[0] == 2
    bad = bytearray(blob)
    bad[512:515] = b"999"  # a pax record's length beyond its header
    with pytest.raises(tarfile.ReadError, match="corrupt pax header"):
        list(read_tar(io.BytesIO(bytes(bad))))


def gnu_sparse_member(name, data, hole):
    """An old-GNU sparse file ('S'): ``hole`` zero bytes, then ``data``; only ``data`` is stored."""
    def sparse_map(header):
        header[386:410] = b"%011o\0%011o\0" % (hole, len(data))  # the one stored region: offset, bytes
        header[483:495] = b"%011o\0" % (hole + len(data))  # the file's real size
    return tar_member(name, data, tarfile.GNUTYPE_SPARSE, tarfile.GNU_FORMAT, patch=sparse_map)


def test_unreadable_member_falls_back_to_webdataset_reader(tmp_path, caplog):
    samples = make_samples(5)
    files = [(f"{s.key}.{ext}", data) for s in samples for ext, data in encode_sample(s).items()]
    middle = files.index((f"{samples[2].key}.json", encode_sample(samples[2])["json"]))
    members = [tar_member(name, data) for name, data in files]
    members.insert(middle, gnu_sparse_member(f"{samples[2].key}.hole", b"end", 600))  # inside sample 2
    blob = b"".join(members) + bytes(1024)
    assert tarfile_members(blob)[middle] == (f"{samples[2].key}.hole", bytes(600) + b"end")
    with pytest.raises(UnsupportedTar):
        list(read_tar(io.BytesIO(blob)))

    url = tmp_path / "sparse.tar"
    url.write_bytes(blob)
    handler = SkipAndLog(max_consecutive=10)
    with caplog.at_level(logging.INFO, logger="pogdiff.stream"):
        got = list(tar_samples(iter([str(url)] * 2), handler, expected={str(url): 5}))
    assert [g["__key__"] for g in got] == [s.key for s in samples] * 2, "a sample was lost or read twice"
    assert all(set(g) == {"__key__", "__url__", "latent.npy", "tokens.npy", "pooled.npy", "imgemb.npy", "json", "crc32"}
               for g in got if g["__key__"] != samples[2].key)
    assert got[2]["hole"] == bytes(600) + b"end" and got[2]["json"] == encode_sample(samples[2])["json"]
    assert handler.take()[0] == 0 and caplog.text.count("webdataset's tar reader") == 2  # once per shard read

    # tarfile ends quietly at a broken header; the samples it did not read are still counted
    url.write_bytes(blob[:blob.index(f"{samples[4].key}.".encode()) + 20])
    got = list(tar_samples(iter([str(url)]), handler, expected={str(url): 5}))
    assert [g["__key__"] for g in got] == [s.key for s in samples[:4]] and handler.take()[0] == 1


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


def test_identity_counts_and_minority_split_read_the_column_in_chunks(tmp_path):
    """Counted a chunk at a time (no O(N) sort), and the split is one flag per identity, read per row."""
    from pogdiff.data.shards import DatasetIndex

    rng = np.random.default_rng(3)
    identities = rng.choice(np.r_[-1, np.arange(40)], size=5000, p=np.r_[0.05, np.full(40, 0.95 / 40)])
    identities[identities == 7] = 8  # an identity with no row
    np.save(tmp_path / "identities.npy", identities.astype(np.int64))
    index = DatasetIndex(tmp_path, {"num_samples": len(identities)}, np.load(tmp_path / "identities.npy", mmap_mode="r"),
                         None, None, None)
    ids, counts = np.unique(identities, return_counts=True)
    want = dict(zip(ids.tolist(), counts.tolist()))
    assert index.identity_counts() == want
    small = index._identity_bincount(chunk_rows=333)
    assert dict(enumerate(small[0].tolist())) | {-1: small[1]} == {i: want.get(i, 0) for i in range(-1, 40)}

    few = sorted(counts[ids >= 0])[10]
    split = index.is_minority(int(few))
    table = {i: c for i, c in want.items() if i >= 0}
    expected = np.array([i >= 0 and table[i] <= few for i in identities])
    np.testing.assert_array_equal(split[:].numpy(), expected)
    rows = rng.integers(0, len(identities), 64)
    np.testing.assert_array_equal(split[rows].numpy(), expected[rows])
    assert len(split) == len(identities) and 0 < expected.sum() < len(expected)
