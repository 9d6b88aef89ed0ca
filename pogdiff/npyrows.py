""".npy files read and written a block of rows at a time with positional file I/O, never a memory map.

Every page a memory map has touched stays in the process's resident set until the map is closed,
so a process that fills or scans an N-row table through one shows an RSS of O(N), which is what
ps, psutil and the issue's memory bar measure. pread/pwrite leave the file's pages in the page
cache, outside the process. Measured on the
10^6-record scale benchmark (benchmarks/RESULTS.md): eval's cache of training embeddings written
through a map added its whole 244 MB to eval's peak RSS.

    out = NpyWriter(path, np.float32, (n, d))   # the file at full size; rows not yet written read 0
    out[a:b] = block; out[rows] = block         # a slice, or any rows in any order
    out.append(block)                           # front to back
    out.close()                                 # complete=True (default): every row written once
    read_rows(path, a, b)                       # rows [a, b) as a new array
    rows = NpyRows(path); rows[idx]             # any rows (an index array, in any order), or a slice
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _header(path: str | Path) -> tuple[int, np.dtype, tuple]:
    """(offset of the data, dtype, shape) of a C-order .npy file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise ValueError(f"{path}: a Fortran-order array cannot be read by rows")
        return f.tell(), dtype, shape


def _pread_into(fd: int, out: np.ndarray, position: int, path) -> None:
    view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], position + done)
        if got == 0:
            raise ValueError(f"{path}: ends before the rows its header declares")
        done += got


def read_rows(path: str | Path, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the .npy at ``path`` (clipped to its length), read with pread."""
    return NpyRows(path)[start:stop]


class NpyRows:
    """The rows of a C-order .npy, read from the file when indexed: ``rows[a:b]``, ``rows[i]`` or
    ``rows[index]`` (an integer array, numpy or torch, any order, repeats allowed) is a new array.
    Picklable (by path)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.offset, self.dtype, self.shape = _header(path)
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        n = self.shape[0]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if isinstance(key, slice):
                start, stop, step = key.indices(n)
                if step != 1:
                    raise ValueError(f"{self.path}: rows are read in slices of step 1")
                out = np.empty((max(0, stop - start), *self.shape[1:]), self.dtype)
                _pread_into(fd, out, self.offset + start * self.row_bytes, self.path)
                return out
            index = np.asarray(key.cpu() if hasattr(key, "cpu") else key, dtype=np.int64)
            rows = np.where(index < 0, index + n, index).reshape(-1)
            if len(rows) and (rows.min() < 0 or rows.max() >= n):
                raise IndexError(f"{self.path}: rows outside [0, {n})")
            wanted, back = np.unique(rows, return_inverse=True)
            got = np.empty((len(wanted), *self.shape[1:]), self.dtype)
            # consecutive rows come in one read
            breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
            for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(wanted)]) if len(wanted) else ():
                _pread_into(fd, got[a:b], self.offset + int(wanted[a]) * self.row_bytes, self.path)
            return got[back.reshape(-1)].reshape(index.shape + self.shape[1:])
        finally:
            os.close(fd)


class NpyWriter:
    """A C-order .npy of ``shape`` and ``dtype`` at ``path``, written by rows (see the module)."""

    def __init__(self, path: str | Path, dtype, shape: tuple):
        self.path, self.dtype, self.shape = Path(path), np.dtype(dtype), tuple(int(s) for s in shape)
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        self.rows_written = 0  # rows handed to write, counted with multiplicity
        with open(self.path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                     "fortran_order": False, "shape": self.shape})
            self.offset = f.tell()
            f.truncate(self.offset + self.shape[0] * self.row_bytes)
        self.fd = os.open(self.path, os.O_WRONLY)

    def _block(self, block, rows: int) -> bytes:
        data = np.ascontiguousarray(block, dtype=self.dtype)
        if data.shape != (rows, *self.shape[1:]):
            raise ValueError(f"{self.path.name}: a block of shape {data.shape} for {rows} rows of {self.shape[1:]}")
        return data.tobytes()

    def _pwrite(self, first_row: int, data: bytes) -> None:
        view, done = memoryview(data), 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.offset + first_row * self.row_bytes + done)

    def __setitem__(self, key, block) -> None:
        n = self.shape[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise ValueError(f"{self.path.name}: rows are written in slices of step 1")
            self._pwrite(start, self._block(block, max(0, stop - start)))
            self.rows_written += max(0, stop - start)
            return
        rows = np.asarray(key, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"{self.path.name}: rows outside [0, {n})")
        data = self._block(block, len(rows))
        if not len(rows):
            return
        data = np.frombuffer(data, self.dtype).reshape(len(rows), *self.shape[1:])
        order = np.argsort(rows, kind="stable")
        rows, data = rows[order], data[order]
        # consecutive rows go out in one write
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
            self._pwrite(int(rows[a]), data[a:b].tobytes())
        self.rows_written += len(rows)

    def append(self, block) -> None:
        start = self.rows_written
        rows = len(block)
        if start + rows > self.shape[0]:
            raise ValueError(f"{self.path}: more than the {self.shape[0]} rows declared")
        self[start:start + rows] = block

    def close(self, complete: bool = True) -> None:
        """Close the file; ``complete``: a ValueError unless as many rows were written as declared."""
        if self.fd < 0:
            return
        os.close(self.fd)
        self.fd = -1
        if complete and self.rows_written != self.shape[0]:
            raise ValueError(f"{self.path}: {self.rows_written} rows written, {self.shape[0]} declared")

    def __enter__(self) -> "NpyWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        self.close(complete=kind is None)
