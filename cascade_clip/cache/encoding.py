"""How the cache stores a row's features (`cache.encoding`) and how a stored row is checked
(docs/design.md: Feature cache).

Every tapped token is L2-normalised (cascade_clip.model.encoder), so its scale carries no
information and need not be stored:

- `fp16`: the token as is, 2 bytes a channel.
- `int8`: `round(127 x / max|x|)` per token, 1 byte a channel and no scale: the reader
  divides the integers by their own L2 norm, which gives back the unit vector up to
  rounding. Half of fp16's bytes (a per-token scale would add 2-4 bytes a token for
  nothing); on ViT-B/16 tokens the error is ~0.7% of the norm where fp8 (e4m3) at the same
  bytes gives ~2.6% (benchmarks/NOTES.md, Feature cache, Encoding).

The global token (C values a row) stays fp16 in both. Rows are decoded where the batch is
used (`decode`, on the training device), so the host reads and moves the stored bytes.

Each row also stores a CRC-32 of its stored taps and global token, computed before the
write: int8 has no invalid values, so only the checksum shows a row that changed on disk.
`check_rows` recomputes it and checks the values (the shard writer on every row before it
renames the shard into place; `cache-verify` on every row or a sample).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

ENCODINGS = ("fp16", "int8")
STORED_DTYPE = {"fp16": np.float16, "int8": np.int8}
INT8_PEAK = 127
# |norm - 1| a stored fp16 row may show (fp16 rounding of unit vectors is ~1e-4).
NORM_TOLERANCE = 1e-2


def stored_dtype(encoding: str) -> np.dtype:
    return np.dtype(STORED_DTYPE[encoding])


def bytes_per_value(encoding: str) -> int:
    return stored_dtype(encoding).itemsize


def encode(tokens: torch.Tensor, encoding: str) -> torch.Tensor:
    """L2-normalised tokens (..., C), any float dtype -> their stored form, on the same device."""
    if encoding == "fp16":
        return tokens.to(torch.float16)
    if encoding == "int8":
        x = tokens.float()
        peak = x.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return torch.round(x * (INT8_PEAK / peak)).to(torch.int8)
    raise ValueError(f"unknown cache encoding {encoding!r} (one of {ENCODINGS})")


def decode(stored: torch.Tensor) -> torch.Tensor:
    """Stored tokens (..., C) -> float32 unit vectors; the stored dtype names the encoding."""
    x = stored.float()
    if stored.dtype == torch.int8:
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1.0)  # an int8 token's norm is >= 127
    return x


def token_errors(stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored tokens (n, ..., C) -> per leading index (a row): (bad, |norm - 1|).

    int8: bad where a token's largest |value| is not exactly 127 (the encoder puts every
    token's peak there, so a zeroed or overwritten chunk shows); its norm error is 0 (decoded
    tokens are unit vectors by construction). fp16: bad where a value is not finite or a
    token's |norm - 1| exceeds NORM_TOLERANCE (err NaN or inf for non-finite values)."""
    n = stored.shape[0]
    if stored.dtype == np.int8:
        flat = stored.reshape(n, -1, stored.shape[-1])
        peak = np.maximum(flat.max(axis=-1).astype(np.int16), -flat.min(axis=-1).astype(np.int16))
        return (peak != INT8_PEAK).any(axis=1), np.zeros(n)
    # A non-finite value makes its token's norm NaN or inf, which amax keeps (no isfinite
    # pass: on fp16 rows it costs twice the norm); torch converts fp16 faster than numpy.
    x = torch.from_numpy(stored.reshape(n, -1, stored.shape[-1]))
    err = (torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32) - 1).abs().amax(dim=1).numpy()
    return ~(err <= NORM_TOLERANCE), err


def describe_error(stored_row: np.ndarray) -> str:
    """What `token_errors` found wrong with one row, in words."""
    if stored_row.dtype == np.int8:
        peak = np.abs(stored_row.reshape(-1, stored_row.shape[-1]).astype(np.int16)).max(axis=-1)
        return f"has a token whose largest int8 value is {int(peak[peak != INT8_PEAK][0])}, not {INT8_PEAK}"
    x = stored_row.astype(np.float32)
    if not np.isfinite(x).all():
        return "holds non-finite values"
    return f"is not L2-normalised (|norm - 1| = {float(np.abs(np.linalg.norm(x, axis=-1) - 1).max()):.3g})"


def row_checksum(taps: np.ndarray, global_token: np.ndarray) -> int:
    """CRC-32 of one row's stored bytes: taps (L, N, C), then the global token (C,)."""
    return zlib.crc32(np.ascontiguousarray(global_token), zlib.crc32(np.ascontiguousarray(taps)))


# Rows read at once when checking: runs of consecutive rows, about 64 MB of ViT-B/16 taps.
CHECK_BATCH_BYTES = 1 << 26


def check_rows(
    f: h5py.File, path: str | Path, rows: Sequence[int], on_rows: Callable[[int], None] | None = None
) -> float:
    """Check stored rows `rows` (increasing) of an open shard: each row's checksum, then its
    taps' and global token's values (`token_errors`). Reads runs of consecutive rows at once;
    `on_rows(n)` after each run. Returns the largest |norm - 1| of the taps (0 for int8);
    raises CacheError naming the file and the first bad row."""
    from cascade_clip.cache.provenance import CacheError

    taps, glob, sums = f["taps"], f["global_token"], f["checksum"]
    per_row = max(1, int(np.prod(taps.shape[1:])) * taps.dtype.itemsize)
    worst = 0.0
    for start, stop in _runs(rows, max(1, CHECK_BATCH_BYTES // per_row)):
        try:
            t, g, c = taps[start:stop], glob[start:stop], sums[start:stop]
        except OSError as err:
            what = f"rows {start}..{stop - 1} unreadable, truncated or corrupt ({err})"
            raise CacheError(f"{path}: {what}") from None
        for k in range(stop - start):
            if row_checksum(t[k], g[k]) != int(c[k]):
                raise CacheError(f"{path}: row {start + k} differs from what was written (checksum): "
                                 "the file is corrupt; remove it and write it again")
        for name, values in (("taps", t), ("global token", g[:, None])):
            bad, err = token_errors(values)
            if bad.any():
                k = int(np.flatnonzero(bad)[0])
                raise CacheError(f"{path}: row {start + k} {name} {describe_error(values[k])}")
            if name == "taps":
                worst = max(worst, float(err.max()))
        if on_rows is not None:
            on_rows(stop - start)
    return worst


def _runs(rows: Sequence[int], step: int) -> list[tuple[int, int]]:
    """Increasing rows -> [start, stop) runs of consecutive rows, each at most `step` long."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r and r - runs[-1][0] < step:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs
