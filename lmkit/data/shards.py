"""A split's token ids stored as one or more shard files (raw uint16/uint32), read as one stream.

Windows may cross from one shard into the next: the stream is the shards' concatenation, so the
guarantees of :mod:`lmkit.data.windows` (step-indexed training, every val token scored once)
do not depend on how a split was cut into shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class ShardedTokens:
    """The concatenation of token files, memory-mapped lazily; pickles as its paths, so
    DataLoader workers map the files themselves instead of receiving copies of the arrays."""

    def __init__(self, paths: Sequence[Path | str], dtype: str) -> None:
        if not paths:
            raise ValueError("a split needs at least one shard file")
        self.paths, self.dtype = [Path(p) for p in paths], dtype
        itemsize = np.dtype(dtype).itemsize
        sizes = [p.stat().st_size // itemsize for p in self.paths]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # [shards + 1]
        self._arrays: list[np.memmap] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def arrays(self) -> list[np.memmap]:
        if self._arrays is None:
            self._arrays = [
                np.memmap(p, dtype=self.dtype, mode="r") if n else np.zeros(0, self.dtype)
                for p, n in zip(self.paths, np.diff(self.starts), strict=True)
            ]
        return self._arrays

    def window(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream (clipped at its end), as one array."""
        stop = min(stop, len(self))
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            a = start - int(self.starts[first])
            take = min(stop, int(self.starts[first + 1])) - start
            pieces.append(self.arrays[first][a : a + take])
            start += take
            first += 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)

    def files_in(self, start: int, stop: int) -> list[str]:
        """The names of the shard files that tokens [start, stop) come from."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop, side="left"))
        return [p.name for p in self.paths[max(first, 0) : last]]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self.window(0, len(self))
        return out.astype(dtype) if dtype is not None else out

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}
