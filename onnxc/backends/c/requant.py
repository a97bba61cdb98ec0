"""Requantization parameters of the int8 kernels: how an int32 accumulator becomes an int8 output.

Every quantized layer maps acc (in units of input scale x weight scale) to
y = zero_point + round(acc * real) with real = input scale * weight scale / output scale, one
real per output channel, as an integer multiplier and a right shift.

- The generic kernels (weight zero points, raw int32 sums) read `fixed_point` words: a 25-bit
  multiplier and a 6-bit shift in one int32, rounding ties to even.
- The fast kernels (onnxc_qconv.c) read one table per layer (`channel_table`) holding each output
  channel's bias and multiplier, and round half up. An int8 layer's weights take a quarter of the
  float layer's, but an int32 bias and a multiplier word add 8 bytes per channel, more than the
  weights themselves in a 3x3 depthwise layer (9 bytes): at 8 bytes DS-CNN's int8 weights are 0.30
  of its float ones. So one 32-bit word holds both whenever they fit: the bias in as few bits as
  the layer's biases need, the shift as an offset from the layer's smallest, and the multiplier's
  mantissa in the bits left (at least MIN_MANTISSA below its leading one), provided the mantissa
  holds the multiplier to float32 precision (EXACT), so that packing never moves an output. The C
  int8 flow makes that so by snapping the weight scales (`scale_snap`); other layers keep
  {bias, fixed_point word} pairs.

The fast kernels compute (hi32(acc * mult) + add) >> (shift - 32); `channel_table` checks that
this cannot overflow for any accumulator the layer can produce and that shift - 32 is in
[1, 23], and otherwise marks the layer `rq_wide` (64-bit arithmetic for every channel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_MANTISSA = 15  # stored bits of a packed multiplier below its leading one
EXACT = 2.0 ** -23  # relative error up to which a packed multiplier counts as the layer's own (float32 epsilon)
FAST_SHIFTS = (33, 55)  # shift range of the fast path (shift - 32 in [1, 23])


def fixed_point(real: np.ndarray) -> np.ndarray:
    """Requantization words (onnxc_requant): a Q31 multiplier rounded to its 25 high bits, the
    right shift (in [1, 62]) in the 6 low bits, with real ~= multiplier / 2^shift."""
    mults, shifts = [], []
    for r in np.asarray(real, dtype=np.float64).reshape(-1):
        if r <= 0 or not np.isfinite(r):
            mults.append(0)
            shifts.append(1)
            continue
        frac, exp = math.frexp(r)  # r = frac * 2^exp, frac in [0.5, 1)
        mult = round(frac * (1 << 25)) << 6
        if mult == 1 << 31:
            mult, exp = mult // 2, exp + 1
        shift = 31 - exp
        if shift > 62:
            mult, shift = round(mult / 2.0 ** (shift - 62)) >> 6 << 6, 62
        if shift < 1:
            raise ValueError(f"requantization multiplier {r:g} is too large")
        mults.append(mult)
        shifts.append(shift)
    return np.array(mults, dtype=np.int64).astype(np.int32) | np.array(shifts, dtype=np.int32)


@dataclass(frozen=True)
class ChannelTable:
    """One layer's `ch` table and the params fields that say how to read it."""

    words: np.ndarray  # int32: one per channel (packed) or bias, rq per channel (pairs)
    fields: dict       # pk_bias (0: pairs), pk_delta, pk_shift, rq_wide

    @property
    def packed(self) -> bool:
        return self.fields["pk_bias"] > 0


def signed_bits(values: np.ndarray) -> int:
    """Bits of the two's complement field that holds every value (at least 2)."""
    lo, hi = int(values.min(initial=0)), int(values.max(initial=0))
    return max(2, (hi).bit_length() + 1, (-lo - 1).bit_length() + 1)


