"""int8 weights kept as 4-bit codes with an int8 codebook per output channel.

A clustered layer (`passes/cluster`: W = codebook[codes], 16 values for 4 bits) reaches the int8
C backend as the dense int8 weight of the QDQ model, quantized per output channel: each row's
int8 values are the row's scale applied to the same 16 floats, so every row holds at most 16
distinct int8 values. Such a layer is stored as those values (16 int8 a row) and one 4-bit code
per weight, two a byte, low nibble first (the float backend's code order), and the kernels
decode a row at a time: the same int8 weights, so the same integer results, in about half the
flash. The codebook is per row because the scales are; any int8 weight with at most 16
values a row qualifies (that is what makes it exact), when it saves bytes.
"""

from __future__ import annotations

import numpy as np

CODEBOOK = 16  # entries a row (4-bit codes)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes two a byte, element i in the low nibble of byte i / 2 when i is even."""
    flat = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def row_codebooks(rows: np.ndarray, stored: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(codes [r][k] in [0, 16), codebook [r][16] int8) with rows[i][j] = codebook[i][codes[i][j]],
    when every row holds at most 16 distinct values and a row's codes with its codebook take fewer
    bytes than the row as stored (`stored` bytes, k by default); else None."""
    rows = np.asarray(rows)
    r, k = rows.shape
    stored = k if stored is None else stored
    if -(-stored // 2) + CODEBOOK >= stored:
        return None
    codes = np.zeros((r, k), np.uint8)
    book = np.zeros((r, CODEBOOK), np.int8)
    for i in range(r):
        values, idx = np.unique(rows[i], return_inverse=True)
        if values.size > CODEBOOK:
            return None
        book[i, :values.size] = values
        codes[i] = idx.reshape(-1)
    return codes, book
