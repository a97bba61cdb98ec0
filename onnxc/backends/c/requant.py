"""Requantization of the int8 kernels: how an int32 accumulator becomes an int8 output, computed
as onnxruntime computes it.

onnxruntime runs a QDQ model's quantized ops on integers (QLinearConv, QGemm,
QLinearGlobalAveragePool; MLAS `MlasRequantizeOutput`): the int32 accumulator (bias included) is
converted to float, multiplied by the channel's scale in single precision, clamped to the output
range and rounded to nearest, ties to even; then the zero point is added. The scale is itself a
float32, computed in float32 as (x_scale * w_scale) / y_scale (`mlas_scale`). A fixed-point
multiplier rounds the exact product instead, which differs wherever the float32 product lands
within its rounding error of half a step: rare, but a deep network carries such a one-step
difference in an early layer to its outputs and grows it. So every int8 kernel requantizes with
the same float32 operations (on the Cortex-M4's single-precision FPU: VCVT, VMUL, VCVTR), and the
C build agrees with onnxruntime's int8 model bit for bit.

The fast kernels (onnxc_qconv.c) read one table per layer (`channel_table`) holding each output
channel's int32 bias and float32 scale. An int8 layer's weights take a quarter of the float
layer's, but a bias and a scale add 8 bytes per channel, more than the weights themselves in a 3x3
depthwise layer (9 bytes). So one 32-bit word holds both whenever they fit: the bias in as few
bits as the layer's biases need, the scale's exponent as an offset from the layer's smallest (in
`delta` low bits), and the scale's mantissa in the bits left between (at most 23), provided its
lower bits are zero, so that packing never moves an output. The C int8 flow makes them so by
snapping the weight scales (`scale_snap`); other layers keep {bias, float32 bits} pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_MANTISSA = 15  # stored mantissa bits (below the leading one) a packed scale may keep at least
MAX_DELTA = 5      # exponent offset bits at most


def mlas_scale(x_scale: float, w_scale: np.ndarray, y_scale: float) -> np.ndarray:
    """Per channel float32 (x_scale * w_scale) / y_scale, each step rounded to float32 as
    onnxruntime's QLinearConv and QGemm compute their output scales."""
    prod = np.float32(x_scale) * np.asarray(w_scale, dtype=np.float32).reshape(-1)
    return (prod.astype(np.float32) / np.float32(y_scale)).astype(np.float32)


def pool_scale(x_scale: float, y_scale: float, count: int) -> np.float32:
    """QLinearGlobalAveragePool's scale: x_scale / (y_scale * count) in float32 (the average is the
    sum minus count * x_zero_point, times this scale)."""
    return np.float32(np.float32(x_scale) / np.float32(np.float32(y_scale) * np.float32(count)))


def requantize(acc: np.ndarray, scale: np.ndarray, zp: int, lo: int, hi: int) -> np.ndarray:
    """What the kernels compute (numpy, for tests): zp + round_half_even(float32(acc) * scale),
    clamped to [lo, hi]."""
    v = np.asarray(acc).astype(np.float32) * np.asarray(scale, dtype=np.float32)
    v = np.clip(v, np.float32(lo - zp), np.float32(hi - zp)).astype(np.float32)
    return (np.rint(v).astype(np.int64) + zp)


def signed_bits(values: np.ndarray) -> int:
    """Bits of the two's complement field that holds every value (at least 2)."""
    lo, hi = int(values.min(initial=0)), int(values.max(initial=0))
    return max(2, (hi).bit_length() + 1, (-lo - 1).bit_length() + 1)


@dataclass(frozen=True)
class Layout:
    """How a layer's channels pack: bias bits, exponent offset bits, mantissa bits kept (the rest
    must be zero) and the smallest biased exponent."""

    bias_bits: int
    delta_bits: int
    mantissa_bits: int
    exp0: int