@dataclass(frozen=True)
class Layout:
    """How a layer's channels pack: bias bits, shift offset bits, mantissa bits below the leading
    one, and each channel's mantissa (leading one included) and shift at that precision."""

    bias_bits: int
    delta_bits: int
    mantissa_bits: int
    mantissa: np.ndarray  # int64, in [2^mantissa_bits, 2^(mantissa_bits + 1))
    shift: np.ndarray     # int64: real ~= mantissa * 2^(30 - mantissa_bits) / 2^shift

    @property
    def real(self) -> np.ndarray:
        """The multipliers the packed words hold."""
        return np.ldexp(self.mantissa.astype(np.float64), (30 - self.mantissa_bits - self.shift).astype(np.int32))


def layout(bias: np.ndarray, real: np.ndarray) -> Layout | None:
    """The packing of a layer's int64 biases and positive multipliers, or None when the biases
    leave fewer than MIN_MANTISSA bits."""
    bias, real = np.asarray(bias, dtype=np.int64).reshape(-1), np.asarray(real, dtype=np.float64).reshape(-1)
    if not ((real > 0).all() and np.isfinite(real).all()):
        return None
    b = signed_bits(bias)
    frac, exp = np.frexp(real)  # real = frac * 2^exp, frac in [0.5, 1)
    for d in range(6):
        mb = 32 - b - d
        if mb < MIN_MANTISSA:
            return None
        q = np.rint(frac * 2.0 ** (mb + 1)).astype(np.int64)  # mantissa with its leading one, in [2^mb, 2^(mb+1)]
        e = exp.astype(np.int64) + (q >> (mb + 1))
        q = np.where(q >> (mb + 1) > 0, q >> 1, q)
        shift = 31 - e
        if int(shift.max() - shift.min()) < 1 << d:
            return Layout(b, d, mb, q, shift)
    return None


def channel_table(bias: np.ndarray, real: np.ndarray, acc_bound: np.ndarray, y_zp: int) -> ChannelTable:
    """The table of a layer with int64 `bias` and float64 `real` per channel, whose accumulators
    (bias included) stay within +-acc_bound, writing outputs with zero point y_zp. Packed only when
    the mantissa holds each multiplier to float32 precision (EXACT; `snap` makes them so), so that
    packing never costs accuracy; else pairs with 25-bit multipliers."""
    bias = np.asarray(bias, dtype=np.int64).reshape(-1)
    real = np.broadcast_to(np.asarray(real, dtype=np.float64).reshape(-1), bias.shape)
    bound = np.broadcast_to(np.asarray(acc_bound, dtype=np.int64).reshape(-1), bias.shape)
    if np.abs(bias).max(initial=0) >= 1 << 31:
        raise ValueError("int8 bias out of the int32 range")
    lay = layout(bias, real)
    if lay is not None and (np.abs(lay.real / real - 1) <= EXACT).all():
        mult = lay.mantissa << (30 - lay.mantissa_bits)
        if _fast(mult, lay.shift, bound, y_zp):
            b, d, mb, s0 = lay.bias_bits, lay.delta_bits, lay.mantissa_bits, int(lay.shift.min())
            word = ((bias << (32 - b)) | ((lay.mantissa - (1 << mb)) << d) | (lay.shift - s0)) & 0xFFFFFFFF
            return ChannelTable(word.astype(np.uint32).view(np.int32),
                                {"pk_bias": b, "pk_delta": d, "pk_shift": s0, "rq_wide": 0})
    rq = fixed_point(real)
    shift = rq & 63
    mult = (rq - shift).astype(np.int64)
    wide = not _fast(mult, shift.astype(np.int64), bound, y_zp)
    words = np.stack([bias, rq.astype(np.int64)], axis=1).reshape(-1).astype(np.int32)
    return ChannelTable(words, {"pk_bias": 0, "pk_delta": 0, "pk_shift": 0, "rq_wide": int(wide)})


def _fast(mult: np.ndarray, shift: np.ndarray, bound: np.ndarray, y_zp: int) -> bool:
    """Whether (hi32(acc * mult) + add) >> t stays in int32 for |acc| <= bound, 32 < shift <= 55."""
    if shift.min() < FAST_SHIFTS[0] or shift.max() > FAST_SHIFTS[1]:
        return False
    t = shift - 32
    hi = (bound * mult >> 32) + 1
    add = (1 << (t - 1)) + abs(y_zp) * (1 << t)
    return bool((hi + add < 1 << 31).all())
