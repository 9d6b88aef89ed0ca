"""pogdiff.npyrows: .npy files written and read by rows without a memory map."""
from pathlib import Path

import numpy as np
import pytest

from pogdiff.npyrows import NpyWriter, read_rows


def resident_mb() -> float:
    """This process's resident set (anonymous + file-mapped), MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024


@pytest.mark.parametrize("dtype,shape", [(np.float32, (37, 5)), (np.int64, (11,)), (np.bool_, (9, 3)),
                                         (np.float16, (4, 2, 3))])
def test_rows_in_any_order_make_the_array_np_load_reads(tmp_path, dtype, shape):
    rng = np.random.default_rng(0)
    want = (rng.standard_normal(shape) * 10).astype(dtype)
    path = tmp_path / "x.npy"
    with NpyWriter(path, dtype, shape) as out:
        n = shape[0]
        out[n // 2:] = want[n // 2:]                       # a slice, the back half first
        rows = rng.permutation(n // 2)                     # the front half as scattered rows, some consecutive
        out[rows[:3]] = want[rows[:3]]
        out[list(rows[3:])] = want[rows[3:]]
    got = np.load(path)
    assert got.dtype == np.dtype(dtype) and got.shape == shape
    np.testing.assert_array_equal(got, want)
    for a, b in [(0, shape[0]), (3, 7), (5, 5), (shape[0] - 1, shape[0] + 10)]:
        np.testing.assert_array_equal(read_rows(path, a, b), want[a:b])


def test_append_writes_front_to_back_and_close_checks_the_count(tmp_path):
    want = np.arange(30, dtype=np.int64).reshape(10, 3)
    out = NpyWriter(tmp_path / "a.npy", np.int64, (10, 3))
    out.append(want[:4])
    out.append(want[4:])
    with pytest.raises(ValueError, match="more than the 10 rows"):
        out.append(want[:1])
    out.close()
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), want)

    short = NpyWriter(tmp_path / "b.npy", np.int64, (10, 3))
    short.append(want[:9])
    with pytest.raises(ValueError, match="9 rows written, 10 declared"):
        short.close()


def test_bad_blocks_and_rows_are_refused(tmp_path):
    with NpyWriter(tmp_path / "c.npy", np.float32, (5, 2)) as out:
        with pytest.raises(ValueError, match="shape"):
            out[0:2] = np.zeros((2, 3))
        with pytest.raises(IndexError, match="outside"):
            out[[4, 5]] = np.zeros((2, 2))
        out[0:5] = np.ones((5, 2))
    # an error inside the block closes the file without the count check, and the error is the one raised
    with pytest.raises(KeyError):
        with NpyWriter(tmp_path / "d.npy", np.float32, (5, 2)) as out:
            out[0:1] = np.ones((1, 2))
            raise KeyError("boom")


def test_rows_written_and_read_do_not_stay_resident(tmp_path):
    """What the module is for: a memory map of the same file would keep all of it in the RSS."""
    rows, dim = 64 * 1024, 256  # 64 MiB of float32
    block = np.ones((4096, dim), np.float32)
    path = tmp_path / "big.npy"
    before = resident_mb()
    with NpyWriter(path, np.float32, (rows, dim)) as out:
        for a in range(0, rows, len(block)):
            out[a:a + len(block)] = block
    total = 0.0
    for a in range(0, rows, len(block)):
        total += float(read_rows(path, a, a + len(block))[:, 0].sum())
    assert total == rows
    assert resident_mb() - before < 24

    mapped = np.load(path, mmap_mode="r")
    assert float(mapped[:, 0].sum() + mapped[:, -1].sum()) == 2 * rows  # touches every page
    assert resident_mb() - before > 48  # the map's pages stay: the contrast the module avoids


def test_npyrows_gathers_any_rows_like_numpy_indexing(tmp_path):
    import torch

    from pogdiff.npyrows import NpyRows

    want = np.arange(60, dtype=np.float32).reshape(20, 3)
    np.save(tmp_path / "t.npy", want)
    rows = NpyRows(tmp_path / "t.npy")
    assert len(rows) == 20 and rows.shape == (20, 3)
    for index in ([5, 1, 2, 3, 19, 5], np.array([[0, 7], [7, 0]]), torch.tensor([4, 4, 18]), [], 6, -1):
        np.testing.assert_array_equal(rows[index], want[np.asarray(index, dtype=np.int64)])
    np.testing.assert_array_equal(rows[3:11], want[3:11])
    with pytest.raises(IndexError, match="outside"):
        rows[[0, 20]]
    np.save(tmp_path / "v.npy", want[:, 0].astype(np.int64))
    column = NpyRows(tmp_path / "v.npy")
    assert column[7] == 21 and column[7].shape == () and column[[7]].shape == (1,)