def _parts(scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bits = np.asarray(scale, dtype=np.float32).reshape(-1).view(np.uint32).astype(np.int64)
    return bits >> 23, bits & ((1 << 23) - 1)  # biased exponent (sign 0), stored mantissa


def room(bias: np.ndarray, scale: np.ndarray) -> Layout | None:
    """The packing a layer's int64 biases and float32 scales leave room for (the mantissa bits are
    what is left, whether or not the scales fit them), or None: scales not positive normal
    numbers, or fewer than MIN_MANTISSA bits left."""
    bias, scale = np.asarray(bias, dtype=np.int64).reshape(-1), np.asarray(scale, dtype=np.float32).reshape(-1)
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        return None
    exp, _ = _parts(scale)
    if exp.min() == 0:
        return None
    b, span = signed_bits(bias), int(exp.max() - exp.min())
    d = next((d for d in range(MAX_DELTA + 1) if span < 1 << d), None)
    if d is None or 32 - b - d < MIN_MANTISSA:
        return None
    return Layout(b, d, min(23, 32 - b - d), int(exp.min()))


def fits(scale: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """Whether each float32 scale's mantissa has nothing below its `mantissa_bits` high bits."""
    _, mant = _parts(scale)
    return (mant & ((1 << (23 - mantissa_bits)) - 1)) == 0


@dataclass(frozen=True)
class ChannelTable:
    """One layer's `ch` table and the params fields that say how to read it."""

    words: np.ndarray  # int32: one per channel (packed) or bias, scale bits per channel (pairs)
    fields: dict       # pk_bias (0: pairs), pk_delta, pk_mant, pk_exp

    @property
    def packed(self) -> bool:
        return self.fields["pk_bias"] > 0


def channel_table(bias: np.ndarray, scale: np.ndarray) -> ChannelTable:
    """The table of a layer with int64 `bias` and float32 `scale` per channel (a single scale
    broadcast): packed when every scale's mantissa fits the room the biases leave (`scale_snap`
    makes them so), else pairs. Packing is exact: the kernels read back the same float32."""
    bias = np.asarray(bias, dtype=np.int64).reshape(-1)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float32).reshape(-1), bias.shape)
    if np.abs(bias).max(initial=0) >= 1 << 31:
        raise ValueError("int8 bias out of the int32 range")
    lay = room(bias, scale)
    if lay is not None and fits(scale, lay.mantissa_bits).all():
        b, d, mb = lay.bias_bits, lay.delta_bits, lay.mantissa_bits
        exp, mant = _parts(scale)
        word = ((bias << (32 - b)) | ((mant >> (23 - mb)) << (32 - b - mb)) | (exp - lay.exp0)) & 0xFFFFFFFF
        return ChannelTable(word.astype(np.uint32).view(np.int32),
                            {"pk_bias": b, "pk_delta": d, "pk_mant": mb, "pk_exp": lay.exp0})
    words = np.stack([bias, scale.astype(np.float32).view(np.int32).astype(np.int64)], axis=1)
    return ChannelTable(words.reshape(-1).astype(np.int32), {"pk_bias": 0, "pk_delta": 0, "pk_mant": 0, "pk_exp": 0})


def unpack(table: ChannelTable) -> tuple[np.ndarray, np.ndarray]:
    """(int64 biases, float32 scales) read back from a table as the kernels read it."""
    f, w = table.fields, table.words.astype(np.int64) & 0xFFFFFFFF
    if not table.packed:
        pairs = table.words.reshape(-1, 2)
        return pairs[:, 0].astype(np.int64), pairs[:, 1].copy().view(np.float32)
    b, d, mb = f["pk_bias"], f["pk_delta"], f["pk_mant"]
    signed = np.where(w >> 31, w - (1 << 32), w)
    mant = ((w << b) & 0xFFFFFFFF) >> (32 - mb)
    bits = ((f["pk_exp"] + (w & ((1 << d) - 1))) << 23) | (mant << (23 - mb))
    return signed >> (32 - b), bits.astype(np.uint32).view(np.float32)
